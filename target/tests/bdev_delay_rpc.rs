//! The delay bdev driven by SPDK's own JSON-RPC client (`spdk-rpc`) against the real `rvhost`:
//! create on a RAM bdev, change a latency, SPDK's errors for bad input, `bdev_get_bdevs`,
//! `save_config` replayed by `-c`, delete, and the base's deletion taking the delay bdev along.

mod rpc_common;

use std::time::{Duration, Instant};

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

#[test]
fn delay_bdev_through_spdk_rpc() {
    let target = Target::start("delay", &["--no-default"]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Malloc0", "8", "512"]);
    let uuid = "0f4c2a8e-3b1d-4e5f-8a9b-0c1d2e3f4a5b";
    let created = target.spdk_ok(&[
        "bdev_delay_create",
        "-b",
        "Malloc0",
        "-d",
        "Delay0",
        "-u",
        uuid,
        "-r",
        "100",
        "-t",
        "1000",
        "-w",
        "200",
        "-n",
        "2000",
    ]);
    assert_eq!(created.trim(), "Delay0");

    let delay = &target.spdk_json(&["bdev_get_bdevs", "-b", "Delay0"])[0];
    assert_eq!(delay["product_name"], "delay");
    assert_eq!(delay["uuid"], uuid);
    assert_eq!(delay["block_size"], 512);
    assert_eq!(delay["num_blocks"], 8 * 2048);
    assert_eq!(
        delay["driver_specific"]["delay"],
        json!({"name": "Delay0", "base_bdev_name": "Malloc0", "uuid": uuid,
               "avg_read_latency": 100, "p99_read_latency": 1000,
               "avg_write_latency": 200, "p99_write_latency": 2000})
    );

    assert_eq!(
        target
            .spdk_ok(&["bdev_delay_update_latency", "Delay0", "avg_write", "500"])
            .trim(),
        "true"
    );
    let delay = &target.spdk_json(&["bdev_get_bdevs", "-b", "Delay0"])[0];
    assert_eq!(delay["driver_specific"]["delay"]["avg_write_latency"], 500);

    // SPDK's errors for bad input.
    let unknown_base = target.spdk_err(&[
        "bdev_delay_create",
        "-b",
        "Nope",
        "-d",
        "Delay1",
        "-r",
        "1",
        "-t",
        "1",
        "-w",
        "1",
        "-n",
        "1",
    ]);
    assert!(unknown_base.contains("\"code\": -19"), "{unknown_base}");
    let duplicate = target.spdk_err(&[
        "bdev_delay_create",
        "-b",
        "Malloc0",
        "-d",
        "Delay0",
        "-r",
        "1",
        "-t",
        "1",
        "-w",
        "1",
        "-n",
        "1",
    ]);
    assert!(
        duplicate.contains("\"code\": -17") && duplicate.contains("File exists"),
        "{duplicate}"
    );
    let p99_below_avg = target.spdk_err(&[
        "bdev_delay_create",
        "-b",
        "Malloc0",
        "-d",
        "Delay1",
        "-r",
        "10",
        "-t",
        "9",
        "-w",
        "1",
        "-n",
        "1",
    ]);
    assert!(
        p99_below_avg.contains("\"code\": -22") && p99_below_avg.contains("p99"),
        "{p99_below_avg}"
    );
    // The base is claimed by Delay0.
    let claimed = target.spdk_err(&[
        "bdev_delay_create",
        "-b",
        "Malloc0",
        "-d",
        "Delay1",
        "-r",
        "1",
        "-t",
        "1",
        "-w",
        "1",
        "-n",
        "1",
    ]);
    assert!(claimed.contains("\"code\": -1"), "{claimed}");
    // ... and cannot be exported by a controller.
    let exported = target.spdk_err(&["vhost_create_blk_controller", "vhost.0", "Malloc0"]);
    assert!(
        exported.contains("\"code\": -1") && exported.contains("Operation not permitted"),
        "{exported}"
    );
    let base = &target.spdk_json(&["bdev_get_bdevs", "-b", "Malloc0"])[0];
    assert_eq!(base["claimed"], true);
    assert_eq!(base["claim_type"], "exclusive_write");
    let not_delay = target.spdk_err(&["bdev_delay_update_latency", "Malloc0", "avg_read", "5"]);
    assert!(
        not_delay.contains("\"code\": -32602") && not_delay.contains("does not exist"),
        "{not_delay}"
    );
    // What SPDK's client would not send: a negative or non-numeric latency, an unknown type.
    let params = |latency: Value| {
        json!({"base_bdev_name": "Malloc0", "name": "Delay1", "avg_read_latency": latency,
               "p99_read_latency": 10, "avg_write_latency": 1, "p99_write_latency": 1})
    };
    assert_eq!(
        target.err_code("bdev_delay_create", params(json!(-5))),
        -32602
    );
    assert_eq!(
        target.err_code("bdev_delay_create", params(json!("5"))),
        -32602
    );
    assert_eq!(
        target.err_code(
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": "Delay0", "latency_type": "avg_write", "latency_us": -1})
        ),
        -32602
    );
    assert_eq!(
        target.err_code(
            "bdev_delay_update_latency",
            json!({"delay_bdev_name": "Delay0", "latency_type": "max_write", "latency_us": 1})
        ),
        -32602
    );
    assert_eq!(bdev_names(&target), ["Malloc0", "Delay0"]);

    // save_config writes the delay bdev after its base, and `-c` recreates both.
    let saved = target.spdk_json(&["save_config"]);
    let bdev_calls: Vec<&Value> = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .unwrap()["config"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let methods: Vec<&str> = bdev_calls
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["bdev_malloc_create", "bdev_delay_create"]);
    let file = target.dir.join("saved.json");
    std::fs::write(&file, saved.to_string()).unwrap();
    let restored = Target::start("delay-restore", &["-c", file.to_str().unwrap()]);
    assert_eq!(
        restored.spdk_json(&["bdev_get_bdevs", "-b", "Delay0"]),
        target.spdk_json(&["bdev_get_bdevs", "-b", "Delay0"])
    );

    // Deleting releases the base: a new delay bdev may claim it.
    target.spdk_ok(&["bdev_delay_delete", "Delay0"]);
    assert_eq!(bdev_names(&target), ["Malloc0"]);
    let base = &target.spdk_json(&["bdev_get_bdevs", "-b", "Malloc0"])[0];
    assert_eq!(base["claimed"], false);
    let gone = target.spdk_err(&["bdev_delay_delete", "Delay0"]);
    assert!(gone.contains("\"code\": -19"), "{gone}");
    let not_ours = target.spdk_err(&["bdev_delay_delete", "Malloc0"]);
    assert!(not_ours.contains("\"code\": -19"), "{not_ours}");
    target.spdk_ok(&[
        "bdev_delay_create",
        "-b",
        "Malloc0",
        "-d",
        "Delay2",
        "-r",
        "0",
        "-t",
        "0",
        "-w",
        "0",
        "-n",
        "0",
    ]);

    // Deleting the base takes the delay bdev with it (at the module's next tick), as SPDK's
    // hot-remove of a base bdev does.
    target.spdk_ok(&["bdev_malloc_delete", "Malloc0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bdev_names(&target).is_empty() {
        assert!(Instant::now() < deadline, "Delay2 outlived its base");
        std::thread::sleep(Duration::from_millis(20));
    }
}
