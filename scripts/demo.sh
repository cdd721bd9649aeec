#!/usr/bin/env bash
# The main job on its built-in default, in one command on a fresh machine:
#   1. installs what is needed (scripts/setup.sh) and builds rvhost;
#   2. starts rvhost with no config: a 256 MiB RAM bdev Malloc0 exported as vhost-user-blk vhost.0;
#   3. shows the bdev and controller through SPDK's own client (spdk-rpc);
#   4. boots a small Linux guest (QEMU, TCG) attached to vhost.0 and runs the disk checks in it
#      (size, block size, O_DIRECT pattern write/read-back, flush, discard, write zeroes);
#   5. stops rvhost.
# Leave rvhost running for your own VM instead with: build/release/rvhost -S /var/tmp
# (it logs the QEMU arguments that attach the disk).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release -p rvhost-target --bin rvhost

dir=$(mktemp -d /tmp/rvhost-demo.XXXXXX)
build/release/rvhost -S "$dir" -r "$dir/spdk.sock" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

for _ in $(seq 100); do [ -S "$dir/vhost.0" ] && [ -S "$dir/spdk.sock" ] && break; sleep 0.1; done
echo "== rvhost is serving; what SPDK's client sees:"
spdk-rpc -s "$dir/spdk.sock" bdev_get_bdevs
spdk-rpc -s "$dir/spdk.sock" vhost_get_controllers

echo "== booting a Linux guest on vhost.0 (software emulation: about a minute on a busy machine)"
bash scripts/guest-run.sh --blk "$dir/vhost.0" --env DISCARD=1 --env ZEROES=1 tests/guest/blk_checks.sh
