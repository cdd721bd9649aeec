#!/usr/bin/env bash
# The VFIO NVMe driver's acceptance test in one command.
#
# Boots a QEMU guest (TCG) with an emulated intel-iommu and an emulated NVMe controller backed by a
# raw file, binds the controller to vfio-pci inside the guest, runs `rvhost-nvme identify`,
# `selftest` (multi-queue write/read-back, flush, write zeroes, deallocate, controller reset with
# I/O in flight) and a short `perf`, then checks on the host that the backing file holds exactly
# what the self test says it wrote.
#
# Environment (all optional):
#   NVME_GUEST_WORK     cache and scratch directory      (default: build/nvme-guest)
#   NVME_GUEST_DISK     backing file of the NVMe drive    (default: $NVME_GUEST_WORK/disk.img)
#   NVME_GUEST_DISK_MB  its size in MiB                    (default: 32)
#   NVME_GUEST_BIN      a prebuilt rvhost-nvme binary      (default: build it with cargo)
#   NVME_GUEST_TIMEOUT  seconds the guest may run          (default: 1200)
#
# With NVME_GUEST_MODE=bdev it is the NVMe bdev's acceptance test instead: the guest runs
# `rvhost` itself with a `-c` JSON config that attaches the controller
# (`bdev_nvme_attach_controller`, then detach and attach again) and exports `Nvme0n1` as vhost-user-blk, drives it with the
# userspace initiator `rvhost-perf --verify` (4 KiB and 128 KiB random read/write), runs the
# guest-side virtio-blk test `target/tests/bdev_nvme_guest_ops.rs` (flush, write zeroes, discard,
# a split 256 KiB write, a read past the end), then the lifecycle test in the same file (RPC detach
# under load, attach again and serve again, a PCI removal under load), stops rvhost
# with SIGINT, and then the host checks that every block rvhost-perf wrote is in
# the raw backing file at the right place with the right content.
#
# Environment (all optional):
#   NVME_GUEST_MODE     driver (default) or bdev
#   NVME_GUEST_RVHOST   bdev mode: prebuilt rvhost binary        (default: build it with cargo)
#   NVME_GUEST_PERF     bdev mode: prebuilt rvhost-perf binary   (default: build it with cargo)
#   NVME_GUEST_OPS      bdev mode: prebuilt bdev_nvme_guest_ops test binary (default: cargo builds it)
#
# With NVME_GUEST_MODE=bench it is an A/B benchmark of two rvhost builds on the same emulated
# controller (bench/README.md): rounds of 4 KiB QD32 and 128 KiB QD8 random reads with
# rvhost-perf, each round running build A then build B, one rvhost at a time, and a summary of
# median IOPS and of the per-round B/A ratios on stdout.
#   NVME_GUEST_RVHOST, NVME_GUEST_RVHOST_B   the two rvhost binaries (A, B; both required)
#   NVME_BENCH_ROUNDS, NVME_BENCH_SECONDS    rounds (default 5) and seconds per run (default 5)
#
# Exit status: 0 pass, 1 fail, 77 skipped because QEMU or a guest kernel cannot be installed.
set -euo pipefail
MODE=${NVME_GUEST_MODE:-driver}
case "$MODE" in driver|bdev|bench) ;; *) echo "NVME_GUEST_MODE must be driver, bdev or bench" >&2; exit 1 ;; esac
if [ "$MODE" = bench ] && { [ -z "${NVME_GUEST_RVHOST:-}" ] || [ -z "${NVME_GUEST_RVHOST_B:-}" ]; }; then
    echo "bench mode needs NVME_GUEST_RVHOST and NVME_GUEST_RVHOST_B" >&2; exit 1
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${NVME_GUEST_WORK:-$ROOT/build/nvme-guest}
DISK=${NVME_GUEST_DISK:-$WORK/disk.img}
DISK_MB=${NVME_GUEST_DISK_MB:-32}
TIMEOUT=${NVME_GUEST_TIMEOUT:-1200}
BLOCK_SIZE=512
mkdir -p "$WORK"

