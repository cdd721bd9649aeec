# vhost-scsi LUNs backed by file bdevs. Targets 0 and 1 (files on a real filesystem) get patterns,
# a flush and a discard of the middle MiB; the host then checks the files. Target 2 sits on a
# nearly full tmpfs: writing past its space must fail with an I/O error while targets 0 and 1 keep
# working.
. /lib/guest.sh
MIB=1048576

# sd_of T: the sdX of target T's LUN 0.
sd_of() {
    for d in /sys/class/scsi_device/*:0:$1:0; do
        if [ -d "$d/device/block" ]; then
            ls "$d/device/block" | head -n 1
            return 0
        fi
    done
    return 1
}

wait_sd() {
    tries=$(($2 * 10))
    while ! sd_of "$1" >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}

wait_for /sys/bus/virtio/drivers/virtio_scsi 60 || { result driver no; exit 1; }
for t in 0 1; do
    if ! wait_sd $t 120; then
        result "t${t}_present" no
        continue
    fi
    D=$(sd_of $t)
    DEV=/dev/$D
    wait_for $DEV 30
    result "t${t}_present" yes
    sysval "t${t}_lbs" /sys/block/$D/queue/logical_block_size
    sysval "t${t}_dmax" /sys/block/$D/queue/discard_max_bytes
    check "t${t}_size" blkcheck size $DEV
    SIZE=$(blkcheck size $DEV)
    # 1..4 MiB in 256 KiB requests, the last MiB in one go; seeds differ per target.
    check "t${t}_io_write" blkcheck write $DEV $MIB $((3 * MIB)) $((t + 61)) 262144
    check "t${t}_io_write_end" blkcheck write $DEV $((SIZE - MIB)) $MIB $((t + 71))
    check "t${t}_io_verify" blkcheck verify $DEV $MIB $((3 * MIB)) $((t + 61)) 65536
    check "t${t}_io_flush" blkcheck flush $DEV
    # UNMAP of 2..3 MiB: zeros there, the pattern intact on both sides.
    run "t${t}_discard" blkdiscard -o $((2 * MIB)) -l $MIB $DEV
    check "t${t}_discard_zeros" blkcheck zeros $DEV $((2 * MIB)) $MIB
    check "t${t}_discard_head" blkcheck verify $DEV $MIB $MIB $((t + 61))
    check "t${t}_discard_tail" blkcheck verify $DEV $((3 * MIB)) $MIB $((t + 61))
    check "t${t}_discard_flush" blkcheck flush $DEV
done

if wait_sd 2 120; then
    D=$(sd_of 2)
    wait_for /dev/$D 30
    result t2_present yes
    check enospc_write blkcheck write /dev/$D 0 $((4 * MIB)) 5 65536
    check enospc_read_back blkcheck verify /dev/$D 0 65536 5 65536
else
    result t2_present no
fi

# The failed target did not take the others down.
D0=$(sd_of 0)
check after_enospc_t0_write blkcheck write /dev/$D0 $((8 * MIB)) $MIB 81
check after_enospc_t0_verify blkcheck verify /dev/$D0 $((8 * MIB)) $MIB 81
check after_enospc_t0_flush blkcheck flush /dev/$D0
