#!/usr/bin/env bash
# Interleaved IOPS comparison of vhost-user targets driven by rvhost-perf and/or SPDK's bdevperf.
#
# Each round starts every target in turn on core 0 (and only that target, so a busy-polling
# target never steals the core from the next one), runs the initiator against it on core 1, and
# stops it: A B C A B C ... (with --initiator both, each target is started once per initiator).
# Per-round IOPS, latencies, the 1-minute load average and the cache-line round trip between the
# two cores (measured just before and after) go to a CSV; the summary gives, per initiator and target, the
# median IOPS and latencies, the median of the per-round ratios to the baseline target, and for
# every rvhost target with an SPDK peer the median of the per-round ratios rvhost/SPDK.
#
#   bench/compare.sh                         # everything: 5 rounds x 10 s, QD 1/32/128, read+write
#   bench/compare.sh --rounds 2 --secs 3     # a quick look
#   bench/compare.sh --targets "rvhost-null qsd-null" --workloads "randread:32 randread:1"
#   bench/compare.sh --socket /path/to/vhost.sock --socket-type blk   # adds an external target
#   bench/compare.sh --files shm             # file bdevs vs qsd on one file in /dev/shm
#   bench/compare.sh --files direct --direct-dir /work/tmp   # O_DIRECT on a real filesystem
#   SPDK_DIR=/path/to/spdk bench/compare.sh --spdk --initiator both   # rvhost beside SPDK v25.09
#
# Targets: rvhost-null rvhost-malloc qsd-null qsd-file (blk); rvhost-scsi-null rvhost-scsi-malloc
# (scsi, with --scsi); "socket" (an already running target given by --socket, not restarted).
# File targets (blk, all on the same file; --files replaces the default targets and makes the qsd
# io_uring peer the baseline): rvhost-uring-shm rvhost-aio-shm qsd-uring-shm (buffered, /dev/shm);
# rvhost-uring-direct rvhost-aio-direct qsd-uring-direct qsd-native-direct (O_DIRECT, a file in
# --direct-dir, default $BUILD/compare-files; --direct-prep fill|fallocate|sparse says how that file
# is made: fill writes every block, so O_DIRECT writes are overwrites of written extents).
# SPDK targets (SPDK's vhost app from the built tree SPDK_DIR names; never built here):
# spdk-null spdk-malloc (blk), spdk-scsi-null spdk-scsi-malloc (scsi), spdk-aio (blk, SPDK's aio bdev, which opens
# with O_DIRECT, on the --files direct file), spdk-aio-shm (the same on the /dev/shm file). --spdk adds each rvhost target's SPDK peer and makes
# targets run in pairs (SPDK first). Without SPDK_DIR the SPDK targets and bdevperf are skipped
# with a message. SPDK programs run with -u (no PCI) and need 2 MiB hugepages (768 MiB).
# --initiator rvhost-perf|bdevperf|both (bdevperf: SPDK's, as a virtio-user initiator with
# vq_count 2). --rvhost-reactor busy|adaptive: RVHOST_BUSY_POLL=1 (the default, as SPDK's
# reactors) or rvhost's default adaptive reactor. --nice N or --rt (SCHED_RR) runs targets,
# initiators and the probe at that priority (--rt on a machine busy with builds).
# --rate IOPS (rvhost-perf only) offers a fixed load instead of a closed loop. For every rvhost
# and SPDK target the run reads the target's framework_get_reactors busy ticks and its process
# CPU time before and after each measurement: the CSV and summary give the target's busy ns and
# CPU ns per request (at a fixed load below saturation, its own cost per request).
# The rvhost/SPDK summary also gives the ratios over only the rounds in which all four core
# round-trip probes of the pair fell on one side of --rtt-split NS (default 200; this VM's two
# levels are ~100 and ~350 ns): rounds in which the host moved the vCPUs are set aside.
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
SPDK_DIR="${SPDK_DIR:-}"
SPDK=0
INITIATORS=rvhost-perf
RVHOST_REACTOR=busy
NICE=""
RATE=""
RTT_SPLIT=200

