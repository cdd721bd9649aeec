//! The real `rvhost` driven by SPDK's own JSON-RPC client (`spdk-rpc` from `spdk==26.9`), for
//! every method under its current SPDK name: proves wire and parameter compatibility.

mod rpc_common;

use std::time::Duration;

use rpc_common::{wait_for_path, Target};
use serde_json::json;

#[test]
fn bdevs_through_spdk_rpc() {
    let target = Target::start("bdevs", &["--no-default"]);
    assert_eq!(
        target
            .spdk_ok(&["bdev_malloc_create", "-b", "Malloc0", "64", "512"])
            .trim(),
        "Malloc0"
    );
    // Unnamed: SPDK's naming, skipping the name already taken.
    assert_eq!(
        target.spdk_ok(&["bdev_malloc_create", "8", "4096"]).trim(),
        "Malloc1"
    );
    let uuid = "6a1c0b52-4f8e-4d2b-9a51-1f2e3d4c5b6a";
    assert_eq!(
        target
            .spdk_ok(&["bdev_null_create", "-u", uuid, "Null0", "16", "4096"])
            .trim(),
        "Null0"
    );

    let all = target.spdk_json(&["bdev_get_bdevs"]);
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Malloc0", "Malloc1", "Null0"]);
    let malloc = &all[0];
    assert_eq!(malloc["product_name"], "Malloc disk");
    assert_eq!(malloc["block_size"], 512);
    assert_eq!(malloc["num_blocks"], 64 * 2048);
    assert_eq!(malloc["aliases"][0], malloc["uuid"]);
    assert_eq!(malloc["claimed"], false);
    assert_eq!(malloc["supported_io_types"]["unmap"], true);

    let null = target.spdk_json(&["bdev_get_bdevs", "-b", "Null0"]);
    assert_eq!(null.as_array().unwrap().len(), 1);
    assert_eq!(null[0]["product_name"], "Null disk");
    assert_eq!(null[0]["uuid"], uuid);
    assert_eq!(null[0]["num_blocks"], 16 * 256);
    assert_eq!(null[0]["supported_io_types"]["unmap"], false);
    assert_eq!(null[0]["supported_io_types"]["write"], true);
    // Looked up by its UUID alias, as SPDK allows.
    assert_eq!(
        target.spdk_json(&["bdev_get_bdevs", "-b", uuid])[0]["name"],
        "Null0"
    );

    // SPDK's errno-style errors, reported by SPDK's client.
    let dup = target.spdk_err(&["bdev_malloc_create", "-b", "Malloc0", "1", "512"]);
    assert!(
        dup.contains("\"code\": -17") && dup.contains("File exists"),
        "{dup}"
    );
    let dup_null = target.spdk_err(&["bdev_null_create", "Malloc1", "1", "512"]);
    assert!(dup_null.contains("\"code\": -17"), "{dup_null}");
    let missing = target.spdk_err(&["bdev_get_bdevs", "-b", "Nope"]);
    assert!(
        missing.contains("\"code\": -19") && missing.contains("No such device"),
        "{missing}"
    );
    let bad_size = target.spdk_err(&["bdev_malloc_create", "-b", "X", "1", "1000"]);
    assert!(
        bad_size.contains("\"code\": -22") && bad_size.contains("block_size"),
        "{bad_size}"
    );
    let metadata = target.spdk_err(&["bdev_malloc_create", "-b", "X", "1", "512", "-m", "8"]);
    assert!(
        metadata.contains("\"code\": -22") && metadata.contains("md_size"),
        "{metadata}"
    );
    let wrong_module = target.spdk_err(&["bdev_malloc_delete", "Null0"]);
    assert!(wrong_module.contains("\"code\": -19"), "{wrong_module}");

    target.spdk_ok(&["bdev_malloc_delete", "Malloc1"]);
    target.spdk_ok(&["bdev_null_delete", "Null0"]);
    let gone = target.spdk_err(&["bdev_null_delete", "Null0"]);
    assert!(gone.contains("\"code\": -19"), "{gone}");
    let left = target.spdk_json(&["bdev_get_bdevs"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["name"], "Malloc0");
}

#[test]
fn vhost_controllers_through_spdk_rpc() {
    let target = Target::start("ctrl", &["--no-default"]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Malloc0", "16", "512"]);
    target.spdk_ok(&["bdev_null_create", "Null0", "16", "4096"]);

    target.spdk_ok(&[
        "vhost_create_blk_controller",
        "--cpumask",
        "0x1",
        "vhost.0",
        "Malloc0",
    ]);
    wait_for_path(&target.dir.join("vhost.0"), true);
    target.spdk_ok(&["vhost_create_blk_controller", "-r", "vhost.1", "Null0"]);
    wait_for_path(&target.dir.join("vhost.1"), true);

    let list = target.spdk_json(&["vhost_get_controllers"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let one = target.spdk_json(&["vhost_get_controllers", "-n", "vhost.1"]);
    assert_eq!(one[0]["ctrlr"], "vhost.1");
    assert_eq!(one[0]["cpumask"], "0x1");
    assert_eq!(one[0]["backend_specific"]["block"]["readonly"], true);
    assert_eq!(one[0]["backend_specific"]["block"]["bdev"], "Null0");
    assert_eq!(
        one[0]["socket"],
        target.dir.join("vhost.1").to_str().unwrap()
    );
    assert_eq!(
        target.spdk_json(&["bdev_get_bdevs", "-b", "Malloc0"])[0]["claimed"],
        true
    );

    let dup = target.spdk_err(&["vhost_create_blk_controller", "vhost.0", "Malloc0"]);
    assert!(dup.contains("\"code\": -17"), "{dup}");
    let no_bdev = target.spdk_err(&["vhost_create_blk_controller", "vhost.2", "Nope"]);
    assert!(no_bdev.contains("\"code\": -19"), "{no_bdev}");
    let bad_mask = target.spdk_err(&[
        "vhost_create_blk_controller",
        "--cpumask",
        "0x2",
        "vhost.2",
        "Malloc0",
    ]);
    assert!(
        bad_mask.contains("\"code\": -22") && bad_mask.contains("cpumask"),
        "{bad_mask}"
    );
    let bad_transport = target.spdk_err(&[
        "vhost_create_blk_controller",
        "--transport",
        "vfio_user_blk",
        "vhost.2",
        "Malloc0",
    ]);
    assert!(bad_transport.contains("\"code\": -22"), "{bad_transport}");
    assert!(!target.dir.join("vhost.2").exists());

    // Deleting a bdev in use hot-detaches it: the controller stays, without its bdev.
    target.spdk_ok(&["bdev_null_delete", "Null0"]);
    let detached = target.spdk_json(&["vhost_get_controllers", "-n", "vhost.1"]);
    assert_eq!(
        detached[0]["backend_specific"]["block"]["bdev"],
        serde_json::Value::Null,
        "{detached}"
    );

    target.spdk_ok(&["vhost_delete_controller", "vhost.1"]);
    wait_for_path(&target.dir.join("vhost.1"), false);
    let missing = target.spdk_err(&["vhost_delete_controller", "vhost.1"]);
    assert!(missing.contains("\"code\": -19"), "{missing}");
    let missing = target.spdk_err(&["vhost_get_controllers", "-n", "vhost.1"]);
    assert!(missing.contains("\"code\": -19"), "{missing}");
    assert_eq!(
        target
            .spdk_json(&["vhost_get_controllers"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn introspection_through_spdk_rpc() {
    let target = Target::start("intro", &["--no-default"]);
    let methods = target.spdk_json(&["rpc_get_methods"]);
    let methods: Vec<&str> = methods
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for name in [
        "bdev_malloc_create",
        "bdev_malloc_delete",
        "bdev_null_create",
        "bdev_null_delete",
        "bdev_get_bdevs",
        "vhost_create_blk_controller",
        "vhost_get_controllers",
        "vhost_delete_controller",
        "rpc_get_methods",
        "spdk_get_version",
        "framework_get_reactors",
        "spdk_kill_instance",
    ] {
        assert!(methods.contains(&name), "{name} missing from {methods:?}");
    }
    assert!(!methods.contains(&"construct_malloc_bdev"));
    let with_aliases = target.spdk_json(&["rpc_get_methods", "--include-aliases", "--current"]);
    assert!(with_aliases
        .as_array()
        .unwrap()
        .contains(&json!("construct_vhost_blk_controller")));

    let version = target.spdk_json(&["spdk_get_version"]);
    assert_eq!(
        version["version"],
        format!("rvhost v{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(version["fields"]["major"], 0);
    assert_eq!(version["fields"]["minor"], 1);
    assert_eq!(version["fields"]["patch"], 0);
    assert_eq!(version["fields"]["suffix"], "");

    let reactors = target.spdk_json(&["framework_get_reactors"]);
    let list = reactors["reactors"].as_array().expect("reactors list");
    assert_eq!(list.len(), 1, "{reactors}");
    assert_eq!(list[0]["lcore"], 0);
    // SPDK's shape: busy and idle in ticks of tick_rate (the time-stamp counter's), threads per
    // reactor.
    assert!(
        reactors["tick_rate"]
            .as_u64()
            .is_some_and(|r| r >= 1_000_000),
        "{reactors}"
    );
    assert!(
        list[0]["busy"].is_u64() && list[0]["idle"].is_u64(),
        "{reactors}"
    );
    assert!(list[0]["lw_threads"].is_array(), "{reactors}");
}

#[test]
fn spdk_kill_instance_shuts_down_cleanly() {
    let mut target = Target::start("kill", &["--no-default"]);
    target.spdk_ok(&["bdev_malloc_create", "-b", "Malloc0", "4", "512"]);
    target.spdk_ok(&["vhost_create_blk_controller", "vhost.0", "Malloc0"]);
    let socket = target.dir.join("vhost.0");
    wait_for_path(&socket, true);
    target.spdk_ok(&["spdk_kill_instance", "SIGTERM"]);
    let status = target.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", target.log());
    assert!(!socket.exists(), "controller socket left behind");
    assert!(!target.rpc.exists(), "RPC socket left behind");
    assert!(target.log().contains("shut down cleanly"));
}

/// Names, UUIDs and geometry of every bdev, and every controller's settings: the state a saved
/// configuration must reproduce.
fn state(target: &Target) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let bdevs = target.spdk_json(&["bdev_get_bdevs"]);
    let bdevs = bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            json!([
                b["name"],
                b["uuid"],
                b["block_size"],
                b["num_blocks"],
                b["product_name"]
            ])
        })
        .collect();
    let ctrls = target.spdk_json(&["vhost_get_controllers"]);
    let ctrls = ctrls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| json!([c["ctrlr"], c["cpumask"], c["backend_specific"]]))
        .collect();
    (bdevs, ctrls)
}

#[test]
fn save_config_output_restores_the_target() {
    let original = Target::start("save", &["--no-default"]);
    original.spdk_ok(&["bdev_malloc_create", "-b", "Malloc0", "4", "512"]);
    original.spdk_ok(&["bdev_null_create", "Null0", "4", "4096"]);
    original.spdk_ok(&["vhost_create_blk_controller", "-r", "vhost.0", "Malloc0"]);
    original.spdk_ok(&["vhost_create_blk_controller", "vhost.1", "Null0"]);
    original.spdk_ok(&["bdev_malloc_create", "-b", "Malloc1", "4", "512"]);
    original.spdk_ok(&["bdev_malloc_create", "-b", "Malloc2", "4", "4096"]);
    original.spdk_ok(&["vhost_create_scsi_controller", "scsi.0"]);
    original.spdk_ok(&["vhost_scsi_controller_add_target", "scsi.0", "0", "Malloc1"]);
    original.spdk_ok(&["vhost_scsi_controller_add_target", "scsi.0", "3", "Malloc2"]);
    let saved = original.spdk_json(&["save_config"]);
    let subsystems: Vec<&str> = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["subsystem"].as_str().unwrap())
        .collect();
    assert_eq!(subsystems, ["bdev", "vhost_blk", "vhost_scsi"]);
    let file = original.dir.join("saved.json");
    std::fs::write(&file, saved.to_string()).unwrap();
    let expected = state(&original);
    assert_eq!(expected.0.len(), 4);
    assert_eq!(expected.1.len(), 3);

    // As a start-up configuration.
    let restored = Target::start("restore", &["-c", file.to_str().unwrap()]);
    assert_eq!(state(&restored), expected);
    wait_for_path(&restored.dir.join("vhost.0"), true);

    // Through SPDK's own load_config, into an empty target.
    let loaded = Target::start("load", &["--no-default"]);
    loaded.spdk_ok(&["load_config", "-j", file.to_str().unwrap()]);
    assert_eq!(state(&loaded), expected);
}

#[test]
fn spdk_kill_instance_sigkill_kills_at_once() {
    use std::os::unix::process::ExitStatusExt;
    let mut target = Target::start("sigkill", &["--no-default"]);
    // SPDK's client expects the connection to drop for this one and reports success.
    target.spdk_ok(&["spdk_kill_instance", "SIGKILL"]);
    let status = target.wait_exit(Duration::from_secs(20));
    assert_eq!(status.signal(), Some(9), "{status}");
}

/// Runs `spdk-rpc` with `args`, feeding `script` (one command per line) on stdin.
fn spdk_rpc_script(target: &Target, args: &[&str], script: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(rpc_common::spdk_rpc())
        .arg("-s")
        .arg(&target.rpc)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running spdk-rpc");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("writing the script");
    child.wait_with_output().expect("waiting for spdk-rpc")
}

#[test]
fn script_and_batch_modes_of_spdk_rpc() {
    let target = Target::start("batch", &["--no-default"]);
    // Script mode: one connection, one request after another.
    let out = spdk_rpc_script(
        &target,
        &[],
        "bdev_malloc_create -b S0 1 512\nbdev_null_create S1 1 512\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["S0", "S1"]
    );
    // Batch mode: one JSON-RPC batch array, one array reply.
    let out = spdk_rpc_script(
        &target,
        &["-b"],
        "bdev_malloc_create -b B0 1 512\nbdev_get_bdevs -b S1\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"B0\"") && stdout.contains("\"Null disk\""),
        "{stdout}"
    );
    // A failing call in a batch is reported, and the others still ran.
    let out = spdk_rpc_script(
        &target,
        &["-b"],
        "bdev_malloc_create -b B0 1 512\nbdev_malloc_create -b B1 1 512\n",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-17"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = target.spdk_json(&["bdev_get_bdevs"]);
    let names: Vec<&str> = names
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["S0", "S1", "B0", "B1"]);
}

#[test]
fn log_level_changes_at_run_time() {
    let target = Target::start("loglevel", &["--no-default", "-L", "warn"]);
    assert_eq!(
        target.spdk_ok(&["log_get_print_level"]).trim(),
        "\"WARNING\""
    );
    target.spdk_ok(&["bdev_null_create", "Quiet", "1", "512"]);
    assert!(
        !target.log().contains("created null bdev"),
        "info logged at WARNING:\n{}",
        target.log()
    );
    target.spdk_ok(&["log_set_print_level", "INFO"]);
    assert_eq!(target.spdk_ok(&["log_get_level"]).trim(), "\"INFO\"");
    target.spdk_ok(&["bdev_null_create", "Loud", "1", "512"]);
    assert!(
        target.log().contains("created null bdev bdev=Loud"),
        "{}",
        target.log()
    );
    target.spdk_ok(&["log_set_level", "ERROR"]);
    target.spdk_ok(&["bdev_null_create", "Quiet2", "1", "512"]);
    assert!(!target.log().contains("Quiet2"), "{}", target.log());
}
