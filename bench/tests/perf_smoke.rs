//! rvhost-perf against a freshly started rvhost data plane (the target's real reactor and
//! vhost-user server, started in this process on core 0): a short `--verify` run must write and
//! read back patterns with no mismatch and complete I/O. No timing is asserted.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvhost_target::bdev::malloc::{MallocBdev, MemoryBudget};
use rvhost_target::bdev::null::NullBdev;
use rvhost_target::bdev::Bdev;
use rvhost_target::dataplane::Dataplane;
use rvhost_target::ops::{BlkControllerSpec, ControllerOps};

fn socket_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rvhost-perf-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(test: &str, bdev: Arc<dyn Bdev>) -> (Arc<Dataplane>, PathBuf) {
    let dir = socket_dir(test);
    let dp = Dataplane::start(0x1, dir.clone()).unwrap();
    dp.create_blk_controller(BlkControllerSpec {
        name: "perf0".into(),
        bdev,
        cpumask: None,
        readonly: false,
    })
    .unwrap();
    let socket = dir.join("perf0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "socket {socket:?} never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (dp, socket)
}

fn perf(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rvhost-perf"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[test]
fn verify_run_against_rvhost_malloc_finds_no_mismatch() {
    let budget = MemoryBudget::new(64 << 20);
    let bdev = MallocBdev::new("Malloc0", (16 << 20) / 512, 512, [1; 16], &budget).unwrap();
    let (dp, socket) = start("verify", bdev);
    let socket = socket.to_str().unwrap().to_owned();
    let (code, report, stderr) = perf(&[
        "--socket",
        &socket,
        "--rw",
        "randrw",
        "--rwmixread",
        "50",
        "--bs",
        "4k",
        "--qd",
        "16",
        "--queues",
        "1",
        "--time",
        "2",
        "--verify",
    ]);
    dp.shutdown();
    assert_eq!(code, 0, "rvhost-perf failed: {stderr}");
    assert_eq!(report["verify_errors"], 0, "{report}");
    assert_eq!(report["io_errors"], 0, "{report}");
    assert!(report["total"]["ios"].as_u64().unwrap() > 0, "{report}");
    assert!(report["total"]["iops"].as_f64().unwrap() > 0.0, "{report}");
    // With 4096 blocks and 1000s of writes, reads must have hit written blocks and been checked.
    assert!(report["verified_reads"].as_u64().unwrap() > 0, "{report}");
    assert!(report["write"]["ios"].as_u64().unwrap() > 0, "{report}");
}

/// `--packed`: the same verified random mix on packed virtqueues, over many laps of the ring.
#[test]
fn verify_run_on_packed_rings_finds_no_mismatch() {
    let budget = MemoryBudget::new(64 << 20);
    let bdev = MallocBdev::new("Malloc0", (16 << 20) / 512, 512, [1; 16], &budget).unwrap();
    let (dp, socket) = start("verify-packed", bdev);
    let socket = socket.to_str().unwrap().to_owned();
    let (code, report, stderr) = perf(&[
        "--socket", &socket, "--rw", "randrw", "--bs", "4k", "--qd", "16", "--queues", "2",
        "--time", "2", "--verify", "--packed",
    ]);
    dp.shutdown();
    assert_eq!(code, 0, "rvhost-perf --packed failed: {stderr}");
    assert_eq!(report["packed"], true, "{report}");
    assert_eq!(report["verify_errors"], 0, "{report}");
    assert_eq!(report["io_errors"], 0, "{report}");
    assert!(report["verified_reads"].as_u64().unwrap() > 0, "{report}");
    assert!(report["write"]["ios"].as_u64().unwrap() > 0, "{report}");
}

/// `--indirect`: every request as one ring descriptor pointing at an indirect table, on split and
/// on packed rings, verified like the runs above; the report says the tables were used.
#[test]
fn verify_run_with_indirect_tables_finds_no_mismatch() {
    let budget = MemoryBudget::new(64 << 20);
    let bdev = MallocBdev::new("Malloc0", (16 << 20) / 512, 512, [5; 16], &budget).unwrap();
    let (dp, socket) = start("verify-indirect", bdev);
    let socket = socket.to_str().unwrap().to_owned();
    let runs: Vec<_> = [false, true]
        .into_iter()
        .map(|packed| {
            let mut args = vec![
                "--socket",
                &socket,
                "--rw",
                "randrw",
                "--bs",
                "4k",
                "--qd",
                "16",
                "--queues",
                "2",
                "--time",
                "2",
                "--verify",
                "--indirect",
            ];
            if packed {
                args.push("--packed");
            }
            (packed, perf(&args))
        })
        .collect();
    dp.shutdown();
    for (packed, (code, report, stderr)) in runs {
        assert_eq!(
            code, 0,
            "rvhost-perf --indirect (packed {packed}) failed: {stderr}"
        );
        assert_eq!(report["indirect"], true, "{report}");
        assert_eq!(report["packed"], packed, "{report}");
        assert_eq!(report["verify_errors"], 0, "{report}");
        assert_eq!(report["io_errors"], 0, "{report}");
        assert!(report["verified_reads"].as_u64().unwrap() > 0, "{report}");
        assert!(report["write"]["ios"].as_u64().unwrap() > 0, "{report}");
    }
}

#[test]
fn verify_catches_a_target_that_drops_writes() {
    // A null bdev completes writes without storing them: every checked read must fail.
    let bdev = NullBdev::new("Null0", (16 << 20) / 512, 512, [2; 16]).unwrap();
    let (dp, socket) = start("null", bdev);
    let socket = socket.to_str().unwrap().to_owned();
    let (code, report, stderr) = perf(&[
        "--socket", &socket, "--rw", "randrw", "--qd", "8", "--time", "2", "--verify",
    ]);
    dp.shutdown();
    assert_eq!(code, 1, "mismatches make the exit status 1: {stderr}");
    assert!(report["verify_errors"].as_u64().unwrap() > 0, "{report}");
    assert!(stderr.contains("verify: block"), "{stderr}");
}

#[test]
fn multi_queue_sequential_write_then_json_fields() {
    let budget = MemoryBudget::new(64 << 20);
    let bdev = MallocBdev::new("Malloc1", (8 << 20) / 512, 512, [3; 16], &budget).unwrap();
    let (dp, socket) = start("mq", bdev);
    let socket = socket.to_str().unwrap().to_owned();
    let (code, report, stderr) = perf(&[
        "--socket", &socket, "--rw", "write", "--bs", "8k", "--qd", "4", "--queues", "2", "--time",
        "1",
    ]);
    dp.shutdown();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["queues"], 2);
    assert_eq!(report["disk"]["capacity"], 8 << 20);
    assert_eq!(report["read"]["ios"], 0);
    assert!(report["write"]["ios"].as_u64().unwrap() > 0, "{report}");
    for key in ["avg_ns", "p50_ns", "p99_ns", "p999_ns", "max_ns"] {
        assert!(
            report["write"]["latency"][key].as_f64().unwrap() > 0.0,
            "{key}: {report}"
        );
    }
}

/// `--dirty-log`: rvhost-perf acts as a migrating frontend. With logging on, the target must mark
/// every read's data buffer (and its used ring and status bytes besides); with the log only handed
/// over (`idle`, logging off), it must mark nothing. Fails if the log stays empty.
#[test]
fn dirty_log_marks_read_buffers_when_on_and_nothing_when_idle() {
    let budget = MemoryBudget::new(64 << 20);
    let bdev = MallocBdev::new("Malloc0", (16 << 20) / 512, 512, [4; 16], &budget).unwrap();
    let (dp, socket) = start("dirty-log", bdev);
    let socket = socket.to_str().unwrap().to_owned();
    let run = |mode: &str| {
        perf(&[
            "--socket",
            &socket,
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--qd",
            "8",
            "--time",
            "1",
            "--dirty-log",
            mode,
        ])
    };
    let (code_on, on, stderr_on) = run("on");
    let (code_idle, idle, stderr_idle) = run("idle");
    dp.shutdown();
    assert_eq!(code_on, 0, "rvhost-perf --dirty-log on failed: {stderr_on}");
    assert_eq!(
        code_idle, 0,
        "rvhost-perf --dirty-log idle failed: {stderr_idle}"
    );
    for report in [&on, &idle] {
        assert_eq!(report["io_errors"], 0, "{report}");
        assert!(report["total"]["ios"].as_u64().unwrap() > 0, "{report}");
    }
    let log = &on["dirty_log"];
    assert_eq!(log["mode"], "on", "{on}");
    // Eight 4 KiB read buffers, each read many times: all eight pages marked.
    assert_eq!(log["data_pages"], 8, "{on}");
    assert_eq!(log["data_pages_marked"], 8, "{on}");
    // Besides the buffers, at least the used ring and the status bytes' page.
    assert!(log["pages_marked"].as_u64().unwrap() >= 10, "{on}");
    let log = &idle["dirty_log"];
    assert_eq!(log["mode"], "idle", "{idle}");
    assert_eq!(log["pages_marked"], 0, "{idle}");
}

#[test]
fn rate_mode_offers_no_more_than_the_rate() {
    // The in-process loopback responder serves far above 20k IOPS; the pacer must hold the run
    // to the rate (plus at most one queue depth of backlog) and still complete requests.
    let (code, report, stderr) = perf(&[
        "--loopback",
        "1",
        "--qd",
        "32",
        "--time",
        "1",
        "--rate",
        "20000",
    ]);
    assert_eq!(code, 0, "rvhost-perf failed: {stderr}");
    assert_eq!(report["rate"], 20000, "{report}");
    let ios = report["total"]["ios"].as_u64().unwrap();
    assert!(ios <= 20_000 + 32, "{ios} requests at --rate 20000 for 1 s");
    // Only that it completes requests at all: on a loaded machine the two threads may get
    // a small share of the cores.
    assert!(
        ios >= 200,
        "only {ios} requests completed at --rate 20000 for 1 s"
    );
}