usage() { sed -n '2,42p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

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
    --spdk) SPDK=1; shift ;;
    --initiator) INITIATORS="$2"; shift 2 ;;
    --rvhost-reactor) RVHOST_REACTOR="$2"; shift 2 ;;
    --nice) NICE="$2"; shift 2 ;;
    --rt) NICE=rt; shift ;;
    --rate) RATE="$2"; shift 2 ;;
    --rtt-split) RTT_SPLIT="$2"; shift 2 ;;
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
case "$INITIATORS" in
  rvhost-perf|bdevperf) ;;
  both) INITIATORS="rvhost-perf bdevperf" ;;
  *) echo "compare.sh: --initiator takes rvhost-perf, bdevperf or both" >&2; exit 2 ;;
esac
if [ -n "$RATE" ] && [ "$INITIATORS" != rvhost-perf ]; then
  echo "compare.sh: --rate needs --initiator rvhost-perf (bdevperf has no fixed-rate mode)" >&2; exit 2
fi
case "$RVHOST_REACTOR" in
  busy|adaptive) ;;
  *) echo "compare.sh: --rvhost-reactor takes busy or adaptive" >&2; exit 2 ;;
esac

# The SPDK peer of an rvhost target (empty when there is none).
spdk_peer() {
  case "$1" in
    rvhost-null) echo spdk-null ;;
    rvhost-malloc) echo spdk-malloc ;;
    rvhost-scsi-null) echo spdk-scsi-null ;;
    rvhost-scsi-malloc) echo spdk-scsi-malloc ;;
    rvhost-aio-direct|rvhost-uring-direct) echo spdk-aio ;;
    rvhost-aio-shm|rvhost-uring-shm) echo spdk-aio-shm ;;
  esac
}
if [ "$SPDK" = 1 ]; then
  # Each rvhost target preceded by its SPDK peer: SPDK, rvhost, SPDK, rvhost, ...
  paired=""
  for t in $TARGETS; do
    p="$(spdk_peer "$t")"
    if [ -n "$p" ] && [[ " $paired " != *" $p "* ]]; then paired="$paired $p"; fi
    paired="$paired $t"
  done
  TARGETS="${paired# }"
fi
SPDK_OK=0
if [ -n "$SPDK_DIR" ]; then
  if [ -x "$SPDK_DIR/build/bin/vhost" ] || [ -x "$SPDK_DIR/build/examples/bdevperf" ]; then
    SPDK_OK=1
    # SPDK's own libraries and its isa-l submodules' (a --with-shared build), nothing else.
    SPDK_LIBS="$SPDK_DIR/build/lib:$SPDK_DIR/isa-l/.libs:$SPDK_DIR/isa-l-crypto/.libs"
    # No PCI (-u); one hugetlbfs file per process (-g: virtio-user passes at most 8 memory
    # regions, and without hugepages bdevperf's virtio-user I/O never completed here); no core
    # lock files, so a stray SPDK process elsewhere cannot make a run fail.
    SPDK_MEM=(-u -g --disable-cpumask-locks)
    free_huge="$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)"
    if [ "${free_huge:-0}" -lt 384 ]; then
      echo "compare.sh: SPDK needs 2 MiB hugepages (768 MiB free for the vhost app and bdevperf; there are ${free_huge:-0} pages): echo 1024 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages" >&2
    fi
  else
    echo "compare.sh: SPDK_DIR=$SPDK_DIR has no build/bin/vhost or build/examples/bdevperf (build SPDK there first); SPDK targets and bdevperf skipped" >&2
  fi
fi
if [ "$SPDK_OK" = 0 ]; then
  kept=""
  for t in $TARGETS; do
    case "$t" in
      spdk-*) [ -n "$SPDK_DIR" ] || echo "compare.sh: SPDK_DIR is not set; skipping $t" >&2 ;;
      *) kept="$kept $t" ;;
    esac
  done
  TARGETS="${kept# }"
  if [[ " $INITIATORS " == *" bdevperf "* ]]; then
    [ -n "$SPDK_DIR" ] || echo "compare.sh: SPDK_DIR is not set; skipping the bdevperf initiator" >&2
    INITIATORS="${INITIATORS/bdevperf/}"
    INITIATORS="$(echo $INITIATORS)"
  fi
