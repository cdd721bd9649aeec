# Verifying writers on a disk whose backend the host kills and restarts under them. For each word
# in PHASES the writers run RUN_SECONDS on their own 8 MiB of the disk while the script prints
# `RESULT phase=WORD` (the host then does that phase's restarts); the outcome is
# `RESULT WORD_writers=ok:writes=N:max_ms=M`, the first error, or `hung:...` once a single I/O has
# waited HANG_SECONDS (the writers then stay stuck, so nothing more runs on the disk).
. /lib/guest.sh
if ! wait_for /sys/block/vda 120; then
    result disk_present no
    exit 1
fi
result disk_present yes
wait_for /dev/vda 30
MIB=1048576
n=0
for phase in $PHASES; do
    out_file=/tmp/writers-$phase.out
    blkcheck writers /dev/vda $((n * 8 * MIB)) $((8 * MIB)) 8 "$RUN_SECONDS" "$HANG_SECONDS" \
        > "$out_file" 2>&1 &
    result phase "$phase"
    tries=$(((RUN_SECONDS + HANG_SECONDS + 60) * 10))
    while [ ! -s "$out_file" ] && [ "$tries" -gt 0 ]; do
        usleep 100000
        tries=$((tries - 1))
    done
    usleep 200000
    out=$(head -n 1 "$out_file")
    result "${phase}_writers" "${out:-timeout}"
    case "$out" in
    ok:*) ;;
    *) break ;;
    esac
    n=$((n + 1))
done
