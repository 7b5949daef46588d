#!/usr/bin/env bash
# Benchmark of `virtplan plan` on fleets of shut-off diskless QEMU domains (two steps each)
# against the floor: ONE bulk `virsh domstats --list-inactive --state --balloon --vcpu` call over
# every inactive domain of the host, with no names (naming domains makes virsh look each one up,
# which would hide exactly the per-domain cost this benchmark is about). Both are whole
# processes (connect, one answer, exit); medians of RUNS runs, measured alternately in one run.
#
#   scripts/bench-plan.sh [SIZES="50 500 2000"] [RUNS=7] [REFERENCE_BINARY]
#
# Besides the slope between consecutive sizes it prints the least-squares line through all of
# them (ms per domain and fixed ms), for plan and for the floor.
#
# With REFERENCE_BINARY (another build of virtplan, e.g. main's), its `plan --format json` is
# timed too and its output compared with this build's (planned_at aside): they must be
# byte-identical. Domains are named vpbench-<pid>-NNNN, defined in growing batches, and removed
# on exit; nothing else is touched. Needs root (or libvirt group) on qemu:///system.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-"50 500 2000"}
RUNS=${2:-7}
REFERENCE=${3:-}
URI=qemu:///system
PREFIX="vpbench-$$"
WORK=$(mktemp -d)
defined=0

cleanup() {
    if ((defined > 0)); then
        for i in $(seq -f '%04g' 1 "$defined"); do echo "undefine $PREFIX-$i"; done |
            virsh -c "$URI" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --quiet
VIRTPLAN=$PWD/target/release/virtplan
type=qemu
[[ -w /dev/kvm ]] && type=kvm

# Defines domains up to number $1 in one virsh session.
define_up_to() {
    local want=$1 i name
    ((want > defined)) || return 0
    for i in $(seq -f '%04g' $((defined + 1)) "$want"); do
        name="$PREFIX-$i"
        cat >"$WORK/d-$i.xml" <<XML
<domain type='$type'><name>$name</name>
<memory unit='MiB'>256</memory><currentMemory unit='MiB'>128</currentMemory>
<vcpu current='1'>2</vcpu><os><type arch='x86_64'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>
XML
        echo "define $WORK/d-$i.xml"
    done | virsh -c "$URI" >/dev/null
    defined=$want
    rm -f "$WORK"/d-*.xml
}

write_plan() {
    local n=$1 i name
    {
        echo "version: 1"
        echo "connection: $URI"
        echo "timezone: UTC"
        echo "steps:"
        for i in $(seq -f '%04g' 1 "$n"); do
            name="$PREFIX-$i"
            echo "  - {at: 2030-01-01 04:00, vm: $name, memory: 192MiB}"
            echo "  - {at: 2030-01-01 04:05, vm: $name, vcpus: 2, autostart: false}"
        done
    } >"$WORK/bench-$n.yaml"
}

# Milliseconds (one decimal) from $1 to $2, two readings of $EPOCHREALTIME: bash's own clock,
# read in this shell right before and after the command, so no other process is timed.
ms_between() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.1f", (e - s) * 1000 }'; }

# Median of the numbers on stdin.
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

printf '%-8s %-10s %-12s %-8s %-10s %s\n' domains plan_ms floor_ms ratio ms/domain reference_ms
prev_n=0 prev_plan=0 fit=""
for n in $SIZES; do
    define_up_to "$n"
    write_plan "$n"
    # The outputs compared once, untimed: every timed run writes to /dev/null, as the floor's.
    "$VIRTPLAN" plan "$WORK/bench-$n.yaml" --format json >"$WORK/new.json"
    [[ -z $REFERENCE ]] || "$REFERENCE" plan "$WORK/bench-$n.yaml" --format json >"$WORK/ref.json"
    plan_t=() floor_t=() ref_t=()
    for _ in $(seq 1 "$RUNS"); do
        s=$EPOCHREALTIME
        "$VIRTPLAN" plan "$WORK/bench-$n.yaml" --format json >/dev/null
        e=$EPOCHREALTIME
        plan_t+=("$(ms_between "$s" "$e")")
        s=$EPOCHREALTIME
        virsh -c "$URI" domstats --list-inactive --state --balloon --vcpu >/dev/null
        e=$EPOCHREALTIME
        floor_t+=("$(ms_between "$s" "$e")")
        if [[ -n $REFERENCE ]]; then
            s=$EPOCHREALTIME
            "$REFERENCE" plan "$WORK/bench-$n.yaml" --format json >/dev/null
            e=$EPOCHREALTIME
            ref_t+=("$(ms_between "$s" "$e")")
        fi
    done
    plan_ms=$(printf '%s\n' "${plan_t[@]}" | median)
    floor_ms=$(printf '%s\n' "${floor_t[@]}" | median)
    ref_ms=-
    if [[ -n $REFERENCE ]]; then
        ref_ms=$(printf '%s\n' "${ref_t[@]}" | median)
        if ! diff <(grep -v '"planned_at"' "$WORK/ref.json") \
            <(grep -v '"planned_at"' "$WORK/new.json") >/dev/null; then
            echo "JSON differs from the reference at $n domains" >&2
            exit 1
        fi
    fi
    slope=-
    if ((prev_n > 0)); then
        slope=$(awk -v a="$prev_plan" -v b="$plan_ms" -v m="$prev_n" -v n="$n" \
            'BEGIN { printf "%.3f", (b - a) / (n - m) }')
    fi
    ratio=$(awk -v p="$plan_ms" -v f="$floor_ms" 'BEGIN { printf "%.2fx", p / (f > 0 ? f : 1) }')
    printf '%-8s %-10s %-12s %-8s %-10s %s\n' "$n" "$plan_ms" "$floor_ms" "$ratio" "$slope" "$ref_ms"
    prev_n=$n prev_plan=$plan_ms
    fit+="$n $plan_ms $floor_ms"$'\n'
done
# Cost per domain over every size at once: the least-squares line through (domains, median ms),
# for plan and for the floor (one size gives no line).
if (($(wc -w <<<"$SIZES") > 1)); then
    awk 'NF == 3 { k++; n[k] = $1; p[k] = $2; f[k] = $3; sn += $1; sp += $2; sf += $3 }
        END {
            mn = sn / k; mp = sp / k; mf = sf / k
            for (i = 1; i <= k; i++) { d = n[i] - mn; v += d * d; cp += d * (p[i] - mp); cf += d * (f[i] - mf) }
            printf "least-squares ms/domain over all sizes: plan %.4f (+ %.1f ms fixed), floor %.4f (+ %.1f ms fixed)\n",
                cp / v, mp - cp / v * mn, cf / v, mf - cf / v * mn
        }' <<<"$fit"
fi
echo "plan: virtplan plan --format json (${RUNS} runs, median); floor: virsh domstats --list-inactive --state --balloon --vcpu (no names)"
echo "ms/domain: slope of plan time since the previous size; target: plan <= 1.5x floor at 500 domains"
[[ -n $REFERENCE ]] && echo "JSON output identical to $REFERENCE at every size (planned_at aside)"
exit 0
