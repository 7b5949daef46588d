//! libvirt through the `virt` crate: the only module that imports `virt`.

/// Stops libvirt from printing every handled error to stderr; call once before connecting.
pub fn silence_stderr_printer() {
    virt::error::clear_error_callback();
}
