#!/usr/bin/env bash
# Interleaved IOPS comparison of vhost-user targets driven by rvhost-perf.
#
# Each round starts every target in turn on core 0 (and only that target, so a busy-polling
# target never steals the core from the next one), runs rvhost-perf against it on core 1, and
# stops it: A B C A B C ... Per-round IOPS and latencies go to a CSV; the summary gives, per target,
# the median IOPS and latencies and the median of the per-round ratios to the baseline target.
#
#   bench/compare.sh                         # everything: 5 rounds x 10 s, QD 1/32/128, read+write
#   bench/compare.sh --rounds 2 --secs 3     # a quick look
#   bench/compare.sh --targets "rvhost-null qsd-null" --workloads "randread:32 randread:1"
#   bench/compare.sh --socket /path/to/vhost.sock --socket-type blk   # adds an external target
#   bench/compare.sh --files shm             # file bdevs vs qsd on one file in /dev/shm
#   bench/compare.sh --files direct --direct-dir /work/tmp   # O_DIRECT on a real filesystem
#
# Targets: rvhost-null rvhost-malloc qsd-null qsd-file (blk); rvhost-scsi-null rvhost-scsi-malloc
# (scsi, with --scsi); "socket" (an already running target given by --socket, not restarted).
# File targets (blk, all on the same file; --files replaces the default targets and makes the qsd
# io_uring peer the baseline): rvhost-uring-shm rvhost-aio-shm qsd-uring-shm (buffered, /dev/shm);
# rvhost-uring-direct rvhost-aio-direct qsd-uring-direct qsd-native-direct (O_DIRECT, a file in
# --direct-dir, default $BUILD/compare-files; --direct-prep fill|fallocate|sparse says how that file
# is made: fill writes every block, so O_DIRECT writes are overwrites of written extents).
set -euo pipefail

ROUNDS=5
SECS=10
BS=4k
SIZE=256m
WORKLOADS="randread:1 randread:32 randread:128 randwrite:1 randwrite:32 randwrite:128"
TARGETS="rvhost-null rvhost-malloc qsd-null qsd-file"
TARGETS_GIVEN=0
BASELINE=""
SCSI=0
SOCKET=""
SOCKET_TYPE=blk
FILES=""
DIRECT_DIR=""
DIRECT_PREP=fill
TARGET_CPU=0
INITIATOR_CPU=1
OUT=""
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${CARGO_TARGET_DIR:-$REPO/build}"
RVHOST="${RVHOST:-}"
PERF="${RVHOST_PERF:-}"

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --bs) BS="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --workloads) WORKLOADS="$2"; shift 2 ;;
    --targets) TARGETS="$2"; TARGETS_GIVEN=1; shift 2 ;;
    --baseline) BASELINE="$2"; shift 2 ;;
    --scsi) SCSI=1; shift ;;
    --socket) SOCKET="$2"; shift 2 ;;
    --socket-type) SOCKET_TYPE="$2"; shift 2 ;;
    --files) FILES="$2"; shift 2 ;;
    --direct-dir) DIRECT_DIR="$2"; shift 2 ;;
    --direct-prep) DIRECT_PREP="$2"; shift 2 ;;
    --target-cpu) TARGET_CPU="$2"; shift 2 ;;
    --initiator-cpu) INITIATOR_CPU="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --rvhost) RVHOST="$2"; shift 2 ;;
    --perf) PERF="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "compare.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

[ "$SCSI" = 1 ] && TARGETS="$TARGETS rvhost-scsi-null rvhost-scsi-malloc"
# --files picks the file targets unless --targets names some of them.
case "$FILES" in
  "") ;;
  shm) [ "$TARGETS_GIVEN" = 1 ] || TARGETS="qsd-uring-shm rvhost-uring-shm rvhost-aio-shm" ;;
  direct) [ "$TARGETS_GIVEN" = 1 ] || TARGETS="qsd-uring-direct qsd-native-direct rvhost-uring-direct rvhost-aio-direct" ;;
  *) echo "compare.sh: --files takes shm or direct" >&2; exit 2 ;;
esac
[ -n "$SOCKET" ] && TARGETS="$TARGETS socket"
[ -n "$BASELINE" ] || BASELINE="${TARGETS%% *}"

if [ -z "$PERF" ] || [ -z "$RVHOST" ]; then
  ( cd "$REPO" && CARGO_TARGET_DIR="$BUILD" cargo build --release -q -p rvhost-bench --bin rvhost-perf \
      && CARGO_TARGET_DIR="$BUILD" cargo build --release -q -p rvhost-target --bin rvhost )
  PERF="${PERF:-$BUILD/release/rvhost-perf}"
  RVHOST="${RVHOST:-$BUILD/release/rvhost}"
fi
QSD="$(command -v qemu-storage-daemon || true)"

WORK="$(mktemp -d /tmp/rvhost-compare.XXXXXX)"
[ -n "$OUT" ] || OUT="$WORK/results.csv"
SHM_FILE="/dev/shm/rvhost-compare-$$.img"
[ -n "$DIRECT_DIR" ] || DIRECT_DIR="$BUILD/compare-files"
DIRECT_FILE="$DIRECT_DIR/rvhost-compare-$$.img"
TARGET_PID=""

