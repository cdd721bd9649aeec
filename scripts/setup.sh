#!/usr/bin/env bash
# Installs what building and testing rvhost needs on a fresh Debian 12 machine (run as root).
# Safe to run again: every step skips what is already there.
set -euo pipefail

need_apt=()
# ceph-*: the one-host cluster of the rbd bdev tests (scripts/ceph-cluster.sh); librbd-dev: the rbd
# bdev links librbd and librados. systemd-container: systemd-nspawn, in which the service unit's test
# boots a real systemd as PID 1.
for pkg in libhwloc-dev libudev-dev pkg-config qemu-system-x86 qemu-system-common busybox-static cpio kmod sg3-utils systemd \
  systemd-container \
  ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

for t in x86_64-unknown-none thumbv7em-none-eabihf; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done

# SPDK's own JSON-RPC client, used to prove wire compatibility.
command -v spdk-rpc >/dev/null || pip install -q spdk==26.9
# A real Prometheus text-format parser for the metrics endpoint's test.
python3 -c 'import prometheus_client' 2>/dev/null || pip install -q prometheus-client==0.26.0
