//! Runs *inside* the NVMe guest of `NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh` (hence
//! `#[ignore]` on the host): a virtio-blk driver over vhost-user (`vhost_support`) sends requests
//! to `rvhost`, which serves `Nvme0n1` on the emulated NVMe controller. Covered: the reported
//! capacity and block size; a 256 KiB write, which the bdev splits over two bounce slots, and its
//! read-back; FLUSH; WRITE ZEROES over part of that data; DISCARD (DSM deallocate); and a read
//! past the end, which must fail. The host then checks the final bytes in the raw image
//! (`scripts/check-perf-image.py --ops`).

mod vhost_support;

use std::path::PathBuf;

use vhost_support::*;

/// Sectors of the guest's 32 MiB drive.
const CAPACITY_SECTORS: u64 = 32 * 2048;
/// The region written: the last MiB of the drive (after the rvhost-perf runs, so it wins).
const REGION_SECTOR: u64 = 31 * 2048;
const REGION_BYTES: usize = 256 * 1024;
/// Zeroed part: 64 KiB, 64 KiB into the region.
const ZERO_SECTOR: u64 = REGION_SECTOR + 128;
const ZERO_SECTORS: u32 = 128;
/// Discarded part: 512 KiB from 31.5 MiB.
const DISCARD_SECTOR: u64 = 31 * 2048 + 1024;
const DISCARD_SECTORS: u32 = 1024;

/// Each 512-byte sector starts with its own sector number, so misplaced data is caught; the
/// rest is a byte pattern (the same formula is in `scripts/check-perf-image.py`).
fn region_pattern(first_sector: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    for (i, sector) in data.chunks_mut(512).enumerate() {
        let number = first_sector + i as u64;
        sector[..8].copy_from_slice(&number.to_le_bytes());
        for (j, byte) in sector.iter_mut().enumerate().skip(8) {
            *byte = (number as u8).wrapping_mul(7) ^ (j as u8).wrapping_mul(31) ^ 0x5a;
        }
    }
    data
}

fn segment(sector: u64, sectors: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg
}

#[test]
#[ignore = "runs in the NVMe guest: NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh"]
fn nvme_bdev_ops_in_the_guest() {
    let socket = PathBuf::from(
        std::env::var_os("RVHOST_NVME_GUEST_SOCKET").expect("RVHOST_NVME_GUEST_SOCKET is set"),
    );
    let wanted = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    let mut driver = Driver::ready(&socket, wanted);
    assert_eq!(
        driver.features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES,
        "QEMU's NVMe controller supports DSM and WRITE ZEROES, so the bdev offers both"
    );
    let config = driver.config();
    let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
    let blk_size = u32::from_le_bytes(config[20..24].try_into().unwrap());
    assert_eq!(capacity, CAPACITY_SECTORS);
    assert_eq!(blk_size, 512);

    let data = region_pattern(REGION_SECTOR, REGION_BYTES);
    assert_eq!(driver.write_blocks(0, REGION_SECTOR, &data), S_OK);
    let (status, back) = driver.read_blocks(0, REGION_SECTOR, REGION_BYTES);
    assert_eq!(status, S_OK);
    assert!(back == data, "256 KiB read-back differs");

    assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK);

    let zero = segment(ZERO_SECTOR, ZERO_SECTORS);
    assert_eq!(
        driver.request(0, T_WRITE_ZEROES, 0, Some((&zero, false))).0,
        S_OK
    );
    let (status, back) = driver.read_blocks(0, REGION_SECTOR, REGION_BYTES);
    assert_eq!(status, S_OK);
    let zero_from = ((ZERO_SECTOR - REGION_SECTOR) * 512) as usize;
    let zero_to = zero_from + ZERO_SECTORS as usize * 512;
    assert!(
        back[..zero_from] == data[..zero_from],
        "data before the zeroes"
    );
    assert!(back[zero_from..zero_to].iter().all(|b| *b == 0), "zeroes");
    assert!(back[zero_to..] == data[zero_to..], "data after the zeroes");

    let discard = segment(DISCARD_SECTOR, DISCARD_SECTORS);
    assert_eq!(
        driver.request(0, T_DISCARD, 0, Some((&discard, false))).0,
        S_OK
    );
    assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK);

    // Past the end: refused, and the device keeps working.
    let (status, _) = driver.read_blocks(0, CAPACITY_SECTORS, 4096);
    assert_eq!(status, S_IOERR);
    let (status, back) = driver.read_blocks(0, REGION_SECTOR, 4096);
    assert_eq!(status, S_OK);
    assert!(back == data[..4096], "read after the refused request");
    eprintln!("NVME-BDEV-OPS PASS");
}
