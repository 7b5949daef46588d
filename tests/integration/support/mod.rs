//! Shared test rigs.

pub mod cli;
pub mod qemu;
