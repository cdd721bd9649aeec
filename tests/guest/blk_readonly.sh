# A read-only virtio-blk disk: the guest sees it read-only, refuses writes, and can still read.
. /lib/guest.sh
if ! wait_for /sys/block/vda 120; then
    result disk_present no
    exit 1
fi
result disk_present yes
wait_for /dev/vda 30
BS=$(cat /sys/block/vda/queue/logical_block_size)
sysval ro /sys/block/vda/ro
check size_bytes blkcheck size /dev/vda
check ro_write_refused blkcheck expect-write-error /dev/vda 0 $BS
check ro_read_zeros blkcheck zeros /dev/vda 0 $((1024 * 1024))

# With IOSTAT set, a second (writable) disk that only this part touches: everything the driver
# sent it, its probing included, is in its /sys/block stat at the end, which the host compares
# with the target's bdev_get_iostat; the known I/O in between is 4 MiB written and read back.
if [ -n "$IOSTAT" ]; then
    if ! wait_for /sys/block/vdb 120 || ! wait_for /dev/vdb 30; then
        result iostat_disk missing
        exit 1
    fi
    sysval iostat_serial /sys/block/vdb/serial
    # Fields 1, 3, 5, 7: reads completed, sectors read, writes completed, sectors written.
    set -- $(cat /sys/block/vdb/stat)
    result iostat_before "$1,$3,$5,$7"
    check iostat_write blkcheck write /dev/vdb 0 4194304 7 65536
    check iostat_verify blkcheck verify /dev/vdb 0 4194304 7 65536
    set -- $(cat /sys/block/vdb/stat)
    result iostat_after "$1,$3,$5,$7"
fi

# With QOS set, a third disk whose rate limits the host changes while the guest runs: before each
# phase the script names it (RESULT qos_phase=NAME), the host sets that phase's limit, and after a
# pause for the change to arrive, one reader keeps QOS_DEPTH random 4 KiB O_DIRECT reads in flight
# through io_uring for QOS_SECONDS (blkcheck qdread); the host checks each phase's rate.
if [ -n "$QOS" ]; then
    if ! wait_for /sys/block/vdc 120 || ! wait_for /dev/vdc 30; then
        result qos_disk missing
        exit 1
    fi
    sysval qos_serial /sys/block/vdc/serial
    # Unmeasured: the first seconds of a TCG guest's reads run slower (code being translated).
    check qos_warmup blkcheck qdread /dev/vdc 16777216 "$QOS_DEPTH" 4096 2
    for phase in $QOS; do
        result qos_phase "$phase"
        sleep 2
        check "qos_$phase" blkcheck qdread /dev/vdc 16777216 "$QOS_DEPTH" 4096 "$QOS_SECONDS"
    done
fi
