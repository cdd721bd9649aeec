# A guest that the host migrates between QEMU processes while it does I/O. For each word in PHASES
# it starts verifying writers (RUN_SECONDS on their own 8 MiB) and a reader that keeps reading
# known data into the slots of a large buffer with O_DIRECT (`blkcheck readhold`: only the device
# writes those pages) until the host writes the phase's number into the marker block, then checks
# every slot. It prints `RESULT phase=WORD` for the host to act (migrate, cancel), then
# `RESULT WORD_reader=...` and `RESULT WORD_writers=...`.
. /lib/guest.sh
if ! wait_for "/sys/block/$DISK" 120; then
    result disk_present no
    exit 1
fi
result disk_present yes
wait_for "/dev/$DISK" 30
dev=/dev/$DISK
MIB=1048576
known=ok
r=0
while [ "$r" -lt "$REGIONS" ]; do
    out=$(blkcheck write "$dev" $(((KNOWN_MIB + r * SLOT_MIB) * MIB)) $((SLOT_MIB * MIB)) $((SEED + r)))
    [ "$out" = ok ] || known="$out"
    r=$((r + 1))
done
result known "$known"
n=0
for phase in $PHASES; do
    n=$((n + 1))
    blkcheck writers "$dev" $((n * 8 * MIB)) $((8 * MIB)) 4 "$RUN_SECONDS" "$HANG_SECONDS" \
        >"/tmp/writers-$phase" 2>&1 &
    blkcheck readhold "$dev" $((KNOWN_MIB * MIB)) $((SLOT_MIB * MIB)) "$REGIONS" "$SLOTS" "$SEED" \
        $((MARKER_MIB * MIB)) "$n" "$HANG_SECONDS" "/tmp/ready-$phase" >"/tmp/reader-$phase" 2>&1 &
    # The host moves the VM once the reader is reading.
    wait_for "/tmp/ready-$phase" 60 || log "reader of $phase not reading after 60 s"
    result phase "$phase"
    for what in reader writers; do
        tries=$(((RUN_SECONDS + HANG_SECONDS + 200) * 10))
        while [ ! -s "/tmp/$what-$phase" ] && [ "$tries" -gt 0 ]; do
            usleep 100000
            tries=$((tries - 1))
        done
        usleep 200000
        out=$(head -n 1 "/tmp/$what-$phase")
        result "${phase}_$what" "${out:-timeout}"
    done
done
