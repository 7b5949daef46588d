#!/usr/bin/env bash
# Measures the test guest (scripts/build-guest.sh): a cold build into an empty cache against its
# floor (`apt-get download` of the same three packages), a cached run against its floor (one
# `apt-cache policy` call), and, RUNS times, a boot until the guest agent answers and an ACPI
# shutdown until libvirt reports it shut off. Root; libvirtd running (scripts/setup-libvirt.sh).
#
# Usage: sudo scripts/bench-guest.sh [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
URI=qemu:///system
scratch=$(mktemp -d)
name="vpt-bench-guest-$$"
cleanup() {
    virsh -q -c "$URI" destroy "$name" >/dev/null 2>&1 || true
    virsh -q -c "$URI" undefine "$name" >/dev/null 2>&1 || true
    rm -rf "$scratch"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.3f", a - b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }

chmod 0755 "$scratch"
mkdir "$scratch/debs" && chmod 0777 "$scratch/debs"
kernel=$(apt-cache show --no-all-versions linux-image-cloud-amd64 |
    sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -n 1)
t=$(now)
(cd "$scratch/debs" && apt-get download -q "$kernel" busybox-static qemu-guest-agent >/dev/null 2>&1)
floor_cold=$(since "$t")
t=$(now)
VIRTPLAN_GUEST_DIR="$scratch/cache" scripts/build-guest.sh >/dev/null 2>&1
cold=$(since "$t")
t=$(now)
apt-cache policy linux-image-cloud-amd64 busybox-static qemu-guest-agent >/dev/null
floor_cached=$(since "$t")
t=$(now)
guest=$(VIRTPLAN_GUEST_DIR="$scratch/cache" scripts/build-guest.sh 2>/dev/null)
cached=$(since "$t")
printf 'cold build      %6.2f s   floor (apt-get download) %6.2f s   ratio %5s\n' \
    "$cold" "$floor_cold" "$(ratio "$cold" "$floor_cold")"
printf 'cached run      %6.2f s   floor (apt-cache policy) %6.2f s   ratio %5s\n' \
    "$cached" "$floor_cached" "$(ratio "$cached" "$floor_cached")"

cat >"$scratch/domain.xml" <<XML
<domain type='$(cat "$guest/domain-type")'>
  <name>$name</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>$guest/vmlinuz</kernel><initrd>$guest/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='virtio'/>
  </devices>
</domain>
XML
virsh -q -c "$URI" define "$scratch/domain.xml" >/dev/null
echo "domain type $(cat "$guest/domain-type"); $RUNS boots:"
for run in $(seq 1 "$RUNS"); do
    t=$(now)
    virsh -q -c "$URI" start "$name" >/dev/null
    until virsh -q -c "$URI" qemu-agent-command "$name" '{"execute":"guest-ping"}' >/dev/null 2>&1; do
        sleep 0.1
    done
    boot=$(since "$t")
    t=$(now)
    virsh -q -c "$URI" shutdown "$name" --mode acpi >/dev/null
    until [[ $(virsh -q -c "$URI" domstate "$name") == "shut off" ]]; do sleep 0.05; done
    off=$(since "$t")
    printf '  run %d: start → agent answers %5.2f s; ACPI shutdown → shut off %5.2f s\n' "$run" "$boot" "$off"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
