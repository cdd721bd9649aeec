//! File bdevs under a real Linux guest (QEMU TCG): a vhost-user-blk disk backed by a file through
//! io_uring (`bdev_uring_create`) or Linux AIO (`bdev_aio_create`). The guest writes patterns and
//! flushes; afterwards the host checks the bytes *in the file* with the same checker (`blkcheck
//! verify` on the file, `O_DIRECT`), so data that only reached a cache or went nowhere fails.
//! A file on a full 1 MiB tmpfs must show up in the guest as an I/O error, with rvhost still up.

use std::path::PathBuf;

use serde_json::json;

use rvhost_tests::files::{host_verify, scratch_dir, sparse_file, TinyTmpfs};
use rvhost_tests::{
    init_test_logging, run_guest, GuestConfig, GuestOutput, Rvhost, VhostUserDevice,
};

const BLK_CHECKS: &str = include_str!("../guest/blk_checks.sh");
const BLK_PERSIST: &str = include_str!("../guest/blk_persist.sh");
const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 64 * MIB;

/// Fills a full filesystem: a failing write must come back as an error, and the disk must still
/// read what fitted.
const ENOSPC_SCRIPT: &str = r#". /lib/guest.sh
if ! wait_for /sys/block/vda 120; then
    result disk_present no
    exit 1
fi
result disk_present yes
wait_for /dev/vda 30
MIB=1048576
check enospc_write blkcheck write /dev/vda 0 $((4 * MIB)) 5 65536
check enospc_read_back blkcheck verify /dev/vda 0 65536 5 65536
check enospc_flush blkcheck flush /dev/vda
"#;

fn blkcheck() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkcheck"))
}

fn start() -> Rvhost {
    match Rvhost::start() {
        Ok(rvhost) => rvhost,
        Err(err) => panic!("{err}"),
    }
}

fn run(config: GuestConfig) -> GuestOutput {
    match run_guest(&config.binary(blkcheck())) {
        Ok(output) => output,
        Err(err) => panic!("{err}"),
    }
}

/// Creates the bdev with `method` and a vhost-blk controller on it; returns the socket.
fn file_controller(
    target: &mut Rvhost,
    method: &str,
    params: serde_json::Value,
    controller: &str,
) -> PathBuf {
    let bdev = params["name"].as_str().unwrap_or_default().to_owned();
    if let Err(err) = target.rpc(method, params) {
        panic!("{err}\n---- rvhost log ----\n{}", target.log());
    }
    if let Err(err) = target.rpc(
        "vhost_create_blk_controller",
        json!({"ctrlr": controller, "dev_name": bdev}),
    ) {
        panic!("{err}\n---- rvhost log ----\n{}", target.log());
    }
    target.wait_controller_socket(controller)
}

fn assert_alive(target: &mut Rvhost) {
    assert!(
        target.is_running(),
        "rvhost exited\n---- rvhost log ----\n{}",
        target.log()
    );
}

fn bdev_info(target: &mut Rvhost, name: &str) -> serde_json::Value {
    match target.rpc("bdev_get_bdevs", json!({"name": name})) {
        Ok(v) => v[0].clone(),
        Err(err) => panic!("{err}"),
    }
}

/// The guest's writes land in the file byte for byte; discard and write-zeroes work from the
/// guest (the common blk checks), and the data written before is still there on the host.
fn guest_data_lands_in_file(engine: &str, method: &str, extra: serde_json::Value) {
    init_test_logging();
    let dir = scratch_dir(engine);
    let file = dir.join("disk.img");
    sparse_file(&file, DISK_BYTES);
    let mut target = start();
    let name = format!("{engine}0");
    let mut params = json!({"name": name, "filename": file});
    if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    let socket = file_controller(&mut target, method, params, &format!("vhost.{engine}"));
    let blk = VhostUserDevice::Blk {
        socket: socket.clone(),
        num_queues: 1,
    };
    let out = run(
        GuestConfig::new(&format!("file-{engine}-persist"), BLK_PERSIST)
            .device(blk.clone())
            .env("MODE", "write verify"),
    );
    out.assert_all_ok("persist_");
    assert_alive(&mut target);
    // The bytes are in the file on the host.
    if let Err(e) = host_verify(&blkcheck(), &file, MIB, 3 * MIB, 77) {
        panic!("guest data (seed 77) is not in the file: {e}");
    }
    if let Err(e) = host_verify(&blkcheck(), &file, DISK_BYTES - MIB, MIB, 78) {
        panic!("guest data (seed 78) is not in the file: {e}");
    }
    // The check can fail: a different seed does not match.
    assert!(host_verify(&blkcheck(), &file, MIB, MIB, 79).is_err());

    // The full set of blk checks (pattern I/O, flush, discard, write zeroes, reset).
    let out = run(
        GuestConfig::new(&format!("file-{engine}-checks"), BLK_CHECKS)
            .device(blk)
            .env("DISCARD", 1)
            .env("ZEROES", 1)
            .env("RESET", 1),
    );
    out.assert_eq("disk_present", "yes");
    out.assert_eq("size_bytes", &DISK_BYTES.to_string());
    out.assert_all_ok("io_");
    out.assert_eq("flush", "ok");
    out.assert_all_ok("discard_");
    out.assert_all_ok("zeroes_");
    out.assert_eq("script_exit", "0");
    assert_alive(&mut target);
    let info = bdev_info(&mut target, &name);
    assert_eq!(info["driver_specific"][engine]["io_errors"], 0, "{info}");
    // The guest's O_DIRECT buffers are whole, aligned pages: the file takes them as they are.
    assert!(
        info["driver_specific"][engine]["zero_copy_ios"].as_u64() > Some(0),
        "{info}"
    );
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rvhost_uring_file_guest_data_lands_in_file() {
    guest_data_lands_in_file("uring", "bdev_uring_create", json!({}));
}

#[test]
fn rvhost_aio_file_guest_data_lands_in_file() {
    guest_data_lands_in_file("aio", "bdev_aio_create", json!({"fallocate": true}));
}

#[test]
fn rvhost_uring_file_enospc_is_an_io_error_in_the_guest() {
    init_test_logging();
    let dir = scratch_dir("enospc");
    let fs = TinyTmpfs::mount(dir.join("mnt"), "1M");
    let file = fs.dir().join("disk.img");
    sparse_file(&file, 16 * MIB);
    let mut target = start();
    let socket = file_controller(
        &mut target,
        "bdev_uring_create",
        json!({"name": "Full0", "filename": file}),
        "vhost.full",
    );
    let out = run(
        GuestConfig::new("file-enospc", ENOSPC_SCRIPT).device(VhostUserDevice::Blk {
            socket,
            num_queues: 1,
        }),
    );
    out.assert_eq("disk_present", "yes");
    let write = out.get("enospc_write").unwrap_or_default().to_owned();
    assert!(
        write.starts_with("failed(") && write.contains("io-error"),
        "writing 4 MiB to a 1 MiB filesystem did not fail with an I/O error: {write:?}\n{}",
        out.diagnostics()
    );
    out.assert_eq("enospc_read_back", "ok");
    assert_alive(&mut target);
    let info = bdev_info(&mut target, "Full0");
    assert!(
        info["driver_specific"]["uring"]["io_errors"].as_u64() > Some(0),
        "{info}"
    );
    drop(target);
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}
