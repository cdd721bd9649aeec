//! vhost-user-blk acceptance tests with a real Linux guest under QEMU (TCG).
//!
//! Each scenario runs twice: against `qemu-storage-daemon` (`qsd_*`, the reference peer, which
//! keeps the harness and the expectations honest) and against the `rvhost` binary (`rvhost_*`).
//! The rvhost tests build the binary themselves and fail, not skip, when it does not build.

use std::path::PathBuf;

use rvhost_tests::{
    init_test_logging, run_guest_with, GuestConfig, GuestOutput, Qsd, QsdBacking, QsdOptions,
    Rvhost, VhostUserDevice,
};

const BLK_CHECKS: &str = include_str!("../guest/blk_checks.sh");
const BLK_READONLY: &str = include_str!("../guest/blk_readonly.sh");
const BLK_PERSIST: &str = include_str!("../guest/blk_persist.sh");
const BLK_REBOOT: &str = include_str!("../guest/blk_reboot.sh");

const MIB: u64 = 1 << 20;
const WB: &str = "write back";
const WT: &str = "write through";

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

fn blk(socket: PathBuf, num_queues: u16) -> VhostUserDevice {
    VhostUserDevice::Blk { socket, num_queues }
}

/// What the guest must see of the disk.
struct Disk {
    size_bytes: u64,
    block_size: u32,
    queues: u16,
    /// The guest's cache mode: "write back" when the device offers VIRTIO_BLK_F_FLUSH (what SPDK
    /// does for a bdev that supports flush), "write through" from qemu-storage-daemon 7.2 (it
    /// offers CONFIG_WCE with wce=0).
    write_cache: &'static str,
    /// The GET_ID answer (`/sys/block/vda/serial`): the bdev name for rvhost, like SPDK.
    serial: &'static str,
}

fn run(config: GuestConfig) -> GuestOutput {
    run_with(config, |_, _| {})
}

/// [`run`], calling `on_result` for each result as the guest prints it.
fn run_with(config: GuestConfig, on_result: impl FnMut(&str, &str)) -> GuestOutput {
    match run_guest_with(&config.binary(blkcheck()), on_result) {
        Ok(output) => output,
        Err(err) => panic!("{err}"),
    }
}

/// The full set of checks in one boot: geometry, pattern I/O, parallel I/O over every queue,
/// flush, discard, write-zeroes, and a device reset by unbinding and rebinding the driver.
fn full_checks(name: &str, socket: PathBuf, disk: &Disk) -> GuestOutput {
    let config = GuestConfig::new(name, BLK_CHECKS)
        .cpus(u8::try_from(disk.queues).unwrap_or(u8::MAX))
        .device(blk(socket, disk.queues))
        .env("DISCARD", 1)
        .env("ZEROES", 1)
        .env("RESET", 1);
    let out = run(config);
    assert_full_checks(&out, disk);
    out
}

fn assert_full_checks(out: &GuestOutput, disk: &Disk) {
    out.assert_eq("disk_present", "yes");
    out.assert_eq("size_sectors", &(disk.size_bytes / 512).to_string());
    out.assert_eq("size_bytes", &disk.size_bytes.to_string());
    out.assert_eq("logical_block_size", &disk.block_size.to_string());
    out.assert_eq("queue_count", &disk.queues.to_string());
    out.assert_eq("ro", "0");
    out.assert_eq("write_cache", disk.write_cache);
    out.assert_eq("serial", disk.serial);
    assert!(
        out.number("queue_discard_max_bytes") > 0,
        "discard not offered\n{}",
        out.diagnostics()
    );
    assert!(
        out.number("queue_write_zeroes_max_bytes") > 0,
        "write-zeroes not offered\n{}",
        out.diagnostics()
    );
    out.assert_all_ok("io_");
    // Every queue carried requests from the CPU pinned to it.
    out.assert_eq("queues_used", &disk.queues.to_string());
    out.assert_eq("flush", "ok");
    out.assert_all_ok("discard_");
    out.assert_all_ok("zeroes_");
    out.assert_eq("reset_unbound", "ok");
    out.assert_eq("reset_rebound", "ok");
    out.assert_eq("reset_queue_count", &disk.queues.to_string());
    out.assert_eq("reset_size_bytes", &disk.size_bytes.to_string());
    out.assert_all_ok("reset_verify_");
    out.assert_eq("reset_write_new", "ok");
    out.assert_eq("reset_flush", "ok");
    out.assert_eq("script_exit", "0");
}

