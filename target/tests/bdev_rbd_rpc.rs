//! The rbd bdev driven by SPDK's own JSON-RPC client (`spdk-rpc`) against the real `rvhost` and a
//! real one-host Ceph cluster (`scripts/ceph-cluster.sh`): register a cluster, create bdevs
//! through it and through a connection of their own (`config` key/value pairs, old method name),
//! `bdev_get_bdevs`, resize, SPDK's errors for bad input (each within a bounded time, leaving
//! nothing behind), `save_config` replayed by `-c`, delete and unregister.

mod ceph_common;
mod rpc_common;
mod vhost_support;

use std::time::{Duration, Instant};

use ceph_common::Ceph;
use rpc_common::Target;
use serde_json::{json, Value};
use vhost_support::{pattern, Driver, S_OK, T_OUT, VIRTIO_F_VERSION_1};

fn bdev_names(target: &Target) -> Vec<String> {
    target
        .spdk_json(&["bdev_get_bdevs"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs a call that must fail with `code` within `limit`; returns the message.
fn fails_within(
    target: &Target,
    limit: Duration,
    method: &str,
    params: Value,
    code: i64,
) -> String {
    let start = Instant::now();
    let reply = target.call(method, params.clone());
    let took = start.elapsed();
    assert!(
        took <= limit,
        "{method} {params} took {took:?}, more than {limit:?}"
    );
    assert_eq!(
        reply["error"]["code"].as_i64(),
        Some(code),
        "{method} {params}: {reply}"
    );
    reply["error"]["message"].as_str().unwrap_or("").to_owned()
}

#[test]
fn rbd_bdev_through_spdk_rpc() {
    let ceph = Ceph::start("rpc", 1);
    ceph.rbd(&["create", "--size", "64", "img0"]);
    ceph.rbd(&["create", "--size", "16", "img1"]);
    let conf = ceph.conf();
    let keyring = ceph.keyring();
    let (conf, keyring) = (conf.to_str().unwrap(), keyring.to_str().unwrap());

    let target = Target::start("rbd", &["--no-default"]);
    let registered = target.spdk_ok(&[
        "bdev_rbd_register_cluster",
        "c0",
        "--config-file",
        conf,
        "--key-file",
        keyring,
    ]);
    assert_eq!(registered.trim(), "c0");
    let info = json!({"cluster_name": "c0", "config_file": conf, "key_file": keyring});
    assert_eq!(
        target.spdk_json(&["bdev_rbd_get_clusters_info", "-b", "c0"]),
        info
    );
    assert_eq!(
        target.spdk_json(&["bdev_rbd_get_clusters_info"]),
        json!([info])
    );

    // Through the registered cluster.
    let uuid = "5b0c8a3e-1d2f-4e5a-9b6c-7d8e9f0a1b2c";
    let created = target.spdk_ok(&[
        "bdev_rbd_create",
        "-b",
        "Rbd0",
        "-c",
        "c0",
        "-u",
        uuid,
        "rbd",
        "img0",
        "4096",
    ]);
    assert_eq!(created.trim(), "Rbd0");
    let bdev = &target.spdk_json(&["bdev_get_bdevs", "-b", "Rbd0"])[0];
    assert_eq!(bdev["product_name"], "Ceph Rbd Disk");
    assert_eq!(bdev["uuid"], uuid);
    assert_eq!(bdev["block_size"], 4096);
    assert_eq!(bdev["num_blocks"], 64 * 256);
    assert_eq!(
        bdev["driver_specific"]["rbd"],
        json!({"pool_name": "rbd", "rbd_name": "img0", "config_file": conf, "key_file": keyring})
    );

    // Through a connection of its own, configured by key/value pairs, under the old name and
    // without a bdev name (SPDK names it CephN).
    let config = json!({"mon_host": ceph.mon_host(), "key": ceph.admin_key()});
    let own = target.ok(
        "construct_rbd_bdev",
        json!({"pool_name": "rbd", "rbd_name": "img1", "block_size": 512, "config": config}),
    );
    assert_eq!(own, "Ceph0");
    let bdev = &target.spdk_json(&["bdev_get_bdevs", "-b", "Ceph0"])[0];
    assert_eq!(bdev["num_blocks"], 16 * 2048);
    assert_eq!(
        bdev["driver_specific"]["rbd"],
        json!({"pool_name": "rbd", "rbd_name": "img1", "config": config})
    );

    // Resize: grows the image (MiB), refuses to shrink it.
    assert_eq!(
        target.spdk_ok(&["bdev_rbd_resize", "Rbd0", "128"]).trim(),
        "true"
    );
    let bdev = &target.spdk_json(&["bdev_get_bdevs", "-b", "Rbd0"])[0];
    assert_eq!(bdev["num_blocks"], 128 * 256);
    let info: Value =
        serde_json::from_slice(&ceph.rbd(&["info", "--format", "json", "img0"])).unwrap();
    assert_eq!(info["size"], 128u64 << 20);
    let shrink = target.spdk_err(&["bdev_rbd_resize", "Rbd0", "64"]);
    assert!(shrink.contains("\"code\": -22"), "{shrink}");
    let missing = target.spdk_err(&["bdev_rbd_resize", "Nope", "64"]);
    assert!(missing.contains("\"code\": -19"), "{missing}");
    // A resize by another client shows up too (the module re-reads sizes every tick).
    ceph.rbd(&["resize", "--size", "32", "img1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while target.spdk_json(&["bdev_get_bdevs", "-b", "Ceph0"])[0]["num_blocks"] != 32 * 2048 {
        assert!(
            Instant::now() < deadline,
            "Ceph0 did not see the image grow"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bad input: a clear error within a bounded time, nothing half-created.
    let quick = Duration::from_secs(5);
    let bounded = Duration::from_secs(20);
    let create = |extra: Value| {
        let mut p = json!({"name": "Bad", "pool_name": "rbd", "rbd_name": "img0",
                           "block_size": 4096, "cluster_name": "c0"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                p.as_object_mut().unwrap().remove(k);
            } else {
                p[k] = v.clone();
            }
        }
        p
    };
    let msg = fails_within(
        &target,
        quick,
        "bdev_rbd_create",
        create(json!({"pool_name": "nopool"})),
        -2,
    );
    assert!(msg.contains("nopool"), "{msg}");
    let msg = fails_within(
        &target,
        quick,
        "bdev_rbd_create",
        create(json!({"rbd_name": "noimage"})),
        -2,
    );
    assert!(msg.contains("noimage"), "{msg}");
    let msg = fails_within(
        &target,
        quick,
        "bdev_rbd_create",
        create(json!({"block_size": 1000})),
        -22,
    );
    assert!(msg.contains("power of two"), "{msg}");
    let msg = fails_within(
        &target,
        quick,
        "bdev_rbd_create",
        create(json!({"cluster_name": "nocluster"})),
        -2,
    );
    assert!(msg.contains("nocluster"), "{msg}");
    let msg = fails_within(
        &target,
        quick,
        "bdev_rbd_create",
        create(json!({"name": "Rbd0"})),
        -17,
    );
    assert!(msg.contains("Rbd0"), "{msg}");
    // A user the cluster does not know, and a monitor nobody listens on: the connection gives up
    // after client_mount_timeout (10 s).
    let wrong_user = create(json!({"cluster_name": null, "user_id": "nobody", "config": config}));
    let msg = fails_within(&target, bounded, "bdev_rbd_create", wrong_user, -110);
    assert!(msg.contains("rados_connect"), "{msg}");
    let unreachable = create(json!({"cluster_name": null,
        "config": {"mon_host": "127.0.0.1:9", "key": ceph.admin_key()}}));
    fails_within(&target, bounded, "bdev_rbd_create", unreachable, -110);
    let msg = fails_within(
        &target,
        bounded,
        "bdev_rbd_register_cluster",
        json!({"name": "c1", "config_param": {"mon_host": "127.0.0.1:9"}}),
        -110,
    );
    assert!(msg.contains("rados_connect"), "{msg}");
    fails_within(
        &target,
        quick,
        "bdev_rbd_register_cluster",
        json!({"name": "c0", "config_file": conf, "key_file": keyring}),
        -17,
    );
    assert_eq!(bdev_names(&target), ["Rbd0", "Ceph0"]);
    assert_eq!(
        target.spdk_json(&["bdev_rbd_get_clusters_info"]),
        json!([info_of(conf, keyring)])
    );
    // A cluster in use stays registered.
    let busy = target.spdk_err(&["bdev_rbd_unregister_cluster", "c0"]);
    assert!(busy.contains("\"code\": -16"), "{busy}");

    // A cluster with a core mask: every thread librados starts for it runs on core 1 only (the
    // target's reactor has core 0; nothing else of the process is restricted to core 1).
    let before = threads_on_core_1(target.pid());
    assert_eq!(
        target.ok(
            "bdev_rbd_register_cluster",
            json!({"name": "c1", "config_file": conf, "key_file": keyring, "core_mask": "0x2"}),
        ),
        "c1"
    );
    assert_eq!(
        target.spdk_json(&["bdev_rbd_get_clusters_info", "-b", "c1"])["core_mask"],
        "0x2"
    );
    let pinned = threads_on_core_1(target.pid());
    assert!(
        before.is_empty()
            && pinned
                .iter()
                .filter(|n| n.starts_with("msgr-worker"))
                .count()
                >= 1,
        "librados threads restricted to core_mask 0x2: before {before:?}, after {pinned:?}"
    );
    let bad_mask = target.err_code(
        "bdev_rbd_register_cluster",
        json!({"name": "c2", "config_file": conf, "key_file": keyring, "core_mask": "zz"}),
    );
    assert_eq!(bad_mask, -22);

    // Read-only (rbd_open_read_only): reads and flushes only; on that cluster.
    target.ok(
        "bdev_rbd_create",
        json!({"name": "RbdRo", "cluster_name": "c1", "pool_name": "rbd", "rbd_name": "img1",
               "block_size": 512, "read_only": true}),
    );
    let io_types = &target.spdk_json(&["bdev_get_bdevs", "-b", "RbdRo"])[0]["supported_io_types"];
    assert_eq!(io_types["read"], true, "{io_types}");
    assert_eq!(io_types["flush"], true, "{io_types}");
    for kind in ["write", "unmap", "write_zeroes"] {
        assert_eq!(io_types[kind], false, "{kind}: {io_types}");
    }

    // save_config: the clusters first, then the bdevs; `-c` recreates them.
    let saved = target.spdk_json(&["save_config"]);
    let bdev_calls: Vec<Value> = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .unwrap()["config"]
        .as_array()
        .unwrap()
        .clone();
    let methods: Vec<&str> = bdev_calls
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .filter(|m| m.starts_with("bdev_rbd"))
        .collect();
    assert_eq!(
        methods,
        [
            "bdev_rbd_register_cluster",
            "bdev_rbd_register_cluster",
            "bdev_rbd_create",
            "bdev_rbd_create",
            "bdev_rbd_create"
        ]
    );
    let read_only = bdev_calls
        .iter()
        .find(|c| c["params"]["name"] == "RbdRo")
        .unwrap();
    assert_eq!(read_only["params"]["read_only"], true, "{read_only}");
    let file = target.dir.join("saved.json");
    std::fs::write(&file, saved.to_string()).unwrap();
    {
        let restored = Target::start("rbd-restore", &["-c", file.to_str().unwrap()]);
        assert_eq!(
            restored.spdk_json(&["bdev_get_bdevs"]),
            target.spdk_json(&["bdev_get_bdevs"])
        );
        assert_eq!(
            restored.spdk_json(&["bdev_rbd_get_clusters_info"]),
            target.spdk_json(&["bdev_rbd_get_clusters_info"])
        );
    }

    assert_eq!(target.ok("bdev_rbd_delete", json!({"name": "RbdRo"})), true);
    target.spdk_ok(&["bdev_rbd_unregister_cluster", "c1"]);

    killed_lock_holder_does_not_block_the_next_process(&ceph, conf, keyring);

    // Delete (current and old names), then the cluster can go.
    assert_eq!(target.spdk_ok(&["bdev_rbd_delete", "Rbd0"]).trim(), "");
    assert_eq!(target.ok("delete_rbd_bdev", json!({"name": "Ceph0"})), true);
    assert!(bdev_names(&target).is_empty());
    let gone = target.spdk_err(&["bdev_rbd_delete", "Rbd0"]);
    assert!(gone.contains("\"code\": -19"), "{gone}");
    target.spdk_ok(&["bdev_rbd_unregister_cluster", "c0"]);
    let none = target.spdk_err(&["bdev_rbd_get_clusters_info"]);
    assert!(none.contains("\"code\": -2"), "{none}");
    let none = target.spdk_err(&["bdev_rbd_unregister_cluster", "c0"]);
    assert!(none.contains("\"code\": -2"), "{none}");
}

/// A writer process killed with SIGKILL holds the image's exclusive lock (it never called
/// `rbd_close`); a second process opening the image must still serve writes. librbd breaks the
/// dead owner's lock once the cluster dropped its watch (`osd_client_watch_timeout`, 30 s by
/// default): until then the first write waits, and completes without an error.
fn killed_lock_holder_does_not_block_the_next_process(ceph: &Ceph, conf: &str, keyring: &str) {
    ceph.rbd(&["create", "--size", "16", "locked"]);
    let writer = |tag: &str| {
        let target = Target::start(tag, &["--no-default"]);
        target.ok(
            "bdev_rbd_register_cluster",
            json!({"name": "c", "config_file": conf, "key_file": keyring}),
        );
        target.ok(
            "bdev_rbd_create",
            json!({"name": "Lock0", "cluster_name": "c", "pool_name": "rbd",
                   "rbd_name": "locked", "block_size": 512}),
        );
        target.spdk_ok(&["vhost_create_blk_controller", "vhost.lock", "Lock0"]);
        target
    };
    let first = writer("lock-a");
    let mut driver = Driver::ready(&first.dir.join("vhost.lock"), VIRTIO_F_VERSION_1);
    assert_eq!(driver.write_blocks(0, 0, &pattern(1, 4096)), S_OK);
    let locks = String::from_utf8_lossy(&ceph.rbd(&["lock", "ls", "locked"])).into_owned();
    assert!(
        locks.contains("auto"),
        "the writer holds the exclusive lock: {locks}"
    );
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &first.pid().to_string()])
        .status()
        .expect("kill -KILL");
    assert!(killed.success());
    drop(driver);
    drop(first);

    let second = writer("lock-b");
    let mut driver = Driver::ready(&second.dir.join("vhost.lock"), VIRTIO_F_VERSION_1);
    let (status, back) = driver.read_blocks(0, 0, 4096);
    assert_eq!(
        (status, back),
        (S_OK, pattern(1, 4096)),
        "the killed writer's data"
    );
    let started = Instant::now();
    let data = pattern(2, 4096);
    let (status, _) =
        driver.request_within(0, T_OUT, 8, Some((&data, false)), Duration::from_secs(90));
    let waited = started.elapsed();
    assert_eq!(
        status,
        S_OK,
        "first write after the kill:\n{}",
        second.log()
    );
    assert_eq!(driver.write_blocks(0, 16, &data), S_OK);
    eprintln!("first write after the lock holder's SIGKILL completed in {waited:?}");
}

/// The names of process `pid`'s threads whose affinity is core 1 alone.
fn threads_on_core_1(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let on_1 = status.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(k, v)| k == "Cpus_allowed_list" && v.trim() == "1")
        });
        if on_1 {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            names.push(comm.trim().to_owned());
        }
    }
    names
}

fn info_of(conf: &str, keyring: &str) -> Value {
    json!({"cluster_name": "c0", "config_file": conf, "key_file": keyring})
}
