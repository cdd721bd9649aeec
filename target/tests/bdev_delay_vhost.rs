//! A delay bdev exported over vhost-user-blk to the in-process frontend (no guest): data written
//! through it reads back intact, and each request takes at least its configured latency (an
//! assertion in the safe direction only: a loaded machine may add time, never remove it).

mod vhost_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rvhost_target::bdev::delay::{DelayBdev, Latencies, LatencyType};
use rvhost_target::bdev::Bdev;
use vhost_support::*;

const S_OK: u8 = 0;

#[test]
fn delayed_blk_keeps_data_and_takes_its_latency() {
    let base = malloc_bdev("Malloc0", 2048, 512);
    let read = Duration::from_millis(20);
    let write = Duration::from_millis(35);
    let latencies = Latencies {
        avg_read_us: read.as_micros() as u64,
        p99_read_us: read.as_micros() as u64,
        avg_write_us: write.as_micros() as u64,
        p99_write_us: write.as_micros() as u64,
    };
    let delay = DelayBdev::new("Delay0", [0xde; 16], base, latencies);
    let exported: Arc<dyn Bdev> = delay.clone();
    let (_dp, dir) = start("delay", &[("vhost.delay", exported, false)]);
    let mut driver = Driver::ready(&dir.join("vhost.delay"), VIRTIO_F_VERSION_1);

    for round in 0..4u8 {
        let data = pattern(round, 4096);
        let sector = u64::from(round) * 64 + 3;
        let start = Instant::now();
        assert_eq!(driver.write_blocks(0, sector, &data), S_OK);
        let took = start.elapsed();
        assert!(
            took >= write,
            "write {round} took {took:?}, less than {write:?}"
        );

        let start = Instant::now();
        let (status, back) = driver.read_blocks(0, sector, data.len());
        let took = start.elapsed();
        assert_eq!(status, S_OK);
        assert_eq!(back, data, "round {round}");
        assert!(
            took >= read,
            "read {round} took {took:?}, less than {read:?}"
        );
    }

    // A latency changed at run time applies to the next request.
    let slower = Duration::from_millis(60);
    for which in [LatencyType::AvgRead, LatencyType::P99Read] {
        delay.set_latency_us(which, slower.as_micros() as u64);
    }
    let start = Instant::now();
    let (status, back) = driver.read_blocks(0, 3, 4096);
    let took = start.elapsed();
    assert_eq!(status, S_OK);
    assert_eq!(back, pattern(0, 4096));
    assert!(took >= slower, "read took {took:?}, less than {slower:?}");
}

/// A request's descriptors at table slots `first..first + 3`: header, data, status.
fn chain(
    first: u16,
    header: u64,
    buffer: u64,
    len: u32,
    device_writes: bool,
    status: u64,
) -> [Desc; 3] {
    [
        Desc {
            addr: header,
            len: 16,
            flags: F_NEXT,
            next: first + 1,
        },
        Desc {
            addr: buffer,
            len,
            flags: F_NEXT | if device_writes { F_WRITE } else { 0 },
            next: first + 2,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ]
}

fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

#[test]
fn a_slow_read_completes_after_a_later_fast_write() {
    // Reads wait 150 ms, writes nothing: the guest sees the write's head used first although it
    // made the read available first (what issue 13's restart tests need).
    let base = malloc_bdev("Malloc0", 2048, 512);
    let latencies = Latencies {
        avg_read_us: 150_000,
        p99_read_us: 150_000,
        avg_write_us: 0,
        p99_write_us: 0,
    };
    let delay: Arc<dyn Bdev> = DelayBdev::new("Delay0", [0xdf; 16], base, latencies);
    let (_dp, dir) = start("delay-order", &[("vhost.order", delay, false)]);
    let mut driver = Driver::ready(&dir.join("vhost.order"), VIRTIO_F_VERSION_1);
    assert_eq!(driver.write_blocks(0, 0, &pattern(7, 512)), S_OK);

    let window = driver.queues[0].data;
    let (read_hdr, read_status, read_buf) = (window, window + 0x100, window + 0x1000);
    let (write_hdr, write_status, write_buf) = (window + 0x200, window + 0x300, window + 0x2000);
    driver.ram.write(read_hdr, &header(T_IN, 0));
    driver.ram.write(read_status, &[0xff]);
    driver.ram.write(write_hdr, &header(T_OUT, 8));
    driver.ram.write(write_buf, &pattern(9, 512));
    driver.ram.write(write_status, &[0xff]);
    let mut descs = Vec::new();
    descs.extend(chain(0, read_hdr, read_buf, 512, true, read_status));
    descs.extend(chain(3, write_hdr, write_buf, 512, false, write_status));

    let start = Instant::now();
    driver.post_head(0, &descs, 0);
    driver.post_head(0, &descs, 3);
    let (first, _) = driver.wait_used(0);
    let (second, _) = driver.wait_used(0);
    assert_eq!((first, second), (3, 0), "the later write completes first");
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(driver.ram.read(read_status, 1)[0], S_OK);
    assert_eq!(driver.ram.read(write_status, 1)[0], S_OK);
    assert_eq!(driver.ram.read(read_buf, 512), pattern(7, 512));
    let (status, back) = driver.read_blocks(0, 8, 512);
    assert_eq!((status, back), (S_OK, pattern(9, 512)));
}
