#!/bin/busybox sh
# /init of the rvhost test guest. Kernel messages and diagnostics go to ttyS0 (the console); the
# test script's stdout goes to ttyS1, the results port the harness parses, so the two never mix.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

RESULTS=/dev/ttyS1
# Raw mode: no CR/LF rewriting or echo on the results port.
stty -F "$RESULTS" raw -echo 2>/dev/null

loaded=ok
for module in $(cat /etc/modules); do
    if ! insmod "/lib/modules/$module.ko"; then
        echo "init: insmod $module failed" >/dev/console
        loaded="failed:$module"
    fi
done

{
    echo "RESULT modules=$loaded"
    echo "RESULT kernel=$(uname -r)"
    echo "RESULT cpus=$(grep -c ^processor /proc/cpuinfo)"
} >"$RESULTS"

echo "init: running /test.sh" >/dev/console
cd /tmp && sh /test.sh >"$RESULTS" 2>/dev/console
status=$?
echo "init: /test.sh exited with $status" >/dev/console
# Closing the tty waits until everything is sent, so DONE really is the last thing on the port.
{
    echo "RESULT script_exit=$status"
    echo "DONE"
} >"$RESULTS"
sync
poweroff -f