log() { echo "nvme-guest-test: $*" >&2; }
skip() { log "SKIPPED: $*"; exit 77; }
apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq >&2 || true
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# ---- host tools ----
if ! command -v qemu-system-x86_64 >/dev/null; then
    log "installing qemu-system-x86"
    apt_install qemu-system-x86 || skip "qemu-system-x86_64 is not installed and cannot be installed"
fi
if ! busybox_path=$(command -v busybox) || ldd "$busybox_path" >/dev/null 2>&1; then
    log "installing busybox-static"
    apt_install busybox-static || skip "no static busybox for the initramfs"
    busybox_path=$(command -v busybox)
fi
for tool in depmod:kmod cpio:cpio xz:xz-utils; do
    command -v "${tool%%:*}" >/dev/null || apt_install "${tool#*:}"
done

# ---- guest kernel (a Debian kernel package, unpacked) ----
KDIR=$WORK/kernel
# The tests/ harness's unpacked kernel, when there is one, saves a download.
for shared in "${RVHOST_GUEST_ASSETS:-$ROOT/build/guest-assets}"/linux-image-*; do
    if [ ! -f "$KDIR/.unpacked" ] && ls "$shared"/boot/vmlinuz-* >/dev/null 2>&1 \
            && ls "$shared"/lib/modules/*/modules.dep >/dev/null 2>&1; then
        KDIR=$shared
    fi
done
if [ ! -f "$KDIR/.unpacked" ] && [ "$KDIR" = "$WORK/kernel" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq >&2 || true
        APT_UPDATED=1
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || skip "no Debian kernel package found"
    log "downloading $pkg"
    rm -rf "$KDIR" "$WORK"/linux-image-*.deb
    (cd "$WORK" && apt-get download "$pkg" >&2) || {
        apt-get update -qq >&2 || true
        (cd "$WORK" && apt-get download "$pkg" >&2)
    } || skip "cannot download $pkg"
    dpkg -x "$WORK"/linux-image-*.deb "$KDIR"
    rm -f "$WORK"/linux-image-*.deb
    touch "$KDIR/.unpacked"
fi
KVER=$(ls "$KDIR/lib/modules" | head -n1)
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || { log "kernel image missing in $KDIR"; exit 1; }
[ -f "$KDIR/lib/modules/$KVER/modules.dep" ] || depmod -b "$KDIR" "$KVER"

# ---- the program under test ----
if [ -n "${NVME_GUEST_BIN:-}" ]; then
    BIN=$NVME_GUEST_BIN
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/build/nvme}
    (cd "$ROOT" && cargo build -p rvhost-nvme --bin rvhost-nvme >&2)
    BIN=$CARGO_TARGET_DIR/debug/rvhost-nvme
fi
[ -x "$BIN" ] || { log "no binary at $BIN"; exit 1; }
GUEST_BINS=("$BIN")
if [ "$MODE" = bdev ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/build/nvme}
    if [ -z "${NVME_GUEST_RVHOST:-}" ]; then
        (cd "$ROOT" && cargo build -p rvhost-target --bin rvhost >&2)
    fi
    if [ -z "${NVME_GUEST_PERF:-}" ]; then
        (cd "$ROOT" && cargo build -p rvhost-bench --bin rvhost-perf >&2)
    fi
    RVHOST_BIN=${NVME_GUEST_RVHOST:-$CARGO_TARGET_DIR/debug/rvhost}
    PERF_BIN=${NVME_GUEST_PERF:-$CARGO_TARGET_DIR/debug/rvhost-perf}
    # The guest-side virtio-blk driver test (target/tests/bdev_nvme_guest_ops.rs).
    OPS_BIN=${NVME_GUEST_OPS:-$(cd "$ROOT" && cargo test -p rvhost-target --test bdev_nvme_guest_ops \
        --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == "bdev_nvme_guest_ops":
        print(m["executable"])
')}
    for b in "$RVHOST_BIN" "$PERF_BIN" "$OPS_BIN"; do [ -x "$b" ] || { log "no binary at '$b'"; exit 1; }; done
    GUEST_BINS+=("$RVHOST_BIN" "$PERF_BIN" "$OPS_BIN")
fi
if [ "$MODE" = bench ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/build/nvme}
    if [ -z "${NVME_GUEST_PERF:-}" ]; then
        (cd "$ROOT" && cargo build --release -p rvhost-bench --bin rvhost-perf >&2)
    fi
    PERF_BIN=${NVME_GUEST_PERF:-$CARGO_TARGET_DIR/release/rvhost-perf}
    for b in "$NVME_GUEST_RVHOST" "$NVME_GUEST_RVHOST_B" "$PERF_BIN"; do
        [ -x "$b" ] || { log "no binary at '$b'"; exit 1; }
    done
    GUEST_BINS+=("$NVME_GUEST_RVHOST" "$NVME_GUEST_RVHOST_B" "$PERF_BIN")
fi

# ---- initramfs ----
INITRD_DIR=$WORK/initramfs
rm -rf "$INITRD_DIR"
mkdir -p "$INITRD_DIR"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp "$busybox_path" "$INITRD_DIR/bin/busybox"
cp "$BIN" "$INITRD_DIR/rvhost-nvme"
if [ "$MODE" = bdev ]; then
    cp "$RVHOST_BIN" "$INITRD_DIR/rvhost"
    cp "$PERF_BIN" "$INITRD_DIR/rvhost-perf"
    cp "$OPS_BIN" "$INITRD_DIR/bdev-ops"
fi
if [ "$MODE" = bench ]; then
    cp "$NVME_GUEST_RVHOST" "$INITRD_DIR/rvhost-a"
    cp "$NVME_GUEST_RVHOST_B" "$INITRD_DIR/rvhost-b"
    cp "$PERF_BIN" "$INITRD_DIR/rvhost-perf"
    echo "${NVME_BENCH_ROUNDS:-5} ${NVME_BENCH_SECONDS:-5}" > "$INITRD_DIR/bench"
fi
echo "$MODE" > "$INITRD_DIR/mode"
# The binaries' shared libraries, at the paths the dynamic loader expects.
for b in "${GUEST_BINS[@]}"; do
    ldd "$b" | awk '/=> \// {print $3} /^[ \t]*\// {print $1}' | while read -r lib; do
        mkdir -p "$INITRD_DIR$(dirname "$lib")"
        cp -L "$lib" "$INITRD_DIR$lib"
    done
done
if [ -e /lib64/ld-linux-x86-64.so.2 ]; then
    mkdir -p "$INITRD_DIR/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$INITRD_DIR/lib64/"
fi

# Kernel modules for VFIO in dependency order (deps first), from modules.dep.
declare -A seen=()
order=()
resolve() {
    local rel=$1 line dep
    [ -n "${seen[$rel]:-}" ] && return
    seen[$rel]=1
    line=$(grep -E "^${rel}:" "$KDIR/lib/modules/$KVER/modules.dep" || true)
    for dep in ${line#*:}; do resolve "$dep"; done
    order+=("$rel")
}
for name in vfio_iommu_type1 vfio-pci vfio_pci; do
    rel=$(grep -oE "^[^:]*/${name}\.ko(\.xz|\.zst)?:" "$KDIR/lib/modules/$KVER/modules.dep" | head -n1 | tr -d ':' || true)
    [ -n "$rel" ] && resolve "$rel"
