//! vhost-scsi controllers through JSON-RPC: SPDK's own client (`spdk-rpc` from `spdk==26.9`)
//! with today's method names, and raw calls with the seed guide's old names.

mod rpc_common;

use rpc_common::{wait_for_path, Target};
use serde_json::json;

#[test]
fn scsi_controller_through_spdk_rpc() {
    let target = Target::start("scsi", &["--no-default"]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Malloc0", "16", "512"]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Malloc1", "16", "4096"]);
    target.spdk_ok(&["bdev_null_create", "Null0", "16", "512"]);

    target.spdk_ok(&["vhost_create_scsi_controller", "--cpumask", "0x1", "scsi.0"]);
    wait_for_path(&target.dir.join("scsi.0"), true);

    // A target number, then -1 for the first free one; both print the number.
    let t = target.spdk_ok(&["vhost_scsi_controller_add_target", "scsi.0", "3", "Malloc0"]);
    assert_eq!(t.trim(), "3");
    let t = target.spdk_ok(&[
        "vhost_scsi_controller_add_target",
        "scsi.0",
        "-1",
        "Malloc1",
    ]);
    assert_eq!(t.trim(), "0");
    let t = target.spdk_ok(&["vhost_scsi_controller_add_target", "scsi.0", "-1", "Null0"]);
    assert_eq!(t.trim(), "1");

    let one = target.spdk_json(&["vhost_get_controllers", "-n", "scsi.0"]);
    assert_eq!(one[0]["ctrlr"], "scsi.0");
    assert_eq!(one[0]["cpumask"], "0x1");
    let scsi = &one[0]["backend_specific"]["scsi"];
    let listed: Vec<(u64, &str)> = scsi
        .as_array()
        .expect("backend_specific.scsi is a list")
        .iter()
        .map(|t| {
            (
                t["scsi_dev_num"].as_u64().unwrap(),
                t["luns"][0]["bdev_name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [(0, "Malloc1"), (1, "Null0"), (3, "Malloc0")],
        "{one}"
    );
    assert_eq!(scsi[2]["target_name"], "Target 3");
    assert_eq!(scsi[2]["luns"][0]["id"], 0);

    // Errors: target in use, out of range, unknown bdev, unknown controller, a blk controller.
    let busy = target.spdk_err(&["vhost_scsi_controller_add_target", "scsi.0", "3", "Malloc0"]);
    assert!(busy.contains("\"code\": -16"), "{busy}");
    let range = target.spdk_err(&["vhost_scsi_controller_add_target", "scsi.0", "8", "Malloc0"]);
    assert!(range.contains("\"code\": -22"), "{range}");
    let nobdev = target.spdk_err(&["vhost_scsi_controller_add_target", "scsi.0", "4", "Nope"]);
    assert!(nobdev.contains("\"code\": -19"), "{nobdev}");
    let noctrl = target.spdk_err(&["vhost_scsi_controller_add_target", "x", "4", "Malloc0"]);
    assert!(noctrl.contains("\"code\": -19"), "{noctrl}");
    target.spdk_ok(&["vhost_create_blk_controller", "blk.0", "Malloc0"]);
    let blk = target.spdk_err(&["vhost_scsi_controller_add_target", "blk.0", "4", "Malloc0"]);
    assert!(blk.contains("\"code\": -22"), "{blk}");
    let dup = target.spdk_err(&["vhost_create_scsi_controller", "scsi.0"]);
    assert!(dup.contains("\"code\": -17"), "{dup}");

    target.spdk_ok(&["vhost_scsi_controller_remove_target", "scsi.0", "1"]);
    let missing = target.spdk_err(&["vhost_scsi_controller_remove_target", "scsi.0", "1"]);
    assert!(missing.contains("\"code\": -19"), "{missing}");

    // Deleting a bdev in use detaches its target.
    target.spdk_ok(&["bdev_malloc_delete", "Malloc1"]);
    let one = target.spdk_json(&["vhost_get_controllers", "-n", "scsi.0"]);
    let ids: Vec<u64> = one[0]["backend_specific"]["scsi"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["scsi_dev_num"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [3], "{one}");

    // With delay, SPDK waits for vhost_start_scsi_controller; rvhost accepts both.
    target.spdk_ok(&["vhost_create_scsi_controller", "--delay", "scsi.1"]);
    target.spdk_ok(&["vhost_start_scsi_controller", "scsi.1"]);
    wait_for_path(&target.dir.join("scsi.1"), true);

    target.spdk_ok(&["vhost_delete_controller", "scsi.0"]);
    wait_for_path(&target.dir.join("scsi.0"), false);
}

#[test]
fn scsi_controller_with_the_seed_guides_names() {
    let target = Target::start("scsiold", &["--no-default"]);
    target.ok(
        "construct_malloc_bdev",
        json!({"name": "Malloc0", "num_blocks": 2048, "block_size": 512}),
    );
    target.ok(
        "construct_vhost_scsi_controller",
        json!({"ctrlr": "vhost.0", "cpumask": "0x1"}),
    );
    assert_eq!(
        target.ok(
            "add_vhost_scsi_lun",
            json!({"ctrlr": "vhost.0", "scsi_target_num": 0, "bdev_name": "Malloc0"})
        ),
        json!(0)
    );
    let listed = target.ok("get_vhost_controllers", json!({}));
    assert_eq!(
        listed[0]["backend_specific"]["scsi"][0]["luns"][0]["bdev_name"],
        "Malloc0"
    );
    target.ok(
        "remove_vhost_scsi_dev",
        json!({"ctrlr": "vhost.0", "scsi_target_num": 0}),
    );
    assert_eq!(
        target.err_code(
            "remove_vhost_scsi_target",
            json!({"ctrlr": "vhost.0", "scsi_target_num": 0})
        ),
        -19
    );
    assert_eq!(
        target.err_code(
            "add_vhost_scsi_lun",
            json!({"ctrlr": "vhost.0", "scsi_target_num": -2, "bdev_name": "Malloc0"})
        ),
        -22
    );
    // Unknown parameters are refused, as SPDK's decoder does.
    assert_eq!(
        target.err_code(
            "construct_vhost_scsi_controller",
            json!({"ctrlr": "vhost.1", "readonly": true})
        ),
        -32602
    );
    let names = target.ok("rpc_get_methods", json!({"include_aliases": true}));
    for name in [
        "vhost_create_scsi_controller",
        "vhost_scsi_controller_add_target",
        "vhost_scsi_controller_remove_target",
        "construct_vhost_scsi_controller",
        "add_vhost_scsi_lun",
        "remove_vhost_scsi_dev",
        "remove_vhost_scsi_target",
    ] {
        assert!(
            names.as_array().unwrap().contains(&json!(name)),
            "{name} missing from {names}"
        );
    }
}
