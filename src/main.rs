//! The `virtplan` binary: everything lives in the library; this only maps the outcome to an exit code.

fn main() {
    virtplan::hypervisor::libvirt::silence_stderr_printer();
    let status = virtplan::run(std::env::args_os());
    std::process::exit(status.code());
}
