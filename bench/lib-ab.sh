# Sourced by the A/B round scripts (dirty-log-cost.sh, packed-compare.sh): each round runs
# rvhost-perf against one busy-polling rvhost twice, once per variant, on fresh connections. This
# file holds what they share: the options and their defaults, the binaries, the priority, the
# work directory and the target's start and stop.
#
#   . "$REPO/bench/lib-ab.sh"; ab_defaults NAME
#   while [ $# -gt 0 ]; do case "$1" in --own) ...;; *) ab_option "$@"; shift "$AB_SHIFT";; esac; done
#   ab_setup
#
# NAME prefixes the scripts' messages and their work directory (/tmp/rvhost-NAME.XXXXXX).

# shellcheck source=bench/lib-rt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-rt.sh"

# ab_defaults NAME: the shared options' defaults.
ab_defaults() {
  AB_NAME="$1"
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
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  BUILD="${CARGO_TARGET_DIR:-$REPO/build}"
  RVHOST="${RVHOST:-$BUILD/release/rvhost}"
  PERF="${RVHOST_PERF:-$BUILD/release/rvhost-perf}"
  TARGET_PID=""
}

# ab_option ARGS...: takes one shared option from ARGS and sets AB_SHIFT to the words it used;
# an option it does not know ends the script with the usage (the caller's `usage`).
ab_option() {
  AB_SHIFT=2
  case "$1" in
    --rounds) ROUNDS="$2" ;;
    --secs) SECS="$2" ;;
    --bs) BS="$2" ;;
    --size) SIZE="$2" ;;
    --workloads) WORKLOADS="$2" ;;
    --types) TYPES="$2" ;;
    --target-cpu) TARGET_CPU="$2" ;;
    --initiator-cpu) INITIATOR_CPU="$2" ;;
    --out) OUT="$2" ;;
    --rvhost) RVHOST="$2" ;;
    --perf) PERF="$2" ;;
    --rt) RT=1; AB_SHIFT=1 ;;
    -h|--help) usage 0 ;;
    *) echo "$AB_NAME.sh: unknown option $1" >&2; usage 2 ;;
  esac
}

# ab_setup: checks the binaries, sets PRIO, WORK, OUT, BLOCKS and MASK, and stops the target on
# exit.
ab_setup() {
  local bin
  for bin in "$RVHOST" "$PERF"; do
    [ -x "$bin" ] || { echo "$AB_NAME.sh: $bin not built (cargo build --release -p rvhost-target -p rvhost-bench)" >&2; exit 2; }
  done
  if [ "$RT" = 1 ]; then bench_prio rt; else bench_prio ""; fi
  WORK="$(mktemp -d "/tmp/rvhost-$AB_NAME.XXXXXX")"
  OUT="${OUT:-$WORK/rounds.csv}"
  trap ab_cleanup EXIT
  BLOCKS="$(python3 -c 'import sys; s=sys.argv[1].lower(); m={"k":1<<10,"m":1<<20,"g":1<<30}; print((int(s[:-1])*m[s[-1]] if s[-1] in m else int(s)) // 512)' "$SIZE")"
  MASK="0x$(printf %x $((1 << TARGET_CPU)))"
}

# ab_header: the run's two comment lines (date, kernel, settings, load; binary, commit, CSV).
ab_header() {
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), rounds=$ROUNDS secs=$SECS bs=$BS size=$SIZE, target CPU $TARGET_CPU, initiator CPU $INITIATOR_CPU$([ "$RT" = 1 ] && echo ', SCHED_RR'), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# rvhost: $RVHOST ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')); per-round CSV: $OUT"
}

ab_cleanup() {
  stop_target
  rm -rf "$WORK/sock"
}

# start_target TYPE BDEV: rvhost (busy polling, on TARGET_CPU) with controller perf.0 (TYPE: blk
# or scsi) on bdev Dev0 (BDEV: null or malloc) of SIZE.
start_target() {
  local type="$1" bdev="$2" create controller
  create="{\"method\":\"bdev_${bdev}_create\",\"params\":{\"name\":\"Dev0\",\"num_blocks\":$BLOCKS,\"block_size\":512}}"
  if [ "$type" = blk ]; then
    controller="{\"method\":\"vhost_create_blk_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"dev_name\":\"Dev0\",\"cpumask\":\"$MASK\"}}"
  else
    controller="{\"method\":\"vhost_create_scsi_controller\",\"params\":{\"ctrlr\":\"perf.0\",\"cpumask\":\"$MASK\"}},{\"method\":\"vhost_scsi_controller_add_target\",\"params\":{\"ctrlr\":\"perf.0\",\"scsi_target_num\":0,\"bdev_name\":\"Dev0\"}}"
  fi
  echo "[$create,$controller]" > "$WORK/config.json"
  rm -rf "$WORK/sock"; mkdir -p "$WORK/sock"
  RVHOST_BUSY_POLL=1 "${PRIO[@]}" taskset -c "$TARGET_CPU" "$RVHOST" -m "$MASK" -S "$WORK/sock" \
    -r "$WORK/sock/rpc.sock" -c "$WORK/config.json" -L warn > "$WORK/rvhost-$type-$bdev.log" 2>&1 &
  TARGET_PID=$!
  for _ in $(seq 400); do
    [ -S "$WORK/sock/perf.0" ] && return 0
    kill -0 "$TARGET_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "$AB_NAME.sh: rvhost ($type, $bdev) did not come up:" >&2
  tail -5 "$WORK/rvhost-$type-$bdev.log" >&2
  exit 1
}

stop_target() {
  if [ -n "$TARGET_PID" ]; then
    kill "$TARGET_PID" 2>/dev/null || true
    wait "$TARGET_PID" 2>/dev/null || true
  fi
  TARGET_PID=""
}
