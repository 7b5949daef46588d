#!/usr/bin/env bash
# Sets up a local libvirtd, builds virtplan, defines a small diskless demo domain `web-01`
# (only if no domain of that name exists), then validates the examples and plans the classic
# maintenance window against it. Nothing is applied.
set -euo pipefail
cd "$(dirname "$0")/.."
URI=qemu:///system

if [[ $(id -u) -eq 0 ]]; then scripts/setup-libvirt.sh; else sudo scripts/setup-libvirt.sh; fi
cargo build --release --quiet
VIRTPLAN=target/release/virtplan

if ! virsh -c "$URI" dominfo web-01 >/dev/null 2>&1; then
    type=qemu
    [[ -w /dev/kvm ]] && type=kvm
    xml=$(mktemp)
    cat >"$xml" <<XML
<domain type='$type'>
  <name>web-01</name>
  <title>virtplan demo domain</title>
  <memory unit='MiB'>1024</memory>
  <currentMemory unit='MiB'>1024</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <clock offset='utc'><timer name='rtc' track='wall'/></clock>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
XML
    virsh -c "$URI" define "$xml" >/dev/null
    rm -f "$xml"
    virsh -c "$URI" start web-01 >/dev/null
    echo "demo: defined and started the diskless domain web-01 (remove it with: virsh -c $URI destroy web-01; virsh -c $URI undefine web-01)"
fi

echo "== virtplan validate examples"
"$VIRTPLAN" validate examples/*.yaml examples/named-host/*.yaml
echo
echo "== virtplan plan examples/classic-window.yaml"
"$VIRTPLAN" plan examples/classic-window.yaml
