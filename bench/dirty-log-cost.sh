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

# shellcheck source=bench/lib-ab.sh
. "$(dirname "$0")/lib-ab.sh"
ab_defaults dirty-log-cost

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    *) ab_option "$@"; shift "$AB_SHIFT" ;;
  esac
done
ab_setup

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
ab_header
for type in $TYPES; do
  start_target "$type" null
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
