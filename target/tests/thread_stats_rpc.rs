//! `framework_get_reactors`, `thread_get_stats`, `thread_get_pollers` and
//! `framework_get_scheduler` of the real `rvhost` binary through SPDK's own client, checked for
//! every member SPDK's `spdk_top` decodes (it rejects a reply that lacks one): a controller is a
//! thread on its reactor, each connected session a `vdev_worker` poller whose run and busy counts
//! and whose thread's busy ticks grow with the requests the in-process frontend sends.

mod rpc_common;
mod vhost_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use rpc_common::Target;
use vhost_support::*;

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

/// The controller's entry in `thread_get_pollers`.
fn pollers_of(target: &Target, name: &str) -> Value {
    let reply = target.spdk_json(&["thread_get_pollers"]);
    assert!(u(&reply, "tick_rate") >= 1_000_000, "{reply}");
    reply["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no thread {name} in {reply}"))
        .clone()
}

#[test]
fn controllers_are_threads_and_sessions_are_pollers_as_spdk_top_reads_them() {
    let target = Target::start("threads", &["--no-default"]);
    target.spdk_ok(&["bdev_null_create", "Null0", "8", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.t", "Null0"]);

    // framework_get_reactors: every member spdk_top requires.
    let reactors = target.spdk_json(&["framework_get_reactors"]);
    let reactor = &reactors["reactors"][0];
    for key in ["lcore", "busy", "idle", "irq", "sys", "usr"] {
        u(reactor, key);
    }
    assert!(u(reactor, "tid") > 0, "{reactor}");
    assert_eq!(reactor["in_interrupt"], false);
    let lw = &reactor["lw_threads"][0];
    assert_eq!(lw["name"], "vhost.t", "{reactors}");
    u(lw, "elapsed");
    assert!(lw["cpumask"].is_string(), "{lw}");
    let thread_id = u(lw, "id");

    // No session yet: a thread without pollers.
    let stats = target.spdk_json(&["thread_get_stats"]);
    assert!(u(&stats, "tick_rate") >= 1_000_000, "{stats}");
    let threads = stats["threads"].as_array().expect("threads");
    assert_eq!(threads.len(), 1, "{stats}");
    let thread = &threads[0];
    assert_eq!(thread["name"], "vhost.t");
    assert_eq!(u(thread, "id"), thread_id);
    assert_eq!(thread["cpumask"], lw["cpumask"]);
    assert_eq!(u(thread, "active_pollers_count"), 0, "{stats}");
    assert_eq!(u(thread, "timed_pollers_count"), 0);
    assert_eq!(u(thread, "paused_pollers_count"), 0);
    assert_eq!(pollers_of(&target, "vhost.t")["active_pollers"], json!([]),);

    // A session sends requests: one poller, busy at least once per request.
    let mut driver = Driver::ready(&target.dir.join("vhost.t"), VIRTIO_F_VERSION_1);
    const REQUESTS: u64 = 50;
    for i in 0..REQUESTS {
        assert_eq!(driver.write_blocks(0, i % 8, &pattern(1, 512)), S_OK);
    }
    // The reactor publishes its counters every so many rounds: wait for them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let poller = loop {
        let thread = pollers_of(&target, "vhost.t");
        assert_eq!(u(&thread, "id"), thread_id);
        let active = thread["active_pollers"].as_array().expect("active").clone();
        assert_eq!(active.len(), 1, "{thread}");
        assert_eq!(thread["timed_pollers"], json!([]));
        assert_eq!(thread["paused_pollers"], json!([]));
        let poller = active[0].clone();
        if u(&poller, "busy_count") >= REQUESTS {
            break poller;
        }
        assert!(
            Instant::now() < deadline,
            "{REQUESTS} requests, poller counts {poller}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(poller["name"], "vdev_worker");
    assert_eq!(poller["state"], "running");
    u(&poller, "id");
    assert!(
        u(&poller, "run_count") > u(&poller, "busy_count"),
        "{poller}"
    );
    let stats = target.spdk_json(&["thread_get_stats"]);
    let thread = &stats["threads"][0];
    assert_eq!(u(thread, "active_pollers_count"), 1, "{stats}");
    assert!(u(thread, "busy") > 0 && u(thread, "idle") > 0, "{stats}");

    let busy_before_end = u(thread, "busy");

    // The session ends: its poller goes, and the thread keeps the time its polls took.
    drop(driver);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pollers_of(&target, "vhost.t")["active_pollers"] != json!([]) {
        assert!(Instant::now() < deadline, "the poller outlived its session");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = target.spdk_json(&["thread_get_stats"]);
    let thread = &stats["threads"][0];
    assert_eq!(u(thread, "active_pollers_count"), 0, "{stats}");
    assert!(
        u(thread, "busy") >= busy_before_end && u(thread, "idle") > 0,
        "the thread's busy time dropped from {busy_before_end} when its session ended: {stats}"
    );

    let scheduler = target.spdk_json(&["framework_get_scheduler"]);
    assert_eq!(scheduler["scheduler_name"], "static", "{scheduler}");
    u(&scheduler, "scheduler_period");
    u(&scheduler, "scheduling_core");

    for method in [
        "thread_get_stats",
        "thread_get_pollers",
        "framework_get_scheduler",
    ] {
        assert_eq!(target.err_code(method, json!({"x": 1})), -32602, "{method}");
    }
}
