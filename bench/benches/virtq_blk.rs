//! The core's hot path per virtio-blk request: pop a head from the available ring, walk its
//! 3-descriptor chain (header, 4 KiB data, status), decode it as a `BlkRequest`; and the used-ring
//! side: push used elements and publish `used.idx`, then decide whether to notify.
//!
//! Guest memory is `rvhost_core::mem::ByteMemory` (a `Cell<u8>` slice copied byte by byte), so the
//! figures include its copy cost; the Linux target's mmap-backed memory copies with `memcpy`.
//!
//! Run: `cargo bench -p rvhost-bench --bench virtq_blk`

use std::hint::black_box;
use std::sync::atomic::Ordering;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvhost_core::blk::{BlkLimits, BlkReqHeaderRepr, BlkRequest, RangeLimits};
use rvhost_core::mem::{ByteMemory, GuestMemory};
use rvhost_core::virtio::ring::VirtqDesc;
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};

const BASE: u64 = 0x1_0000_0000;
const RAM: usize = 4 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = BASE;
const AVAIL: u64 = BASE + 0x1_0000;
const USED: u64 = BASE + 0x2_0000;
const HEADERS: u64 = BASE + 0x3_0000;
const STATUS: u64 = BASE + 0x4_0000;
const INDIRECT_TABLES: u64 = BASE + 0x5_0000;
const DATA: u64 = BASE + 0x10_0000;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const FEATURES: u64 = (1 << 28) | (1 << 29) | (1 << 32);

fn limits() -> BlkLimits {
    BlkLimits {
        capacity: 1 << 30,
        read_only: false,
        discard: Some(RangeLimits {
            max_sectors: 1 << 22,
            max_segments: 1,
        }),
        write_zeroes: Some(RangeLimits {
            max_sectors: 1 << 22,
            max_segments: 1,
        }),
    }
}

fn put(mem: &ByteMemory<'_>, table: u64, index: u64, d: VirtqDesc) {
    mem.write(table + 16 * index, &d.to_bytes())
        .expect("descriptor inside bench memory");
}

/// Lays out `QSIZE` read requests of 4 KiB, as Linux's virtio-blk driver builds them: direct chains
/// (header, data, status) using descriptors 3i..3i+2 mod QSIZE — the queue only has QSIZE
/// descriptors, so heads are every third one up to QSIZE/3 requests — or one indirect descriptor
/// per request pointing at a 3-entry table.
fn layout(mem: &ByteMemory<'_>, indirect: bool) -> Vec<u16> {
    let mut heads = Vec::new();
    let requests = if indirect {
        u64::from(QSIZE)
    } else {
        u64::from(QSIZE) / 3
    };
    for r in 0..requests {
        let hdr = BlkReqHeaderRepr {
            request_type: 0,
            reserved: 0,
            sector: r * 8,
        };
        mem.write(HEADERS + 16 * r, &hdr.to_bytes())
            .expect("header");
        let chain = [
            VirtqDesc {
                addr: HEADERS + 16 * r,
                len: 16,
                flags: NEXT,
                next: 1,
            },
            VirtqDesc {
                addr: DATA + 4096 * r,
                len: 4096,
                flags: NEXT | WRITE,
                next: 2,
            },
            VirtqDesc {
                addr: STATUS + r,
                len: 1,
                flags: WRITE,
                next: 0,
            },
        ];
        if indirect {
            let table = INDIRECT_TABLES + 48 * r;
            for (i, d) in chain.iter().enumerate() {
                put(mem, table, i as u64, *d);
            }
            put(
                mem,
                DESC,
                r,
                VirtqDesc {
                    addr: table,
                    len: 48,
                    flags: INDIRECT,
                    next: 0,
                },
            );
            heads.push(r as u16);
        } else {
            let first = 3 * r;
            for (i, d) in chain.iter().enumerate() {
                let mut d = *d;
                d.next = (first + i as u64 + 1) as u16;
                put(mem, DESC, first + i as u64, d);
            }
            heads.push(first as u16);
        }
    }
    heads
}

