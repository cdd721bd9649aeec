//! File bdevs behind vhost-scsi, under a real Linux guest (QEMU TCG): one controller with three
//! LUNs, target 0 a file through io_uring (`bdev_uring_create`), target 1 a file through Linux AIO
//! (`bdev_aio_create --fallocate`, 4 KiB blocks), target 2 a file on a 1 MiB tmpfs. The guest
//! writes patterns, flushes and UNMAPs a MiB on targets 0 and 1; the host then checks the bytes
//! *in the files* (`blkcheck verify`, `O_DIRECT`) and that each UNMAP left a hole (`SEEK_HOLE`).
//! Writing 4 MiB to target 2 must fail in the guest with an I/O error while rvhost keeps serving
//! the other LUNs.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use rvhost_tests::files::{host_verify, next_hole, scratch_dir, sparse_file, TinyTmpfs};
use rvhost_tests::{init_test_logging, GuestConfig, Rvhost, VhostUserDevice, VIRTIO_SCSI_MODULES};

const SCSI_FILE: &str = include_str!("../guest/scsi_file.sh");
const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 32 * MIB;

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

/// What the guest script wrote to target `t`'s file, checked on the host.
fn assert_file_holds_guest_data(file: &Path, t: u64) {
    let seed = t + 61;
    for (offset, len, seed) in [
        (MIB, MIB, seed),
        (3 * MIB, MIB, seed),
        (DISK_BYTES - MIB, MIB, t + 71),
    ] {
        if let Err(e) = host_verify(&blkcheck(), file, offset, len, seed) {
            panic!(
                "target {t}: guest data (seed {seed}) at {offset} is not in {}: {e}",
                file.display()
            );
        }
    }
    // The checker can fail: another seed does not match.
    assert!(host_verify(&blkcheck(), file, MIB, MIB, seed + 1).is_err());
    // The UNMAP of 2..3 MiB punched a hole there; 1..2 MiB is data.
    assert_eq!(
        next_hole(file, MIB),
        2 * MIB,
        "target {t}: no hole where the guest discarded ({})",
        file.display()
    );
    assert!(
        next_hole(file, 3 * MIB) > 3 * MIB,
        "target {t}: the discard reached past its range"
    );
}

fn bdev_stats(target: &mut Rvhost, name: &str, module: &str) -> Value {
    let info = target.rpc_ok("bdev_get_bdevs", json!({"name": name}));
    info[0]["driver_specific"][module].clone()
}

#[test]
fn rvhost_scsi_luns_on_uring_and_aio_files() {
    init_test_logging();
    let dir = scratch_dir("scsi");
    let uring_file = dir.join("uring.img");
    let aio_file = dir.join("aio.img");
    sparse_file(&uring_file, DISK_BYTES);
    sparse_file(&aio_file, DISK_BYTES);
    let tmpfs = TinyTmpfs::mount(dir.join("full"), "1M");
    let full_file = tmpfs.dir().join("disk.img");
    sparse_file(&full_file, 16 * MIB);

    let mut target = match Rvhost::start() {
        Ok(t) => t,
        Err(err) => panic!("{err}"),
    };
    target.rpc_ok(
        "bdev_uring_create",
        json!({"name": "Uring0", "filename": uring_file}),
    );
    target.rpc_ok(
        "bdev_aio_create",
        json!({"name": "Aio0", "filename": aio_file, "block_size": 4096, "fallocate": true}),
    );
    target.rpc_ok(
        "bdev_uring_create",
        json!({"name": "Full0", "filename": full_file}),
    );
    target.rpc_ok(
        "vhost_create_scsi_controller",
        json!({"ctrlr": "scsi.file", "cpumask": "0x1"}),
    );
    for (t, bdev) in [(0, "Uring0"), (1, "Aio0"), (2, "Full0")] {
        let got = target.rpc_ok(
            "vhost_scsi_controller_add_target",
            json!({"ctrlr": "scsi.file", "scsi_target_num": t, "bdev_name": bdev}),
        );
        assert_eq!(got, json!(t));
    }
    let socket = target.wait_controller_socket("scsi.file");

    let config = GuestConfig::new("file-scsi", SCSI_FILE)
        .modules(VIRTIO_SCSI_MODULES)
        .device(VhostUserDevice::Scsi {
            socket,
            num_queues: 1,
        })
        .binary(blkcheck());
    let out = target.run_guest(&config);

    for (t, lbs) in [(0, 512), (1, 4096)] {
        out.assert_eq(&format!("t{t}_present"), "yes");
        out.assert_eq(&format!("t{t}_lbs"), &lbs.to_string());
        out.assert_eq(&format!("t{t}_size"), &DISK_BYTES.to_string());
        assert!(
            out.number(&format!("t{t}_dmax")) > 0,
            "target {t} offers no discard\n{}",
            out.diagnostics()
        );
        out.assert_all_ok(&format!("t{t}_io_"));
        out.assert_all_ok(&format!("t{t}_discard"));
    }
    assert_file_holds_guest_data(&uring_file, 0);
    assert_file_holds_guest_data(&aio_file, 1);

    out.assert_eq("t2_present", "yes");
    let write = out.get("enospc_write").unwrap_or_default().to_owned();
    assert!(
        write.starts_with("failed(") && write.contains("io-error"),
        "writing 4 MiB to a 1 MiB filesystem did not fail with an I/O error: {write:?}\n{}",
        out.diagnostics()
    );
    out.assert_eq("enospc_read_back", "ok");
    out.assert_all_ok("after_enospc_");
    out.assert_eq("script_exit", "0");
    if let Err(e) = host_verify(&blkcheck(), &uring_file, 8 * MIB, MIB, 81) {
        panic!("the write after ENOSPC is not in the file: {e}");
    }

    assert!(
        bdev_stats(&mut target, "Full0", "uring")["io_errors"].as_u64() > Some(0),
        "the ENOSPC was not counted"
    );
    for (name, module) in [("Uring0", "uring"), ("Aio0", "aio")] {
        let stats = bdev_stats(&mut target, name, module);
        assert_eq!(stats["io_errors"], 0, "{name}: {stats}");
        // The guest's O_DIRECT buffers are whole, aligned pages: the file takes them as they are.
        assert!(stats["zero_copy_ios"].as_u64() > Some(0), "{name}: {stats}");
    }
    assert!(target.is_running(), "rvhost exited after the checks");
    drop(target);
    drop(tmpfs);
    let _ = std::fs::remove_dir_all(&dir);
}
