# The guest reboots (`reboot -f`: QEMU resets the machine and every device, the vhost-user backend
# sees the device stopped and started again on the same connection) and the disk works afterwards
# with the data of the first boot intact. Run with GuestConfig::boots(2).
# Which boot this is is kept on the disk itself: its first block holds REBOOTED after boot 1.
. /lib/guest.sh
if ! wait_for /sys/block/vda 120 || ! wait_for /dev/vda 30; then
    result disk_present no
    exit 1
fi
MIB=1048576
BS=$(cat /sys/block/vda/queue/logical_block_size)
mark=$(dd if=/dev/vda bs=$BS count=1 iflag=direct 2>/dev/null | head -c 8)
if [ "$mark" != REBOOTED ]; then
    result boot first
    check reboot_write blkcheck write /dev/vda $MIB $((2 * MIB)) 91 $((256 * 1024))
    # conv=sync pads the marker to a whole block.
    printf REBOOTED | dd of=/dev/vda bs=$BS count=1 conv=sync oflag=direct 2>/dev/null
    check reboot_flush blkcheck flush /dev/vda
    log "rebooting"
    reboot -f
    sleep 600
    result reboot_happened no
else
    result boot second
    check reboot_verify blkcheck verify /dev/vda $MIB $((2 * MIB)) 91
    check reboot_write_again blkcheck write /dev/vda $((4 * MIB)) $MIB 92
    check reboot_verify_again blkcheck verify /dev/vda $((4 * MIB)) $MIB 92
fi