done
[ ${#order[@]} -ge 3 ] || { log "VFIO modules not found in $KVER"; exit 1; }
: > "$INITRD_DIR/modules.order"
for rel in "${order[@]}"; do
    base=$(basename "$rel")
    case "$base" in
        *.xz) xz -dc "$KDIR/lib/modules/$KVER/$rel" > "$INITRD_DIR/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.zst) zstd -dcq "$KDIR/lib/modules/$KVER/$rel" > "$INITRD_DIR/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *) cp "$KDIR/lib/modules/$KVER/$rel" "$INITRD_DIR/lib/modules/$base" ;;
    esac
    echo "/lib/modules/$base" >> "$INITRD_DIR/modules.order"
done

cat > "$INITRD_DIR/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod "$m" || echo "guest: insmod $m failed"
done
BDF=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/class")" = "0x010802" ]; then BDF=$(basename "$d"); fi
done
echo "guest: NVMe controller at ${BDF:-<none>}, IOMMU group $(basename "$(readlink /sys/bus/pci/devices/$BDF/iommu_group)")"
echo vfio-pci > "/sys/bus/pci/devices/$BDF/driver_override"
echo "$BDF" > /sys/bus/pci/drivers_probe
echo "guest: bound to $(basename "$(readlink /sys/bus/pci/devices/$BDF/driver)"); /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
echo 64 > /proc/sys/vm/nr_hugepages
echo "guest: hugepages $(cat /proc/sys/vm/nr_hugepages)"
export RUST_LIB_BACKTRACE=0
if [ "$(cat /mode)" = bench ]; then
    cat > /rvhost.json <<CONFIG
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_nvme_attach_controller",
     "params": {"name": "Nvme0", "trtype": "pcie", "traddr": "$BDF"}}]},
  {"subsystem": "vhost_blk", "config": [
    {"method": "vhost_create_blk_controller",
     "params": {"ctrlr": "vhost.0", "dev_name": "Nvme0n1"}}]}
]}
CONFIG
    mkdir -p /var/tmp/rv /dev/shm && mount -t tmpfs tmpfs /dev/shm
    read -r rounds seconds < /bench
    for round in $(seq "$rounds"); do
        for build in a b; do
            "/rvhost-$build" -c /rvhost.json --no-default -S /var/tmp/rv -r /var/tmp/rv/rpc.sock -m 0x1 -L warn &
            pid=$!
            for i in $(seq 600); do [ -S /var/tmp/rv/vhost.0 ] && break; sleep 0.1; done
            for shape in "4k 32" "128k 8"; do
                set -- $shape
                report=$(/rvhost-perf --socket /var/tmp/rv/vhost.0 --type blk --rw randread \
                    --bs "$1" --qd "$2" --time "$seconds" --cpu 1 --json 2>/dev/null | tail -n1)
                echo "NVME-BENCH $round $build $1 $2 $report"
            done
            kill -INT "$pid"; wait "$pid"
        done
    done
    echo "NVME-BENCH-DONE"
    poweroff -f
