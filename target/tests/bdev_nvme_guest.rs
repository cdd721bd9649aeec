//! The NVMe bdev's acceptance test: `NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh` boots a QEMU
//! guest (TCG, intel-iommu, an emulated NVMe controller on a raw file), runs this package's
//! `rvhost` in it with a `-c` config that attaches the controller (`bdev_nvme_attach_controller`,
//! a detach, and the attach again) and exports `Nvme0n1` as vhost-user-blk, drives it with
//! `rvhost-perf --verify` (4 KiB and 128 KiB random read/write), runs the guest-side tests of
//! `bdev_nvme_guest_ops.rs` (virtio-blk operations; RPC detach, re-attach and a PCI removal while
//! rvhost-perf drives I/O), and then checks on the host that
//! every block rvhost-perf stamped is in the raw image at its own address with its exact content
//! (`scripts/check-perf-image.py`). The script builds `rvhost-nvme` and `rvhost-perf` itself.

use std::path::{Path, PathBuf};
use std::process::Command;

const SKIP_STATUS: i32 = 77;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

#[test]
fn rvhost_on_an_nvme_controller_in_a_qemu_guest() {
    let root = workspace_root();
    let work = root.join("build").join("nvme-bdev-guest");
    std::fs::create_dir_all(&work).expect("create the guest work directory");
    let disk = work.join(format!("disk-{}.img", std::process::id()));
    let status = Command::new("bash")
        .arg(root.join("scripts").join("nvme-guest-test.sh"))
        .env("NVME_GUEST_MODE", "bdev")
        .env("NVME_GUEST_WORK", &work)
        .env("NVME_GUEST_DISK", &disk)
        .env("NVME_GUEST_RVHOST", env!("CARGO_BIN_EXE_rvhost"))
        .status()
        .expect("run scripts/nvme-guest-test.sh");
    if status.code() == Some(SKIP_STATUS) {
        eprintln!("SKIPPED rvhost_on_an_nvme_controller_in_a_qemu_guest: QEMU or a guest kernel cannot be installed here (see above)");
        return;
    }
    assert!(
        status.success(),
        "NVMe bdev guest test failed ({status}); serial log in {}",
        work.display()
    );
    let _ = std::fs::remove_file(&disk);
}