fi
# --nice N runs targets, initiators and the probe at that niceness; --rt under SCHED_RR priority
# 1 (why: bench/lib-rt.sh).
# shellcheck source=bench/lib-rt.sh
. "$REPO/bench/lib-rt.sh"
bench_prio "$NICE"
[ -n "$TARGETS" ] || { echo "compare.sh: no target left to run" >&2; exit 2; }
[ -n "$INITIATORS" ] || { echo "compare.sh: no initiator left to run" >&2; exit 2; }
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

# SPDK's vhost app with the same controller, as an SPDK JSON config (subsystems).
spdk_config() {
  local kind="$1" bdev="$2" create
  case "$bdev" in
    null) create="{\"method\":\"bdev_null_create\",\"params\":{\"name\":\"Dev0\",\"num_blocks\":$BLOCKS,\"block_size\":512}}" ;;
    malloc) create="{\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"Dev0\",\"num_blocks\":$BLOCKS,\"block_size\":512}}" ;;
    aio-direct|aio-shm)
      local file
      file="$(backing_file "${bdev#aio-}")" || return 1
      create="{\"method\":\"bdev_aio_create\",\"params\":{\"name\":\"Dev0\",\"filename\":\"$file\",\"block_size\":512}}" ;;
  esac
  local mask
  mask="0x$(printf %x $((1 << TARGET_CPU)))"
  if [ "$kind" = blk ]; then
    echo "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[$create]},{\"subsystem\":\"vhost_blk\",\"config\":[{\"method\":\"vhost_create_blk_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"dev_name\":\"Dev0\",\"cpumask\":\"$mask\"}}]}]}"
  else
    echo "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[$create]},{\"subsystem\":\"vhost_scsi\",\"config\":[{\"method\":\"vhost_create_scsi_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"cpumask\":\"$mask\"}},{\"method\":\"vhost_scsi_controller_add_target\",\"params\":{\"ctrlr\":\"perf.0\",\"scsi_target_num\":0,\"bdev_name\":\"Dev0\"}}]}]}"
  fi
}

# Runs initiator $1 against $SOCK ($TYPE) for workload $2 at depth $3; prints
# "iops,avg_lat_us,p50_lat_us,p99_lat_us,io_errors" or ",,,,failed" (details in $WORK/init.err).
run_initiator() {
  local init="$1" rw="$2" qd="$3"
  if [ "$init" = rvhost-perf ]; then
    local json
    json="$("${PRIO[@]}" "$PERF" --socket "$SOCK" --type "$TYPE" --rw "$rw" --bs "$BS" --qd "$qd" \
              --time "$SECS" --size "$SIZE" --cpu "$INITIATOR_CPU" ${RATE:+--rate "$RATE"} \
              --json 2>"$WORK/init.err" || true)"
    python3 -c '
import json, sys
try:
    r = json.loads(sys.argv[1])
except Exception:
    print(",,,,failed"); sys.exit()
t = r["total"]
l = t["latency"]
print("%.0f,%.2f,%.2f,%.2f,%d" % (t["iops"], l["avg_ns"] / 1e3, l["p50_ns"] / 1e3, l["p99_ns"] / 1e3, r["io_errors"]))
' "$json"
    return
  fi
  # SPDK's bdevperf as a virtio-user initiator of the target's socket (a fresh SPDK process each
  # time, its reactor on the initiator core; -l prints the latency percentiles).
  local bs_bytes
  bs_bytes="$(size_bytes "$BS")"
  echo "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[{\"method\":\"bdev_virtio_attach_controller\",\"params\":{\"name\":\"Virtio0\",\"trtype\":\"user\",\"traddr\":\"$SOCK\",\"dev_type\":\"$TYPE\",\"vq_count\":2,\"vq_size\":512}}]}]}" > "$WORK/bdevperf.json"
  LD_LIBRARY_PATH="$SPDK_LIBS" timeout -k 5 $((SECS + 60)) "${PRIO[@]}" "$SPDK_DIR/build/examples/bdevperf" \
    "${SPDK_MEM[@]}" -s 256 -m "0x$(printf %x $((1 << INITIATOR_CPU)))" -c "$WORK/bdevperf.json" \
    -q "$qd" -o "$bs_bytes" -w "$rw" -t "$SECS" -l > "$WORK/bdevperf.out" 2>"$WORK/init.err" || true
  python3 -c '
import re, sys
text = open(sys.argv[1], errors="replace").read().replace("\r", "\n")
total = re.search(r"^\s*Total\s*:\s+([0-9.]+)\s+[0-9.]+\s+([0-9.]+)\s+[0-9.]+\s+([0-9.]+)", text, re.M)
if not total or float(total.group(1)) == 0:
    print(",,,,failed"); sys.exit()
pct = dict((float(p), float(v)) for p, v in re.findall(r"^\s*([0-9.]+)%\s*:\s*([0-9.]+)us", text, re.M))
iops, fails, avg = float(total.group(1)), float(total.group(2)), float(total.group(3))
p50 = pct.get(50.0, float("nan")); p99 = pct.get(99.0, float("nan"))
print("%.0f,%.2f,%.2f,%.2f,%d" % (iops, avg, p50, p99, round(fails * float(sys.argv[2]))))
' "$WORK/bdevperf.out" "$SECS"
  cat "$WORK/bdevperf.out" >> "$WORK/init.err"
}

