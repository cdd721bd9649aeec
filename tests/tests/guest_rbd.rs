//! RBD images of a real Ceph cluster (`scripts/ceph-cluster.sh`, two memstore OSDs, pool size 2
//! / min_size 1) behind rvhost, under a real Linux guest (QEMU TCG), in one boot:
//! - vhost-blk on rbd bdev `Rbd0` (image `blk`, 512-byte blocks) and vhost-scsi target 0 on
//!   `Rbd1` (image `scsi`, 4 KiB blocks): patterns, flush, discard, offloaded write-zeroes;
//! - the same image `blk` exported by a second rvhost process: what one writes and flushes, the
//!   other reads (the shared storage live migration between hosts needs);
//! - both images grown with `bdev_rbd_resize` under the running guest: it sees the new sizes
//!   (blk through the config-change notification, on A's and on B's disk; scsi through the
//!   PARAM_CHANGE event) and writes at the new end;
//! - one OSD killed with SIGKILL under the guest's write/verify loop and restarted: no I/O error
//!   reaches the guest and the data stays;
//! - afterwards `rbd export` of both images holds exactly what the guest wrote, zeros where it
//!   discarded or zeroed.

#[path = "../../target/tests/ceph_common/mod.rs"]
mod ceph_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use ceph_common::Ceph;
use rvhost_tests::files::{host_verify, scratch_dir};
use rvhost_tests::{
    init_test_logging, run_guest_with, GuestConfig, Rvhost, VhostUserDevice, VIRTIO_BLK_MODULES,
    VIRTIO_SCSI_MODULES,
};

const SCRIPT: &str = include_str!("../guest/rbd.sh");
const MIB: u64 = 1 << 20;
const IMAGE_MIB: u64 = 64;
/// What the guest's resize phase grows both images to.
const RESIZED_MIB: u64 = 96;

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

fn register(target: &mut Rvhost, ceph: &Ceph) {
    target.rpc_ok(
        "bdev_rbd_register_cluster",
        json!({"name": "test", "config_file": ceph.conf(), "key_file": ceph.keyring()}),
    );
}

/// `rbd export` of `image` into `dir`.
fn export(ceph: &Ceph, image: &str, dir: &Path) -> PathBuf {
    let file = dir.join(format!("{image}.raw"));
    ceph.rbd(&["export", image, file.to_str().unwrap()]);
    file
}

fn assert_pattern(file: &Path, offset: u64, len: u64, seed: u64, what: &str) {
    if let Err(e) = host_verify(&blkcheck(), file, offset, len, seed) {
        panic!("{what}: the guest's data (seed {seed}) at {offset}+{len} is not in the image: {e}");
    }
}

fn assert_zeros(file: &Path, offset: u64, len: u64, what: &str) {
    let bytes = std::fs::read(file).unwrap();
    let range = &bytes[offset as usize..(offset + len) as usize];
    assert!(
        range.iter().all(|&b| b == 0),
        "{what}: {offset}+{len} is not zeros in the exported image"
    );
}

/// What `checks PREFIX DEV SEED` in tests/guest/rbd.sh left on the image.
fn assert_checks(file: &Path, seed: u64, what: &str) {
    let size = std::fs::metadata(file).unwrap().len();
    assert_eq!(
        size,
        RESIZED_MIB * MIB,
        "{what}: exported size (after the resize)"
    );
    // Written at the end before the resize, and at the new end after it.
    let size = IMAGE_MIB * MIB;
    assert_pattern(file, RESIZED_MIB * MIB - MIB, MIB, seed + 10, what);
    assert_pattern(file, MIB, MIB, seed, what);
    assert_zeros(file, 2 * MIB, MIB, what);
    assert_pattern(file, 3 * MIB, MIB, seed, what);
    assert_pattern(file, size - MIB, MIB, seed + 10, what);
    assert_pattern(file, 5 * MIB, MIB / 4, seed + 20, what);
    assert_zeros(file, 5 * MIB + MIB / 4, MIB / 2, what);
    // The checker can fail: another seed does not match.
    assert!(host_verify(&blkcheck(), file, MIB, MIB, seed + 1).is_err());
}

