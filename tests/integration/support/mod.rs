//! Shared test rigs.

pub mod cli;
pub mod guest;
pub mod qemu;