wait_socket() {
  for _ in $(seq 400); do
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
      # Busy polling by default, as SPDK's reactors; --rvhost-reactor adaptive runs what users run.
      local busy=1
      [ "$RVHOST_REACTOR" = busy ] || busy=""
      RVHOST_BUSY_POLL=$busy "${PRIO[@]}" taskset -c "$TARGET_CPU" "$RVHOST" -m "0x$(printf %x $((1 << TARGET_CPU)))" \
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
      "${PRIO[@]}" taskset -c "$TARGET_CPU" "$QSD" --blockdev "$blockdev" \
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
      "${PRIO[@]}" taskset -c "$TARGET_CPU" "$QSD" \
        --blockdev "driver=file,node-name=disk0,filename=$file,aio=$aio,cache.direct=$direct" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1,logical-block-size=512" \
        > "$WORK/$t.log" 2>&1 &
      TARGET_PID=$!
      ;;
    spdk-null|spdk-malloc|spdk-scsi-null|spdk-scsi-malloc|spdk-aio|spdk-aio-shm)
      local kind=blk bdev=null
      case "$t" in spdk-scsi-*) kind=scsi; TYPE=scsi ;; esac
      case "$t" in *-malloc) bdev=malloc ;; spdk-aio) bdev=aio-direct ;; spdk-aio-shm) bdev=aio-shm ;; esac
      spdk_config "$kind" "$bdev" > "$WORK/config.json" || return 1
      # SPDK's vhost app: one reactor on the target core, the controller's socket in $WORK/sock.
      LD_LIBRARY_PATH="$SPDK_LIBS" "${PRIO[@]}" taskset -c "$TARGET_CPU" "$SPDK_DIR/build/bin/vhost" \
        "${SPDK_MEM[@]}" -s 512 -m "0x$(printf %x $((1 << TARGET_CPU)))" -S "$WORK/sock" \
        -r "$WORK/sock/rpc.sock" --json "$WORK/config.json" > "$WORK/$t.log" 2>&1 &
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

# The cache-line round trip between the two cores just before a measurement (rvhost-perf
# --probe-cores): on a VM it switches between levels as the host moves the vCPUs, and every
# poll-mode figure follows it (bench/README.md, "Against SPDK v25.09").
core_probe() {
  "${PRIO[@]}" "$PERF" --probe-cores "$TARGET_CPU,$INITIATOR_CPU" --probe-ms 200 --json 2>/dev/null \
    | python3 -c 'import json, sys; print("%.0f" % json.load(sys.stdin)["round_trip_ns"])' 2>/dev/null || true
}

# The target's own accounting now: "busy_ns cpu_ns" (framework_get_reactors' busy ticks over
# all reactors, in ns; the process's user+system CPU time, in ns), or "" for a target without
# one. rvhost and SPDK answer the same JSON-RPC method on the same socket path.
target_cost() {
  [ -n "$TARGET_PID" ] && [ -S "$WORK/sock/rpc.sock" ] || return 0
  python3 "$REPO/bench/reactors-busy.py" "$WORK/sock/rpc.sock" "$TARGET_PID" 2>/dev/null || true
}