/// Fills the available ring with `heads` (slot i = heads[i % len]) and sets avail.idx = `count`.
fn make_available(mem: &ByteMemory<'_>, heads: &[u16], count: u16) {
    for slot in 0..QSIZE {
        let h = heads[usize::from(slot) % heads.len()];
        mem.write(AVAIL + 4 + 2 * u64::from(slot), &h.to_le_bytes())
            .expect("avail slot");
    }
    mem.store_u16(AVAIL + 2, count, Ordering::Release)
        .expect("avail idx");
}

fn queue() -> SplitQueue {
    let cfg = QueueConfig {
        size: QSIZE,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
    };
    SplitQueue::new(cfg, FEATURES).expect("valid queue")
}

fn pop_walk_decode(c: &mut Criterion) {
    let mut ram = vec![0u8; RAM];
    let mem = ByteMemory::new(BASE, 0x7f00_0000_0000, &mut ram);
    let limits = limits();

    for indirect in [false, true] {
        let heads = layout(&mem, indirect);
        let kind = if indirect { "indirect" } else { "direct" };
        let mut group = c.benchmark_group(format!("blk_read_3desc_{kind}"));

        // One request per poll: the avail.idx load is paid per request.
        make_available(&mem, &heads, 1);
        let mut q = queue();
        let mut chain: Chain<128> = Chain::new();
        group.throughput(Throughput::Elements(1));
        group.bench_function("pop_walk_decode_single", |b| {
            b.iter(|| {
                q.set_last_avail_idx(0);
                let head = q.pop_head(&mem).expect("ring ok").expect("one request");
                q.walk_chain(&mem, head, &mut chain).expect("valid chain");
                let req = BlkRequest::<1>::decode(&mem, &chain, &limits).expect("valid request");
                black_box((req.sector, req.data_len(), req.status_addr));
            })
        });

        // A full batch per poll: one avail.idx load for QSIZE requests.
        make_available(&mem, &heads, QSIZE);
        let mut popped = vec![0u16; usize::from(QSIZE)];
        group.throughput(Throughput::Elements(u64::from(QSIZE)));
        group.bench_function("pop_walk_decode_batch256", |b| {
            b.iter(|| {
                q.set_last_avail_idx(0);
                let n = q.pop_heads(&mem, &mut popped).expect("ring ok");
                for &head in &popped[..n] {
                    q.walk_chain(&mem, head, &mut chain).expect("valid chain");
                    let req =
                        BlkRequest::<1>::decode(&mem, &chain, &limits).expect("valid request");
                    black_box((req.sector, req.data_len(), req.status_addr));
                }
            })
        });
        group.finish();
    }
}

fn used_publish(c: &mut Criterion) {
    let mut ram = vec![0u8; RAM];
    let mem = ByteMemory::new(BASE, 0x7f00_0000_0000, &mut ram);
    let mut q = queue();
    let mut group = c.benchmark_group("used_ring");

    group.throughput(Throughput::Elements(1));
    group.bench_function("push_publish_notify_single", |b| {
        b.iter(|| {
            q.push_used(&mem, 5, 4097).expect("used ring ok");
            q.publish_used(&mem).expect("used ring ok");
            black_box(q.needs_notification(&mem).expect("avail ring ok"));
        })
    });

    group.throughput(Throughput::Elements(u64::from(QSIZE)));
    group.bench_function("push256_publish_once_notify", |b| {
        b.iter(|| {
            for id in 0..QSIZE {
                q.push_used(&mem, id, 4097).expect("used ring ok");
            }
            q.publish_used(&mem).expect("used ring ok");
            black_box(q.needs_notification(&mem).expect("avail ring ok"));
        })
    });
    group.finish();
}

criterion_group!(benches, pop_walk_decode, used_publish);
criterion_main!(benches);
