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