# Per-request cost from two target_cost readings and the requests counted.
cost_per_io() {
  python3 -c '
import sys
a, b, ios = sys.argv[1].split(), sys.argv[2].split(), float(sys.argv[3] or 0)
if len(a) != 2 or len(b) != 2 or ios <= 0:
    print(","); sys.exit()
print("%.1f,%.1f" % ((float(b[0]) - float(a[0])) / ios, (float(b[1]) - float(a[1])) / ios))
' "$1" "$2" "$3"
}

echo "initiator,target,workload,qd,round,iops,avg_lat_us,p50_lat_us,p99_lat_us,io_errors,load1,core_rtt_ns,core_rtt_after_ns,target_busy_ns_per_io,target_cpu_ns_per_io" > "$OUT"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), rounds=$ROUNDS secs=$SECS bs=$BS size=$SIZE, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# targets: $TARGETS (baseline $BASELINE); initiators: $INITIATORS; rvhost reactor: $RVHOST_REACTOR; target on CPU $TARGET_CPU, initiator on CPU $INITIATOR_CPU${NICE:+, nice $NICE}${RATE:+, offered load $RATE IOPS}"
if [ "$SPDK_OK" = 1 ]; then
  echo "# SPDK: $SPDK_DIR ($(git -C "$SPDK_DIR" describe --tags 2>/dev/null || cat "$SPDK_DIR/VERSION" 2>/dev/null || true))"
fi
echo "# per-round CSV: $OUT"
for wl in $WORKLOADS; do
  rw="${wl%%:*}"; qd="${wl##*:}"
  for round in $(seq "$ROUNDS"); do
    for t in $TARGETS; do
      for init in $INITIATORS; do
        rtt="$(core_probe)"
        if ! start_target "$t"; then
          echo "$init,$t,$rw,$qd,$round,,,,,failed,,$rtt,,," >> "$OUT"
          stop_target
          continue
        fi
        cost0="$(target_cost)"
        line="$(run_initiator "$init" "$rw" "$qd")"
        load1="$(cut -d' ' -f1 /proc/loadavg)"
        cost1=""
        # An rvhost reactor publishes its counters every 1024 rounds: let it run a few idle ones.
        [ -z "$cost0" ] || { sleep 0.2; cost1="$(target_cost)"; }
        cost="$(cost_per_io "$cost0" "$cost1" "$(python3 -c 'import sys; print(round(float(sys.argv[1] or 0) * float(sys.argv[2])))' "${line%%,*}" "$SECS")")"
        stop_target
        rtt_after="$(core_probe)"
        echo "$init,$t,$rw,$qd,$round,$line,$load1,$rtt,$rtt_after,$cost" >> "$OUT"
        printf '%-11s %-20s %-9s qd=%-4s round %s: %s (load %s, core rtt %s/%s ns, target busy/cpu ns per IO %s)\n' "$init" "$t" "$rw" "$qd" "$round" "$line" "$load1" "$rtt" "$rtt_after" "$cost"
        if [ "${line##*,}" = failed ]; then sed 's/^/    initiator: /' "$WORK/init.err" | tail -3; fi
      done
    done
  done
done

python3 - "$OUT" "$BASELINE" "$RTT_SPLIT" <<'PY'
import csv, statistics, sys
from collections import defaultdict
path, baseline, split = sys.argv[1], sys.argv[2], float(sys.argv[3])
all_rows = list(csv.DictReader(open(path)))
rows = [r for r in all_rows if r["iops"]]
loads = [float(r["load1"]) for r in all_rows if r.get("load1")]
by = defaultdict(dict)   # (initiator, workload, qd) -> target -> round -> row
for r in rows:
    by[(r["initiator"], r["workload"], r["qd"])].setdefault(r["target"], {})[r["round"]] = r

def ratio_median(rounds, base):
    ratios = [float(r["iops"]) / float(base[k]["iops"]) for k, r in rounds.items()
              if k in base and float(base[k]["iops"]) > 0]
    return (f"{statistics.median(ratios):.2f}", ratios) if ratios else ("-", [])

print()
if loads:
    print(f"load average (1 min) during the run: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}")
    print()
