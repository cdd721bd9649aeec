//! vhost-user-scsi acceptance tests with a real Linux guest under QEMU (TCG) against the `rvhost`
//! binary: two LUNs of different block sizes seen with the right H:C:T:L, INQUIRY strings, size
//! and block size; O_DIRECT pattern I/O and discard on both; a third target hot-attached and one
//! hot-detached while the guest runs, each seen by the guest's kernel.
//!
//! Hot-plug needs the host to act while the guest runs: the guest script announces a phase on
//! its results port (`RESULT phase=...`) and waits for the kernel to react; the test reads the
//! results file as it grows and issues the RPC.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use rvhost_tests::host::runs_dir;
use rvhost_tests::{
    init_test_logging, run_guest, GuestConfig, GuestOutput, Rvhost, VhostUserDevice,
    VIRTIO_SCSI_MODULES,
};

const MIB: u64 = 1 << 20;

/// Runs in the guest. Targets 0 and 1 exist at boot; target 2 is hot-attached when the script
/// reports `phase=attach`, target 1 hot-detached when it reports `phase=detach`.
const SCSI_CHECKS: &str = r#"
. /lib/guest.sh

# sd_of T: the sdX of target T's LUN 0 (any host, channel 0).
sd_of() {
    for d in /sys/class/scsi_device/*:0:$1:0; do
        if [ -d "$d/device/block" ]; then
            ls "$d/device/block" | head -n 1
            return 0
        fi
    done
    return 1
}

# wait_sd T SECONDS
wait_sd() {
    tries=$(($2 * 10))
    while ! sd_of "$1" >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}

# gone T SECONDS: waits until target T's LUN 0 has left the SCSI midlayer.
gone() {
    tries=$(($2 * 10))
    while ls -d /sys/class/scsi_device/*:0:$1:0 >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}

describe() {
    t=$1
    D=$(sd_of "$t")
    result "t${t}_present" yes
    result "t${t}_hctl" "$(basename $(ls -d /sys/class/scsi_device/*:0:$t:0))"
    sysval "t${t}_vendor" /sys/block/$D/device/vendor
    sysval "t${t}_model" /sys/block/$D/device/model
    sysval "t${t}_lbs" /sys/block/$D/queue/logical_block_size
    sysval "t${t}_sectors" /sys/block/$D/size
    sysval "t${t}_wwid" /sys/block/$D/device/wwid
    sysval "t${t}_dmax" /sys/block/$D/queue/discard_max_bytes
    sysval "t${t}_write_cache" /sys/block/$D/queue/write_cache
    check "t${t}_size" blkcheck size /dev/$D
}

exercise() {
    t=$1
    D=$(sd_of "$t")
    DEV=/dev/$D
    BS=$(cat /sys/block/$D/queue/logical_block_size)
    SIZE=$(blkcheck size $DEV)
    check "t${t}_io_write_first" blkcheck write $DEV 0 $BS $((t + 11))
    check "t${t}_io_verify_first" blkcheck verify $DEV 0 $BS $((t + 11))
    check "t${t}_io_write_last" blkcheck write $DEV $((SIZE - BS)) $BS $((t + 12))
    check "t${t}_io_verify_last" blkcheck verify $DEV $((SIZE - BS)) $BS $((t + 12))
    check "t${t}_io_write_1m" blkcheck write $DEV 1048576 1048576 $((t + 13)) 131072 $BS
    check "t${t}_io_verify_1m" blkcheck verify $DEV 1048576 1048576 $((t + 13)) 65536
    check "t${t}_io_write_4m" blkcheck write $DEV 4194304 4194304 $((t + 14)) 4194304
    check "t${t}_io_verify_4m" blkcheck verify $DEV 4194304 4194304 $((t + 14)) 524288
    check "t${t}_flush" blkcheck flush $DEV
    # Discard 256 KiB in the middle of the 1 MiB pattern; the malloc bdev reads unmapped blocks
    # back as zeros, and the rest of the pattern must be intact.
    run "t${t}_discard" blkdiscard -o 1310720 -l 262144 $DEV
    check "t${t}_discard_zeros" blkcheck zeros $DEV 1310720 262144
    check "t${t}_discard_head_intact" blkcheck verify $DEV 1048576 262144 $((t + 13))
    check "t${t}_discard_tail_intact" blkcheck verify $DEV 1572864 524288 $((t + 13))
}

wait_for /sys/bus/virtio/drivers/virtio_scsi 60 || { result driver no; exit 1; }
for t in 0 1; do
    if wait_sd $t 120; then
        describe $t
        exercise $t
    else
        result "t${t}_present" no
    fi
done
if sd_of 2 >/dev/null 2>&1; then result t2_before_attach present; else result t2_before_attach absent; fi

# LUN reset (SG_SCSI_RESET -> virtio-scsi LOGICAL UNIT RESET) while a writer keeps I/O in flight:
# the reset completes, the writer's data all lands (commands after the reset see the unit
# attention and are retried by the kernel).
D0=$(sd_of 0)
blkcheck write /dev/$D0 8388608 16777216 21 65536 >/tmp/bg.out 2>&1 &
BG=$!
usleep 300000
run lun_reset sg_reset -d /dev/$D0
if wait $BG; then result lun_reset_bg_write ok; else result lun_reset_bg_write "failed:$(head -n 1 /tmp/bg.out)"; fi
check lun_reset_verify blkcheck verify /dev/$D0 8388608 16777216 21

# Multiqueue: one writer pinned to each CPU; blk-mq maps each CPU to its own request queue, so
# every request virtqueue signals completions.
NCPU=$(grep -c ^processor /proc/cpuinfo)
for c in $(seq 0 $((NCPU - 1))); do
    taskset -c $c blkcheck write /dev/$D0 $((16777216 + c * 1048576)) 1048576 $((40 + c)) 65536 >/dev/null &
done
wait
result mq_request_queues "$(grep -c 'virtio[0-9]*-request' /proc/interrupts)"
result mq_queues_used "$(awk '/virtio[0-9]+-request/ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; if (s > 0) n++ } END { print n + 0 }' /proc/interrupts)"

result phase attach
if wait_sd 2 120; then
    describe 2
    exercise 2
else
    result t2_present no
fi

D1=$(sd_of 1)
# A writer keeps I/O in flight to target 1 while it is detached: it must end (its I/O completes or
# fails), never hang.
blkcheck write /dev/$D1 0 33554432 31 65536 >/tmp/bg1.out 2>&1 &
BG1=$!
usleep 200000
result phase detach
if gone 1 120; then
    result t1_gone yes
    # The scsi_device leaves sysfs before sd deletes the disk: give that a moment.
    if wait_gone /sys/block/$D1 30 && wait_gone /dev/$D1 30; then
        result t1_dev_gone yes
    else
        result t1_dev_gone no
    fi
else
    result t1_gone no
fi
wait $BG1
result detach_writer_ended "rc=$?"
# The other targets still work after the detach.
D0=$(sd_of 0)
check after_detach_t0_write blkcheck write /dev/$D0 65536 65536 99
check after_detach_t0_verify blkcheck verify /dev/$D0 65536 65536 99
D2=$(sd_of 2)
check after_detach_t2_verify blkcheck verify /dev/$D2 0 $(cat /sys/block/$D2/queue/logical_block_size) 13

# Deleting the bdev behind target 2 detaches it too.
result phase delete_bdev
if gone 2 120; then result t2_gone_with_bdev yes; else result t2_gone_with_bdev no; fi
check after_delete_t0_verify blkcheck verify /dev/$D0 65536 65536 99
result phase end
"#;

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

/// `sg_reset` from sg3-utils, copied into the guest (it needs only libc).
const SG_RESET: &str = "/usr/bin/sg_reset";

/// The results file of the running guest named `name` (run directories are
/// `<name>-<pid>-<n>` under the harness's runs directory).
fn live_results(name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-{}-", std::process::id());
    let entries = std::fs::read_dir(runs_dir()).ok()?;
    entries
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("results.txt"))
}

/// Waits until the guest reports `RESULT phase=<phase>`; false if the guest ended first or the
/// deadline passed.
fn wait_phase(
    name: &str,
    phase: &str,
    guest: &std::thread::JoinHandle<rvhost_tests::Result<GuestOutput>>,
    deadline: Instant,
) -> bool {
    let line = format!("RESULT phase={phase}");
    while Instant::now() < deadline && !guest.is_finished() {
        if let Some(path) = live_results(name) {
            if std::fs::read_to_string(&path).is_ok_and(|t| t.lines().any(|l| l.trim() == line)) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The NAA identifier Linux shows in `wwid`: `naa.` and 32 hex digits (NAA 6, IEEE registered
/// extended), the same for every boot because it derives from the bdev's UUID.
fn assert_naa(out: &GuestOutput, key: &str) {
    let wwid = out.get(key).unwrap_or_default();
    let hex = wwid.strip_prefix("naa.").unwrap_or_default();
    assert!(
        hex.len() == 32 && hex.starts_with('6') && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{key} = {wwid:?}\n{}",
        out.diagnostics()
    );
}

fn assert_disk(out: &GuestOutput, t: u8, block_size: u32, bytes: u64) {
    out.assert_eq(&format!("t{t}_present"), "yes");
    let hctl = out.get(&format!("t{t}_hctl")).unwrap_or_default();
    assert!(
        hctl.ends_with(&format!(":0:{t}:0")),
        "t{t}_hctl = {hctl:?}\n{}",
        out.diagnostics()
    );
    out.assert_eq(&format!("t{t}_vendor"), "RVHOST");
    out.assert_eq(&format!("t{t}_model"), "rvhost Malloc");
    out.assert_eq(&format!("t{t}_lbs"), &block_size.to_string());
    out.assert_eq(&format!("t{t}_sectors"), &(bytes / 512).to_string());
    out.assert_eq(&format!("t{t}_size"), &bytes.to_string());
    assert_naa(out, &format!("t{t}_wwid"));
    assert!(
        out.number(&format!("t{t}_dmax")) > 0,
        "discard not offered on target {t}\n{}",
        out.diagnostics()
    );
    out.assert_all_ok(&format!("t{t}_io_"));
    out.assert_eq(&format!("t{t}_flush"), "ok");
    out.assert_all_ok(&format!("t{t}_discard"));
}

/// One boot against a fresh target: `Err(())` when the guest hung in early boot (a known TCG
/// problem on a loaded host: it never reached the script), so the caller may retry.
fn attempt(name: &str) -> Result<(GuestOutput, Rvhost), ()> {
    let mut target = match Rvhost::start() {
        Ok(t) => t,
        Err(err) => panic!("{err}"),
    };
    for (bdev, blocks, bs) in [
        ("M512", 65536u64, 512u32),
        ("M4K", 8192, 4096),
        ("M3", 32768, 512),
    ] {
        target.rpc_ok(
            "bdev_malloc_create",
            json!({"name": bdev, "num_blocks": blocks, "block_size": bs}),
        );
    }
    // The seed guide's names for the boot-time targets, today's for the hot-plugged one.
    target.rpc_ok(
        "construct_vhost_scsi_controller",
        json!({"ctrlr": "scsi0", "cpumask": "0x1"}),
    );
    let t0 = target.rpc_ok(
        "add_vhost_scsi_lun",
        json!({"ctrlr": "scsi0", "scsi_target_num": 0, "bdev_name": "M512"}),
    );
    assert_eq!(t0, json!(0));
    let t1 = target.rpc_ok(
        "vhost_scsi_controller_add_target",
        json!({"ctrlr": "scsi0", "scsi_target_num": -1, "bdev_name": "M4K"}),
    );
    assert_eq!(t1, json!(1), "-1 picks the first free target");
    let listed = target.rpc_ok("vhost_get_controllers", json!({"name": "scsi0"}));
    let scsi = &listed[0]["backend_specific"]["scsi"];
    assert_eq!(scsi[0]["scsi_dev_num"], json!(0), "{listed}");
    assert_eq!(scsi[0]["luns"][0]["bdev_name"], json!("M512"), "{listed}");
    assert_eq!(scsi[1]["luns"][0]["bdev_name"], json!("M4K"), "{listed}");

    let socket = target.controller_socket("scsi0");
    let config = GuestConfig::new(name, SCSI_CHECKS)
        .modules(VIRTIO_SCSI_MODULES)
        .cpus(2)
        .device(VhostUserDevice::Scsi {
            socket,
            num_queues: 2,
        })
        .binary(blkcheck())
        .binary(SG_RESET);
    let guest = std::thread::spawn(move || run_guest(&config));

    // The script reaches its first phase within minutes unless the boot hung.
    let boot_deadline = Instant::now() + BOOT_TIMEOUT;
    if wait_phase(name, "attach", &guest, boot_deadline) {
        let t2 = target.rpc_ok(
            "vhost_scsi_controller_add_target",
            json!({"ctrlr": "scsi0", "scsi_target_num": 2, "bdev_name": "M3"}),
        );
        assert_eq!(t2, json!(2));
    } else if !guest.is_finished() && !started(name) {
        tracing::warn!(name, "guest hung before running its script; killing it");
        kill_guest(name);
        let _ = guest.join();
        return Err(());
    }
    if wait_phase(name, "detach", &guest, Instant::now() + PHASE_TIMEOUT) {
        target.rpc_ok(
            "remove_vhost_scsi_dev",
            json!({"ctrlr": "scsi0", "scsi_target_num": 1}),
        );
    }
    if wait_phase(name, "delete_bdev", &guest, Instant::now() + PHASE_TIMEOUT) {
        target.rpc_ok("bdev_malloc_delete", json!({"name": "M3"}));
    }
    match guest.join() {
        Ok(Ok(out)) => Ok((out, target)),
        Ok(Err(err)) => panic!("{err}\n---- rvhost log ----\n{}", target.log()),
        Err(_) => panic!(
            "guest thread panicked\n---- rvhost log ----\n{}",
            target.log()
        ),
    }
}

/// Whether the guest's kernel got as far as printing anything on its console.
fn started(name: &str) -> bool {
    live_results(name)
        .and_then(|r| std::fs::metadata(r.with_file_name("console.log")).ok())
        .is_some_and(|m| m.len() > 0)
}

/// Ends the QEMU of the guest named `name` (found by its run directory on its command line).
fn kill_guest(name: &str) {
    let Some(results) = live_results(name) else {
        return;
    };
    let needle = results.with_file_name("initramfs.cpio.gz");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(needle.to_string_lossy().as_ref())
        {
            if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const PHASE_TIMEOUT: Duration = Duration::from_secs(900);

#[test]
fn rvhost_scsi_two_luns_io_lun_reset_hot_attach_detach() {
    init_test_logging();
    assert!(
        std::path::Path::new(SG_RESET).is_file(),
        "{SG_RESET} is needed in the guest for the LUN reset: apt-get install sg3-utils"
    );
    let mut outcome = None;
    for round in 1..=2 {
        if let Ok(done) = attempt(&format!("rvhost-scsi-{round}")) {
            outcome = Some(done);
            break;
        }
    }
    let Some((out, mut target)) = outcome else {
        panic!("the guest hung in early boot twice");
    };
    assert!(
        target.is_running(),
        "rvhost exited\n---- rvhost log ----\n{}",
        target.log()
    );

    assert_disk(&out, 0, 512, 32 * MIB);
    assert_disk(&out, 1, 4096, 32 * MIB);
    out.assert_eq("lun_reset", "ok");
    out.assert_eq("lun_reset_bg_write", "ok");
    out.assert_eq("lun_reset_verify", "ok");
    out.assert_eq("mq_request_queues", "2");
    out.assert_eq("mq_queues_used", "2");
    assert!(
        target.log().contains("LogicalUnitReset"),
        "the guest's reset did not reach the target as a LUN reset\n{}",
        target.log()
    );
    out.assert_eq("t2_before_attach", "absent");
    assert_disk(&out, 2, 512, 16 * MIB);
    out.assert_eq("t1_gone", "yes");
    out.assert_eq("t1_dev_gone", "yes");
    out.assert_all_ok("after_detach_");
    assert!(
        out.get("detach_writer_ended").is_some(),
        "{}",
        out.diagnostics()
    );
    out.assert_eq("t2_gone_with_bdev", "yes");
    out.assert_eq("after_delete_t0_verify", "ok");
    out.assert_eq("phase", "end");
    out.assert_eq("script_exit", "0");

    let listed = target.rpc_ok("vhost_get_controllers", json!({"name": "scsi0"}));
    let ids: Vec<&Value> = listed[0]["backend_specific"]["scsi"]
        .as_array()
        .map(|a| a.iter().map(|t| &t["scsi_dev_num"]).collect())
        .unwrap_or_default();
    assert_eq!(ids, [&json!(0)], "{listed}");
}
