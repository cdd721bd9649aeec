//! An rbd bdev exported over vhost-user-blk to the in-process frontend (no guest), on a real
//! one-host Ceph cluster: written data reads back and is in the image (`rbd export`), flush,
//! discard and write-zeroes complete, and once the cluster stops answering (its only OSD killed)
//! a write fails with IOERR within a bound (`rados_osd_op_timeout`, 5 s here) while the reactor
//! keeps serving. While that write is in flight the reactor waits with the driver's kicks on
//! (its completion wakes the reactor), until a request in flight on a delay bdev over the same
//! image (whose completions nothing wakes) keeps it polling with them off.

mod ceph_common;
mod vhost_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ceph_common::Ceph;
use rvhost_target::bdev::delay::{DelayBdev, Latencies};
use rvhost_target::bdev::rbd::{ClusterConfig, RbdBdev};
use rvhost_target::bdev::Bdev;
use vhost_support::*;

/// `VRING_USED_F_NO_NOTIFY`: the device asks the driver not to kick.
const NO_NOTIFY: u16 = 1;

/// Posts a 4 KiB write at `sector` on queue 0 without waiting for it; returns its status address.
fn post_write(driver: &mut Driver, sector: u64, seed: u8) -> u64 {
    let q = &driver.queues[0];
    let (hdr, buf, status) = (q.header_addr(), q.buffer_addr(), q.status_addr());
    driver.ram.write(buf, &pattern(seed, 4096));
    driver.post_blk_at(
        0,
        BlkRequestAt {
            head: 0,
            req_type: T_OUT,
            sector,
            hdr,
            buf,
            len: 4096,
            status,
        },
    );
    status
}

/// For each driver, the share of `window` during which queue 0 had kicks on (sampled every
/// 100 µs).
fn kicks_on(drivers: &[&Driver], window: Duration) -> Vec<f64> {
    let mut on = vec![0u32; drivers.len()];
    let mut samples = 0u32;
    let end = Instant::now() + window;
    while Instant::now() < end {
        for (d, count) in drivers.iter().zip(on.iter_mut()) {
            if d.ram.load_u16(d.queues[0].used) & NO_NOTIFY == 0 {
                *count += 1;
            }
        }
        samples += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    on.iter()
        .map(|&n| f64::from(n) / f64::from(samples.max(1)))
        .collect()
}

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
    let delayed: Arc<dyn Bdev> = DelayBdev::new(
        "Delay0",
        [0xdc; 16],
        Arc::clone(&exported),
        Latencies {
            avg_read_us: 0,
            p99_read_us: 0,
            avg_write_us: 0,
            p99_write_us: 0,
        },
    );
    // One reactor (core 0) polls both devices.
    let (_dp, dir) = start(
        "rbd",
        &[
            ("vhost.rbd", exported, false),
            ("vhost.delay", delayed, false),
        ],
    );
    let mut driver = Driver::ready(
        &dir.join("vhost.rbd"),
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES,
    );
    let mut delay_driver = Driver::ready(&dir.join("vhost.delay"), VIRTIO_F_VERSION_1);
    assert_eq!(delay_driver.write_blocks(0, 900, &pattern(7, 4096)), S_OK);

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
    let status = post_write(&mut driver, 50, 9);

    // Meanwhile the reactor blocks with the driver's kicks on: what it has in flight wakes it
    // when it completes, so a request the driver adds meanwhile would be kicked. (Before it
    // waited on its waker alone with kicks off.) The write is still in flight after the
    // window, so the kicks were not those of an idle device.
    std::thread::sleep(Duration::from_millis(50));
    let on = kicks_on(&[&driver], Duration::from_millis(700))[0];
    assert_eq!(
        driver.ram.read(status, 1)[0],
        0xff,
        "the write was in flight"
    );
    assert!(
        on > 0.5,
        "kicks on {:.0} % of the rbd write's time",
        on * 100.0
    );

    // Negative control: a write in flight on the delay bdev (its completions are found by
    // polling, whatever is below) keeps the reactor polling: kicks off on both devices.
    let delayed_status = post_write(&mut delay_driver, 60, 10);
    std::thread::sleep(Duration::from_millis(50));
    let on = kicks_on(&[&driver, &delay_driver], Duration::from_millis(500));
    assert_eq!(
        driver.ram.read(status, 1)[0],
        0xff,
        "the rbd write was in flight"
    );
    assert_eq!(
        delay_driver.ram.read(delayed_status, 1)[0],
        0xff,
        "the delayed write was in flight"
    );
    assert!(
        on[0] < 0.1 && on[1] < 0.1,
        "kicks on {:.0} % / {:.0} % of the time with a delay bdev's write in flight",
        on[0] * 100.0,
        on[1] * 100.0
    );

    driver.wait_used(0);
    let took = started.elapsed();
    assert_eq!(
        driver.ram.read(status, 1)[0],
        S_IOERR,
        "a write to an unreachable cluster"
    );
    assert!(took < Duration::from_secs(10), "the write took {took:?}");
    assert!(
        took >= Duration::from_secs(4),
        "the write failed before the time-out ({took:?})"
    );
    delay_driver.wait_used(0);
    assert_eq!(delay_driver.ram.read(delayed_status, 1)[0], S_IOERR);
}
