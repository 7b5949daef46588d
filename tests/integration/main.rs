mod libvirt_adapter;
mod plan;
mod support;
