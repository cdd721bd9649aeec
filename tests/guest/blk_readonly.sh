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
