//! The driver's acceptance test: a real QEMU guest with an emulated intel-iommu and NVMe
//! controller, the controller bound to vfio-pci, and `rvhost-nvme` (this package's binary) run
//! inside it by `scripts/nvme-guest-test.sh`. Afterwards the backing file is checked here, on the
//! host, so that what the guest read back is known to have reached the medium.

use std::path::{Path, PathBuf};
use std::process::Command;

use rvhost_nvme::pattern::{check_chunk, SelftestLayout};

const BLOCK_SIZE: usize = 512;
const SKIP_STATUS: i32 = 77;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

#[test]
fn nvme_controller_in_a_qemu_guest() {
    let root = workspace_root();
    let work = root.join("build").join("nvme-guest");
    std::fs::create_dir_all(&work).expect("create the guest work directory");
    let disk = work.join(format!("disk-{}.img", std::process::id()));
    let status = Command::new("bash")
        .arg(root.join("scripts").join("nvme-guest-test.sh"))
        .env("NVME_GUEST_WORK", &work)
        .env("NVME_GUEST_DISK", &disk)
        .env("NVME_GUEST_BIN", env!("CARGO_BIN_EXE_rvhost-nvme"))
        .status()
        .expect("run scripts/nvme-guest-test.sh");
    if status.code() == Some(SKIP_STATUS) {
        eprintln!();
        eprintln!("################################################################");
        eprintln!("# SKIPPED nvme_controller_in_a_qemu_guest: QEMU or a guest     #");
        eprintln!("# kernel cannot be installed on this machine (see above).      #");
        eprintln!("################################################################");
        eprintln!();
        return;
    }
    assert!(
        status.success(),
        "guest test failed ({status}); serial log in {}",
        work.display()
    );

    let image = std::fs::read(&disk).expect("read the NVMe backing file");
    let layout = SelftestLayout::new(image.len() as u64).expect("image large enough");
    let chunk_len = rvhost_nvme::pattern::CHUNK_BYTES as usize;
    for (chunk, bytes) in image.chunks_exact(chunk_len).enumerate() {
        let chunk = chunk as u64;
        let expected = layout.expected(chunk);
        if let Err(lba) = check_chunk(chunk, BLOCK_SIZE, expected, bytes) {
            panic!("backing file: LBA {lba} (chunk {chunk}) does not hold {expected:?}");
        }
    }
    let _ = std::fs::remove_file(&disk);
}
