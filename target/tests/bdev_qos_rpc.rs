//! `bdev_set_qos_limit` of the real `rvhost` binary through SPDK's own client: the in-process
//! vhost-user-blk frontend sends requests one at a time for a fixed window and counts how many
//! completed. Without a limit it gets well past every limit tried (the negative control); with
//! one, the count stays near the limit's share of the window: I/Os beyond the quota wait and
//! none fails. Limits changed at run time apply at once, 0 removes them, one limit holds for two
//! controllers sharing the bdev, `bdev_get_bdevs` shows them and `save_config` keeps them.
//!
//! Rates are checked as counts over a window with wide bounds (a loaded machine slows the
//! frontend, never speeds it up past a limit), not as timings. The negative control needs the
//! frontend and target to beat the highest limit tried several times over, which the release
//! build CI runs does many times over (about 30000 requests a second here); a debug build on a
//! loaded machine may not.

mod rpc_common;
mod vhost_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use rpc_common::Target;
use vhost_support::*;

/// How long each measurement runs.
const WINDOW: Duration = Duration::from_secs(2);
/// Bytes per request.
const IO_BYTES: usize = 4096;

/// Requests the frontend keeps outstanding: enough that a quota refilled late (a reactor that
/// did not run for a few timeslices on a loaded machine) is used, as a guest's queue would.
const DEPTH: u16 = 8;

/// Makes request `i` (of [`DEPTH`]) available on queue 0: a write, or a read when `read`, of
/// `IO_BYTES` at `sector`, in descriptors `3i..3i+2` with buffers of its own.
fn post_request(driver: &mut Driver, i: u16, read: bool, sector: u64) {
    let q = &driver.queues[0];
    let request = BlkRequestAt {
        head: 3 * i,
        req_type: if read { T_IN } else { T_OUT },
        sector,
        hdr: q.header_addr() + 32 * u64::from(i),
        buf: q.buffer_addr() + IO_BYTES as u64 * u64::from(i),
        len: IO_BYTES as u32,
        status: q.status_addr() + u64::from(i),
    };
    driver.post_blk_at(0, request);
}

/// Keeps [`DEPTH`] requests outstanding on queue 0 for [`WINDOW`] (writes and reads alternating),
/// then waits for the last ones; returns how many completed. Every one must succeed. Completions
/// are looked for without sleeping (the shared helper sleeps between looks, which would cap the
/// frontend's own rate near the limits measured).
fn run_window(driver: &mut Driver) -> u64 {
    let (used, status_base) = (driver.queues[0].used, driver.queues[0].status_addr());
    let start = Instant::now();
    let mut posted = 0u64;
    let mut done = 0u64;
    for i in 0..DEPTH {
        post_request(driver, i, posted % 2 == 1, (posted % 64) * 8);
        posted += 1;
    }
    let mut last_progress = Instant::now();
    while done < posted {
        let seen = driver.queues[0].used_seen;
        if driver.ram.load_u16(used + 2) == seen {
            assert!(
                last_progress.elapsed() < TIMEOUT,
                "no completion in {TIMEOUT:?} ({done} of {posted} done)"
            );
            std::thread::yield_now();
            continue;
        }
        last_progress = Instant::now();
        let elem = driver
            .ram
            .read(used + 4 + 8 * u64::from(seen % QUEUE_SIZE), 8);
        driver.queues[0].used_seen = seen.wrapping_add(1);
        let head = u16::from_le_bytes([elem[0], elem[1]]);
        assert!(head % 3 == 0 && head / 3 < DEPTH, "used head {head}");
        let i = head / 3;
        let status = driver.ram.read(status_base + u64::from(i), 1)[0];
        assert_eq!(status, S_OK, "request {done} failed");
        done += 1;
        if start.elapsed() < WINDOW {
            post_request(driver, i, posted % 2 == 1, (posted % 64) * 8);
            posted += 1;
        }
    }
    done
}

fn limits(target: &Target, name: &str) -> Value {
    let bdevs = target.spdk_json(&["bdev_get_bdevs", "-b", name]);
    bdevs[0]["assigned_rate_limits"].clone()
}

