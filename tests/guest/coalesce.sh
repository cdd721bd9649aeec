# Interrupt coalescing, spliced into a boot's script by the test (tests/guest_packed.rs): QD
# COALESCE_THREADS 4 KiB O_DIRECT random reads (blkcheck randread) for COALESCE_SECONDS per phase on the virtio-blk disk whose serial is COALESCE_SERIAL. Before each phase of COALESCE_PHASES the script names it
# (RESULT coalesce_phase=NAME) and waits for the host to set that phase's coalescing
# (vhost_controller_set_coalescing); the phase's result is blkcheck's line plus the interrupts the
# disk's request virtqueues took during the reads (":irqs=N", from /proc/interrupts).
cdisk=
for d in /sys/block/vd*; do
    if [ "$(cat $d/serial 2>/dev/null)" = "$COALESCE_SERIAL" ]; then
        cdisk=$(basename $d)
    fi
done
result coalesce_disk "${cdisk:-missing}"
cvdev=$(basename "$(readlink /sys/block/$cdisk/device)")
result coalesce_virtio_device "$cvdev"
# queue_irqs: the interrupts of the device's request queue vectors, summed over queues and CPUs.
queue_irqs() {
    irq_counts "$cvdev" | awk '{ s += $2 } END { print s + 0 }'
}
# Unmeasured: the first seconds of a TCG guest's reads run slower (code being translated).
check coalesce_warmup blkcheck randread /dev/$cdisk 16777216 "$COALESCE_THREADS" 2
for phase in $COALESCE_PHASES; do
    result coalesce_phase "$phase"
    sleep 2
    before=$(queue_irqs)
    out=$(blkcheck randread /dev/$cdisk 16777216 "$COALESCE_THREADS" "$COALESCE_SECONDS")
    rc=$?
    after=$(queue_irqs)
    if [ "$rc" -eq 0 ]; then
        result "coalesce_$phase" "$out:irqs=$((after - before))"
    else
        result "coalesce_$phase" "failed(rc=$rc):$out"
    fi
done
