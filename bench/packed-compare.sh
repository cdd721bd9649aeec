#!/usr/bin/env bash
# Split against packed virtqueues in IOPS: rvhost (vhost-user-blk and vhost-user-scsi, on a null
# and on a malloc bdev) driven by rvhost-perf with split rings and with `--packed`.
#
# One rvhost process per device type and bdev (busy polling, pinned to --target-cpu) serves one
# controller; each round runs rvhost-perf (pinned to --initiator-cpu) once with split rings and
# once with packed ones, each on a fresh vhost-user connection, the order alternating from round
# to round so slow drifts of a noisy machine hit both alike. Per-round IOPS, each side's busy time
# per request and the 1-minute load average go to a CSV; the summary gives per device, bdev and
# workload the median IOPS of each layout, the median of the per-round ratios packed/split, and
# the median busy ns per request of the target (framework_get_reactors' busy ticks over the run
# ÷ requests) and of the initiator (rvhost-perf's own busy time ÷ requests): the side whose busy
# fraction (busy ns per request × IOPS) is near 1 is the one that limits the run.
#
# Requests are direct chains of three ring descriptors unless --indirect (rvhost-perf --indirect:
# one ring descriptor pointing at an indirect table, as a Linux guest offers them);
# --chains "direct indirect" runs both in every round (the order reversed every other round)
# and summarises each apart.
#
#   bench/packed-compare.sh                          # 5 rounds x 2 s, randread QD 1/32/128
#   bench/packed-compare.sh --rt --rounds 7          # SCHED_RR, on a machine busy with builds
#   bench/packed-compare.sh --types blk --bdevs null --workloads "randread:32 randwrite:32"
#   bench/packed-compare.sh --rt --indirect          # indirect tables in both layouts
#
# --rt runs target and initiator under SCHED_RR priority 1, as bench/compare.sh --rt does.
# Binaries: $RVHOST / --rvhost and $RVHOST_PERF / --perf, default build/release/{rvhost,rvhost-perf}.
set -euo pipefail

# shellcheck source=bench/lib-ab.sh
. "$(dirname "$0")/lib-ab.sh"
ab_defaults packed-compare
BDEVS="null malloc"

CHAINS="direct"

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bdevs) BDEVS="$2"; shift 2 ;;
    --indirect) CHAINS="indirect"; shift ;;
    --chains) CHAINS="$2"; shift 2 ;;
    *) ab_option "$@"; shift "$AB_SHIFT" ;;
  esac
done
for chains in $CHAINS; do
  case "$chains" in
    direct|indirect) ;;
    *) echo "packed-compare.sh: --chains takes direct and/or indirect, not $chains" >&2; usage 2 ;;
  esac
done
ab_setup

# The target's busy time so far in ns (framework_get_reactors' busy ticks over its reactors).
target_busy_ns() {
  python3 "$(dirname "$0")/reactors-busy.py" "$WORK/sock/rpc.sock"
}

# Prints "IOPS INITIATOR_BUSY_NS_PER_IO REQUESTS" of one run ("split" or "packed" rings,
# "direct" or "indirect" chains); fails the script on an error or a report whose layout or chains
# are not the ones asked for.
run_perf() {
  local type="$1" rw="$2" qd="$3" ring="$4" chains="$5" json
  local args=(--socket "$WORK/sock/perf.0" --type "$type" --rw "$rw" --bs "$BS" --qd "$qd"
              --time "$SECS" --size "$SIZE" --cpu "$INITIATOR_CPU" --json)
  [ "$ring" = packed ] && args+=(--packed)
  [ "$chains" = indirect ] && args+=(--indirect)
  if ! json="$("${PRIO[@]}" "$PERF" "${args[@]}" 2>"$WORK/perf.err")"; then
    echo "packed-compare.sh: rvhost-perf failed ($type $rw qd $qd, $ring rings, $chains chains):" >&2
    tail -5 "$WORK/perf.err" >&2
    exit 1
  fi
  python3 -c '
import json, sys
r, ring, chains = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
errors, packed, indirect = r["io_errors"], r.get("packed", False), r.get("indirect", False)
if errors or packed != (ring == "packed") or indirect != (chains == "indirect"):
    sys.exit(f"{errors} I/O errors, packed={packed} indirect={indirect} for {ring} rings, {chains} chains")
print("%.0f %.1f %d" % (r["total"]["iops"], r["initiator"]["busy_ns_per_io"], r["total"]["ios"]))
' "$json" "$ring" "$chains"
}

