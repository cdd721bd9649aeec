//! Graceful stop of the real `rvhost` binary under guest I/O (in-process vhost-user-blk
//! frontend, requests held in flight by a delay bdev): SIGTERM, SIGINT and `spdk_kill_instance
//! SIGTERM` stop taking requests, let those in flight complete onto the used ring, and exit 0
//! saying how many were drained; SIGKILL leaves them incomplete (the control that shows the
//! checks can fail); a stop whose requests outlast `--shutdown-timeout` exits 1 and says so.

mod rpc_common;
mod vhost_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rpc_common::Target;
use vhost_support::*;

/// Requests put in flight before the stop.
const IN_FLIGHT: u16 = 8;
/// Requests made available after the stop began (must not be taken).
const LATE: u16 = 4;
/// What the delay bdev adds to every read and write.
const DELAY: Duration = Duration::from_millis(1500);

/// A start-up configuration: a RAM bdev under a delay bdev, exported as `vhost.0`.
fn config(tag: &str, delay: Duration) -> PathBuf {
    let us = delay.as_micros() as u64;
    let path =
        std::env::temp_dir().join(format!("rvhost-graceful-{tag}-{}.json", std::process::id()));
    let text = serde_json::json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}},
            {"method": "bdev_delay_create",
             "params": {"base_bdev_name": "Malloc0", "name": "Delay0",
                        "avg_read_latency": us, "p99_read_latency": us,
                        "avg_write_latency": us, "p99_write_latency": us}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "vhost.0", "dev_name": "Delay0"}}]}]});
    std::fs::write(&path, text.to_string()).expect("writing the configuration");
    path
}

/// Where request `i` keeps its header, status byte and 512-byte buffer in queue 0's window.
fn addrs(driver: &Driver, i: u16) -> (u64, u64, u64) {
    let base = driver.queues[0].data;
    let i = u64::from(i);
    (
        base + i * 0x20,
        base + 0x1000 + i,
        base + 0x2000 + i * 0x200,
    )
}

