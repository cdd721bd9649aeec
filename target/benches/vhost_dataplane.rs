//! Requests per second through the whole data plane: a host-side vhost-user frontend (the `vhost`
//! crate's `Frontend` with shared memory, as in the integration tests) posts batches of 4 KiB
//! virtio-blk requests to a busy-polling reactor serving a RAM bdev and spins until they are used.
//!
//! Run: `cargo bench -p rvhost-target --bench vhost_dataplane`. The reactor is pinned to core 0;
//! pin the bench itself elsewhere (`taskset -c 1`) for stable figures.
//!
//! Measured 2026-11-22 on the 2-core CI VM (shared with other builds, so upper bounds on cost) with
//! `CARGO_TARGET_DIR=build/dataplane taskset -c 1 cargo bench -p rvhost-target --bench
//! vhost_dataplane`; each figure includes the host-side frontend writing descriptors through
//! vm-memory and spinning on `used.idx`, and the RAM bdev's copy:
//!
//! | batch | 4 KiB read | 4 KiB write |
//! |---|---|---|
//! | 1 request  | 2.60 µs (385 K req/s) | 1.72 µs (581 K req/s) |
//! | 16 requests | 34.1 µs (470 K req/s) | 20.2 µs (791 K req/s) |

#[path = "../tests/vhost_support/mod.rs"]
#[allow(dead_code, clippy::all)]
mod vhost_support;

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rvhost_target::dataplane::{Dataplane, DataplaneOptions};
use rvhost_target::ops::{BlkControllerSpec, ControllerOps};
use rvhost_target::reactor::IdlePolicy;
use vhost_support::*;

/// Posts `depth` requests of `kind` (each 3 descriptors: header, 4 KiB data, status) and waits for
/// all of them.
fn batch(d: &mut Driver, kind: u32, depth: u16) {
    let q = &d.queues[0];
    let (desc, avail, used, data) = (q.desc, q.avail, q.used, q.data);
    let start = q.avail_idx;
    for i in 0..depth {
        let base = data + u64::from(i) * 0x2000;
        let (hdr, status, buf) = (base, base + 0x20, base + 0x1000);
        let head = i * 3;
        let write = if kind == T_IN { F_WRITE } else { 0 };
        for (k, desc_entry) in [
            Desc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: head + 1,
            },
            Desc {
                addr: buf,
                len: 4096,
                flags: F_NEXT | write,
                next: head + 2,
            },
            Desc {
                addr: status,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ]
        .iter()
        .enumerate()
        {
            d.ram.write(
                desc + 16 * (u64::from(head) + k as u64),
                &desc_entry.bytes(),
            );
        }
        let slot = u64::from(start.wrapping_add(i) % QUEUE_SIZE);
        d.ram.store_u16(avail + 4 + 2 * slot, head);
    }
    fence(Ordering::SeqCst);
    let end = start.wrapping_add(depth);
    d.ram.store_u16(avail + 2, end);
    d.queues[0].avail_idx = end;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.ram.load_u16(used + 2) != end {
        assert!(Instant::now() < deadline, "requests did not complete");
        std::hint::spin_loop();
    }
    d.queues[0].used_seen = end;
}

fn prepare_headers(d: &Driver, kind: u32, depth: u16) {
    let data = d.queues[0].data;
    for i in 0..depth {
        let base = data + u64::from(i) * 0x2000;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes());
        d.ram.write(base, &hdr);
    }
}

fn dataplane(c: &mut Criterion) {
    let dir = socket_dir("bench");
    let dp = Dataplane::start_with(
        0x1,
        dir.clone(),
        DataplaneOptions {
            idle: IdlePolicy::BusyPoll,
            ..DataplaneOptions::default()
        },
    )
    .expect("data plane");
    let bdev = malloc_bdev("Bench0", 1 << 16, 512);
    dp.create_blk_controller(BlkControllerSpec {
        name: "bench.0".into(),
        bdev: Arc::clone(&bdev),
        cpumask: None,
        readonly: false,
    })
    .expect("controller");
    let mut d = Driver::ready(
        &dir.join("bench.0"),
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX,
    );

    let mut group = c.benchmark_group("vhost_blk_4k");
    for (name, kind) in [("read", T_IN), ("write", T_OUT)] {
        for depth in [1u16, 16] {
            prepare_headers(&d, kind, depth);
            group.throughput(Throughput::Elements(u64::from(depth)));
            group.bench_with_input(BenchmarkId::new(name, depth), &depth, |b, &depth| {
                b.iter(|| batch(&mut d, kind, depth));
            });
        }
    }
    group.finish();
    drop(d);
    dp.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = dataplane
}
criterion_main!(benches);