cleanup() {
  stop_target
  rm -f "$SHM_FILE" "$DIRECT_FILE"
  rm -rf "$WORK/sock"
}
trap cleanup EXIT INT TERM

stop_target() {
  if [ -n "$TARGET_PID" ]; then
    kill -TERM "$TARGET_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$TARGET_PID" 2>/dev/null || true
    wait "$TARGET_PID" 2>/dev/null || true
    TARGET_PID=""
  fi
}

size_bytes() {
  python3 -c 'import sys; s=sys.argv[1].lower(); m={"k":1<<10,"m":1<<20,"g":1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))' "$1"
}
SIZE_BYTES="$(size_bytes "$SIZE")"
BLOCKS=$((SIZE_BYTES / 512))

# The backing file of a file target ($1 = shm or direct), made once per run.
backing_file() {
  if [ "$1" = shm ]; then
    [ -f "$SHM_FILE" ] || fallocate -l "$SIZE_BYTES" "$SHM_FILE"
    echo "$SHM_FILE"
    return
  fi
  if [ ! -f "$DIRECT_FILE" ]; then
    mkdir -p "$DIRECT_DIR"
    case "$DIRECT_PREP" in
      fill) dd if=/dev/zero of="$DIRECT_FILE" bs=1M count=$((SIZE_BYTES >> 20)) oflag=direct status=none ;;
      fallocate) fallocate -l "$SIZE_BYTES" "$DIRECT_FILE" ;;
      sparse) truncate -s "$SIZE_BYTES" "$DIRECT_FILE" ;;
      *) echo "compare.sh: --direct-prep takes fill, fallocate or sparse" >&2; return 1 ;;
    esac
    sync
  fi
  echo "$DIRECT_FILE"
}

# rvhost with one controller on a null, malloc, uring-* or aio-* bdev; blk or scsi.
rvhost_config() {
  local kind="$1" bdev="$2"
  local create
  if [ "$bdev" = uring-shm ] || [ "$bdev" = uring-direct ]; then
    create="{\"method\":\"bdev_uring_create\",\"params\":{\"name\":\"Dev0\",\"filename\":\"$(backing_file "${bdev#*-}")\",\"block_size\":512}}"
  elif [ "$bdev" = aio-shm ] || [ "$bdev" = aio-direct ]; then
    create="{\"method\":\"bdev_aio_create\",\"params\":{\"name\":\"Dev0\",\"filename\":\"$(backing_file "${bdev#*-}")\",\"block_size\":512}}"
  elif [ "$bdev" = null ]; then
    create="{\"method\":\"bdev_null_create\",\"params\":{\"name\":\"Dev0\",\"num_blocks\":$BLOCKS,\"block_size\":512}}"
  else
    create="{\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"Dev0\",\"num_blocks\":$BLOCKS,\"block_size\":512}}"
  fi
  if [ "$kind" = blk ]; then
    echo "[$create,{\"method\":\"vhost_create_blk_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"dev_name\":\"Dev0\",\"cpumask\":\"0x$(printf %x $((1 << TARGET_CPU)))\"}}]"
  else
    echo "[$create,{\"method\":\"vhost_create_scsi_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"cpumask\":\"0x$(printf %x $((1 << TARGET_CPU)))\"}},{\"method\":\"vhost_scsi_controller_add_target\",\"params\":{\"ctrlr\":\"perf.0\",\"scsi_target_num\":0,\"bdev_name\":\"Dev0\"}}]"
  fi
}

wait_socket() {
  for _ in $(seq 200); do
    [ -S "$1" ] && return 0
    kill -0 "$TARGET_PID" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Starts target $1; sets SOCK and TYPE.
start_target() {
  local t="$1"
  rm -rf "$WORK/sock"; mkdir -p "$WORK/sock"
  SOCK="$WORK/sock/perf.0"
  TYPE=blk
  case "$t" in
    rvhost-null|rvhost-malloc|rvhost-scsi-null|rvhost-scsi-malloc|rvhost-uring-*|rvhost-aio-*)
      local kind=blk bdev=null
      case "$t" in *scsi*) kind=scsi; TYPE=scsi ;; esac
      case "$t" in *malloc) bdev=malloc ;; rvhost-uring-*|rvhost-aio-*) bdev="${t#rvhost-}" ;; esac
      rvhost_config "$kind" "$bdev" > "$WORK/config.json"
      # Busy polling, as SPDK's reactors: the benchmark measures the data path, not wake-ups.
      RVHOST_BUSY_POLL=1 taskset -c "$TARGET_CPU" "$RVHOST" -m "0x$(printf %x $((1 << TARGET_CPU)))" \
        -S "$WORK/sock" -r "$WORK/sock/rpc.sock" -c "$WORK/config.json" -L warn \
        > "$WORK/$t.log" 2>&1 &
      TARGET_PID=$!
      ;;
    qsd-null|qsd-file)
      [ -n "$QSD" ] || { echo "compare.sh: qemu-storage-daemon not installed" >&2; return 1; }
      local blockdev
      if [ "$t" = qsd-null ]; then
        blockdev="driver=null-co,node-name=disk0,size=$SIZE_BYTES"
      else
        [ -f "$SHM_FILE" ] || fallocate -l "$SIZE_BYTES" "$SHM_FILE"
        blockdev="driver=file,node-name=disk0,filename=$SHM_FILE,cache.direct=off"
      fi
      taskset -c "$TARGET_CPU" "$QSD" --blockdev "$blockdev" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1" \
        > "$WORK/$t.log" 2>&1 &
      TARGET_PID=$!
      ;;
    qsd-uring-shm|qsd-uring-direct|qsd-native-direct)
      [ -n "$QSD" ] || { echo "compare.sh: qemu-storage-daemon not installed" >&2; return 1; }
      local where="${t##*-}" aio="${t#qsd-}" direct=off
      aio="${aio%-*}"
      [ "$aio" = uring ] && aio=io_uring
      [ "$where" = direct ] && direct=on
      local file
      file="$(backing_file "$where")" || return 1
      taskset -c "$TARGET_CPU" "$QSD" \
        --blockdev "driver=file,node-name=disk0,filename=$file,aio=$aio,cache.direct=$direct" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1,logical-block-size=512" \
        > "$WORK/$t.log" 2>&1 &
      TARGET_PID=$!
      ;;
    socket)
      SOCK="$SOCKET"; TYPE="$SOCKET_TYPE"; TARGET_PID=""
      return 0
      ;;
    *) echo "compare.sh: unknown target $t" >&2; return 1 ;;
  esac
  wait_socket "$SOCK" || { echo "compare.sh: $t did not come up; log:" >&2; cat "$WORK/$t.log" >&2; return 1; }
}

