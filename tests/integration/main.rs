//! The one integration test binary: every module shares the built CLI and the test rigs.

mod apply;
mod filter;
mod fleet;
mod guest;
mod harden;
mod harden_daemon;
mod hosts;
mod layers;
mod lease;
mod lease_faults;
mod libvirt_adapter;
mod lifecycle;
mod notify;
mod ops;
mod plan;
mod rollout;
mod safe_windows;
mod support;
mod validate;
mod watch;
