# Packed virtqueues (packed=on): a vhost-user-blk disk (vda) and a vhost-user-scsi LUN in one
# boot, then a reboot. Boot 1 runs the full virtio-blk checks (blk_checks.sh, spliced in below by
# the test: integrity, multiqueue, flush, discard, write-zeroes, reset by unbind/rebind) and the
# full virtio-scsi checks (scsi_checks.sh, spliced in the same way) plus 4 MiB requests; boot 2 (after `reboot -f` resets both devices) reads back
# what boot 1 wrote. Which boot this is is kept on vda itself, at 40 MiB. Run with boots(2).
# With COALESCE_PHASES set, boot 1 also measures a third disk's interrupts (vdb, serial
# COALESCE_SERIAL) with interrupt coalescing off and on (coalesce.sh).
. /lib/guest.sh
MIB=1048576
KIB=1024
if ! wait_for /sys/block/vda 120 || ! wait_for /dev/vda 30; then
    result disk_present no
    exit 1
fi

# packed_bit DRIVER: bit 34 (VIRTIO_F_RING_PACKED) of the features the guest negotiated with the
# first device bound to DRIVER.
packed_bit() {
    for dev in /sys/bus/virtio/drivers/$1/virtio*; do
        cut -c 35 "$dev/features"
        return 0
    done
    echo missing
}

wait_scsi() {
    tries=$(($1 * 10))
    while ! scsi_disk >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}

BS=$(cat /sys/block/vda/queue/logical_block_size)
mark=$(dd if=/dev/vda bs=$BS skip=$((40 * MIB / BS)) count=1 iflag=direct 2>/dev/null | head -c 8)
if [ "$mark" != REBOOTED ]; then
    result boot first
    result blk_packed "$(packed_bit virtio_blk)"
    # The virtio-blk checks, in a subshell: they set their own variables and may exit.
    (
@BLK_CHECKS@
    )

    # The reset in the blk checks rebinds the disk: find its name again.
    VDA=/dev/$(virtio_disk 0)

    # Interrupt coalescing phases on a third disk (coalesce.sh, spliced in below by the test).
    if [ -n "$COALESCE_PHASES" ]; then
@COALESCE@
    fi

    # The virtio-scsi checks (scsi_checks.sh, spliced in below by the test, in a subshell as the
    # blk checks): pattern I/O, flush, discard, a LUN reset with I/O in flight, I/O pinned to
    # every CPU.
    wait_for /sys/bus/virtio/drivers/virtio_scsi 60
    (
@SCSI_CHECKS@
    )
    if ! SD=$(scsi_disk); then
        exit 1
    fi
    result scsi_packed "$(packed_bit virtio_scsi)"
    SDEV=/dev/$SD
    # Beyond scsi_checks.sh: requests of 4 MiB.
    check scsi_io_write_4m blkcheck write $SDEV $((4 * MIB)) $((4 * MIB)) 54 $((4 * MIB))
    check scsi_io_verify_4m blkcheck verify $SDEV $((4 * MIB)) $((4 * MIB)) 54 $((512 * KIB))

    check reboot_blk_write blkcheck write $VDA $((30 * MIB)) $((2 * MIB)) 91 $((256 * KIB))
    check reboot_scsi_write blkcheck write $SDEV $((24 * MIB)) $((2 * MIB)) 92 $((256 * KIB))
    printf REBOOTED | dd of=$VDA bs=$BS seek=$((40 * MIB / BS)) count=1 conv=sync oflag=direct 2>/dev/null
    check reboot_blk_flush blkcheck flush $VDA
    check reboot_scsi_flush blkcheck flush $SDEV
    log "rebooting"
    reboot -f
    sleep 600
    result reboot_happened no
else
    result boot second
    result blk_packed_after_reboot "$(packed_bit virtio_blk)"
    check reboot_blk_verify blkcheck verify /dev/vda $((30 * MIB)) $((2 * MIB)) 91
    check reboot_blk_write_again blkcheck write /dev/vda $((34 * MIB)) $MIB 93
    check reboot_blk_verify_again blkcheck verify /dev/vda $((34 * MIB)) $MIB 93
    if wait_for /sys/bus/virtio/drivers/virtio_scsi 60 && wait_scsi 120; then
        SDEV=/dev/$(scsi_disk)
        result scsi_packed_after_reboot "$(packed_bit virtio_scsi)"
        check reboot_scsi_verify blkcheck verify $SDEV $((24 * MIB)) $((2 * MIB)) 92
        check reboot_scsi_write_again blkcheck write $SDEV $((28 * MIB)) $MIB 94
        check reboot_scsi_verify_again blkcheck verify $SDEV $((28 * MIB)) $MIB 94
    else
        result reboot_scsi_present no
    fi
fi