/// Makes request `i` available: even ones write a pattern at sector `i`, odd ones read.
fn post(driver: &mut Driver, i: u16) {
    let (hdr, status, buf) = addrs(driver, i);
    let write = i % 2 == 0;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
    header[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
    driver.ram.write(hdr, &header);
    driver.ram.write(status, &[0xff]);
    driver.ram.write(buf, &pattern(i as u8, 512));
    let first = i * 3;
    let descs = [
        Desc {
            addr: hdr,
            len: 16,
            flags: F_NEXT,
            next: first + 1,
        },
        Desc {
            addr: buf,
            len: 512,
            flags: F_NEXT | if write { 0 } else { F_WRITE },
            next: first + 2,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    let table = driver.queues[0].desc;
    for (slot, desc) in (first..).zip(descs) {
        driver
            .ram
            .write(table + 16 * u64::from(slot), &desc.bytes());
    }
    driver.post_head(0, &[], first);
}

/// Requests queue `queue` of `ctrlr`'s one session has taken and not completed, from the
/// per-queue view (`rvhost_get_queue_stats`). (The used ring's `avail_event` no longer tells how
/// many heads were taken: the target parks it and rewrites it only every 2^15 - size heads.)
fn in_flight_of(target: &Target, ctrlr: &str, queue: usize) -> u64 {
    let reply = target.ok(
        "rvhost_get_queue_stats",
        serde_json::json!({"ctrlr": ctrlr}),
    );
    reply["controllers"][0]["sessions"][0]["queues"][queue]["in_flight"]
        .as_u64()
        .unwrap_or(0)
}

fn used_idx(driver: &Driver) -> u16 {
    driver.ram.load_u16(driver.queues[0].used + 2)
}

fn wait_until(what: &str, target: &Target, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}\n{}", target.log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts the target with `extra` options, connects, and puts [`IN_FLIGHT`] requests in flight
/// (taken by the target, held by the delay bdev).
fn in_flight(tag: &str, delay: Duration, extra: &[&str]) -> (Target, Driver) {
    let config = config(tag, delay);
    let mut args = vec!["-c", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let target = Target::start(tag, &args);
    let _ = std::fs::remove_file(&config);
    let mut driver = Driver::ready(
        &target.dir.join("vhost.0"),
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
    );
    assert_ne!(driver.features & VIRTIO_F_RING_EVENT_IDX, 0);
    for i in 0..IN_FLIGHT {
        post(&mut driver, i);
    }
    wait_until("the target took every request", &target, || {
        in_flight_of(&target, "vhost.0", 0) == u64::from(IN_FLIGHT)
    });
    assert_eq!(used_idx(&driver), 0, "completed before the delay");
    // Forget earlier signals: what counts is whether the completions are signalled.
    let _ = driver.queues[0].call.read();
    (target, driver)
}

fn signal(target: &Target, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &target.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{name}");
}

/// Every request in flight completed onto the used ring with status OK (reads with the data the
/// earlier write of the same sector put there, or zeroes), none of the late ones was taken (a
/// graceful stop completes every request it took, so a late one taken would be on the used ring
/// too: the used index would pass [`IN_FLIGHT`] and the heads would not be exactly the first ones).
fn check_drained(driver: &mut Driver) {
    assert_eq!(used_idx(driver), IN_FLIGHT, "used index after the stop");
    assert!(
        driver.queues[0].call.read().is_ok(),
        "the completions were not signalled to the driver"
    );
    let mut heads: Vec<u32> = (0..IN_FLIGHT).map(|_| driver.wait_used(0).0).collect();
    heads.sort_unstable();
    let expected: Vec<u32> = (0..IN_FLIGHT).map(|i| u32::from(i) * 3).collect();
    assert_eq!(
        heads, expected,
        "every head in flight is on the used ring once"
    );
    for i in 0..IN_FLIGHT {
        let (_, status, _) = addrs(driver, i);
        assert_eq!(driver.ram.read(status, 1)[0], S_OK, "status of request {i}");
    }
}

/// The stop itself: requests in flight at the signal complete, requests made available once the
/// stop began are left for the next target, exit status 0, and the log says what was drained.
fn graceful(tag: &str, stop: impl FnOnce(&Target)) {
    let (mut target, mut driver) = in_flight(tag, DELAY, &[]);
    let stopped = Instant::now();
    stop(&target);
    wait_until("the stop began", &target, || {
        target.log().contains("sessions take no new requests")
    });
    for i in IN_FLIGHT..IN_FLIGHT + LATE {
        post(&mut driver, i);
    }
    let status = target.wait_exit(Duration::from_secs(30));
    let took = stopped.elapsed();
    let log = target.log();
    assert!(status.success(), "exit status {status}\n{log}");
    assert!(
        took >= DELAY / 2,
        "exited after {took:?}, before the delayed requests could complete\n{log}"
    );
    check_drained(&mut driver);
    assert!(
        log.contains(&format!(
            "drained {IN_FLIGHT} requests in flight from 1 sessions"
        )),
        "{log}"
    );
    assert!(log.contains("shut down cleanly"), "{log}");
    assert!(
        !target.dir.join("vhost.0").exists(),
        "controller socket left behind"
    );
}

#[test]
fn sigterm_completes_the_requests_in_flight_then_exits_0() {
    graceful("term", |t| signal(t, "TERM"));
}

#[test]
fn sigint_completes_the_requests_in_flight_then_exits_0() {
    graceful("int", |t| signal(t, "INT"));
}

#[test]
fn spdk_kill_instance_sigterm_completes_the_requests_in_flight_then_exits_0() {
    graceful("rpc", |t| {
        t.spdk_ok(&["spdk_kill_instance", "SIGTERM"]);
    });
}

#[test]
fn sigkill_leaves_the_requests_in_flight_incomplete() {
    let (mut target, driver) = in_flight("kill", DELAY, &[]);
    signal(&target, "KILL");
    let status = target.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "exit status {status}");
    // Well past the delay: nothing completes them any more.
    std::thread::sleep(DELAY + Duration::from_millis(500));
    assert_eq!(
        used_idx(&driver),
        0,
        "requests completed by a killed target"
    );
    assert!(driver.queues[0].call.read().is_err(), "signalled");
    for i in 0..IN_FLIGHT {
        let (_, status, _) = addrs(&driver, i);
        assert_eq!(driver.ram.read(status, 1)[0], 0xff, "status of request {i}");
    }
}

#[test]
fn a_stop_whose_requests_outlast_the_timeout_exits_1_and_says_so() {
    let (mut target, driver) = in_flight(
        "timeout",
        Duration::from_secs(20),
        &["--shutdown-timeout", "0.5"],
    );
    let stopped = Instant::now();
    signal(&target, "TERM");
    let status = target.wait_exit(Duration::from_secs(15));
    let took = stopped.elapsed();
    let log = target.log();
    assert_eq!(status.code(), Some(1), "exit status {status}\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}\n{log}");
    assert!(log.contains("shutdown timeout (0.5 s) hit"), "{log}");
    assert_eq!(used_idx(&driver), 0);
}

/// vhost-scsi: the drain is the device shell's, so a scsi session drains the same way. Event
/// buffers the driver posted wait for events that never come; they are not requests in flight
/// (the transport takes them only with an event pending) and do not hold the stop up.
#[test]
fn sigterm_drains_a_vhost_scsi_session_too() {
    const REQUEST_QUEUE: usize = 2;
    const EVENT_QUEUE: usize = 1;
    const REQ_LEN: u32 = 51;
    const RESP_LEN: u32 = 108;
    let us = DELAY.as_micros() as u64;
    let config =
        std::env::temp_dir().join(format!("rvhost-graceful-scsi-{}.json", std::process::id()));
    let text = serde_json::json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}},
            {"method": "bdev_delay_create",
             "params": {"base_bdev_name": "Malloc0", "name": "Delay0",
                        "avg_read_latency": us, "p99_read_latency": us,
                        "avg_write_latency": us, "p99_write_latency": us}}]},
        {"subsystem": "vhost_scsi", "config": [
            {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "scsi.0"}},
            {"method": "vhost_scsi_controller_add_target",
             "params": {"ctrlr": "scsi.0", "scsi_target_num": 0, "bdev_name": "Delay0"}}]}]});
    std::fs::write(&config, text.to_string()).expect("writing the configuration");
    let mut target = Target::start("scsi", &["-c", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    let mut driver = Driver::connect(
        &target.dir.join("scsi.0"),
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
    );
    driver.set_mem_table();
    for q in 0..3 {
        driver.setup_queue(q);
    }
    let queue = |driver: &Driver, index: usize| {
        let q = driver
            .queues
            .iter()
            .find(|q| q.index == index)
            .expect("queue");
        (q.desc, q.used, q.data, q.buffer_addr())
    };
    // An event buffer, as a guest's driver keeps one posted.
    let (_, _, _, event_buf) = queue(&driver, EVENT_QUEUE);
    driver.post(
        EVENT_QUEUE,
        &[Desc {
            addr: event_buf,
            len: 16,
            flags: F_WRITE,
            next: 0,
        }],
    );
    // READ(10) of one block at LBA i, each with its own descriptors.
    let (table, used, data, _) = queue(&driver, REQUEST_QUEUE);
    let addrs = |i: u16| {
        let i = u64::from(i);
        (
            data + i * 0x40,
            data + 0x1000 + i * 0x80,
            data + 0x2000 + i * 0x200,
        )
    };
    for i in 0..IN_FLIGHT {
        let (req, resp, buf) = addrs(i);
        let mut header = vec![0u8; REQ_LEN as usize];
        header[0..8].copy_from_slice(&[1, 0, 0x40, 0, 0, 0, 0, 0]);
        header[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&u32::from(i).to_be_bytes());
        cdb[8] = 1;
        header[19..29].copy_from_slice(&cdb);
        driver.ram.write(req, &header);
        driver.ram.write(resp, &[0xee; RESP_LEN as usize]);
        let first = i * 3;
        let descs = [
            Desc {
                addr: req,
                len: REQ_LEN,
                flags: F_NEXT,
                next: first + 1,
            },
            Desc {
                addr: resp,
                len: RESP_LEN,
                flags: F_NEXT | F_WRITE,
                next: first + 2,
            },
            Desc {
                addr: buf,
                len: 512,
                flags: F_WRITE,
                next: 0,
            },
        ];
        for (slot, desc) in (first..).zip(descs) {
            driver
                .ram
                .write(table + 16 * u64::from(slot), &desc.bytes());
        }
        driver.post_head(REQUEST_QUEUE, &[], first);
    }
    let used_idx = |driver: &Driver| driver.ram.load_u16(used + 2);
    wait_until("the target took every command", &target, || {
        in_flight_of(&target, "scsi.0", REQUEST_QUEUE) == u64::from(IN_FLIGHT)
    });
    assert_eq!(used_idx(&driver), 0, "completed before the delay");

    signal(&target, "TERM");
    let status = target.wait_exit(Duration::from_secs(30));
    let log = target.log();
    assert!(status.success(), "exit status {status}\n{log}");
    assert_eq!(
        used_idx(&driver),
        IN_FLIGHT,
        "used index after the stop\n{log}"
    );
    for i in 0..IN_FLIGHT {
        let (_, resp, _) = addrs(i);
        let r = driver.ram.read(resp, RESP_LEN as usize);
        assert_eq!((r[11], r[10]), (0, 0), "response and status of command {i}");
    }
    assert!(
        log.contains(&format!(
            "drained {IN_FLIGHT} requests in flight from 1 sessions"
        )),
        "{log}"
    );
}
