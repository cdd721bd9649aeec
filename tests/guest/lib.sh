# Helpers for guest test scripts (source with `. /lib/guest.sh`). Every result is one line
# `RESULT key=value` on stdout; diagnostics go to stderr, which is the console.

result() {
    echo "RESULT $1=$2"
}

log() {
    echo "test: $*" >&2
}

# check KEY CMD...: runs a command that prints one line (like blkcheck); the result is that line if
# the command succeeded, else "failed(rc=N):line".
check() {
    key=$1
    shift
    out=$("$@")
    rc=$?
    out=$(echo "$out" | head -n 1)
    if [ "$rc" -eq 0 ]; then
        result "$key" "$out"
    else
        log "$key: '$*' failed with $rc: $out"
        result "$key" "failed(rc=$rc):$out"
    fi
}

# run KEY CMD...: runs a quiet command; the result is "ok" or "failed(rc=N)".
run() {
    key=$1
    shift
    if "$@" >&2; then
        result "$key" ok
    else
        rc=$?
        log "$key: '$*' failed with $rc"
        result "$key" "failed(rc=$rc)"
    fi
}

# sysval KEY FILE: the content of a sysfs file (or "missing").
sysval() {
    if [ -r "$2" ]; then
        result "$1" "$(cat "$2")"
    else
        result "$1" missing
    fi
}

# wait_for PATH SECONDS: waits until PATH exists; fails after SECONDS.
wait_for() {
    tries=$(($2 * 10))
    while [ ! -e "$1" ]; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}

# wait_gone PATH SECONDS: waits until PATH disappears; fails after SECONDS.
wait_gone() {
    tries=$(($2 * 10))
    while [ -e "$1" ]; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}

# virtio_disk N: the block device name (e.g. vda) of the Nth virtio-blk disk (0-based) in PCI order.
virtio_disk() {
    n=0
    for dev in /sys/bus/virtio/drivers/virtio_blk/virtio*; do
        [ -d "$dev/block" ] || continue
        if [ "$n" -eq "$1" ]; then
            ls "$dev/block" | head -n 1
            return 0
        fi
        n=$((n + 1))
    done
    return 1
}

# irq_counts VIRTIO_DEV: "queue interrupts" lines, one per request virtqueue of the device (e.g.
# virtio0), the interrupts summed over all CPUs.
irq_counts() {
    awk -v dev="$1-req." '
        index($NF, dev) == 1 {
            fired = 0
            for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) fired += $i
            print substr($NF, length(dev) + 1), fired
        }' /proc/interrupts
}

# scsi_disk: the sdX of SCSI target 0's LUN 0 (any host, channel 0); fails if there is none.
scsi_disk() {
    for d in /sys/class/scsi_device/*:0:0:0; do
        if [ -d "$d/device/block" ]; then
            ls "$d/device/block" | head -n 1
            return 0
        fi
    done
    return 1
}
