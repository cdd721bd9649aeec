# virtio-scsi checks on target 0 of the guest's virtio-scsi host, every result prefixed scsi_:
# pattern I/O, flush, discard, a LUN reset with I/O in flight, and I/O pinned to every CPU so
# that each request virtqueue carries requests. Expects blkcheck and sg_reset in /bin.
. /lib/guest.sh

tries=1200
while ! scsi_disk >/dev/null 2>&1 && [ "$tries" -gt 0 ]; do
    tries=$((tries - 1))
    usleep 100000
done
if ! SD=$(scsi_disk); then
    result scsi_present no
    exit 1
fi
result scsi_present yes
DEV=/dev/$SD
wait_for $DEV 30
sysval scsi_lbs /sys/block/$SD/queue/logical_block_size
sysval scsi_dmax /sys/block/$SD/queue/discard_max_bytes
check scsi_size blkcheck size $DEV
BS=$(cat /sys/block/$SD/queue/logical_block_size)
SIZE=$(blkcheck size $DEV)

check scsi_io_write_first blkcheck write $DEV 0 $BS 51
check scsi_io_verify_first blkcheck verify $DEV 0 $BS 51
check scsi_io_write_last blkcheck write $DEV $((SIZE - BS)) $BS 52
check scsi_io_verify_last blkcheck verify $DEV $((SIZE - BS)) $BS 52
check scsi_io_write_1m blkcheck write $DEV 1048576 1048576 53 131072 $BS
check scsi_io_verify_1m blkcheck verify $DEV 1048576 1048576 53 65536
check scsi_flush blkcheck flush $DEV
# Discard 256 KiB in the middle of the 1 MiB pattern: zeros there, the rest intact.
run scsi_discard blkdiscard -o 1310720 -l 262144 $DEV
check scsi_discard_zeros blkcheck zeros $DEV 1310720 262144
check scsi_discard_head_intact blkcheck verify $DEV 1048576 262144 53
check scsi_discard_tail_intact blkcheck verify $DEV 1572864 524288 53

# LUN reset (LOGICAL UNIT RESET through the control queue) while a writer keeps I/O in flight.
blkcheck write $DEV 4194304 8388608 54 65536 >/tmp/scsi_bg.out 2>&1 &
BG=$!
usleep 300000
run scsi_lun_reset sg_reset -d $DEV
if wait $BG; then result scsi_lun_reset_bg_write ok; else result scsi_lun_reset_bg_write "failed:$(head -n 1 /tmp/scsi_bg.out)"; fi
check scsi_lun_reset_verify blkcheck verify $DEV 4194304 8388608 54

# Multiqueue: one writer pinned to each CPU; blk-mq maps each CPU to its own request queue.
NCPU=$(grep -c ^processor /proc/cpuinfo)
for c in $(seq 0 $((NCPU - 1))); do
    taskset -c $c blkcheck write $DEV $((16777216 + c * 1048576)) 1048576 $((60 + c)) 65536 >/tmp/scsi_mq$c.out 2>&1 &
done
wait
for c in $(seq 0 $((NCPU - 1))); do
    result "scsi_io_mq_write_$c" "$(head -n 1 /tmp/scsi_mq$c.out)"
    check "scsi_io_mq_verify_$c" blkcheck verify $DEV $((16777216 + c * 1048576)) 1048576 $((60 + c))
done
result scsi_mq_request_queues "$(grep -c 'virtio[0-9]*-request' /proc/interrupts)"
result scsi_mq_queues_used "$(awk '/virtio[0-9]+-request/ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; if (s > 0) n++ } END { print n + 0 }' /proc/interrupts)"
