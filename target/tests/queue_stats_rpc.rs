//! `rvhost_get_queue_stats` and the per-queue metrics of the real `rvhost` binary: a session
//! sends known numbers of writes on queue 0 and reads on queue 1; each queue reports exactly its
//! own requests, payload bytes and latency percentiles, and a queue that carried nothing reports
//! nothing (the negative control), as does a controller without a session.

mod rpc_common;
mod vhost_support;

use serde_json::{json, Value};

use rpc_common::Target;
use vhost_support::*;

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// The queues of the one session of `ctrlr`.
fn queues_of(target: &Target, ctrlr: &str) -> Vec<Value> {
    let reply = target.ok("rvhost_get_queue_stats", json!({"ctrlr": ctrlr}));
    assert!(u(&reply, "tick_rate") >= 1_000_000, "{reply}");
    let controllers = reply["controllers"].as_array().expect("controllers");
    assert_eq!(controllers.len(), 1, "{reply}");
    assert_eq!(controllers[0]["ctrlr"], ctrlr);
    let sessions = controllers[0]["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 1, "{reply}");
    sessions[0]["queues"].as_array().expect("queues").clone()
}

/// The value of the one sample of `metric` whose labels include all of `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad sample {line}"))
        })
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?} in\n{text}");
    found[0]
}

#[test]
fn each_queue_reports_its_own_requests_bytes_and_latencies() {
    let target = Target::start("queues", &["--no-default"]);
    target.spdk_ok(&["bdev_null_create", "Null0", "8", "512"]);
    target.spdk_ok(&["bdev_null_create", "Null1", "8", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.q", "Null0"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.idle", "Null1"]);

    let mut driver = Driver::ready(
        &target.dir.join("vhost.q"),
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_MQ,
    );
    driver.setup_queue(1);
    driver.setup_queue(2);
    const WRITES: u64 = 37;
    const READS: u64 = 23;
    for i in 0..WRITES {
        assert_eq!(driver.write_blocks(0, i % 8, &pattern(1, 1024)), S_OK);
    }
    for i in 0..READS {
        assert_eq!(driver.read_blocks(1, i % 8, 2048).0, S_OK);
    }

    // Every request was answered before the next was sent: all counted, none in flight.
    let queues = queues_of(&target, "vhost.q");
    assert_eq!(queues.len(), 3, "{queues:?}");
    let (q0, q1, q2) = (&queues[0], &queues[1], &queues[2]);
    assert_eq!(u(q0, "queue"), 0);
    assert_eq!(u(q0, "requests"), WRITES, "{q0}");
    assert_eq!(u(q0, "bytes_written"), WRITES * 1024, "{q0}");
    assert_eq!(u(q0, "bytes_read"), 0, "{q0}");
    assert_eq!(u(q0, "in_flight"), 0, "{q0}");
    assert_eq!(u(q1, "queue"), 1);
    assert_eq!(u(q1, "requests"), READS, "{q1}");
    assert_eq!(u(q1, "bytes_read"), READS * 2048, "{q1}");
    assert_eq!(u(q1, "bytes_written"), 0, "{q1}");
    let tick_rate = u(
        &target.ok("rvhost_get_queue_stats", json!({"ctrlr": "vhost.q"})),
        "tick_rate",
    );
    for q in [q0, q1] {
        let lat = &q["latency_ns"];
        let (p50, p99, p999, max) = (u(lat, "p50"), u(lat, "p99"), u(lat, "p99.9"), u(lat, "max"));
        assert!(p50 > 0 && p50 <= p99 && p99 <= p999 && p999 <= max, "{q}");
        // A null bdev answers within the reactor's next rounds: far below a second.
        assert!(max < 1_000_000_000, "{q}");
        assert!(u(q, "latency_ticks") > 0, "{q}");
        // The histogram against the sum of the latencies, which is counted apart from it: its
        // maximum (the top of a bucket 1 % wide) is at least the mean and at most the sum.
        let sum_ns = u(q, "latency_ticks") as f64 * 1e9 / tick_rate as f64;
        let mean_ns = sum_ns / u(q, "requests") as f64;
        assert!(max as f64 + 2.0 >= mean_ns, "mean {mean_ns} ns: {q}");
        assert!(max as f64 <= sum_ns * 1.01 + 2.0, "sum {sum_ns} ns: {q}");
    }
    // Negative control: the queue that carried nothing counted nothing.
    assert_eq!(u(q2, "queue"), 2);
    for key in [
        "requests",
        "bytes_read",
        "bytes_written",
        "in_flight",
        "latency_ticks",
    ] {
        assert_eq!(u(q2, key), 0, "{key} of an unused queue: {q2}");
    }
    assert_eq!(
        q2["latency_ns"],
        json!({"p50": 0, "p99": 0, "p99.9": 0, "max": 0})
    );

    // A controller nobody connected to has no session; all controllers are listed without a
    // filter.
    let idle = target.ok("rvhost_get_queue_stats", json!({"ctrlr": "vhost.idle"}));
    assert_eq!(idle["controllers"][0]["sessions"], json!([]), "{idle}");
    let all = target.ok("rvhost_get_queue_stats", json!({}));
    let names: Vec<&str> = all["controllers"]
        .as_array()
        .expect("controllers")
        .iter()
        .map(|c| c["ctrlr"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["vhost.idle", "vhost.q"], "{all}");

    // The metrics endpoint's text carries the same per-queue series.
    let text = target.ok("rvhost_get_metrics", json!({}));
    let text = text.as_str().expect("metrics text");
    let q = |queue: &'static str| [("controller", "vhost.q"), ("queue", queue)];
    assert_eq!(
        sample(text, "rvhost_queue_requests_total", &q("0")),
        WRITES as f64
    );
    assert_eq!(
        sample(text, "rvhost_queue_requests_total", &q("1")),
        READS as f64
    );
    assert_eq!(sample(text, "rvhost_queue_requests_total", &q("2")), 0.0);
    let mut written = q("0").to_vec();
    written.push(("kind", "write"));
    assert_eq!(
        sample(text, "rvhost_queue_bytes_total", &written),
        (WRITES * 1024) as f64
    );
    let mut read = q("1").to_vec();
    read.push(("kind", "read"));
    assert_eq!(
        sample(text, "rvhost_queue_bytes_total", &read),
        (READS * 2048) as f64
    );
    assert_eq!(sample(text, "rvhost_queue_in_flight", &q("0")), 0.0);
    let mut p99 = q("1").to_vec();
    p99.push(("quantile", "0.99"));
    let p99 = sample(text, "rvhost_queue_latency_seconds", &p99);
    assert!(p99 > 0.0 && p99 < 1.0, "{p99}");
    assert_eq!(
        sample(text, "rvhost_queue_latency_seconds_count", &q("1")),
        READS as f64
    );

    // Bad input.
    assert_eq!(
        target.err_code("rvhost_get_queue_stats", json!({"ctrlr": "nope"})),
        -19
    );
    assert_eq!(
        target.err_code("rvhost_get_queue_stats", json!({"name": "vhost.q"})),
        -32602
    );
    assert_eq!(
        target.err_code("rvhost_get_queue_stats", json!({"ctrlr": 3})),
        -32602
    );

    // The session ends: its queues go with it.
    drop(driver);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let reply = target.ok("rvhost_get_queue_stats", json!({"ctrlr": "vhost.q"}));
        if reply["controllers"][0]["sessions"] == json!([]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{reply}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
