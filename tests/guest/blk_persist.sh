# Data written in one boot must be there in the next boot against the same running backend.
#   MODE=write          write the patterns and flush
#   MODE=verify         read them back
#   MODE="write verify" both in one boot
. /lib/guest.sh
if ! wait_for /sys/block/vda 120; then
    result disk_present no
    exit 1
fi
result disk_present yes
wait_for /dev/vda 30
MIB=1048576
SIZE=$(blkcheck size /dev/vda)
for step in $MODE; do
    case $step in
    write)
        check persist_write_a blkcheck write /dev/vda $MIB $((3 * MIB)) 77 $((256 * 1024))
        check persist_write_b blkcheck write /dev/vda $((SIZE - MIB)) $MIB 78
        check persist_flush blkcheck flush /dev/vda
        ;;
    verify)
        check persist_verify_a blkcheck verify /dev/vda $MIB $((3 * MIB)) 77
        check persist_verify_b blkcheck verify /dev/vda $((SIZE - MIB)) $MIB 78
        ;;
    *)
        result persist_mode "unknown:$step"
        ;;
    esac
done
