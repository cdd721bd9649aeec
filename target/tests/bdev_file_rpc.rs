//! The file bdev methods driven by SPDK's own client (`spdk-rpc`): `bdev_aio_create` with its
//! positional block size and `--readonly`/`--fallocate`, `bdev_uring_create`, rescan after a
//! resize, delete (refused for the wrong module), errors, the old name `construct_aio_bdev` over
//! raw JSON-RPC, and `save_config` recreating them.

mod rpc_common;

use rpc_common::Target;
use serde_json::json;

#[test]
fn file_bdevs_through_spdk_rpc() {
    let target = Target::start("filebdevs", &["--no-default"]);
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../build/file-bdev-tests")
        .join(format!("rpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("a.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let img_s = img.to_str().unwrap();

    assert_eq!(
        target
            .spdk_ok(&["bdev_aio_create", img_s, "Aio0", "4096", "--readonly"])
            .trim(),
        "Aio0"
    );
    assert_eq!(
        target
            .spdk_ok(&["bdev_uring_create", img_s, "Uring0"])
            .trim(),
        "Uring0"
    );
    let aio = &target.spdk_json(&["bdev_get_bdevs", "-b", "Aio0"])[0];
    assert_eq!(aio["product_name"], "AIO disk");
    assert_eq!(
        (aio["block_size"].as_u64(), aio["num_blocks"].as_u64()),
        (Some(4096), Some(2048))
    );
    assert_eq!(aio["supported_io_types"]["write"], false);
    assert_eq!(aio["driver_specific"]["aio"]["filename"], img_s);
    assert_eq!(aio["driver_specific"]["aio"]["readonly"], true);
    let uring = &target.spdk_json(&["bdev_get_bdevs", "-b", "Uring0"])[0];
    assert_eq!(
        (uring["block_size"].as_u64(), uring["num_blocks"].as_u64()),
        (Some(512), Some(16384))
    );
    assert_eq!(uring["supported_io_types"]["unmap"], true);
    assert_eq!(uring["supported_io_types"]["write_zeroes"], true);
    assert_eq!(uring["driver_specific"]["uring"]["io_errors"], 0);
    // The reactor runs on core 0 (-m 0x1): io_uring's workers are kept off it when another
    // core is available.
    let workers = &uring["driver_specific"]["uring"]["io_worker_cores"];
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores > 1 {
        let mask = u64::from_str_radix(workers.as_str().unwrap().trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("io_worker_cores {workers}: {e}"));
        assert_eq!(
            mask & 1,
            0,
            "io_uring workers may run on the reactor's core: {workers}"
        );
        assert_ne!(mask, 0, "{workers}");
    } else {
        assert!(workers.is_null(), "{workers}");
    }

    // Grow the file; rescan picks it up.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    target.spdk_ok(&["bdev_aio_rescan", "Aio0"]);
    target.spdk_ok(&["bdev_uring_rescan", "Uring0"]);
    assert_eq!(
        target.spdk_json(&["bdev_get_bdevs", "-b", "Aio0"])[0]["num_blocks"],
        4096
    );
    assert_eq!(
        target.spdk_json(&["bdev_get_bdevs", "-b", "Uring0"])[0]["num_blocks"],
        32768
    );

    // The old name, over raw JSON-RPC (SPDK's current client no longer knows it).
    assert_eq!(
        target.ok(
            "construct_aio_bdev",
            json!({"name": "Aio1", "filename": img_s, "fallocate": true})
        ),
        json!("Aio1")
    );
    let saved = target.spdk_json(&["save_config"]);
    let bdev_calls: Vec<&serde_json::Value> = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["subsystem"] == "bdev")
        .flat_map(|s| s["config"].as_array().unwrap().iter())
        .collect();
    let aio1 = bdev_calls
        .iter()
        .find(|c| c["params"]["name"] == "Aio1")
        .expect("Aio1 in save_config");
    assert_eq!(aio1["method"], "bdev_aio_create");
    assert_eq!(aio1["params"]["fallocate"], true);
    assert_eq!(aio1["params"]["filename"], img_s);
    assert!(bdev_calls
        .iter()
        .any(|c| c["method"] == "bdev_uring_create"));

    // Errors: missing file, bad block size, duplicate name, wrong module, unknown member.
    let missing = target.spdk_err(&["bdev_uring_create", "/nonexistent/x.img", "U9"]);
    assert!(missing.contains("\"code\": -22"), "{missing}");
    let bad_bs = target.spdk_err(&["bdev_aio_create", img_s, "A9", "1000"]);
    assert!(
        bad_bs.contains("\"code\": -22") && bad_bs.contains("block_size"),
        "{bad_bs}"
    );
    let dup = target.spdk_err(&["bdev_aio_create", img_s, "Aio0"]);
    assert!(dup.contains("\"code\": -17"), "{dup}");
    let wrong = target.spdk_err(&["bdev_uring_delete", "Aio0"]);
    assert!(wrong.contains("\"code\": -19"), "{wrong}");
    assert_eq!(
        target.err_code(
            "bdev_uring_create",
            json!({"name": "U8", "filename": img_s, "bogus": 1})
        ),
        -32602
    );

    target.spdk_ok(&["bdev_aio_delete", "Aio0"]);
    target.spdk_ok(&["bdev_aio_delete", "Aio1"]);
    target.spdk_ok(&["bdev_uring_delete", "Uring0"]);
    let gone = target.spdk_err(&["bdev_aio_rescan", "Aio0"]);
    assert!(gone.contains("\"code\": -19"), "{gone}");
    assert_eq!(
        target
            .spdk_json(&["bdev_get_bdevs"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
