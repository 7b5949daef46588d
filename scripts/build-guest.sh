#!/usr/bin/env bash
# Builds virtplan's test guest from Debian packages only, into a cache outside the repository:
# a kernel (linux-image-cloud-amd64) and a busybox initramfs that boots in ~2 s under QEMU by
# direct kernel boot, answers the ACPI power button (busybox acpid), runs qemu-guest-agent on the
# org.qemu.guest_agent.0 virtio-serial port, lets the virtio balloon take memory and onlines
# hot-added vCPUs. No image is downloaded: `apt-get download` fetches the .deb files and
# `dpkg-deb -x` unpacks them (nothing is installed on the host but the agent's shared libraries).
#
# Usage: scripts/build-guest.sh            (root, or a user who may write the cache folder)
#   VIRTPLAN_GUEST_DIR   cache folder (default /var/cache/virtplan-guest)
# Prints the folder holding `vmlinuz`, `initrd.img`, `versions` and `domain-type` (`kvm` or
# `qemu`: the libvirt domain type this host boots the guest with) as the one line of stdout.
#
# Idempotent and cached: the build is keyed by the candidate versions of the three packages and
# by this script's own hash, so it is rebuilt when either changes (`apt-get update` brings a new
# kernel: the next run rebuilds) and otherwise costs one `apt-cache policy` call. Concurrent runs
# serialise on a lock; a build is assembled aside and published by renaming its folder into
# place, so a reader never sees half a guest.
set -euo pipefail

CACHE="${VIRTPLAN_GUEST_DIR:-/var/cache/virtplan-guest}"
KERNEL_META=linux-image-cloud-amd64
PACKAGES=(busybox-static qemu-guest-agent)
# Loaded in this order by the guest's init (none of them depends on a module outside this list).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    virtio_console virtio_balloon button evdev)