#[test]
fn rvhost_rbd_blk_scsi_shared_and_osd_failure() {
    init_test_logging();
    let ceph = Ceph::start("guest", 2);
    for image in ["blk", "scsi"] {
        ceph.rbd(&["create", "--size", &IMAGE_MIB.to_string(), image]);
    }

    let mut a = Rvhost::start().unwrap_or_else(|e| panic!("{e}"));
    register(&mut a, &ceph);
    a.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "Rbd0", "cluster_name": "test", "pool_name": "rbd", "rbd_name": "blk",
               "block_size": 512}),
    );
    a.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "Rbd1", "cluster_name": "test", "pool_name": "rbd", "rbd_name": "scsi",
               "block_size": 4096}),
    );
    a.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "blk.rbd", "dev_name": "Rbd0"}),
    );
    a.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "scsi.rbd"}));
    a.rpc_ok(
        "vhost_scsi_controller_add_target",
        json!({"ctrlr": "scsi.rbd", "scsi_target_num": 0, "bdev_name": "Rbd1"}),
    );
    // The second process, on the same image.
    let mut b = Rvhost::start().unwrap_or_else(|e| panic!("{e}"));
    register(&mut b, &ceph);
    b.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "Shared", "cluster_name": "test", "pool_name": "rbd", "rbd_name": "blk",
               "block_size": 512}),
    );
    b.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "blk.shared", "dev_name": "Shared"}),
    );
    let (blk, shared, scsi) = (
        a.wait_controller_socket("blk.rbd"),
        b.wait_controller_socket("blk.shared"),
        a.wait_controller_socket("scsi.rbd"),
    );

    // virtio-blk and virtio-scsi both.
    let mut modules = VIRTIO_BLK_MODULES.to_vec();
    modules.extend(
        VIRTIO_SCSI_MODULES
            .iter()
            .filter(|m| !VIRTIO_BLK_MODULES.contains(m)),
    );
    let config = GuestConfig::new("rbd", SCRIPT)
        .modules(&modules)
        .device(VhostUserDevice::Blk {
            socket: blk,
            num_queues: 1,
        })
        .device(VhostUserDevice::Blk {
            socket: shared,
            num_queues: 1,
        })
        .device(VhostUserDevice::Scsi {
            socket: scsi,
            num_queues: 1,
        })
        .env("FAULT_SECONDS", 30)
        .env("RESIZED_MIB", RESIZED_MIB)
        .binary(blkcheck());
    let dir = ceph.dir.clone();
    let mut fault: Option<std::thread::JoinHandle<Result<(), String>>> = None;
    let mut resized = false;
    let out = run_guest_with(&config, |key, value| {
        if key == "phase" && value == "resize" {
            for bdev in ["Rbd0", "Rbd1"] {
                a.rpc_ok(
                    "bdev_rbd_resize",
                    json!({"name": bdev, "new_size": RESIZED_MIB}),
                );
            }
            resized = true;
        }
        if key == "phase" && value == "fault" {
            let dir = dir.clone();
            fault = Some(std::thread::spawn(move || {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh");
                let run = |args: &[&str]| -> Result<(), String> {
                    let out = std::process::Command::new("bash")
                        .arg(&script)
                        .args(args)
                        .output()
                        .map_err(|e| e.to_string())?;
                    if out.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&out.stderr).into_owned())
                    }
                };
                let d = dir.to_str().unwrap_or_default();
                std::thread::sleep(Duration::from_secs(3));
                run(&["kill-osd", d, "1"])?;
                std::thread::sleep(Duration::from_secs(8));
                run(&["start-osd", d, "1"])
            }));
        }
    });
    let out = match out {
        Ok(out) => out,
        Err(err) => panic!("{err}\n---- rvhost A log ----\n{}", a.log()),
    };
    let Some(fault) = fault else {
        panic!(
            "the guest never reached the fault phase\n{}\n---- rvhost A log ----\n{}",
            out.diagnostics(),
            a.log()
        );
    };
    if let Err(e) = fault.join().expect("fault thread") {
        panic!("killing and restarting osd.1 failed: {e}");
    }
    assert!(a.is_running() && b.is_running(), "an rvhost exited");

    assert!(resized, "the guest never reached the resize phase");
    for p in ["blk", "shared", "scsi"] {
        out.assert_eq(
            &format!("resize_{p}_size"),
            &(RESIZED_MIB * MIB).to_string(),
        );
    }
    out.assert_all_ok("blk_resized_");
    out.assert_all_ok("scsi_resized_");
    for p in ["blk", "scsi"] {
        out.assert_eq(&format!("{p}_size"), &(IMAGE_MIB * MIB).to_string());
        out.assert_all_ok(&format!("{p}_io_"));
        out.assert_all_ok(&format!("{p}_discard"));
        out.assert_all_ok(&format!("{p}_zeroes"));
    }
    out.assert_eq("scsi_present", "yes");
    out.assert_all_ok("shared_");
    out.assert_eq("fault_flush", "ok");
    out.assert_eq("fault_errors", "0");
    out.assert_eq("fault_verify_bad", "0");
    let rounds = out.number("fault_rounds");
    assert!(
        rounds >= 2,
        "only {rounds} write/verify rounds during the fault"
    );
    eprintln!("fault phase: {rounds} rounds of 1 MiB write + verify, no guest I/O error");
    out.assert_eq("phase", "done");

    // Close the images (both processes), then read them back from the cluster.
    drop(b);
    drop(a);
    let dir = scratch_dir("rbd-export");
    let blk_file = export(&ceph, "blk", &dir);
    assert_checks(&blk_file, 61, "blk");
    assert_pattern(
        &blk_file,
        10 * MIB,
        MIB,
        91,
        "written through the second rvhost",
    );
    for j in rounds.saturating_sub(8)..rounds {
        assert_pattern(&blk_file, (16 + j % 8) * MIB, MIB, 200 + j, "fault round");
    }
    let scsi_file = export(&ceph, "scsi", &dir);
    assert_checks(&scsi_file, 62, "scsi");
    let _ = std::fs::remove_dir_all(&dir);
}