/// The rate measurements of the tests in this file, one at a time (each target's reactor runs on
/// core 0).
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn window_secs() -> u64 {
    WINDOW.as_secs()
}

/// The most a window may complete under `per_sec`: its share, plus the requests outstanding
/// when it ends and a margin for a late refill's catch-up.
fn ceiling(per_sec: u64) -> u64 {
    per_sec * window_secs() * 11 / 10 + u64::from(DEPTH) + 20
}

/// The least it must complete (the quota is not starved): half its share.
fn floor(per_sec: u64) -> u64 {
    per_sec * window_secs() / 2
}

#[test]
fn qos_limits_hold_change_at_run_time_and_are_saved() {
    let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let target = Target::start("qos", &[]);
    target.spdk_ok(&["bdev_null_create", "Qos0", "64", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.qos", "Qos0"]);
    assert_eq!(
        limits(&target, "Qos0"),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    let mut driver = Driver::ready(&target.dir.join("vhost.qos"), VIRTIO_F_VERSION_1);

    // Negative control: without a limit the frontend gets past the highest ceiling below.
    let free = run_window(&mut driver);
    assert!(
        free > ceiling(2000),
        "without a limit {free} requests in {WINDOW:?}: too slow to tell a limit from none"
    );

    // 1000 I/Os per second.
    target.spdk_ok(&["bdev_set_qos_limit", "Qos0", "--rw-ios-per-sec", "1000"]);
    assert_eq!(limits(&target, "Qos0")["rw_ios_per_sec"], 1000);
    let limited = run_window(&mut driver);
    assert!(
        (floor(1000)..=ceiling(1000)).contains(&limited),
        "1000 IOPS: {limited} requests in {WINDOW:?} (without a limit: {free})"
    );

    // Raised at run time (1500 is rounded up to 2000, as SPDK does): the rate follows.
    target.spdk_ok(&["bdev_set_qos_limit", "Qos0", "--rw-ios-per-sec", "1500"]);
    assert_eq!(limits(&target, "Qos0")["rw_ios_per_sec"], 2000);
    let raised = run_window(&mut driver);
    assert!(
        raised > ceiling(1000) && raised <= ceiling(2000),
        "2000 IOPS: {raised} requests in {WINDOW:?} (at 1000: {limited})"
    );

    // Bandwidth: 1 MiB/s of 4 KiB requests is 256 per second; the I/O limit stays as well.
    target.spdk_ok(&["bdev_set_qos_limit", "Qos0", "--rw-mbytes-per-sec", "1"]);
    assert_eq!(
        limits(&target, "Qos0"),
        json!({"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 1, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    let per_sec = (1 << 20) / IO_BYTES as u64;
    let bandwidth = run_window(&mut driver);
    assert!(
        (floor(per_sec)..=ceiling(per_sec)).contains(&bandwidth),
        "1 MiB/s: {bandwidth} requests of {IO_BYTES} bytes in {WINDOW:?}"
    );

    // save_config keeps the limits after the bdev's creation.
    let config = target.ok("framework_get_config", json!({"name": "bdev"}));
    let calls = config.as_array().expect("calls");
    let create = calls
        .iter()
        .position(|c| c["method"] == "bdev_null_create" && c["params"]["name"] == "Qos0")
        .expect("the bdev's creation is saved");
    let qos = calls
        .iter()
        .position(|c| c["method"] == "bdev_set_qos_limit")
        .unwrap_or_else(|| panic!("no bdev_set_qos_limit in {config}"));
    assert!(create < qos, "{config}");
    assert_eq!(
        calls[qos]["params"],
        json!({"name": "Qos0", "rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 1})
    );

    // A read-only limit leaves writes alone; then 0 removes every limit.
    target.spdk_ok(&[
        "bdev_set_qos_limit",
        "Qos0",
        "--rw-ios-per-sec",
        "0",
        "--rw-mbytes-per-sec",
        "0",
        "--r-mbytes-per-sec",
        "1",
    ]);
    let reads_limited = run_window(&mut driver);
    // Half the requests are reads at 256 per second; the writes each follow one.
    assert!(
        reads_limited <= 2 * ceiling(per_sec),
        "1 MiB/s of reads: {reads_limited} requests in {WINDOW:?}"
    );
    target.spdk_ok(&["bdev_set_qos_limit", "Qos0", "--r-mbytes-per-sec", "0"]);
    assert_eq!(
        limits(&target, "Qos0"),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    let removed = run_window(&mut driver);
    assert!(
        removed > ceiling(2000),
        "after removing the limits: {removed} requests in {WINDOW:?} (without a limit first: {free})"
    );
    let config = target.ok("framework_get_config", json!({"name": "bdev"}));
    assert!(
        !config.to_string().contains("bdev_set_qos_limit"),
        "{config}"
    );

    eprintln!(
        "requests in {WINDOW:?}: no limit {free}, 1000 IOPS {limited}, 2000 IOPS {raised}, \
         1 MiB/s {bandwidth}, 1 MiB/s of reads {reads_limited}, limits removed {removed}"
    );
    // What was queued completed and was counted, and none failed.
    let stat = target.spdk_json(&["bdev_get_iostat", "--names", "Qos0"]);
    let bdev = &stat["bdevs"][0];
    let total = free + limited + raised + bandwidth + reads_limited + removed;
    assert_eq!(
        bdev["num_read_ops"].as_u64().unwrap() + bdev["num_write_ops"].as_u64().unwrap(),
        total,
        "{stat}"
    );
    assert_eq!(bdev["io_error"], json!({}), "{stat}");
}

#[test]
fn one_limit_holds_for_two_controllers_sharing_a_bdev() {
    let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let target = Target::start("qos2", &[]);
    target.spdk_ok(&["bdev_null_create", "Shared0", "64", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.qa", "Shared0"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.qb", "Shared0"]);
    target.spdk_ok(&["bdev_set_qos_limit", "Shared0", "--rw-ios-per-sec", "1000"]);
    let sockets = [target.dir.join("vhost.qa"), target.dir.join("vhost.qb")];
    let counts: Vec<u64> = std::thread::scope(|scope| {
        let runs: Vec<_> = sockets
            .iter()
            .map(|socket| {
                scope.spawn(move || {
                    let mut driver = Driver::ready(socket, VIRTIO_F_VERSION_1);
                    run_window(&mut driver)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("frontend"))
            .collect()
    });
    let total: u64 = counts.iter().sum();
    assert!(
        (floor(1000)..=ceiling(1000)).contains(&total),
        "two controllers under one limit of 1000 IOPS: {counts:?} in {WINDOW:?}"
    );
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    eprintln!("two controllers under 1000 IOPS: {counts:?} requests in {WINDOW:?}");
}

#[test]
fn bad_limits_get_spdks_errors() {
    let target = Target::start("qoserr", &[]);
    target.spdk_ok(&["bdev_null_create", "Qos1", "8", "512"]);
    // Unknown bdev.
    assert_eq!(
        target.err_code(
            "bdev_set_qos_limit",
            json!({"name": "Nope", "rw_ios_per_sec": 1000})
        ),
        -19
    );
    // No limit named.
    assert_eq!(
        target.err_code("bdev_set_qos_limit", json!({"name": "Qos1"})),
        -22
    );
    let message = target.spdk_err(&["bdev_set_qos_limit", "Qos1"]);
    assert!(message.contains("No rate limits specified"), "{message}");
    // Negative, non-numeric, fractional and unknown members.
    for params in [
        json!({"name": "Qos1", "rw_ios_per_sec": -1000}),
        json!({"name": "Qos1", "rw_mbytes_per_sec": "ten"}),
        json!({"name": "Qos1", "w_mbytes_per_sec": 1.5}),
        json!({"name": "Qos1", "rw_ios_per_second": 1000}),
        json!({"rw_ios_per_sec": 1000}),
    ] {
        assert_eq!(
            target.err_code("bdev_set_qos_limit", params.clone()),
            -32602,
            "{params}"
        );
    }
    // None of that set a limit.
    assert_eq!(
        limits(&target, "Qos1"),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    // The old name SPDK's documentation used still works.
    target.ok(
        "set_bdev_qos_limit",
        json!({"name": "Qos1", "w_mbytes_per_sec": 5}),
    );
    assert_eq!(limits(&target, "Qos1")["w_mbytes_per_sec"], 5);
}
