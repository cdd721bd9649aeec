#!/usr/bin/env bash
# Interleaved comparison on one Ceph RBD image: qemu-storage-daemon's rbd driver against rvhost's
# rbd bdev (and up to two more rvhost builds or settings, for A/B), each exported as
# vhost-user-blk, started one at a time pinned to core 0 (qsd with taskset; rvhost with `-m 0x1`
# and the cluster's core_mask 0x1, which puts librados' and librbd's threads there too) and
# driven by rvhost-perf pinned to core 1: qsd A B qsd A B ...
#
#   bench/rbd-compare.sh CEPH_DIR [IMAGE]
#
# CEPH_DIR is a cluster of scripts/ceph-cluster.sh (its ceph.conf and admin keyring); IMAGE (default
# bench0, in pool rbd) must exist (`rbd -c CEPH_DIR/ceph.conf create --size 1024 bench0`).
#
# Environment:
# - RVHOST (default build/release/rvhost), PERF (default build/release/rvhost-perf);
# - TARGETS (default "qsd rvhost", plus rvhost-b and rvhost-c when they are configured);
# - WORKLOADS (default randread and randwrite at QD 1, 32 and 128), ROUNDS (5), SECS (5), SIZE
#   (bytes addressed, 256m);
# - RVHOST_ENV: extra environment of rvhost (e.g. "RVHOST_RBD_MODE=events");
#   RVHOST_PARAMS: extra JSON members of its bdev_rbd_register_cluster (default
#   '"core_mask": "0x1"'; e.g. add '"config_param": {"rbd_cache": "false"}');
# - RVHOST_B, RVHOST_B_ENV, RVHOST_B_PARAMS (and RVHOST_C...): a second (third) rvhost, another
#   build or the same one with other settings; any of them set adds rvhost-b (rvhost-c);
# - NICE (e.g. -10): runs the targets and rvhost-perf at that nice level and renices every thread
#   of the cluster's daemons to it, their sessions' autogroups too (with autogroup scheduling a
#   nice level counts only inside its session), so that on a machine busy with other work the
#   benchmark's processes compete mainly with each other, as on a quiet machine.
#
# Prints one CSV row per run and, per workload and target, the median IOPS, the median of the
# per-round IOPS ratios to the first target and the CPU time per I/O: of the whole target
# process (every thread, librbd's and librados' too) and of its I/O thread alone (rvhost's
# reactor, `reactor_0`; qsd's main loop, the process's first thread), both from /proc
# (utime+stime of the process, schedstat of the thread) over the rvhost-perf run, divided by the
# I/Os it completed. Runs during which SCHED_RR processes (other benchmarks' `--rt`) computed for
# more than 0.2 s are left out of the summary: meanwhile everything else gets the 5 % of each
# second that real-time tasks leave.
set -euo pipefail

