//! An rbd bdev exported over vhost-user-blk to the in-process frontend (no guest), on a real
//! one-host Ceph cluster: written data reads back and is in the image (`rbd export`), flush,
//! discard and write-zeroes complete, and once the cluster stops answering (its only OSD killed)
//! a write fails with IOERR within a bound (`rados_osd_op_timeout`, 5 s here) while the reactor
//! keeps serving.

mod ceph_common;
mod vhost_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ceph_common::Ceph;
use rvhost_target::bdev::rbd::{ClusterConfig, RbdBdev};
use rvhost_target::bdev::Bdev;
use vhost_support::*;

#[test]
fn rbd_blk_io_then_unreachable_cluster_fails_with_ioerr() {
    let ceph = Ceph::start("vhost", 1);
    ceph.rbd(&["create", "--size", "16", "img"]);
    let config = ClusterConfig {
        options: vec![
            ("mon_host".into(), ceph.mon_host()),
            ("key".into(), ceph.admin_key()),
            ("rados_osd_op_timeout".into(), "5".into()),
            // Every write goes to the cluster (no write-back cache), so the last check sees it.
            ("rbd_cache".into(), "false".into()),
        ],
        ..ClusterConfig::default()
    };
    let bdev = match RbdBdev::open_with_config("Rbd0", [0xcb; 16], &config, "rbd", "img", 512) {
        Ok(b) => b,
        Err(e) => panic!("opening the image: {e}"),
    };
    assert_eq!(bdev.num_blocks(), 16 * 2048);
    let exported: Arc<dyn Bdev> = bdev;
    let (_dp, dir) = start("rbd", &[("vhost.rbd", exported, false)]);
    let mut driver = Driver::ready(
        &dir.join("vhost.rbd"),
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES,
    );

    let mut written = Vec::new();
    for round in 0..4u8 {
        let data = pattern(round, 8192);
        let sector = u64::from(round) * 100 + 7;
        assert_eq!(driver.write_blocks(0, sector, &data), S_OK, "write {round}");
        let (status, back) = driver.read_blocks(0, sector, data.len());
        assert_eq!(status, S_OK);
        assert_eq!(back, data, "round {round}");
        written.push((sector, data));
    }
    assert_eq!(driver.request(0, T_FLUSH, 0, None).0, S_OK, "flush");
    // Discard and write-zeroes: one segment {sector, num_sectors, flags}.
    for (kind, sector) in [(T_DISCARD, 2000u64), (T_WRITE_ZEROES, 3000)] {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        assert_eq!(driver.request(0, kind, 0, Some((&seg, false))).0, S_OK);
        let (status, back) = driver.read_blocks(0, sector, 16 * 512);
        assert_eq!(status, S_OK);
        assert!(back.iter().all(|&b| b == 0), "type {kind}: not zeros");
    }

    // What the frontend wrote is in the image, as another client reads it.
    let image = ceph.rbd(&["export", "img", "-"]);
    assert_eq!(image.len(), 16 << 20);
    for (sector, data) in &written {
        let at = (*sector * 512) as usize;
        assert_eq!(
            &image[at..at + data.len()],
            &data[..],
            "sector {sector} in the image"
        );
    }

    // The cluster stops answering: a write fails with IOERR within a bound, not a hang. (With
    // librbd's cache on, its default, a write may complete into the write-back cache, as in
    // QEMU, and the flush that must make it durable fails instead.)
    ceph.script("kill-osd", &["0"]);
    let started = Instant::now();
    let status = driver.write_blocks(0, 50, &pattern(9, 4096));
    let took = started.elapsed();
    assert_eq!(status, S_IOERR, "a write to an unreachable cluster");
    assert!(took < Duration::from_secs(10), "the write took {took:?}");
    assert!(
        took >= Duration::from_secs(4),
        "the write failed before the time-out ({took:?})"
    );
}
