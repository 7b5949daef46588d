//! Shared test rigs.

pub mod qemu;
