//! The virtio-vhost-user transport end to end with a real Linux guest under QEMU (TCG): an
//! unmodified `vhost-user-blk-pci` and `vhost-user-scsi-pci` connect to the vhost-user sockets of
//! two emulated virtio-vhost-user devices inside the `rvhost` binary (controllers created with
//! `"transport": "vvu_emu"`). Each device tunnels QEMU's messages, maps the guest's memory into
//! its shared memory window and turns kicks into interrupts and doorbells into calls; rvhost
//! drives it with its virtio-vhost-user driver and serves malloc bdevs. One boot runs the blk
//! checks of the socket transport (integrity, flush, discard, write-zeroes, a device reset,
//! every queue used) and then the SCSI ones (integrity, flush, discard, a LUN reset with I/O in
//! flight, every request queue used).

use std::path::PathBuf;

use serde_json::{json, Value};

use rvhost_tests::{init_test_logging, GuestConfig, Rvhost, VhostUserDevice, VIRTIO_SCSI_MODULES};

const BLK_CHECKS: &str = include_str!("../guest/blk_checks.sh");
const SCSI_CHECKS: &str = include_str!("../guest/scsi_checks.sh");

/// `sg_reset` from sg3-utils, copied into the guest (it needs only libc).
const SG_RESET: &str = "/usr/bin/sg_reset";

const MIB: u64 = 1 << 20;
const QUEUES: u16 = 2;

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

/// The JSON-RPC error code of a call that must fail.
fn rpc_error_code(target: &mut Rvhost, method: &str, params: Value) -> i64 {
    match target.rpc(method, params.clone()) {
        Ok(result) => panic!("{method} {params} succeeded: {result}"),
        Err(err) => {
            let text = err.to_string();
            let code = text
                .split("\"code\":")
                .nth(1)
                .and_then(|rest| rest.split([',', '}']).next())
                .and_then(|code| code.trim().parse().ok());
            code.unwrap_or_else(|| panic!("{method} {params}: no error code in {text}"))
        }
    }
}