fi
if [ "$(cat /mode)" = bdev ]; then
    # rvhost on the controller, configured the way an SPDK user would (-c JSON config). The
    # controller is attached, detached (releasing the VFIO device) and attached again, so that a
    # detach that leaves anything behind fails the second attach.
    cat > /rvhost.json <<CONFIG
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_nvme_attach_controller",
     "params": {"name": "Nvme0", "trtype": "pcie", "traddr": "$BDF"}},
    {"method": "bdev_nvme_detach_controller", "params": {"name": "Nvme0"}},
    {"method": "construct_nvme_bdev",
     "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "$BDF"}}]},
  {"subsystem": "vhost_blk", "config": [
    {"method": "vhost_create_blk_controller",
     "params": {"ctrlr": "vhost.0", "dev_name": "Nvme0n1"}}]}
]}
CONFIG
    mkdir -p /var/tmp/rv
    /rvhost -c /rvhost.json --no-default -S /var/tmp/rv -r /var/tmp/rv/rpc.sock -m 0x1 -L info &
    rvhost_pid=$!
    for i in $(seq 600); do [ -S /var/tmp/rv/vhost.0 ] && break; sleep 0.1; done
    ls -l /var/tmp/rv
    rc_perf4k=1; rc_perf128k=1; rc_ops=1; rc_lifecycle=1
    mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
    if [ -S /var/tmp/rv/vhost.0 ]; then
        /rvhost-perf --socket /var/tmp/rv/vhost.0 --type blk --rw randrw --verify --time 5 --cpu 1; rc_perf4k=$?
        # The first 16 MiB only, so that 4 KiB blocks of the first run survive for the host check.
        /rvhost-perf --socket /var/tmp/rv/vhost.0 --type blk --rw randrw --verify --time 5 --cpu 1 --bs 128k --qd 8 --seed 7 --size 16m; rc_perf128k=$?
        # Flush, write zeroes, discard and a split 256 KiB write through a virtio-blk driver.
        RVHOST_NVME_GUEST_SOCKET=/var/tmp/rv/vhost.0 /bdev-ops --ignored --exact \
            nvme_bdev_ops_in_the_guest --test-threads 1 --nocapture; rc_ops=$?
        # Detach over RPC and attach again, then a real PCI removal, each under rvhost-perf load.
        RVHOST_NVME_GUEST_SOCKET=/var/tmp/rv/vhost.0 RVHOST_NVME_GUEST_RPC=/var/tmp/rv/rpc.sock \
            RVHOST_NVME_GUEST_PERF=/rvhost-perf RVHOST_NVME_GUEST_BDF="$BDF" /bdev-ops --ignored \
            --exact nvme_bdev_detach_reattach_and_removal_in_the_guest --test-threads 1 \
            --nocapture; rc_lifecycle=$?
    fi
    # A clean shutdown closes the channels (deleting their I/O queues) and the controller.
    kill -INT "$rvhost_pid"; wait "$rvhost_pid"; rc_rvhost=$?
    echo "RVHOST-NVME-BDEV-RESULT perf4k=$rc_perf4k perf128k=$rc_perf128k ops=$rc_ops lifecycle=$rc_lifecycle rvhost=$rc_rvhost"
    sync
    poweroff -f