echo "type,bdev,workload,qd,round,chains,ring,iops,load1,target_busy_ns_per_io,initiator_busy_ns_per_io" > "$OUT"
ab_header
echo "# chains: $CHAINS"
for type in $TYPES; do
  for bdev in $BDEVS; do
    start_target "$type" "$bdev"
    for wl in $WORKLOADS; do
      rw="${wl%%:*}"; qd="${wl##*:}"
      for round in $(seq "$ROUNDS"); do
        # Every (chains, ring) pair once, the whole order reversed every other round.
        runs=""
        for chains in $CHAINS; do
          for ring in split packed; do runs="$runs $chains:$ring"; done
        done
        [ $((round % 2)) = 0 ] && runs="$(echo "$runs" | tr ' ' '\n' | tac | tr '\n' ' ')"
        for run in $runs; do
          chains="${run%%:*}"; ring="${run##*:}"
          busy0="$(target_busy_ns)"
          read -r iops init_busy ios <<< "$(run_perf "$type" "$rw" "$qd" "$ring" "$chains")"
          busy1="$(target_busy_ns)"
          target_busy="$(python3 -c 'import sys; b0, b1, n = map(float, sys.argv[1:]); print("%.1f" % ((b1 - b0) / max(n, 1)))' "$busy0" "$busy1" "$ios")"
          load1="$(cut -d' ' -f1 /proc/loadavg)"
          echo "$type,$bdev,$rw,$qd,$round,$chains,$ring,$iops,$load1,$target_busy,$init_busy" >> "$OUT"
          printf '%-4s %-6s %-9s qd=%-4s round %s %-8s %-6s: %s IOPS, busy ns per I/O target %s initiator %s (load %s)\n' \
            "$type" "$bdev" "$rw" "$qd" "$round" "$chains" "$ring" "$iops" "$target_busy" "$init_busy" "$load1"
        done
      done
    done
    stop_target
  done
done

python3 - "$OUT" <<'PY'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
loads = [float(r["load1"]) for r in rows]
by = defaultdict(lambda: defaultdict(dict))  # (chains, type, bdev, workload, qd) -> round -> ring -> row
for r in rows:
    by[(r["chains"], r["type"], r["bdev"], r["workload"], r["qd"])][r["round"]][r["ring"]] = r
print()
print(f"load average (1 min) during the run: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}")
print()
print("| chains | device | bdev | workload | QD | median IOPS, split | median IOPS, packed | median per-round ratio packed/split | per-round ratios | target busy ns/IO split / packed | initiator busy ns/IO split / packed |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (c, t, b, wl, qd), rounds in sorted(by.items(), key=lambda kv: kv[0][0] != "indirect"):
    full = [r for r in rounds.values() if "split" in r and "packed" in r and float(r["split"]["iops"]) > 0]
    ratios = [float(r["packed"]["iops"]) / float(r["split"]["iops"]) for r in full]
    med = lambda ring, col: statistics.median(float(r[ring][col]) for r in full)
    split, packed = med("split", "iops"), med("packed", "iops")
    tb = f"{med('split', 'target_busy_ns_per_io'):.0f} / {med('packed', 'target_busy_ns_per_io'):.0f}"
    ib = f"{med('split', 'initiator_busy_ns_per_io'):.0f} / {med('packed', 'initiator_busy_ns_per_io'):.0f}"
    print(f"| {c} | {t} | {b} | {wl} | {qd} | {split:,.0f} | {packed:,.0f} | {statistics.median(ratios):.3f} | {' '.join(f'{x:.3f}' for x in ratios)} | {tb} | {ib} |")
PY