CEPH_DIR=${1:?usage: bench/rbd-compare.sh CEPH_DIR [IMAGE]}
IMAGE=${2:-bench0}
REPO=$(cd "$(dirname "$0")/.." && pwd)
RVHOST=${RVHOST:-$REPO/build/release/rvhost}
PERF=${PERF:-$REPO/build/release/rvhost-perf}
DEFAULT_TARGETS="qsd rvhost"
[ -n "${RVHOST_B:-}${RVHOST_B_PARAMS:-}${RVHOST_B_ENV:-}" ] && DEFAULT_TARGETS="$DEFAULT_TARGETS rvhost-b"
[ -n "${RVHOST_C:-}${RVHOST_C_PARAMS:-}${RVHOST_C_ENV:-}" ] && DEFAULT_TARGETS="$DEFAULT_TARGETS rvhost-c"
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
WORKLOADS=${WORKLOADS:-randread:1 randwrite:1 randread:32 randwrite:32 randread:128 randwrite:128}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
SIZE=${SIZE:-256m}
NICE=${NICE:-}
RUN=()
[ -n "$NICE" ] && RUN=(nice -n "$NICE")
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
      "${RUN[@]}" taskset -c 0 qemu-storage-daemon \
        --blockdev "driver=rbd,pool=rbd,image=$IMAGE,conf=$CONF,user=admin,node-name=r0,cache.direct=off" \
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$SOCK,writable=on" \
        >"$WORK/$t.log" 2>&1 &
      ;;
    rvhost|rvhost-b|rvhost-c)
      # core_mask 0x1: librados' and librbd's threads on the reactor's core, as taskset puts
      # every thread of qsd on it.
      local bin=$RVHOST params=${RVHOST_PARAMS-'"core_mask": "0x1"'} envs=${RVHOST_ENV:-}
      if [ "$t" = rvhost-b ]; then
        bin=${RVHOST_B:-$RVHOST}
        params=${RVHOST_B_PARAMS:-$params}
        envs=${RVHOST_B_ENV:-$envs}
      elif [ "$t" = rvhost-c ]; then
        bin=${RVHOST_C:-$RVHOST}
        params=${RVHOST_C_PARAMS:-$params}
        envs=${RVHOST_C_ENV:-$envs}
      fi
      cat >"$WORK/config.json" <<EOF
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_rbd_register_cluster", "params": {"name": "c0", "config_file": "$CONF", "key_file": "$KEYRING"${params:+, $params}}},
  {"method": "bdev_rbd_create", "params": {"name": "Rbd0", "cluster_name": "c0", "pool_name": "rbd", "rbd_name": "$IMAGE", "block_size": 512}}]},
 {"subsystem": "vhost_blk", "config": [
  {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.sock", "dev_name": "Rbd0"}}]}]}
EOF
      "${RUN[@]}" env $envs "$bin" -m 0x1 -S "$WORK" -r "$WORK/rpc.sock" -c "$WORK/config.json" >"$WORK/$t.log" 2>&1 &
      ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  PID=$!
  for _ in $(seq 300); do [ -S "$SOCK" ] && return 0; sleep 0.1; done
  echo "$t did not create $SOCK; its log:" >&2
  cat "$WORK/$t.log" >&2
  exit 1
}

# CPU time of the whole process in ns (utime + stime, clock ticks).
proc_cpu_ns() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%d\n", ($12 + $13) * 1e9 / hz }' "/proc/$1/stat"
}

# On-CPU time in ns of the process's I/O thread: rvhost's reactor_0, qsd's first thread.
io_thread() {
  local pid=$1 t
  for t in /proc/"$pid"/task/*; do
    if [ "$(cat "$t/comm" 2>/dev/null)" = reactor_0 ]; then basename "$t"; return; fi
  done
  echo "$pid"
}
thread_cpu_ns() { cut -d' ' -f1 "/proc/$1/task/$2/schedstat"; }

if [ -n "$NICE" ]; then
  # With autogroup scheduling (kernel.sched_autogroup_enabled), CPU time is shared first between
  # sessions and a thread's nice level counts only inside its session: each daemon (started with
  # setsid) and this script's session (targets and rvhost-perf) get the nice level as a group too.
  for pid in $$ $(cat "$CEPH_DIR"/run/*.pid); do
    [ -w "/proc/$pid/autogroup" ] && echo "$NICE" >"/proc/$pid/autogroup"
    for task in /proc/"$pid"/task/*; do
      renice -n "$NICE" -p "${task##*/}" >/dev/null
    done
  done
fi

# Processes running under SCHED_RR (other benchmarks' `--rt`): while one of them computes,
# everything else gets the 5 % of each second that real-time tasks leave, and a run's figures
# mean nothing. rr_cpu prints "PID:TICKS" of each such process (CPU time, every thread);
# rr_cpu_s BEFORE AFTER how many seconds of CPU they took in between.
rr_cpu() {
  local pid
  for pid in $(ps -eo cls=,pid= | awk '$1 == "RR" { print $2 }'); do
    awk -v p="$pid" '{ sub(/^.*\) /, ""); printf "%s:%d ", p, $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || true
  done
}
rr_cpu_s() {
  python3 -c '
import os, sys
def parse(arg):
    return dict(e.split(":", 1) for e in arg.split() if e.count(":") == 1 and e.split(":")[1].isdigit())
before, after = parse(sys.argv[1]), parse(sys.argv[2])
ticks = sum(max(0, int(t) - int(before.get(p, 0))) for p, t in after.items())
print("%.2f" % (ticks / os.sysconf("SC_CLK_TCK")))' "$1" "$2" || echo 0
}

echo "round,workload,target,iops,avg_us,p99_us,load1,cpu_us_per_io,io_thread_us_per_io,rr_cpu_s" | tee "$CSV"
for round in $(seq "$ROUNDS"); do
  for w in $WORKLOADS; do
    rw=${w%%:*} qd=${w##*:}
    for t in $TARGETS; do
      start_target "$t"
      tid=$(io_thread "$PID")
      rr0=$(rr_cpu)
      cpu0=$(proc_cpu_ns "$PID") th0=$(thread_cpu_ns "$PID" "$tid")
      json=$("${RUN[@]}" "$PERF" --socket "$SOCK" --rw "$rw" --qd "$qd" --bs 4k --time "$SECS" --size "$SIZE" \
               --cpu 1 --json 2>"$WORK/perf.err" || true)
      cpu1=$(proc_cpu_ns "$PID") th1=$(thread_cpu_ns "$PID" "$tid")
      stop_target
      row=$(python3 -c '
import json, sys
try:
    t = json.loads(sys.argv[1])["total"]
    print("%.0f,%.1f,%.1f" % (t["iops"], t["latency"]["avg_ns"] / 1e3, t["latency"]["p99_ns"] / 1e3))
    cpu = "%.2f,%.2f" % ((int(sys.argv[3]) - int(sys.argv[2])) / 1e3 / t["ios"],
                         (int(sys.argv[5]) - int(sys.argv[4])) / 1e3 / t["ios"])
except Exception:
    print(",,")
    cpu = ","
print(cpu, file=sys.stderr)
' "$json" "$cpu0" "$cpu1" "$th0" "$th1" 2>"$WORK/cpu")
      rr=$(rr_cpu_s "$rr0" "$(rr_cpu)")
      echo "$round,$w,$t,$row,$(cut -d' ' -f1 /proc/loadavg),$(cat "$WORK/cpu"),$rr" | tee -a "$CSV"
    done
  done
done

python3 - "$CSV" "$TARGETS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
# Runs during which real-time processes computed for more than 0.2 s are left out.
rt = [r for r in rows if float(r["rr_cpu_s"] or 0) > 0.2]
if rt:
    print("\n%d runs overlapped SCHED_RR work (rr_cpu_s > 0.2) and are left out" % len(rt))
    rows = [r for r in rows if r not in rt]
targets = sys.argv[2].split()
base = targets[0]
print("\nworkload       target     median IOPS  median avg µs  median ratio to %s  CPU µs/IO (process, I/O thread)" % base)
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
        cpu = [float(r["cpu_us_per_io"]) for r in runs.values() if r["cpu_us_per_io"]]
        th = [float(r["io_thread_us_per_io"]) for r in runs.values() if r["io_thread_us_per_io"]]
        print("%-14s %-10s %11.0f  %13.1f  %19.2f  %6.1f, %6.1f" % (
            w, t, statistics.median(float(r["iops"]) for r in runs.values()),
            statistics.median(float(r["avg_us"]) for r in runs.values()),
            statistics.median(ratios) if ratios else float("nan"),
            statistics.median(cpu) if cpu else float("nan"),
            statistics.median(th) if th else float("nan")))
loads = [float(r["load1"]) for r in rows]
print("load average (1 min): min %.1f, median %.1f, max %.1f" % (min(loads), statistics.median(loads), max(loads)))
EOF
echo "CSV: $CSV"
