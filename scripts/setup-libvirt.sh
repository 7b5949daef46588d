#!/usr/bin/env bash
# Installs and starts a local libvirtd with the QEMU driver, for virtplan's end-to-end tests.
#
# For a fresh Debian 12 machine or container without systemd, run as root. Idempotent: running it
# twice changes nothing the second time. Exits 1 (printing the libvirtd log tail) when
# `virsh -c qemu:///system version` does not answer within ~60 s.
set -euo pipefail

URI="qemu:///system"
QEMU_CONF=/etc/libvirt/qemu.conf
LOG_DIR=/var/log/libvirt
RUN_DIR=/var/run/libvirt
LIBVIRTD_LOG="$LOG_DIR/libvirtd.log"
# qemu-utils (qemu-img) must be installed before libvirtd starts: the QEMU driver looks for
# qemu-img once, at start, and needs it for snapshots of shut-off qcow2 domains.
PACKAGES=(libvirt-dev pkg-config libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86
    qemu-utils
    libssl-dev python3-aiosmtpd) # notify: TLS for webhooks/SMTP; a real SMTP server for its tests

say() { printf 'setup-libvirt: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (try: sudo $0)" >&2
    exit 1
fi

# 1. Packages: skip apt entirely when everything is already installed.
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${PACKAGES[@]}"
else
    say "packages already installed"
fi

# 2. Groups, user and folders libvirtd expects.
if ! getent group kvm >/dev/null; then
    groupadd --system kvm
    say "created group kvm"
fi
if ! getent group libvirt-qemu >/dev/null; then
    groupadd --system libvirt-qemu
    say "created group libvirt-qemu"
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid libvirt-qemu --groups kvm --no-create-home \
        --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
    say "created user libvirt-qemu"
fi
# A throw-away unprivileged user: the many-hosts tests start its own per-user libvirtd
# (qemu:///session, in a temporary folder) as a second host, and kill it to test a lost host,
# without ever disturbing the system daemon the other tests use.
SESSION_USER=virtplan-session
if ! getent passwd "$SESSION_USER" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$SESSION_USER"
    say "created user $SESSION_USER (for qemu:///session test daemons)"
fi
for dir in "$LOG_DIR" "$RUN_DIR" /var/lib/libvirt /etc/libvirt; do
    if [[ ! -d $dir ]]; then
        mkdir -p "$dir"
        say "created $dir"
    fi
done

# 3. qemu.conf: run QEMU as root without a security driver (containers have no SELinux/AppArmor
#    and often cannot change file ownership). Replace an existing (possibly commented) setting,
#    else append it, so a second run is a no-op.
set_conf() {
    local key=$1 value=$2 line
    line="$key = $value"
    touch "$QEMU_CONF"
    if grep -qxF "$line" "$QEMU_CONF"; then
        return
    fi
    if grep -qE "^[#[:space:]]*$key[[:space:]]*=" "$QEMU_CONF"; then
        sed -i -E "0,/^[#[:space:]]*$key[[:space:]]*=.*/s//$line/" "$QEMU_CONF"
    else
        printf '%s\n' "$line" >>"$QEMU_CONF"
    fi
    say "set $line in $QEMU_CONF"
    CONF_CHANGED=1
}
CONF_CHANGED=0
set_conf user '"root"'
set_conf group '"root"'
set_conf security_driver '"none"'

# 4. Daemons. Without systemd there is no socket activation: start them ourselves.
if pgrep -x -u root virtlogd >/dev/null; then
    say "virtlogd already running"
else
    virtlogd -d
    say "started virtlogd"
fi
# A libvirtd started before qemu-img was installed never finds it ("unable to find qemu-img" when
# snapshotting a shut-off qcow2 domain): restart it. Running domains survive a restart.
started_before_qemu_img() {
    local pid qemu_img now elapsed
    pid=$(pgrep -xo -u root libvirtd) || return 1
    qemu_img=$(command -v qemu-img) || return 1
    now=$(date +%s)
    elapsed=$(ps -o etimes= -p "$pid" | tr -d ' ')
    (($(stat -c %Z "$qemu_img") >= now - elapsed))
}
if started_before_qemu_img; then
    say "libvirtd was started before qemu-img was installed: restarting it"
    if [[ -d /run/systemd/system ]] && systemctl is-active --quiet libvirtd 2>/dev/null; then
        systemctl restart libvirtd
    else
        pid=$(pgrep -xo -u root libvirtd)
        kill "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "libvirtd ($pid) did not stop within 10 s" >&2
            exit 1
        fi
    fi
fi
if pgrep -x -u root libvirtd >/dev/null; then
    if ((CONF_CHANGED)); then
        say "warning: qemu.conf changed while libvirtd was running; restart libvirtd to apply it"
    fi
    say "libvirtd already running"
else
    LIBVIRT_LOG_OUTPUTS="3:file:$LIBVIRTD_LOG" libvirtd -d
    say "started libvirtd (log: $LIBVIRTD_LOG)"
fi

# 5. Wait, bounded, until the daemon answers.
for _ in $(seq 1 60); do
    if virsh -c "$URI" version >/dev/null 2>&1; then
        say "libvirtd answers on $URI:"
        virsh -c "$URI" version
        if [[ -w /dev/kvm ]]; then
            say "/dev/kvm is writable: diskless test domains use domain type kvm (scripts/build-guest.sh probes the test guest's own type)"
        else
            say "/dev/kvm is not usable: tests use domain type qemu (TCG)"
        fi
        exit 0
    fi
    sleep 1
done

say "libvirtd did not answer on $URI within 60 s" >&2
if [[ -f $LIBVIRTD_LOG ]]; then
    say "last lines of $LIBVIRTD_LOG:" >&2
    tail -n 50 "$LIBVIRTD_LOG" >&2
fi
virsh -c "$URI" version >&2 || true
exit 1
