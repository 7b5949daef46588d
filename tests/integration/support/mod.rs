//! Shared test rigs.

pub mod cli;
pub mod guest;
pub mod helpers;
pub mod qemu;
pub mod session;