echo "target,workload,qd,round,iops,avg_lat_us,p50_lat_us,p99_lat_us,io_errors" > "$OUT"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), rounds=$ROUNDS secs=$SECS bs=$BS size=$SIZE"
echo "# targets: $TARGETS (baseline $BASELINE); target on CPU $TARGET_CPU, initiator on CPU $INITIATOR_CPU"
echo "# per-round CSV: $OUT"
for wl in $WORKLOADS; do
  rw="${wl%%:*}"; qd="${wl##*:}"
  for round in $(seq "$ROUNDS"); do
    for t in $TARGETS; do
      if ! start_target "$t"; then
        echo "$t,$rw,$qd,$round,,,,,failed" >> "$OUT"
        stop_target
        continue
      fi
      json="$("$PERF" --socket "$SOCK" --type "$TYPE" --rw "$rw" --bs "$BS" --qd "$qd" \
                --time "$SECS" --size "$SIZE" --cpu "$INITIATOR_CPU" --json 2>"$WORK/perf.err" || true)"
      stop_target
      line="$(python3 -c '
import json, sys
try:
    r = json.loads(sys.argv[1])
except Exception:
    print(",,,,failed"); sys.exit()
t = r["total"]
l = t["latency"]
print("%.0f,%.2f,%.2f,%.2f,%d" % (t["iops"], l["avg_ns"] / 1e3, l["p50_ns"] / 1e3, l["p99_ns"] / 1e3, r["io_errors"]))
' "$json")"
      echo "$t,$rw,$qd,$round,$line" >> "$OUT"
      printf '%-20s %-9s qd=%-4s round %s: %s\n' "$t" "$rw" "$qd" "$round" "$line"
      if [ "${line##*,}" = failed ]; then sed 's/^/    perf: /' "$WORK/perf.err" | tail -3; fi
    done
  done
done

python3 - "$OUT" "$BASELINE" <<'PY'
import csv, statistics, sys
from collections import defaultdict
path, baseline = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(path)) if r["iops"]]
by = defaultdict(dict)   # (workload, qd) -> target -> round -> row
for r in rows:
    by[(r["workload"], r["qd"])].setdefault(r["target"], {})[r["round"]] = r
print()
print(f"| workload | QD | target | median IOPS | median avg lat (us) | median p50 (us) | median p99 (us) | median per-round ratio to {baseline} | rounds |")
print("|---|---|---|---|---|---|---|---|---|")
for (wl, qd), targets in by.items():
    base = targets.get(baseline, {})
    for t, rounds in targets.items():
        iops = [float(r["iops"]) for r in rounds.values()]
        lat = [float(r["avg_lat_us"]) for r in rounds.values()]
        p50 = [float(r["p50_lat_us"]) for r in rounds.values()]
        p99 = [float(r["p99_lat_us"]) for r in rounds.values()]
        ratios = [float(r["iops"]) / float(base[k]["iops"]) for k, r in rounds.items()
                  if k in base and float(base[k]["iops"]) > 0]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        print(f"| {wl} | {qd} | {t} | {statistics.median(iops):,.0f} | {statistics.median(lat):.2f} | {statistics.median(p50):.2f} | {statistics.median(p99):.2f} | {ratio} | {len(iops)} |")
PY
