#!/usr/bin/env bash
# What dirty logging for live migration costs in IOPS: rvhost on a null bdev (vhost-user-blk and
# vhost-user-scsi), driven by rvhost-perf with logging off and with `--dirty-log` (rvhost-perf
# then acts as a migrating frontend: SET_LOG_BASE, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG on every
# vring, before the first request).
#
# One rvhost process per device type (busy polling, pinned to --target-cpu) serves one
# controller on a null bdev; each round runs rvhost-perf (pinned to --initiator-cpu) once with
# logging off and once on, each on a fresh vhost-user connection, the order alternating from round
# to round so slow drifts of a noisy machine hit both alike. A run with logging on must report
# marked pages, one with logging off none. Per-round IOPS and the 1-minute load average go to a
# CSV; the summary gives per device type and workload the median IOPS off and on and the median
# of the per-round ratios on/off.
#
#   bench/dirty-log-cost.sh                          # 5 rounds x 2 s, randread QD 1/32/128
#   bench/dirty-log-cost.sh --rt --rounds 7          # SCHED_RR, on a machine busy with builds
#   bench/dirty-log-cost.sh --types blk --workloads "randread:32 randwrite:32"
#
# --rt runs target and initiator under SCHED_RR priority 1, as bench/compare.sh --rt does.
# Binaries: $RVHOST / --rvhost and $RVHOST_PERF / --perf, default build/release/{rvhost,rvhost-perf}.
set -euo pipefail

ROUNDS=5
SECS=2
BS=4k
SIZE=256m
WORKLOADS="randread:1 randread:32 randread:128"
TYPES="blk scsi"
TARGET_CPU=0
INITIATOR_CPU=1
RT=0
OUT=""
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${CARGO_TARGET_DIR:-$REPO/build}"
RVHOST="${RVHOST:-$BUILD/release/rvhost}"
PERF="${RVHOST_PERF:-$BUILD/release/rvhost-perf}"

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --bs) BS="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --workloads) WORKLOADS="$2"; shift 2 ;;
    --types) TYPES="$2"; shift 2 ;;
    --target-cpu) TARGET_CPU="$2"; shift 2 ;;
    --initiator-cpu) INITIATOR_CPU="$2"; shift 2 ;;
    --rt) RT=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --rvhost) RVHOST="$2"; shift 2 ;;
    --perf) PERF="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "dirty-log-cost.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

for bin in "$RVHOST" "$PERF"; do
  [ -x "$bin" ] || { echo "dirty-log-cost.sh: $bin not built (cargo build --release -p rvhost-target -p rvhost-bench)" >&2; exit 2; }
done
# shellcheck source=bench/lib-rt.sh
. "$REPO/bench/lib-rt.sh"
if [ "$RT" = 1 ]; then bench_prio rt; else bench_prio ""; fi
WORK="$(mktemp -d /tmp/rvhost-dirty-log-cost.XXXXXX)"
OUT="${OUT:-$WORK/rounds.csv}"
TARGET_PID=""
cleanup() {
  if [ -n "$TARGET_PID" ]; then kill "$TARGET_PID" 2>/dev/null || true; wait "$TARGET_PID" 2>/dev/null || true; fi
  rm -rf "$WORK/sock"
}
trap cleanup EXIT

BLOCKS="$(python3 -c 'import sys; s=sys.argv[1].lower(); m={"k":1<<10,"m":1<<20,"g":1<<30}; print((int(s[:-1])*m[s[-1]] if s[-1] in m else int(s)) // 512)' "$SIZE")"
MASK="0x$(printf %x $((1 << TARGET_CPU)))"

start_target() {
  local type="$1" null controller
  null="{\"method\":\"bdev_null_create\",\"params\":{\"name\":\"Dev0\",\"num_blocks\":$BLOCKS,\"block_size\":512}}"
  if [ "$type" = blk ]; then
    controller="{\"method\":\"vhost_create_blk_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"dev_name\":\"Dev0\",\"cpumask\":\"$MASK\"}}"
  else
    controller="{\"method\":\"vhost_create_scsi_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"cpumask\":\"$MASK\"}},{\"method\":\"vhost_scsi_controller_add_target\",\"params\":{\"ctrlr\":\"perf.0\",\"scsi_target_num\":0,\"bdev_name\":\"Dev0\"}}"
  fi
  echo "[$null,$controller]" > "$WORK/config.json"
  rm -rf "$WORK/sock"; mkdir -p "$WORK/sock"
  RVHOST_BUSY_POLL=1 "${PRIO[@]}" taskset -c "$TARGET_CPU" "$RVHOST" -m "$MASK" -S "$WORK/sock" \
    -r "$WORK/sock/rpc.sock" -c "$WORK/config.json" -L warn > "$WORK/rvhost-$type.log" 2>&1 &
  TARGET_PID=$!
  for _ in $(seq 400); do
    [ -S "$WORK/sock/perf.0" ] && return 0
    kill -0 "$TARGET_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "dirty-log-cost.sh: rvhost ($type) did not come up:" >&2
  tail -5 "$WORK/rvhost-$type.log" >&2
  exit 1
}

