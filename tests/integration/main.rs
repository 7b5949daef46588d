mod libvirt_adapter;
mod support;
