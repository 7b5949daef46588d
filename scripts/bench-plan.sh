#!/usr/bin/env bash
# Benchmark of `virtplan plan` on a fleet of N defined (shut-off) diskless QEMU domains with two
# steps each, against the floor (one bulk `virsh domstats` call over the same domains) and what a
# shell script does (one `virsh dominfo` per domain). Reports whole-process times and ratios.
#
#   scripts/bench-plan.sh [N=500] [RUNS=5]
#
# Defines domains named vpbench-<pid>-NNN and removes them on exit; touches nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}
RUNS=${2:-5}
URI=qemu:///system
PREFIX="vpbench-$$"
WORK=$(mktemp -d)

cleanup() {
    for i in $(seq -f '%03g' 1 "$N"); do
        virsh -c "$URI" undefine "$PREFIX-$i" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet
VIRTPLAN=$PWD/target/release/virtplan
type=qemu
[[ -w /dev/kvm ]] && type=kvm

echo "defining $N domains..."
names=()
for i in $(seq -f '%03g' 1 "$N"); do
    name="$PREFIX-$i"
    names+=("$name")
    cat >"$WORK/d.xml" <<XML
<domain type='$type'><name>$name</name>
<memory unit='MiB'>256</memory><currentMemory unit='MiB'>128</currentMemory>
<vcpu current='1'>2</vcpu><os><type arch='x86_64'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>
XML
    virsh -c "$URI" define "$WORK/d.xml" >/dev/null
done

{
    echo "version: 1"
    echo "connection: $URI"
    echo "timezone: UTC"
    echo "steps:"
    for name in "${names[@]}"; do
        echo "  - {at: 2030-01-01 04:00, vm: $name, memory: 192MiB}"
        echo "  - {at: 2030-01-01 04:05, vm: $name, vcpus: 2, autostart: false}"
    done
} >"$WORK/bench.yaml"

# Median wall time in milliseconds of RUNS runs of a command.
measure() {
    local times=() start end
    for _ in $(seq 1 "$RUNS"); do
        start=$(date +%s%N)
        "$@" >/dev/null
        end=$(date +%s%N)
        times+=($(((end - start) / 1000000)))
    done
    printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((RUNS + 1) / 2))p"
}

loop() {
    for name in "${names[@]}"; do virsh -c "$URI" dominfo "$name"; done
}

plan_ms=$(measure "$VIRTPLAN" plan "$WORK/bench.yaml" --format json)
bulk_ms=$(measure virsh -c "$URI" domstats --state --balloon --vcpu "${names[@]}")
loop_ms=$(measure loop)

echo "domains: $N, steps: $((2 * N)), runs: $RUNS (median)"
echo "virtplan plan:                $plan_ms ms"
echo "virsh domstats (bulk, floor): $bulk_ms ms"
echo "virsh dominfo loop:           $loop_ms ms"
awk -v p="$plan_ms" -v b="$bulk_ms" -v l="$loop_ms" 'BEGIN {
    printf "plan / bulk domstats = %.2fx (target <= 2x)\n", p / (b > 0 ? b : 1)
    printf "loop / plan          = %.1fx (target >= 50x)\n", l / (p > 0 ? p : 1)
}'