fn readonly_checks(name: &str, socket: PathBuf, disk: &Disk) {
    readonly_checks_with(name, socket, disk, |config| config, |_, _| {});
}

/// The read-only checks, in a guest `extra` may add to (devices, environment); returns the
/// guest's results for further checks.
fn readonly_checks_with(
    name: &str,
    socket: PathBuf,
    disk: &Disk,
    extra: impl FnOnce(GuestConfig) -> GuestConfig,
    on_result: impl FnMut(&str, &str),
) -> GuestOutput {
    let out = run_with(
        extra(GuestConfig::new(name, BLK_READONLY).device(blk(socket, disk.queues))),
        on_result,
    );
    out.assert_eq("disk_present", "yes");
    out.assert_eq("ro", "1");
    out.assert_eq("size_bytes", &disk.size_bytes.to_string());
    let refused = out.get("ro_write_refused").unwrap_or_default();
    assert!(
        refused.starts_with("refused-at-"),
        "write was not refused: {refused}\n{}",
        out.diagnostics()
    );
    out.assert_eq("ro_read_zeros", "ok");
    out
}

/// Two boots against one running backend: what boot 1 wrote and flushed, boot 2 reads back. This
/// also makes the backend serve a second frontend connection after the first went away.
fn persistence_checks(name: &str, socket: PathBuf, queues: u16) {
    let boot = |mode: &str| {
        run(GuestConfig::new(&format!("{name}-{mode}"), BLK_PERSIST)
            .device(blk(socket.clone(), queues))
            .env("MODE", mode))
    };
    let first = boot("write");
    first.assert_all_ok("persist_");
    let second = boot("verify");
    second.assert_eq("persist_verify_a", "ok");
    second.assert_eq("persist_verify_b", "ok");
}

/// One QEMU, two boots: `reboot -f` in the guest resets the machine and its devices, the backend
/// sees the device stop and start again on the same connection, and the disk works afterwards.
fn reboot_checks(name: &str, socket: PathBuf, queues: u16) {
    let config = GuestConfig::new(name, BLK_REBOOT)
        .cpus(2)
        .device(blk(socket, queues))
        .boots(2);
    let out = run(config);
    let boots: Vec<&str> = out
        .lines
        .iter()
        .filter(|(k, _)| k == "boot")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(boots, ["first", "second"], "\n{}", out.diagnostics());
    for key in ["reboot_write", "reboot_flush", "reboot_verify"] {
        out.assert_eq(key, "ok");
    }
    out.assert_all_ok("reboot_");
    out.assert_eq("script_exit", "0");
}

mod qsd {
    use super::*;

