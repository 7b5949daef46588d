//! The `virtplan` binary: everything lives in the library; this only maps the outcome to an exit code.

/// See Cargo.toml: measured faster than the system allocator on large plans.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    virtplan::hypervisor::libvirt::silence_stderr_printer();
    let status = virtplan::run(std::env::args_os());
    std::process::exit(status.code());
}