stop_target() {
  kill "$TARGET_PID" 2>/dev/null || true
  wait "$TARGET_PID" 2>/dev/null || true
  TARGET_PID=""
}

# Prints "iops,pages_marked" for one run (logging "off" or "on"); fails the script on an error
# or a log that says logging was not what was asked for.
run_perf() {
  local type="$1" rw="$2" qd="$3" log="$4" json
  local args=(--socket "$WORK/sock/perf.0" --type "$type" --rw "$rw" --bs "$BS" --qd "$qd"
              --time "$SECS" --size "$SIZE" --cpu "$INITIATOR_CPU" --json)
  [ "$log" = on ] && args+=(--dirty-log)
  if ! json="$("${PRIO[@]}" "$PERF" "${args[@]}" 2>"$WORK/perf.err")"; then
    echo "dirty-log-cost.sh: rvhost-perf failed ($type $rw qd $qd, logging $log):" >&2
    tail -5 "$WORK/perf.err" >&2
    exit 1
  fi
  python3 -c '
import json, sys
r, log = json.loads(sys.argv[1]), sys.argv[2]
marked = (r.get("dirty_log") or {}).get("pages_marked", 0)
errors = r["io_errors"]
if errors or (log == "on") != (marked > 0):
    sys.exit(f"{errors} I/O errors, {marked} pages marked with logging {log}")
print("%.0f,%d" % (r["total"]["iops"], marked))
' "$json" "$log"
}

echo "type,workload,qd,round,logging,iops,pages_marked,load1" > "$OUT"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), rounds=$ROUNDS secs=$SECS bs=$BS size=$SIZE, target CPU $TARGET_CPU, initiator CPU $INITIATOR_CPU$([ "$RT" = 1 ] && echo ', SCHED_RR'), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# rvhost: $RVHOST ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')); per-round CSV: $OUT"
for type in $TYPES; do
  start_target "$type"
  for wl in $WORKLOADS; do
    rw="${wl%%:*}"; qd="${wl##*:}"
    for round in $(seq "$ROUNDS"); do
      order="off on"
      [ $((round % 2)) = 0 ] && order="on off"
      for log in $order; do
        line="$(run_perf "$type" "$rw" "$qd" "$log")"
        load1="$(cut -d' ' -f1 /proc/loadavg)"
        echo "$type,$rw,$qd,$round,$log,$line,$load1" >> "$OUT"
        printf '%-4s %-9s qd=%-4s round %s logging %-3s: %s IOPS, %s pages marked (load %s)\n' \
          "$type" "$rw" "$qd" "$round" "$log" "${line%%,*}" "${line##*,}" "$load1"
      done
    done
  done
  stop_target
done

python3 - "$OUT" <<'PY'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
loads = [float(r["load1"]) for r in rows]
by = defaultdict(lambda: defaultdict(dict))  # (type, workload, qd) -> round -> logging -> iops
for r in rows:
    by[(r["type"], r["workload"], r["qd"])][r["round"]][r["logging"]] = float(r["iops"])
print()
print(f"load average (1 min) during the run: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}")
print()
print("| device | workload | QD | median IOPS, logging off | median IOPS, logging on | median per-round ratio on/off | per-round ratios |")
print("|---|---|---|---|---|---|---|")
for (t, wl, qd), rounds in by.items():
    full = [r for r in rounds.values() if "on" in r and "off" in r and r["off"] > 0]
    ratios = [r["on"] / r["off"] for r in full]
    off = statistics.median(r["off"] for r in full)
    on = statistics.median(r["on"] for r in full)
    print(f"| {t} | {wl} | {qd} | {off:,.0f} | {on:,.0f} | {statistics.median(ratios):.3f} | {' '.join(f'{x:.3f}' for x in ratios)} |")
PY
