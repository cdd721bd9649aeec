//! Microbenchmarks of the data-path pieces of the platform layer: guest address translation,
//! copies by host address (what a RAM bdev does per request), and the SPSC control ring.

use std::fs::File;
use std::hint::black_box;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rvhost_core::mem::GuestMemory;
use rvhost_platform_linux::{
    copy_between, spsc, HostMemory, MemoryTable, PagePolicy, RegionSpec, SharedDmaMemory,
};

const LOW: u64 = 0x10_0000;
const HIGH: u64 = 0x1_0000_0000;

/// QEMU's usual layout: RAM below the PCI hole and RAM above 4 GiB, from one memfd.
fn guest_table() -> Arc<MemoryTable> {
    // SAFETY: valid NUL-terminated name; result checked below.
    let raw = unsafe { libc::memfd_create(c"rvhost-bench".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(2 * LOW).unwrap();
    let fd = || OwnedFd::from(file.try_clone().unwrap());
    let low = RegionSpec {
        guest_phys_addr: 0,
        memory_size: LOW,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
    };
    let high = RegionSpec {
        guest_phys_addr: HIGH,
        memory_size: LOW,
        userspace_addr: 0x7f10_0000_0000,
        mmap_offset: LOW,
    };
    MemoryTable::from_regions([(low, fd()), (high, fd())]).unwrap()
}

fn guest_memory(c: &mut Criterion) {
    let table = guest_table();
    let mut g = c.benchmark_group("guest_memory");
    g.bench_function("translate_same_region", |b| {
        b.iter(|| table.translate(black_box(HIGH + 0x2000), black_box(4096)))
    });
    g.bench_function("translate_alternating_regions", |b| {
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            table.translate(black_box(if flip { HIGH + 0x2000 } else { 0x2000 }), 4096)
        })
    });
    g.bench_function("load_u16_acquire", |b| {
        b.iter(|| table.load_u16(black_box(HIGH + 2), Ordering::Acquire))
    });
    g.throughput(Throughput::Bytes(4096));
    let host = table.translate(HIGH + 0x4000, 4096).unwrap();
    let src = vec![0x5au8; 4096];
    g.bench_function("copy_to_host_4k", |b| {
        b.iter(|| table.copy_to_host(black_box(host), &src))
    });
    let disk = SharedDmaMemory::allocate_with(1 << 20, PagePolicy::SmallOnly).unwrap();
    let disk_addr = disk.host_addr(0x8000).unwrap();
    g.bench_function("copy_between_guest_and_ram_disk_4k", |b| {
        b.iter(|| copy_between(&disk, black_box(disk_addr), &*table, black_box(host), 4096))
    });
    g.finish();
}

fn spsc_ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("spsc");
    g.bench_function("push_pop_same_thread", |b| {
        let (mut tx, mut rx) = spsc::channel::<u64>(256);
        b.iter(|| {
            let _ = tx.try_push(black_box(7));
            rx.try_pop()
        })
    });
    const BATCH: u64 = 100_000;
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("cross_thread_100k", |b| {
        b.iter_batched(
            || spsc::channel::<u64>(1024),
            |(mut tx, mut rx)| {
                let producer = std::thread::spawn(move || {
                    let mut i = 0;
                    while i < BATCH {
                        if tx.try_push(i).is_ok() {
                            i += 1;
                        }
                    }
                });
                let mut got = 0;
                while got < BATCH {
                    if rx.try_pop().is_some() {
                        got += 1;
                    }
                }
                producer.join().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, guest_memory, spsc_ring);
criterion_main!(benches);