say() { printf 'build-guest: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# 1. What would be built: the candidate versions of the three packages, in one apt-cache call
#    (this is all a cached run costs). The kernel metapackage's version names its image package's
#    version (they come from one source package); the image package itself is resolved at build.
resolve() {
    VERSIONS=$(apt-cache policy "$KERNEL_META" "${PACKAGES[@]}" 2>/dev/null | awk '
        /^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) }
        $1 == "Candidate:" && $2 != "(none)" { print pkg "=" $2 }')
    [[ $(wc -l <<<"$VERSIONS") -eq $((1 + ${#PACKAGES[@]})) ]]
}
if ! resolve; then
    say "package lists do not know $KERNEL_META/${PACKAGES[*]}: running apt-get update"
    apt-get update >&2
    resolve || die "apt cannot find $KERNEL_META, ${PACKAGES[*]} (Debian main, amd64)"
fi
SCRIPT_HASH=$(sha256sum "$0" | cut -c1-16)
KEY=$(printf '%s\nscript=%s\n' "$VERSIONS" "$SCRIPT_HASH" | sha256sum | cut -c1-16)

# Each build lives in its own folder named by its key (a complete one has `domain-type`, its
# last file), so checkouts with different versions of this script (branches, worktrees) share the
# cache without rebuilding over each other.
current_ok() { [[ -f $CACHE/$KEY/domain-type ]]; }
publish_path() {
    touch "$CACHE/$KEY" 2>/dev/null || true # in use: kept by the clean-up below
    echo "$CACHE/$KEY"
}

if current_ok; then
    say "up to date ($(tr '\n' ' ' <"$CACHE/$KEY/versions"))"
    publish_path
    exit 0
fi

mkdir -p "$CACHE"
chmod 0755 "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if current_ok; then # another run built it while we waited for the lock
    publish_path
    exit 0
fi

started=$SECONDS
work=$(mktemp -d "$CACHE/.build.XXXXXX")
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT
KERNEL_PKG=$(apt-cache show --no-all-versions "$KERNEL_META" |
    sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -n 1)
[[ -n $KERNEL_PKG ]] || die "cannot tell which kernel $KERNEL_META depends on"
say "building $KEY:" $VERSIONS "($KERNEL_PKG)"

# 2. Fetch and unpack. `apt-get download` writes into the current folder; _apt cannot write into
#    a root-only mktemp folder, which apt reports (harmlessly) unless the folder is world-writable.
mkdir "$work/debs" "$work/pkg" "$work/root"
chmod 0777 "$work/debs"
(cd "$work/debs" && apt-get download -q "$KERNEL_PKG" "${PACKAGES[@]}" >&2)
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/pkg"
done
BUSYBOX="$work/pkg/bin/busybox"
[[ -x $BUSYBOX ]] || die "busybox-static did not provide /bin/busybox"

# 3. The initramfs tree.
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc/acpi/PWRF,proc,sys,dev,run,tmp,var}
ln -s ../run "$root/var/run"
cp "$BUSYBOX" "$root/bin/busybox"
# Every applet busybox knows, as a symlink where busybox expects to live (bin/sh, sbin/poweroff..).
while read -r applet; do
    [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
done < <("$BUSYBOX" --list-full)

kver=$(basename "$(find "$work/pkg/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
[[ -n $kver ]] || die "$KERNEL_PKG has no /lib/modules"
for module in "${MODULES[@]}"; do
    file=$(find "$work/pkg/lib/modules/$kver" -name "$module.ko" | head -n 1)
    [[ -n $file ]] || die "module $module.ko not found in $KERNEL_PKG"
    cp "$file" "$root/lib/modules/"
done

# qemu-guest-agent and the libraries the dynamic loader would load for it. They are resolved on
# this host: install the agent's library dependencies if ldd cannot find one.
qga="$work/pkg/usr/sbin/qemu-ga"
[[ -x $qga ]] || die "qemu-guest-agent did not provide /usr/sbin/qemu-ga"
if ldd "$qga" | grep -q 'not found'; then
    mapfile -t deps < <(apt-cache depends --no-pre-depends qemu-guest-agent |
        awk '$1 == "Depends:" { print $2 }')
    say "installing the agent's libraries: ${deps[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${deps[@]}" >&2
fi
if ldd "$qga" | grep 'not found' >&2; then
    die "ldd cannot resolve the libraries above for qemu-ga"
fi
cp "$qga" "$root/usr/sbin/qemu-ga"
while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done < <(ldd "$qga" | grep -oE '/[^ ]+')

# qemu-ga powers off with `/sbin/shutdown -h -P +0 MSG` and reboots with `-r`: nothing to
# unmount in an initramfs, so both go straight to the kernel. `virtplan.agent_shutdown=fail` on
# the kernel command line makes it fail instead (the agent then reports an error), for tests of
# the ladder's fallback from the agent to ACPI.
rm -f "$root/sbin/shutdown"
cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
grep -q virtplan.agent_shutdown=fail /proc/cmdline && exit 1
case " $* " in *" -r "*) exec reboot -f ;; *) exec poweroff -f ;; esac
EOF
# busybox acpid runs /etc/acpi/<action>/<event> for the power button (PWRF 00000080).
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
exec poweroff -f
EOF

cat >"$root/etc/inittab" <<'EOF'
::sysinit:/etc/rc
::respawn:/sbin/start-qemu-ga
::respawn:/sbin/online-cpus
::ctrlaltdel:/bin/busybox reboot -f
EOF

cat >"$root/etc/rc" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in ${MODULES[*]}; do
    insmod /lib/modules/\$m.ko || echo "virtplan-guest: insmod \$m failed"
done
# virtplan.clock_skew=SECONDS: a guest whose clock is off by that much at boot (tests of
# clock: {sync: true}, which sets it from the host through the agent).
skew=\$(sed -n 's/.*virtplan.clock_skew=\([-0-9]*\).*/\1/p' /proc/cmdline)
[ -n "\$skew" ] && date -s "@\$((\$(date +%s) + skew))" >/dev/null
# virtplan.power_button=ignore: a guest that ignores the power button (tests of the agent rung).
grep -q virtplan.power_button=ignore /proc/cmdline || acpid -c /etc/acpi -l /run/acpid.log
echo "virtplan-guest: up"
EOF

# The agent's port appears once virtio_console has probed the device; qemu-ga needs its /dev node
# (udev's /dev/virtio-ports/ names do not exist without udev). No port (the domain has no agent
# channel): wait, so init does not respawn in a loop.
cat >"$root/sbin/start-qemu-ga" <<'EOF'
#!/bin/sh
while :; do
    for f in /sys/class/virtio-ports/*/name; do
        if [ "$(cat "$f" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
            port=$(basename "$(dirname "$f")")
            echo "virtplan-guest: qemu-ga on /dev/$port"
            exec qemu-ga -m virtio-serial -p "/dev/$port" -t /run -f /run/qemu-ga.pid
        fi
    done
    sleep 1
done
EOF

# Hot-added vCPUs arrive offline; distributions online them with a udev rule. This is that rule.
cat >"$root/sbin/online-cpus" <<'EOF'
#!/bin/sh
while :; do
    for f in /sys/devices/system/cpu/cpu*/online; do
        [ -e "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 >"$f"
    done
    sleep 1
done
EOF
chmod 0755 "$root/sbin/shutdown" "$root/etc/acpi/PWRF/00000080" "$root/etc/rc" \
    "$root/sbin/start-qemu-ga" "$root/sbin/online-cpus"
# The kernel runs /init; busybox picks the applet from the name it was called by.
ln -s /bin/busybox "$root/init"

# 4. Pack and publish.
out="$work/out"
mkdir "$out"
cp "$work/pkg/boot/vmlinuz-$kver" "$out/vmlinuz"
(cd "$root" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null) | gzip -1 >"$out/initrd.img"
printf '%s\nscript=%s\n' "$VERSIONS" "$SCRIPT_HASH" >"$out/versions"

# 5. Domain type, chosen by trying: KVM when it boots this guest, else TCG (`qemu`). A usable
#    /dev/kvm is not enough: on some nested hosts KVM stalls early in boot (or QEMU aborts on an
#    MSR). Boot once under KVM, straight through QEMU (no libvirt needed), and wait for the
#    guest's "up" line; a working KVM shows it in well under a second.
probe_kvm() {
    [[ -w /dev/kvm ]] || {
        echo "/dev/kvm is not usable"
        return 1
    }
    command -v qemu-system-x86_64 >/dev/null || {
        echo "qemu-system-x86_64 is not installed"
        return 1
    }
    local log="$work/kvm-probe.log" pid
    qemu-system-x86_64 -accel kvm -m 256 -nodefaults -display none -no-reboot \
        -kernel "$out/vmlinuz" -initrd "$out/initrd.img" -append "console=ttyS0 panic=-1" \
        -serial "file:$log" >"$work/kvm-probe.err" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if grep -q 'virtplan-guest: up' "$log" 2>/dev/null; then
            kill "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null || true
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    echo "the guest did not boot under KVM within 10 s: $(head -c 200 "$work/kvm-probe.err" | tr '\n' ' ')"
    return 1
}
if why=$(probe_kvm); then
    echo kvm >"$out/domain-type"
    say "domain type: kvm (the guest booted under KVM)"
else
    echo qemu >"$out/domain-type"
    say "domain type: qemu (TCG): $why"
fi
chmod 0755 "$out"
chmod 0644 "$out"/*
rm -rf "${CACHE:?}/$KEY"
mv "$out" "$CACHE/$KEY"
# Remove builds nobody used for a week (a defined domain may still point at a recent one).
find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" ! -name '.*' -mtime +7 \
    -exec rm -rf {} +
say "built in $((SECONDS - started)) s: $(du -sh "$CACHE/$KEY" | cut -f1)"
publish_path