#[test]
fn rvhost_vvu_blk_and_scsi_through_emulated_devices() {
    init_test_logging();
    assert!(
        std::path::Path::new(SG_RESET).is_file(),
        "{SG_RESET} is needed in the guest for the LUN reset: apt-get install sg3-utils"
    );
    let mut target = match Rvhost::start() {
        Ok(t) => t,
        Err(err) => panic!("{err}"),
    };
    target.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "VB", "num_blocks": 65536, "block_size": 512}),
    );
    target.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "VS", "num_blocks": 8192, "block_size": 4096}),
    );

    // Bad transport parameters are refused with EINVAL and create nothing.
    for params in [
        json!({"ctrlr": "bad", "dev_name": "VB", "transport": "vvu"}),
        json!({"ctrlr": "bad", "dev_name": "VB", "transport": "vvu", "traddr": "not-a-bdf"}),
        json!({"ctrlr": "bad", "dev_name": "VB", "transport": "vvu_emu", "traddr": "0000:00:04.0"}),
        json!({"ctrlr": "bad", "dev_name": "VB", "traddr": "0000:00:04.0"}),
        json!({"ctrlr": "bad", "dev_name": "VB", "transport": "vhost_user_scsi"}),
    ] {
        assert_eq!(
            rpc_error_code(&mut target, "vhost_create_blk_controller", params),
            -22
        );
    }
    assert_eq!(
        rpc_error_code(
            &mut target,
            "vhost_create_scsi_controller",
            json!({"ctrlr": "bad", "transport": "vhost_user_blk"})
        ),
        -22
    );
    // A PCI function that does not exist (or is not bound to vfio-pci) is refused too.
    assert_eq!(
        rpc_error_code(
            &mut target,
            "vhost_create_blk_controller",
            json!({"ctrlr": "bad", "dev_name": "VB", "transport": "vvu", "traddr": "0000:7f:1f.7"})
        ),
        -22
    );
    assert!(target
        .rpc("vhost_get_controllers", json!({"name": "bad"}))
        .is_err());

    target.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vvu.blk", "dev_name": "VB", "transport": "vvu_emu"}),
    );
    target.rpc_ok(
        "vhost_create_scsi_controller",
        json!({"ctrlr": "vvu.scsi", "transport": "vvu_emu"}),
    );
    target.rpc_ok(
        "vhost_scsi_controller_add_target",
        json!({"ctrlr": "vvu.scsi", "scsi_target_num": 0, "bdev_name": "VS"}),
    );
    let listed = target.rpc_ok("vhost_get_controllers", json!({"name": "vvu.blk"}));
    assert_eq!(
        listed[0]["backend_specific"]["transport"],
        json!("vvu_emu"),
        "{listed}"
    );
    // The socket transport's listing is SPDK's, without a transport key.
    let listed = target.rpc_ok("vhost_get_controllers", json!({"name": "vhost.0"}));
    assert!(
        listed[0]["backend_specific"].get("transport").is_none(),
        "{listed}"
    );

    let blk_socket = target.wait_controller_socket("vvu.blk");
    let scsi_socket = target.wait_controller_socket("vvu.scsi");
    let mut modules = VIRTIO_SCSI_MODULES.to_vec();
    modules.push("virtio_blk");
    let config = GuestConfig::new("rvhost-vvu", &format!("{BLK_CHECKS}\n{SCSI_CHECKS}"))
        .modules(&modules)
        .cpus(QUEUES as u8)
        .device(VhostUserDevice::Blk {
            socket: blk_socket,
            num_queues: QUEUES,
        })
        .device(VhostUserDevice::Scsi {
            socket: scsi_socket,
            num_queues: QUEUES,
        })
        .binary(blkcheck())
        .binary(SG_RESET)
        .env("DISCARD", 1)
        .env("ZEROES", 1)
        .env("RESET", 1);
    let out = target.run_guest(&config);

    // Both devices reached rvhost through the virtio-vhost-user transport, not a socket session.
    let log = target.log();
    for ctrlr in ["vvu.blk", "vvu.scsi"] {
        assert!(
            log.lines()
                .any(|l| l.contains("frontend connected (virtio-vhost-user)") && l.contains(ctrlr)),
            "{ctrlr} was not served through its virtio-vhost-user device\n{log}"
        );
    }

    // virtio-blk: the socket transport's full checks.
    out.assert_eq("disk_present", "yes");
    out.assert_eq("size_bytes", &(32 * MIB).to_string());
    out.assert_eq("logical_block_size", "512");
    out.assert_eq("queue_count", &QUEUES.to_string());
    out.assert_eq("serial", "VB");
    out.assert_all_ok("io_");
    out.assert_eq("queues_used", &QUEUES.to_string());
    out.assert_eq("flush", "ok");
    out.assert_all_ok("discard_");
    out.assert_all_ok("zeroes_");
    out.assert_eq("reset_unbound", "ok");
    out.assert_eq("reset_rebound", "ok");
    out.assert_eq("reset_queue_count", &QUEUES.to_string());
    out.assert_all_ok("reset_verify_");
    out.assert_eq("reset_write_new", "ok");
    out.assert_eq("reset_flush", "ok");

    // virtio-scsi.
    out.assert_eq("scsi_present", "yes");
    out.assert_eq("scsi_lbs", "4096");
    out.assert_eq("scsi_size", &(32 * MIB).to_string());
    assert!(
        out.number("scsi_dmax") > 0,
        "discard not offered\n{}",
        out.diagnostics()
    );
    out.assert_all_ok("scsi_io_");
    out.assert_eq("scsi_flush", "ok");
    out.assert_all_ok("scsi_discard");
    out.assert_eq("scsi_lun_reset", "ok");
    out.assert_eq("scsi_lun_reset_bg_write", "ok");
    out.assert_eq("scsi_lun_reset_verify", "ok");
    out.assert_eq("scsi_mq_request_queues", &QUEUES.to_string());
    out.assert_eq("scsi_mq_queues_used", &QUEUES.to_string());
    out.assert_eq("script_exit", "0");
    assert!(
        log.contains("LogicalUnitReset"),
        "the guest's reset did not reach the target as a LUN reset\n{log}"
    );

    // The controllers go away with their devices and sockets.
    target.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vvu.blk"}));
    target.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vvu.scsi"}));
    assert!(!target.controller_socket("vvu.blk").exists());
    assert!(target.is_running(), "rvhost exited\n{}", target.log());
}