fi
/rvhost-nvme identify "$BDF"; rc_identify=$?
# Three passes over the whole namespace: PRPs with SGLs where needed, SGLs for everything, and
# PRPs only (where the byte-unaligned buffer shape becomes an unaligned first PRP segment).
rc_selftest=0
for sgl in when-needed always never; do
    /rvhost-nvme selftest "$BDF" --queues 2 --qd 16 --sgl "$sgl" || rc_selftest=$?
done
/rvhost-nvme perf "$BDF" --time 3 --qd 32; rc_perf=$?
echo "RVHOST-NVME-GUEST-RESULT identify=$rc_identify selftest=$rc_selftest perf=$rc_perf"
sync
poweroff -f
EOF
chmod +x "$INITRD_DIR/init"
INITRD=$WORK/initramfs.cpio.gz
(cd "$INITRD_DIR" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD"

# ---- the drive: random bytes, so zeroes found later were written by the test ----
log "preparing ${DISK_MB} MiB drive $DISK"
head -c "$((DISK_MB * 1024 * 1024))" /dev/urandom > "$DISK"

# ---- boot ----
# One QEMU guest at a time on this 2-core machine: the same lock the tests/ harness takes.
QEMU_LOCK=${RVHOST_GUEST_ASSETS:-$ROOT/build/guest-assets}/qemu.lock
mkdir -p "$(dirname "$QEMU_LOCK")"
exec 9>>"$QEMU_LOCK"
log "waiting for the QEMU slot ($QEMU_LOCK)"
flock 9
SERIAL_LOG=$WORK/serial.log
# A TCG guest on a loaded host occasionally hangs in early boot (a lost timer interrupt, before
# anything of ours runs). Such a boot is detected by its missing progress line and retried once;
# a guest that booted is never retried.
BOOT_TIMEOUT=${NVME_GUEST_BOOT_TIMEOUT:-300}
boot_guest() {
    : > "$SERIAL_LOG"
    qemu-system-x86_64 \
        -accel tcg \
        -M q35,kernel-irqchip=split \
        -smp 2 \
        -m 1024 \
        -device intel-iommu,intremap=on,caching-mode=on,aw-bits=48 \
        -drive if=none,id=nv0,file="$DISK",format=raw,discard=unmap \
        -device nvme,serial=deadbeef,drive=nv0,logical_block_size=$BLOCK_SIZE,physical_block_size=$BLOCK_SIZE \
        -kernel "$VMLINUZ" \
        -initrd "$INITRD" \
        -append "console=ttyS0 intel_iommu=on iommu=pt panic=-1 loglevel=4" \
        -display none -monitor none -serial file:"$SERIAL_LOG" \
        -no-reboot </dev/null &
    local qemu_pid=$! start=$SECONDS booted=
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if [ -z "$booted" ] && grep -aq '^guest: NVMe controller' "$SERIAL_LOG"; then
            booted=1
            log "guest booted after $((SECONDS - start))s"
        fi
        if [ -z "$booted" ] && [ $((SECONDS - start)) -ge "$BOOT_TIMEOUT" ]; then
            log "guest did not reach init within ${BOOT_TIMEOUT}s"
            kill "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" || true
            return 2
        fi
        if [ $((SECONDS - start)) -ge "$TIMEOUT" ]; then
            log "guest still running after ${TIMEOUT}s"
            kill "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" || true
            return 1
        fi
        sleep 1
    done
    wait "$qemu_pid"
}
log "booting the guest (TCG; up to ${TIMEOUT}s), serial log in $SERIAL_LOG"
qemu_rc=0
for attempt in 1 2; do
    qemu_rc=0
    boot_guest || qemu_rc=$?
    [ "$qemu_rc" -eq 2 ] && [ "$attempt" -eq 1 ] && { log "retrying the boot"; continue; }
    break
done
exec 9>&-
sed 's/^/guest| /' "$SERIAL_LOG" >&2
log "qemu exited with $qemu_rc"

if [ "$MODE" = bench ]; then
    grep -aq '^NVME-BENCH-DONE' "$SERIAL_LOG" || { log "FAIL: the benchmark did not finish"; exit 1; }
    python3 - "$SERIAL_LOG" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1], errors="replace"):
    if not line.startswith("NVME-BENCH "):
        continue
    _, rnd, build, bs, qd, report = line.rstrip("\r\n").split(" ", 5)
    iops = json.loads(report)["total"]["iops"] if report.startswith("{") else 0.0
    runs.setdefault((bs, qd), {}).setdefault(int(rnd), {})[build] = iops
