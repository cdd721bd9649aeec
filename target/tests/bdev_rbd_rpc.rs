//! The rbd bdev driven by SPDK's own JSON-RPC client (`spdk-rpc`) against the real `rvhost` and a
//! real one-host Ceph cluster (`scripts/ceph-cluster.sh`): register a cluster, create bdevs
//! through it and through a connection of their own (`config` key/value pairs, old method name),
//! `bdev_get_bdevs`, resize, SPDK's errors for bad input (each within a bounded time, leaving
//! nothing behind), `save_config` replayed by `-c`, delete and unregister.

mod ceph_common;
mod rpc_common;

use std::time::{Duration, Instant};

use ceph_common::Ceph;
use rpc_common::Target;
use serde_json::{json, Value};

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

    // save_config: the cluster first, then the bdevs; `-c` recreates them.
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
            "bdev_rbd_create",
            "bdev_rbd_create"
        ]
    );
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

fn info_of(conf: &str, keyring: &str) -> Value {
    json!({"cluster_name": "c0", "config_file": conf, "key_file": keyring})
}
