#!/usr/bin/env bash
# Interleaved comparison on one Ceph RBD image: qemu-storage-daemon's rbd driver against rvhost's
# rbd bdev (and a second rvhost build, for A/B), each exported as vhost-user-blk, started one at a
# time pinned to core 0 and driven by rvhost-perf pinned to core 1: qsd A B qsd A B ...
#
#   bench/rbd-compare.sh CEPH_DIR [IMAGE]
#
# CEPH_DIR is a cluster of scripts/ceph-cluster.sh (its ceph.conf and admin keyring); IMAGE (default
# bench0, in pool rbd) must exist (`rbd -c CEPH_DIR/ceph.conf create --size 1024 bench0`).
# Environment: RVHOST (default build/release/rvhost), RVHOST_B (optional second build), PERF
# (default build/release/rvhost-perf), TARGETS (default "qsd rvhost" plus rvhost-b with
# RVHOST_B), WORKLOADS (default "randread:1 randwrite:1 randread:32"), ROUNDS (5), SECS (5),
# SIZE (bytes addressed, 256m). Prints one CSV row per run and, per workload and target, the
# median IOPS and the median of the per-round IOPS ratios to the first target.
set -euo pipefail

CEPH_DIR=${1:?usage: bench/rbd-compare.sh CEPH_DIR [IMAGE]}
IMAGE=${2:-bench0}
REPO=$(cd "$(dirname "$0")/.." && pwd)
RVHOST=${RVHOST:-$REPO/build/release/rvhost}
PERF=${PERF:-$REPO/build/release/rvhost-perf}
DEFAULT_TARGETS="qsd rvhost"
[ -n "${RVHOST_B:-}" ] && DEFAULT_TARGETS="$DEFAULT_TARGETS rvhost-b"
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
WORKLOADS=${WORKLOADS:-randread:1 randwrite:1 randread:32}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
SIZE=${SIZE:-256m}
CONF=$CEPH_DIR/ceph.conf
KEYRING=$CEPH_DIR/ceph.client.admin.keyring
WORK=$(mktemp -d /tmp/rbd-compare.XXXXXX)
SOCK=$WORK/vhost.sock
CSV=$WORK/results.csv
PID=

stop_target() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
  fi
  rm -f "$SOCK"
}
trap stop_target EXIT

start_target() {
  local t=$1
  rm -f "$SOCK"
  case "$t" in
    qsd)
      taskset -c 0 qemu-storage-daemon \
        --blockdev "driver=rbd,pool=rbd,image=$IMAGE,conf=$CONF,user=admin,node-name=r0,cache.direct=off" \
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$SOCK,writable=on" \
        >"$WORK/$t.log" 2>&1 &
      ;;
    rvhost|rvhost-b)
      local bin=$RVHOST
      [ "$t" = rvhost-b ] && bin=$RVHOST_B
      cat >"$WORK/config.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_rbd_register_cluster", "params": {"name": "c0", "config_file": "$CONF", "key_file": "$KEYRING"}},
  {"method": "bdev_rbd_create", "params": {"name": "Rbd0", "cluster_name": "c0", "pool_name": "rbd", "rbd_name": "$IMAGE", "block_size": 512}}]},
 {"subsystem": "vhost_blk", "config": [
  {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.sock", "dev_name": "Rbd0"}}]}]}
EOF
      "$bin" -m 0x1 -S "$WORK" -r "$WORK/rpc.sock" -c "$WORK/config.json" >"$WORK/$t.log" 2>&1 &
      ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  PID=$!
  for _ in $(seq 300); do [ -S "$SOCK" ] && return 0; sleep 0.1; done
  echo "$t did not create $SOCK; its log:" >&2
  cat "$WORK/$t.log" >&2
  exit 1
}

echo "round,workload,target,iops,avg_us,p99_us,load1" | tee "$CSV"
for round in $(seq "$ROUNDS"); do
  for w in $WORKLOADS; do
    rw=${w%%:*} qd=${w##*:}
    for t in $TARGETS; do
      start_target "$t"
      json=$("$PERF" --socket "$SOCK" --rw "$rw" --qd "$qd" --bs 4k --time "$SECS" --size "$SIZE" \
               --cpu 1 --json 2>"$WORK/perf.err" || true)
      stop_target
      row=$(python3 -c '
import json, sys
try:
    t = json.loads(sys.argv[1])["total"]
    print("%.0f,%.1f,%.1f" % (t["iops"], t["latency"]["avg_ns"] / 1e3, t["latency"]["p99_ns"] / 1e3))
except Exception:
    print(",,")
' "$json")
      echo "$round,$w,$t,$row,$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$CSV"
    done
  done
done

python3 - "$CSV" "$TARGETS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
targets = sys.argv[2].split()
base = targets[0]
print("\nworkload       target     median IOPS  median avg µs  median ratio to %s" % base)
for w in dict.fromkeys(r["workload"] for r in rows):
    by = {}
    for r in rows:
        if r["workload"] == w and r["iops"]:
            by.setdefault(r["target"], {})[r["round"]] = r
    for t in targets:
        runs = by.get(t, {})
        if not runs:
            continue
        ratios = [float(r["iops"]) / float(by[base][k]["iops"])
                  for k, r in runs.items() if k in by.get(base, {})]
        print("%-14s %-10s %11.0f  %13.1f  %.2f" % (
            w, t, statistics.median(float(r["iops"]) for r in runs.values()),
            statistics.median(float(r["avg_us"]) for r in runs.values()),
            statistics.median(ratios) if ratios else float("nan")))
loads = [float(r["load1"]) for r in rows]
print("load average (1 min): min %.1f, median %.1f, max %.1f" % (min(loads), statistics.median(loads), max(loads)))
EOF
echo "CSV: $CSV"