for (bs, qd), rounds in runs.items():
    a = [r["a"] for r in rounds.values() if "a" in r]
    b = [r["b"] for r in rounds.values() if "b" in r]
    ratios = [r["b"] / r["a"] for r in rounds.values() if r.get("a") and "b" in r]
    print(f"randread bs={bs} qd={qd}: A median {statistics.median(a):.0f} IOPS, "
          f"B median {statistics.median(b):.0f} IOPS, B/A per round "
          f"{' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
PY
    exit 0
fi
if [ "$MODE" = bdev ]; then
    result=$(grep -a 'RVHOST-NVME-BDEV-RESULT' "$SERIAL_LOG" | tail -n1 | tr -d '\r' || true)
    if [ "$result" != "RVHOST-NVME-BDEV-RESULT perf4k=0 perf128k=0 ops=0 lifecycle=0 rvhost=0" ]; then
        log "FAIL: guest reported '${result:-nothing}'"
        exit 1
    fi
    # Guest memory must be unmapped from the IOMMU cleanly, also when a controller is detached
    # or removed with sessions still connected.
    if grep -aq 'unmapping host memory failed' "$SERIAL_LOG"; then
        log "FAIL: rvhost could not unmap guest memory (see the serial log)"
        exit 1
    fi
    # Every block of the random-filled drive that carries rvhost-perf's verify header must be the
    # exact pattern for its own block number (4 KiB blocks from the 4k run, 128 KiB blocks from
    # the 128k run), i.e. the data went through rvhost and the NVMe bdev to the right place.
    python3 "$ROOT/scripts/check-perf-image.py" --ops "$DISK" || { log "FAIL: backing file check"; exit 1; }
    log "PASS"
    exit 0
fi
result=$(grep -a 'RVHOST-NVME-GUEST-RESULT' "$SERIAL_LOG" | tail -n1 | tr -d '\r' || true)
if [ "$result" != "RVHOST-NVME-GUEST-RESULT identify=0 selftest=0 perf=0" ]; then
    log "FAIL: guest reported '${result:-nothing}'"
    exit 1
fi
grep -aq 'SELFTEST PASS' "$SERIAL_LOG" || { log "FAIL: no SELFTEST PASS"; exit 1; }

# ---- the medium ----
"$BIN" verify-image "$DISK" --block-size "$BLOCK_SIZE" || { log "FAIL: backing file check"; exit 1; }
log "PASS"
