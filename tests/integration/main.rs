//! The one integration test binary: every module shares the built CLI and the test rigs.

mod apply;
mod lease;
mod libvirt_adapter;
mod plan;
mod support;
mod validate;
mod watch;