    fn start(options: QsdOptions) -> Qsd {
        match Qsd::start(options) {
            Ok(qsd) => qsd,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn qsd_blk_one_queue_512b() {
        init_test_logging();
        let qsd = start(QsdOptions::default());
        let disk = Disk {
            size_bytes: 64 * MIB,
            block_size: 512,
            queues: 1,
            write_cache: WT,
            serial: "vhost_user_blk",
        };
        full_checks("qsd-blk-1q", qsd.socket().to_path_buf(), &disk);
    }

    #[test]
    fn qsd_blk_four_queues_4k() {
        init_test_logging();
        let qsd = start(QsdOptions {
            backing: QsdBacking::File {
                size_bytes: 64 * MIB,
            },
            logical_block_size: 4096,
            num_queues: 4,
            writable: true,
        });
        let disk = Disk {
            size_bytes: 64 * MIB,
            block_size: 4096,
            queues: 4,
            write_cache: WT,
            serial: "vhost_user_blk",
        };
        full_checks("qsd-blk-4q", qsd.socket().to_path_buf(), &disk);
    }

    #[test]
    fn qsd_blk_readonly() {
        init_test_logging();
        let qsd = start(QsdOptions {
            writable: false,
            ..QsdOptions::default()
        });
        let disk = Disk {
            size_bytes: 64 * MIB,
            block_size: 512,
            queues: 1,
            write_cache: WT,
            serial: "vhost_user_blk",
        };
        readonly_checks("qsd-blk-ro", qsd.socket().to_path_buf(), &disk);
    }

    /// The checks must be able to fail: on a null backend writes vanish, so read-back must report
    /// a mismatch (and reads of never-written data must still look like zeros).
    #[test]
    fn qsd_null_backend_fails_pattern_checks() {
        init_test_logging();
        let qsd = start(QsdOptions {
            backing: QsdBacking::Null {
                size_bytes: 64 * MIB,
            },
            ..QsdOptions::default()
        });
        let out = run(GuestConfig::new("qsd-blk-null", BLK_PERSIST)
            .device(blk(qsd.socket().to_path_buf(), 1))
            .env("MODE", "write verify"));
        for key in ["persist_write_a", "persist_write_b", "persist_flush"] {
            out.assert_eq(key, "ok");
        }
        for key in ["persist_verify_a", "persist_verify_b"] {
            let value = out.get(key).unwrap_or_default();
            assert!(
                value.starts_with("failed(rc=1):mismatch@"),
                "{key} = {value:?}: lost writes went unnoticed\n{}",
                out.diagnostics()
            );
        }
    }

    #[test]
    fn qsd_blk_guest_reboot() {
        init_test_logging();
        let qsd = start(QsdOptions {
            num_queues: 2,
            ..QsdOptions::default()
        });
        reboot_checks("qsd-blk-reboot", qsd.socket().to_path_buf(), 2);
    }

    #[test]
    fn qsd_blk_data_survives_reboot() {
        init_test_logging();
        let qsd = start(QsdOptions::default());
        persistence_checks("qsd-blk-persist", qsd.socket().to_path_buf(), 1);
    }
}

mod rvhost {
    use super::*;

    fn start() -> Rvhost {
        match Rvhost::start() {
            Ok(rvhost) => rvhost,
            Err(err) => panic!("{err}"),
        }
    }

    fn malloc_controller(
        target: &mut Rvhost,
        bdev: &str,
        blocks: u64,
        block_size: u32,
        controller: &str,
        readonly: bool,
    ) -> PathBuf {
        match target.create_malloc_blk(bdev, blocks, block_size, controller, readonly) {
            Ok(socket) => socket,
            Err(err) => panic!("{err}\n---- rvhost log ----\n{}", target.log()),
        }
    }

    /// Fails with the target's log if it died under the guest.
    fn assert_alive(target: &mut Rvhost) {
        assert!(
            target.is_running(),
            "rvhost exited\n---- rvhost log ----\n{}",
            target.log()
        );
    }

    #[test]
    fn rvhost_blk_default_malloc0() {
        init_test_logging();
        let mut target = start();
        let disk = Disk {
            size_bytes: 256 * MIB,
            block_size: 512,
            queues: 1,
            write_cache: WB,
            serial: "Malloc0",
        };
        full_checks("rvhost-blk-1q", target.controller_socket("vhost.0"), &disk);
        assert_alive(&mut target);
    }

    #[test]
    fn rvhost_blk_four_queues_4k() {
        init_test_logging();
        let mut target = start();
        let socket = malloc_controller(&mut target, "M1", 16384, 4096, "vhost.1", false);
        let disk = Disk {
            size_bytes: 64 * MIB,
            block_size: 4096,
            queues: 4,
            write_cache: WB,
            serial: "M1",
        };
        full_checks("rvhost-blk-4q", socket, &disk);
        assert_alive(&mut target);
    }

    /// The rate limit each phase of the guest's QoS part runs under (`bdev_set_qos_limit`
    /// parameter and value; 0 removes it), in the order the script runs them.
    const QOS_PHASES: [(&str, &str, u64); 7] = [
        ("unlimited", "rw_ios_per_sec", 0),
        ("iops2000", "rw_ios_per_sec", 2000),
        ("iops4000", "rw_ios_per_sec", 4000),
        ("iops0", "rw_ios_per_sec", 0),
        ("mb8", "rw_mbytes_per_sec", 8),
        ("mb16", "rw_mbytes_per_sec", 16),
        ("mb0", "rw_mbytes_per_sec", 0),
    ];
    /// 4 KiB reads in flight in the guest's QoS phases (one thread, io_uring), and each phase's
    /// length.
    const QOS_DEPTH: u32 = 32;
    const QOS_SECONDS: u32 = 5;

    /// What the guest measured in a phase.
    #[derive(Debug, Clone)]
    struct QosRate {
        /// Reads per second over the phase.
        iops: u64,
        /// KiB per second over the phase.
        kibps: u64,
        /// Reads completed in each second of the phase (for the failure message).
        per_second: String,
    }

    fn qos_rate(out: &GuestOutput, phase: &str) -> QosRate {
        let text = out.get(&format!("qos_{phase}")).unwrap_or_default();
        let field = |key: &str| {
            text.strip_prefix("ok:")?
                .split(':')
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        let per_second = text.rsplit("secs=").next().unwrap_or_default().to_owned();
        match (field("iops"), field("kibps")) {
            (Some(iops), Some(kibps)) => QosRate {
                iops,
                kibps,
                per_second,
            },
            _ => panic!("qos_{phase}={text:?}\n{}", out.diagnostics()),
        }
    }

    /// The guest's QoS phases: a limit holds within 10 %, raising it at run time raises the
    /// rate, 0 removes it; for I/Os per second (`rw_ios_per_sec`) and for MiB per second
    /// (`rw_mbytes_per_sec`). The unlimited phases must show the guest reading at least 1.5 times
    /// the lower limit: otherwise the guest's own speed, not the limit, could explain a rate near
    /// it, and the check fails saying so.
    fn assert_qos(out: &GuestOutput) {
        out.assert_eq("qos_serial", "Qos0");
        let rates: Vec<(&str, QosRate)> = QOS_PHASES
            .iter()
            .map(|p| (p.0, qos_rate(out, p.0)))
            .collect();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!("guest QoS phases (host load {}): {rates:?}", load.trim());
        // The measure of a phase: reads per second for I/O limits, KiB per second for byte
        // limits (a limit of N MiB/s is N * 1024 KiB/s).
        let rate = |name: &str| {
            let p = QOS_PHASES.iter().find(|p| p.0 == name).expect("phase");
            let r = &rates.iter().find(|(n, _)| *n == name).expect("rate").1;
            if p.1 == "rw_mbytes_per_sec" {
                r.kibps
            } else {
                r.iops
            }
        };
        let capacity = |phase: &str, limit: u64| {
            let got = rate(phase);
            assert!(
                got * 2 >= limit * 3,
                "{phase}: without a limit the guest read only {got}/s, under 1.5 x the limit \
                 {limit}/s under test: the check cannot tell the limit from the guest's own speed \
                 (host load {load}); phases {rates:?}"
            );
        };
        let within = |phase: &str, expected: u64| {
            let got = rate(phase);
            let seconds = rates
                .iter()
                .find(|(n, _)| *n == phase)
                .map_or("", |(_, r)| r.per_second.as_str());
            assert!(
                got * 10 >= expected * 9 && got * 10 <= expected * 11,
                "{phase}: {got}/s, limit {expected}/s (+-10 %; reads in each second: {seconds}); \
                 phases {rates:?}"
            );
        };
        let raised = |phase: &str, before: &str, limit: u64| {
            let (got, was) = (rate(phase), rate(before));
            assert!(
                got * 4 >= was * 5 && got * 10 <= limit * 11,
                "{phase}: raising the limit to {limit}/s took the rate from {was}/s to {got}/s; \
                 phases {rates:?}"
            );
        };
        capacity("unlimited", 2000);
        within("iops2000", 2000);
        raised("iops4000", "iops2000", 4000);
        capacity("iops0", 2000);
        within("mb8", 8 * 1024);
        raised("mb16", "mb8", 16 * 1024);
        capacity("mb0", 8 * 1024);
    }

    /// The read-only checks, and in the same boot `bdev_get_iostat` against what the guest's
    /// block layer counted on a second disk (probing included) around 4 MiB written and read
    /// back with O_DIRECT, and rate limits (`bdev_set_qos_limit`) on a third disk, changed
    /// while the guest reads from it.
    #[test]
    fn rvhost_blk_readonly() {
        init_test_logging();
        let mut target = start();
        let socket = malloc_controller(&mut target, "M2", 32768, 512, "vhost.2", true);
        let stat_socket = malloc_controller(&mut target, "Stat0", 32768, 512, "vhost.stat", false);
        let qos_socket = malloc_controller(&mut target, "Qos0", 4096, 4096, "vhost.qos", false);
        target.rpc_ok(
            "bdev_enable_histogram",
            serde_json::json!({"name": "Stat0", "enable": true}),
        );
        let disk = Disk {
            size_bytes: 16 * MIB,
            block_size: 512,
            queues: 1,
            write_cache: WB,
            serial: "M2",
        };
        let phases: Vec<&str> = QOS_PHASES.iter().map(|p| p.0).collect();
        let mut qos_errors = Vec::new();
        let out = readonly_checks_with(
            "rvhost-blk-ro",
            socket,
            &disk,
            |config| {
                config
                    .device(blk(stat_socket, 1))
                    .env("IOSTAT", 1)
                    .device(blk(qos_socket, 1))
                    .env("QOS", phases.join(" "))
                    .env("QOS_DEPTH", QOS_DEPTH)
                    .env("QOS_SECONDS", QOS_SECONDS)
            },
            |key, value| {
                if key != "qos_phase" {
                    return;
                }
                let Some((_, param, limit)) = QOS_PHASES.iter().find(|p| p.0 == value) else {
                    return qos_errors.push(format!("unknown phase {value}"));
                };
                let mut params = serde_json::json!({"name": "Qos0"});
                params[*param] = serde_json::json!(limit);
                if let Err(err) = target.rpc("bdev_set_qos_limit", params) {
                    qos_errors.push(format!("{value}: {err}"));
                }
            },
        );
        assert_alive(&mut target);
        assert!(qos_errors.is_empty(), "bdev_set_qos_limit: {qos_errors:?}");
        assert_qos(&out);

        out.assert_eq("iostat_serial", "Stat0");
        out.assert_eq("iostat_write", "ok");
        out.assert_eq("iostat_verify", "ok");
        let counts = |key: &str| -> Vec<u64> {
            let text = out.get(key).unwrap_or_default();
            let v: Vec<u64> = text.split(',').filter_map(|n| n.parse().ok()).collect();
            assert_eq!(v.len(), 4, "{key}={text}\n{}", out.diagnostics());
            v
        };
        let (before, after) = (counts("iostat_before"), counts("iostat_after"));
        // /sys/block counts 512-byte sectors: the known I/O is exactly 4 MiB each way.
        assert_eq!(
            after[1] - before[1],
            8192,
            "sectors read {before:?} -> {after:?}"
        );
        assert_eq!(
            after[3] - before[3],
            8192,
            "sectors written {before:?} -> {after:?}"
        );
        let stat = target.rpc_ok("bdev_get_iostat", serde_json::json!({"name": "Stat0"}));
        let bdev = &stat["bdevs"][0];
        let field = |key: &str| bdev[key].as_u64().unwrap_or(u64::MAX);
        let reported = [
            field("num_read_ops"),
            field("bytes_read"),
            field("num_write_ops"),
            field("bytes_written"),
        ];
        let guest = [after[0], after[1] * 512, after[2], after[3] * 512];
        // The guest wrote nothing else: writes match exactly. Reads: the driver's probing is in
        // both, and the target may see one small read more than /sys/block counts (observed:
        // one 512-byte read the guest's block statistics leave out).
        let extra_reads = reported[0].checked_sub(guest[0]);
        let extra_bytes = reported[1].checked_sub(guest[1]);
        assert!(
            reported[2..] == guest[2..]
                && extra_reads.is_some_and(|n| n <= 1)
                && extra_bytes.is_some_and(|b| b <= 4096),
            "bdev_get_iostat (reads, bytes read, writes, bytes written) {reported:?} against \
             the guest's /sys/block/vdb/stat {guest:?}: {stat}"
        );
        assert!(
            field("read_latency_ticks") > 0 && field("write_latency_ticks") > 0,
            "{stat}"
        );

        // The latency histogram, enabled before the boot, holds every read and write (and the
        // flushes, which iostat does not count) in SPDK's encoding.
        let histogram = target.rpc_ok("bdev_get_histogram", serde_json::json!({"name": "Stat0"}));
        let bytes = unbase64(histogram["histogram"].as_str().unwrap_or_default());
        let ranges = histogram["max_range"].as_u64().unwrap_or(0) + 1;
        let granularity = histogram["granularity"].as_u64().unwrap_or(0);
        assert_eq!(
            bytes.len() as u64,
            (ranges << granularity) * 8,
            "{histogram}"
        );
        let counted: u64 = bytes
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .sum();
        assert!(
            counted >= reported[0] + reported[2] && counted <= reported[0] + reported[2] + 64,
            "histogram holds {counted} I/Os, iostat {reported:?}"
        );
    }

    /// Standard base64 (RFC 4648) back to bytes.
    fn unbase64(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let (mut bits, mut nbits, mut out) = (0u32, 0, Vec::new());
        for c in text.bytes().filter(|&c| c != b'=') {
            let value = ALPHABET.iter().position(|&a| a == c).unwrap_or(0) as u32;
            bits = (bits << 6) | value;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
            }
        }
        out
    }

    #[test]
    fn rvhost_blk_guest_reboot() {
        init_test_logging();
        let mut target = start();
        reboot_checks("rvhost-blk-reboot", target.controller_socket("vhost.0"), 2);
        assert_alive(&mut target);
    }

    #[test]
    fn rvhost_blk_data_survives_reboot() {
        init_test_logging();
        let mut target = start();
        persistence_checks("rvhost-blk-persist", target.controller_socket("vhost.0"), 1);
        assert_alive(&mut target);
    }
}