print(f"| initiator | workload | QD | target | median IOPS | median avg lat (us) | median p50 (us) | median p99 (us) | median per-round ratio to {baseline} | median target busy / CPU ns per IO | rounds | core rtt before/after each round (ns) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (init, wl, qd), targets in by.items():
    base = targets.get(baseline, {})
    for t, rounds in targets.items():
        med = lambda k: statistics.median([float(r[k]) for r in rounds.values()])
        ratio, _ = ratio_median(rounds, base)
        rtts = " ".join(f'{r.get("core_rtt_ns") or "-"}/{r.get("core_rtt_after_ns") or "-"}' for r in rounds.values())
        def med_opt(k):
            v = [float(r[k]) for r in rounds.values() if r.get(k)]
            return f"{statistics.median(v):.0f}" if v else "-"
        cost = f"{med_opt('target_busy_ns_per_io')} / {med_opt('target_cpu_ns_per_io')}"
        print(f"| {init} | {wl} | {qd} | {t} | {med('iops'):,.0f} | {med('avg_lat_us'):.2f} | {med('p50_lat_us'):.2f} | {med('p99_lat_us'):.2f} | {ratio} | {cost} | {len(rounds)} | {rtts} |")

peers = {"rvhost-null": "spdk-null", "rvhost-malloc": "spdk-malloc",
         "rvhost-scsi-null": "spdk-scsi-null", "rvhost-scsi-malloc": "spdk-scsi-malloc",
         "rvhost-aio-direct": "spdk-aio", "rvhost-aio-shm": "spdk-aio-shm",
         "rvhost-uring-shm": "spdk-aio-shm",
         "rvhost-uring-direct": "spdk-aio"}
pairs = [(init, wl, qd, t, peers[t]) for (init, wl, qd), targets in by.items()
         for t in targets if t in peers and peers[t] in targets]
if pairs:
    print()
    def state(*rows):
        probes = [float(r[k]) for r in rows for k in ("core_rtt_ns", "core_rtt_after_ns") if r.get(k)]
        if len(probes) != 2 * len(rows):
            return None
        if all(p < split for p in probes):
            return "fast"
        if all(p >= split for p in probes):
            return "slow"
        return None
    print(f"Same-state rounds: all four probes of the pair below {split:.0f} ns (fast) or all at or above (slow); the others are set aside.")
    print()
    print("| initiator | workload | QD | rvhost target | SPDK target | median per-round ratio rvhost/SPDK | per-round ratios | median per-round p50 latency ratio rvhost/SPDK | median per-round busy-per-IO ratio rvhost/SPDK | same-state IOPS ratio (n: fast+slow) | same-state p50 ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for init, wl, qd, t, p in pairs:
        targets = by[(init, wl, qd)]
        ratio, ratios = ratio_median(targets[t], targets[p])
        base = targets[p]
        p50s = [float(r["p50_lat_us"]) / float(base[k]["p50_lat_us"]) for k, r in targets[t].items()
                if k in base and float(base[k]["p50_lat_us"] or "nan") > 0]
        p50 = f"{statistics.median(p50s):.2f}" if p50s else "-"
        busy = [float(r["target_busy_ns_per_io"]) / float(base[k]["target_busy_ns_per_io"])
                for k, r in targets[t].items()
                if k in base and r.get("target_busy_ns_per_io") and base[k].get("target_busy_ns_per_io")
                and float(base[k]["target_busy_ns_per_io"]) > 0]
        busy_ratio = f"{statistics.median(busy):.2f}" if busy else "-"
        same = [(k, state(r, base[k])) for k, r in targets[t].items() if k in base]
        same = [(k, st) for k, st in same if st]
        s_iops = [float(targets[t][k]["iops"]) / float(base[k]["iops"]) for k, _ in same if float(base[k]["iops"]) > 0]
        s_p50 = [float(targets[t][k]["p50_lat_us"]) / float(base[k]["p50_lat_us"]) for k, _ in same if float(base[k]["p50_lat_us"] or "nan") > 0]
        nf = sum(1 for _, st in same if st == "fast")
        s_txt = f"{statistics.median(s_iops):.2f} ({nf}+{len(same) - nf})" if s_iops else "- (0)"
        s_p50_txt = f"{statistics.median(s_p50):.2f}" if s_p50 else "-"
        print(f"| {init} | {wl} | {qd} | {t} | {p} | {ratio} | {' '.join(f'{x:.2f}' for x in ratios)} | {p50} | {busy_ratio} | {s_txt} | {s_p50_txt} |")
PY
