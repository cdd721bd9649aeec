#!/usr/bin/env bash
# Boots the rvhost test guest by hand against vhost-user sockets and prints its RESULT lines.
#
#   scripts/guest-run.sh --blk /path/to/vhost.0[:QUEUES] [--cpus N] [--env K=V]... SCRIPT
#   scripts/guest-run.sh --scsi /path/to/vhost.1[:QUEUES] SCRIPT
#
# blkcheck (tests/src/bin/blkcheck.rs) is always put into the guest. SCRIPT runs in the guest with
# busybox; `. /lib/guest.sh` gives result/check/run/sysval/wait_for (tests/guest/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/build/guest-tools}"
cargo build --release -q -p rvhost-tests --bin guest-run --bin blkcheck
exec "$CARGO_TARGET_DIR/release/guest-run" --bin "$CARGO_TARGET_DIR/release/blkcheck" "$@"
