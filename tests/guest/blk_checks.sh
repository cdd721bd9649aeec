# virtio-blk checks run in one boot. Expects blkcheck in /bin. Variables (all optional):
#   RESET=1      also reset the device by unbinding/rebinding virtio_blk and check it works again
#   DISCARD=1    check discard (the backend advertises it)
#   ZEROES=1     check write-zeroes (fallocate ZERO_RANGE and the no-fallback PUNCH_HOLE)
. /lib/guest.sh

if ! wait_for /sys/bus/virtio/drivers/virtio_blk 60 || ! wait_for /sys/block/vda 120; then
    result disk_present no
    exit 1
fi
result disk_present yes
DISK=vda
DEV=/dev/$DISK
wait_for "$DEV" 30

sysval size_sectors /sys/block/$DISK/size
sysval logical_block_size /sys/block/$DISK/queue/logical_block_size
sysval physical_block_size /sys/block/$DISK/queue/physical_block_size
# The GET_ID request: SPDK answers with the bdev name.
sysval serial /sys/block/$DISK/serial
sysval ro /sys/block/$DISK/ro
sysval write_cache /sys/block/$DISK/queue/write_cache
sysval queue_discard_max_bytes /sys/block/$DISK/queue/discard_max_bytes
sysval queue_write_zeroes_max_bytes /sys/block/$DISK/queue/write_zeroes_max_bytes
sysval max_segments /sys/block/$DISK/queue/max_segments
sysval max_sectors_kb /sys/block/$DISK/queue/max_sectors_kb
result queue_count "$(ls -d /sys/block/$DISK/mq/*/ | wc -l)"
check size_bytes blkcheck size $DEV

BS=$(cat /sys/block/$DISK/queue/logical_block_size)
SIZE=$(blkcheck size $DEV)
KIB=1024
MIB=1048576
# Buffers that start one block past a page boundary split every page into two segments.
if [ "$BS" -lt 4096 ]; then MIS=$BS; else MIS=0; fi

# pattern NAME OFFSET LEN SEED [IO_SIZE [MISALIGN]]: write then read back identical.
pattern() {
    name=$1
    shift
    check "io_write_$name" blkcheck write $DEV "$@"
    check "io_verify_$name" blkcheck verify $DEV "$@"
}

pattern first_block 0 $BS 11
pattern last_block $((SIZE - BS)) $BS 12
pattern small_run $((3 * BS)) $((7 * BS)) 13 $BS
pattern 64k_misaligned $((1 * MIB + BS)) $((64 * KIB)) 14 $((64 * KIB)) $MIS
pattern 1m_single $((2 * MIB)) $MIB 15 $MIB
pattern 4m_in_512k $((4 * MIB)) $((4 * MIB)) 16 $((512 * KIB)) $MIS
pattern 2m_single_misaligned $((9 * MIB)) $((2 * MIB)) 17 $((2 * MIB)) $MIS
# Overwrite part of an earlier region: the new data wins, the rest is untouched.
check io_write_overlap blkcheck write $DEV $((4 * MIB + 256 * KIB)) $((256 * KIB)) 18
check io_verify_overlap_head blkcheck verify $DEV $((4 * MIB)) $((256 * KIB)) 16
check io_verify_overlap_new blkcheck verify $DEV $((4 * MIB + 256 * KIB)) $((256 * KIB)) 18
check io_verify_overlap_tail blkcheck verify $DEV $((4 * MIB + 512 * KIB)) $((3 * MIB + 512 * KIB)) 16

# Several processes at once, each pinned to its own CPU: blk-mq maps each CPU to its own hardware
# queue, so with N queues and N CPUs every virtqueue carries requests.
NCPU=$(grep -c ^processor /proc/cpuinfo)
VDEV=$(basename "$(readlink /sys/block/$DISK/device)")
irq_counts "$VDEV" >/tmp/irq_before
for i in 0 1 2 3; do
    taskset -c $((i % NCPU)) blkcheck write $DEV $((12 * MIB + i * MIB)) $MIB $((100 + i)) $((128 * KIB)) >/tmp/par_w$i 2>&1 &
