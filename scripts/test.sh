#!/usr/bin/env bash
# Runs virtplan's whole test suite against a real libvirtd: sets it up, then runs the tests with
# VIRTPLAN_REQUIRE_QEMU=1 so that tests needing qemu:///system fail instead of skipping.
set -euo pipefail

cd "$(dirname "$0")/.."

# The real test guest (tests/integration/guest.rs) is built once and cached; the tests would
# build it themselves, but as root only.
if [[ $(id -u) -eq 0 ]]; then
    scripts/setup-libvirt.sh
    scripts/build-guest.sh >/dev/null
else
    sudo scripts/setup-libvirt.sh
    sudo scripts/build-guest.sh >/dev/null
fi

export VIRTPLAN_REQUIRE_QEMU=1

if cargo nextest --version >/dev/null 2>&1; then
    # The crate has no doctests, so nextest's summary is the whole story (and the last line).
    cargo nextest run "$@"
else
    cargo test "$@"
fi
