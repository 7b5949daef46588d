#!/usr/bin/env bash
# Sets up a local libvirtd, builds virtplan, defines a demo domain `web-01` running the test guest
# (only if no domain of that name exists), then validates the examples and plans the classic
# maintenance window against it. Nothing is applied.
set -euo pipefail
cd "$(dirname "$0")/.."
URI=qemu:///system

if [[ $(id -u) -eq 0 ]]; then scripts/setup-libvirt.sh; else sudo scripts/setup-libvirt.sh; fi
cargo build --release --quiet
VIRTPLAN=target/release/virtplan

if ! virsh -c "$URI" dominfo web-01 >/dev/null 2>&1; then
    # The real test guest (scripts/build-guest.sh): boots in seconds, answers ACPI and the guest
    # agent, balloons; its qcow2 disk takes snapshots.
    if [[ $(id -u) -eq 0 ]]; then guest=$(scripts/build-guest.sh); else guest=$(sudo scripts/build-guest.sh); fi
    type=$(cat "$guest/domain-type")
    images=/var/lib/libvirt/images
    disk=$images/virtplan-demo-web-01.qcow2
    # The domain's own copies: a later rebuild of the cache leaves it bootable.
    cp "$guest/vmlinuz" "$images/virtplan-demo-vmlinuz"
    cp "$guest/initrd.img" "$images/virtplan-demo-initrd.img"
    [[ -f $disk ]] || qemu-img create -q -f qcow2 "$disk" 64M
    xml=$(mktemp)
    cat >"$xml" <<XML
<domain type='$type'>
  <name>web-01</name>
  <title>virtplan demo domain</title>
  <memory unit='MiB'>1024</memory>
  <currentMemory unit='MiB'>1024</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$images/virtplan-demo-vmlinuz</kernel>
    <initrd>$images/virtplan-demo-initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'><timer name='rtc' track='wall'/></clock>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='virtio'/>
  </devices>
</domain>
XML
    virsh -c "$URI" define "$xml" >/dev/null
    rm -f "$xml"
    virsh -c "$URI" start web-01 >/dev/null
    echo "demo: defined and started web-01, the test guest (remove it with: virsh -c $URI destroy web-01; virsh -c $URI undefine web-01 --snapshots-metadata; rm $images/virtplan-demo-*)"
fi

echo "== virtplan validate examples"
"$VIRTPLAN" validate examples/*.yaml examples/named-host/*.yaml
echo
echo "== virtplan plan examples/classic-window.yaml"
"$VIRTPLAN" plan examples/classic-window.yaml
