//! Packed virtqueues (`packed=on`) with a real Linux guest under QEMU (TCG) against the `rvhost`
//! binary, in one guest run: a 2-queue vhost-user-blk disk through the full virtio-blk checks
//! (integrity, every queue used, flush, discard, write-zeroes, reset by unbind/rebind), a
//! 2-queue vhost-user-scsi LUN through the same kinds of checks, then a reboot that resets both
//! devices and reads back what the first boot wrote. SeaBIOS drives the blk disk with split rings
//! before Linux resets it and negotiates packed ones, so the device changes layout on the way.

use std::path::PathBuf;

use serde_json::json;

use rvhost_tests::{init_test_logging, GuestConfig, Rvhost, VhostUserDevice};

const BLK_CHECKS: &str = include_str!("../guest/blk_checks.sh");
const PACKED: &str = include_str!("../guest/packed.sh");

/// virtio-blk and virtio-scsi in one guest.
const MODULES: &[&str] = &[
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "sg",
];

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

#[test]
fn rvhost_packed_blk_and_scsi() {
    init_test_logging();
    let mut target = match Rvhost::start() {
        Ok(t) => t,
        Err(err) => panic!("{err}"),
    };
    let blk_socket = match target.create_malloc_blk("P0", 131072, 512, "vhost.packed", false) {
        Ok(socket) => socket,
        Err(err) => panic!("{err}\n---- rvhost log ----\n{}", target.log()),
    };
    target.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "PS0", "num_blocks": 65536, "block_size": 512}),
    );
    target.rpc_ok(
        "vhost_create_scsi_controller",
        json!({"ctrlr": "scsi.packed", "cpumask": "0x1"}),
    );
    target.rpc_ok(
        "vhost_scsi_controller_add_target",
        json!({"ctrlr": "scsi.packed", "scsi_target_num": 0, "bdev_name": "PS0"}),
    );
    let scsi_socket = target.wait_controller_socket("scsi.packed");

    let script = PACKED.replace("@BLK_CHECKS@", BLK_CHECKS);
    let config = GuestConfig::new("rvhost-packed", &script)
        .modules(MODULES)
        .cpus(2)
        .boots(2)
        .device(VhostUserDevice::Packed(Box::new(VhostUserDevice::Blk {
            socket: blk_socket,
            num_queues: 2,
        })))
        .device(VhostUserDevice::Packed(Box::new(VhostUserDevice::Scsi {
            socket: scsi_socket,
            num_queues: 2,
        })))
        .env("DISCARD", 1)
        .env("ZEROES", 1)
        .env("RESET", 1)
        .binary(blkcheck());
    let out = target.run_guest(&config);

    // Packed rings were negotiated, before and after the reboot.
    for key in [
        "blk_packed",
        "scsi_packed",
        "blk_packed_after_reboot",
        "scsi_packed_after_reboot",
    ] {
        out.assert_eq(key, "1");
    }
    // blk: the checks split rings pass (tests/guest_blk.rs).
    out.assert_eq("disk_present", "yes");
    out.assert_eq("size_bytes", &(131072u64 * 512).to_string());
    out.assert_eq("queue_count", "2");
    out.assert_eq("serial", "P0");
    out.assert_all_ok("io_");
    out.assert_eq("queues_used", "2");
    out.assert_eq("flush", "ok");
    out.assert_all_ok("discard_");
    out.assert_all_ok("zeroes_");
    out.assert_eq("reset_unbound", "ok");
    out.assert_eq("reset_rebound", "ok");
    out.assert_eq("reset_queue_count", "2");
    out.assert_all_ok("reset_verify_");
    out.assert_eq("reset_write_new", "ok");
    out.assert_eq("reset_flush", "ok");
    // scsi.
    out.assert_eq("scsi_present", "yes");
    out.assert_all_ok("scsi_io_");
    out.assert_eq("scsi_flush", "ok");
    out.assert_all_ok("scsi_discard");
    out.assert_eq("scsi_queues_used", "2");
    // Reboot: both devices reset, both disks keep what boot 1 wrote.
    let boots: Vec<&str> = out
        .lines
        .iter()
        .filter(|(k, _)| k == "boot")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(boots, ["first", "second"], "\n{}", out.diagnostics());
    out.assert_all_ok("reboot_");
    out.assert_eq("reboot_blk_verify", "ok");
    out.assert_eq("reboot_scsi_verify", "ok");
    out.assert_eq("script_exit", "0");
}