done
wait
for i in 0 1 2 3; do
    taskset -c $((i % NCPU)) blkcheck verify $DEV $((12 * MIB + i * MIB)) $MIB $((100 + i)) $((64 * KIB)) >/tmp/par_v$i 2>&1 &
done
wait
for i in 0 1 2 3; do
    result "io_parallel_write_$i" "$(head -n 1 /tmp/par_w$i)"
    result "io_parallel_verify_$i" "$(head -n 1 /tmp/par_v$i)"
done
# Virtqueues that completed the parallel requests: each request queue has its own MSI-X vector
# (virtioN-req.Q in /proc/interrupts); count the vectors that fired during that I/O.
result queues_used "$(irq_counts "$VDEV" | awk 'NR == FNR { before[$1] = $2; next }
    $2 > before[$1] { used++ } END { print used + 0 }' /tmp/irq_before -)"

check flush blkcheck flush $DEV

if [ "${DISCARD:-0}" = 1 ]; then
    base=$((16 * MIB))
    check discard_prepare blkcheck write $DEV $base $MIB 21
    run discard_range blkdiscard -o $((base + 256 * KIB)) -l $((512 * KIB)) $DEV
    check discard_keeps_head blkcheck verify $DEV $base $((256 * KIB)) 21
    check discard_keeps_tail blkcheck verify $DEV $((base + 768 * KIB)) $((256 * KIB)) 21
fi

if [ "${ZEROES:-0}" = 1 ]; then
    base=$((18 * MIB))
    check zeroes_prepare blkcheck write $DEV $base $((2 * MIB)) 31
    check zeroes_zero_range blkcheck zeroout $DEV $((base + 256 * KIB)) $((256 * KIB))
    check zeroes_read_zero blkcheck zeros $DEV $((base + 256 * KIB)) $((256 * KIB))
    # PUNCH_HOLE has no fallback in the guest: it succeeds only if the device did WRITE_ZEROES.
    check zeroes_offloaded blkcheck punch $DEV $((base + MIB)) $((512 * KIB))
    check zeroes_offloaded_read_zero blkcheck zeros $DEV $((base + MIB)) $((512 * KIB))
    check zeroes_keeps_head blkcheck verify $DEV $base $((256 * KIB)) 31
    check zeroes_keeps_middle blkcheck verify $DEV $((base + 512 * KIB)) $((512 * KIB)) 31
    check zeroes_keeps_tail blkcheck verify $DEV $((base + 1536 * KIB)) $((512 * KIB)) 31
fi

if [ "${RESET:-0}" = 1 ]; then
    vdev=$(basename "$(readlink /sys/block/$DISK/device)")
    result reset_virtio_device "$vdev"
    # Unbinding resets the device (status 0) and frees its queues; binding negotiates again.
    echo "$vdev" >/sys/bus/virtio/drivers/virtio_blk/unbind
    if wait_gone /sys/block/$DISK 60; then result reset_unbound ok; else result reset_unbound timeout; fi
    echo "$vdev" >/sys/bus/virtio/drivers/virtio_blk/bind
    if wait_for /sys/bus/virtio/devices/$vdev/block 60; then
        DISK=$(ls /sys/bus/virtio/devices/$vdev/block | head -n 1)
        DEV=/dev/$DISK
        wait_for $DEV 30
        result reset_rebound ok
    else
        result reset_rebound timeout
    fi
    result reset_queue_count "$(ls -d /sys/block/$DISK/mq/*/ | wc -l)"
    check reset_size_bytes blkcheck size $DEV
    check reset_verify_old blkcheck verify $DEV $((2 * MIB)) $MIB 15
    check reset_verify_old_parallel blkcheck verify $DEV $((12 * MIB)) $MIB 100
    check reset_write_new blkcheck write $DEV $((24 * MIB)) $((2 * MIB)) 41 $((256 * KIB)) $MIS
    check reset_verify_new blkcheck verify $DEV $((24 * MIB)) $((2 * MIB)) 41
    check reset_flush blkcheck flush $DEV
fi
