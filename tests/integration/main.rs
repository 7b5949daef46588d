mod apply;
mod libvirt_adapter;
mod support;
