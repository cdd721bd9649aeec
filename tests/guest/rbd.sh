# RBD images behind rvhost (tests/tests/guest_rbd.rs). Disks: vda = vhost-blk on rbd image
# `blk` (rvhost A), vdb = vhost-blk on the same image through a second rvhost process (B), sda =
# vhost-scsi target 0 on rbd image `scsi` (rvhost A). The host compares the images with what is
# checked here (`rbd export`) after the guest powers off.
. /lib/guest.sh
MIB=1048576

wait_for /sys/bus/virtio/drivers/virtio_blk 60 || { result driver no; exit 1; }
tries=600
while ! virtio_disk 1 >/dev/null 2>&1; do
    tries=$((tries - 1)); [ "$tries" -gt 0 ] || break; usleep 100000
done
A=/dev/$(virtio_disk 0)
B=/dev/$(virtio_disk 1)
wait_for $A 30; wait_for $B 30

# checks PREFIX DEV SEED ZERO: patterns, flush, discard, write-zeroes (ZERO = punch: offloaded
# with no fallback, virtio-blk WRITE_ZEROES; zeroout: the kernel may fall back to writing zeros)
# on one disk.
checks() {
    p=$1; DEV=$2; s=$3; z=$4
    check "${p}_size" blkcheck size $DEV
    SIZE=$(blkcheck size $DEV)
    check "${p}_io_write" blkcheck write $DEV $MIB $((3 * MIB)) $s 262144
    check "${p}_io_write_end" blkcheck write $DEV $((SIZE - MIB)) $MIB $((s + 10))
    check "${p}_io_verify" blkcheck verify $DEV $MIB $((3 * MIB)) $s 65536
    check "${p}_io_flush" blkcheck flush $DEV
    # Discard 2..3 MiB: zeros there, the pattern intact on both sides.
    run "${p}_discard" blkdiscard -o $((2 * MIB)) -l $MIB $DEV
    check "${p}_discard_zeros" blkcheck zeros $DEV $((2 * MIB)) $MIB
    check "${p}_discard_head" blkcheck verify $DEV $MIB $MIB $s
    check "${p}_discard_tail" blkcheck verify $DEV $((3 * MIB)) $MIB $s
    # Write-zeroes of 5.25..5.75 MiB inside a pattern at 5..6 MiB.
    check "${p}_zeroes_prepare" blkcheck write $DEV $((5 * MIB)) $MIB $((s + 20))
    check "${p}_zeroes" blkcheck $z $DEV $((5 * MIB + MIB / 4)) $((MIB / 2))
    check "${p}_zeroes_read_zero" blkcheck zeros $DEV $((5 * MIB + MIB / 4)) $((MIB / 2))
    check "${p}_zeroes_head" blkcheck verify $DEV $((5 * MIB)) $((MIB / 4)) $((s + 20))
    check "${p}_zeroes_flush" blkcheck flush $DEV
}

checks blk $A 61 punch

# The same image through the other rvhost process: what A wrote and flushed, B reads; what B
# writes and flushes, A reads.
check shared_b_reads_a blkcheck verify $B $MIB $MIB 61 65536
check shared_b_write blkcheck write $B $((10 * MIB)) $MIB 91 65536
check shared_b_flush blkcheck flush $B
check shared_a_reads_b blkcheck verify $A $((10 * MIB)) $MIB 91 65536

if wait_for /sys/bus/virtio/drivers/virtio_scsi 60; then
    tries=600
    S=
    while [ -z "$S" ]; do
        for d in /sys/class/scsi_device/*:0:0:0; do
            [ -d "$d/device/block" ] && S=$(ls "$d/device/block" | head -n 1)
        done
        tries=$((tries - 1)); [ "$tries" -gt 0 ] || break; usleep 100000
    done
    if [ -n "$S" ] && wait_for /dev/$S 30; then
        result scsi_present yes
        checks scsi /dev/$S 62 zeroout
    else
        result scsi_present no
    fi
else
    result scsi_present no
fi

# Resize: at this phase the host grows both images through rvhost A (bdev_rbd_resize), so A
# tells its guest (blk: config-change notification; scsi: PARAM_CHANGE event, the driver
# rescans) and B, which has image blk open too, notices the new size and tells its guest as
# well. Nothing here asks for a rescan.
result phase resize
NEW=$((${RESIZED_MIB:-96} * MIB))
# wait_size NAME DEV: waits up to 30 s for DEV to have the new size, reports the size seen.
wait_size() {
    tries=300
    while [ "$(blkcheck size $2)" != "$NEW" ]; do
        tries=$((tries - 1)); [ "$tries" -gt 0 ] || break; usleep 100000
    done
    result "resize_$1_size" "$(blkcheck size $2)"
}
wait_size blk $A
wait_size shared $B
check blk_resized_write blkcheck write $A $((NEW - MIB)) $MIB 71 65536
check blk_resized_verify blkcheck verify $A $((NEW - MIB)) $MIB 71 65536
check blk_resized_flush blkcheck flush $A
if [ -n "$S" ]; then
    wait_size scsi /dev/$S
    check scsi_resized_write blkcheck write /dev/$S $((NEW - MIB)) $MIB 72 65536
    check scsi_resized_verify blkcheck verify /dev/$S $((NEW - MIB)) $MIB 72 65536
    check scsi_resized_flush blkcheck flush /dev/$S
fi

# Fault: the host kills one OSD (of two; pool size 2, min_size 1) with SIGKILL and restarts it
# while this loop writes and verifies on A. No I/O error may reach the guest.
result phase fault
errors=0
i=0
end=$(( $(date +%s) + ${FAULT_SECONDS:-30} ))
while [ "$(date +%s)" -lt "$end" ]; do
    off=$(( (16 + (i % 8)) * MIB ))
    if ! blkcheck write $A $off $MIB $((200 + i)) 65536 >/dev/null; then errors=$((errors + 1)); fi
    if ! blkcheck verify $A $off $MIB $((200 + i)) 65536 >/dev/null; then errors=$((errors + 1)); fi
    i=$((i + 1))
done
check fault_flush blkcheck flush $A
result fault_rounds $i
result fault_errors $errors
# The last eight rounds' patterns, all still there after the OSD came back.
bad=0
j=$((i > 8 ? i - 8 : 0))
while [ $j -lt $i ]; do
    off=$(( (16 + (j % 8)) * MIB ))
    blkcheck verify $A $off $MIB $((200 + j)) 65536 >/dev/null || bad=$((bad + 1))
    j=$((j + 1))
done
result fault_verify_bad $bad
result phase done
