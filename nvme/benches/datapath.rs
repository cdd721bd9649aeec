//! Driver-side cost of the data path, without hardware: building data pointers, and a full
//! submit → doorbell → reap cycle against rings in plain memory whose completions a stand-in
//! device posts (its work is included, and is a handful of stores per command).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvhost_nvme::cmd::{CompletionEntry, SubmissionEntry};
use rvhost_nvme::prp::{build_data_pointer, DmaSegment, SglSupport};
use rvhost_nvme::queue::{memory_layout, QueueMemory, QueuePair};

fn data_pointers(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_pointer");
    let one_page = [DmaSegment {
        iova: 0x10_0000,
        len: 4096,
    }];
    let contiguous = [DmaSegment {
        iova: 0x10_0000,
        len: 64 * 1024,
    }];
    let scattered: Vec<DmaSegment> = (0..16)
        .map(|i| DmaSegment {
            iova: 0x100_0000 + i * 0x3000,
            len: 4096,
        })
        .collect();
    let ragged = [
        DmaSegment {
            iova: 0x10_0104,
            len: 0x1F00,
        },
        DmaSegment {
            iova: 0x20_3008,
            len: 0x8000,
        },
        DmaSegment {
            iova: 0x30_B010,
            len: 0x6100,
        },
    ];
    let sgl = SglSupport {
        supported: true,
        dword_aligned: false,
        prefer: false,
    };
    let mut list = [0u64; 512];
    g.bench_function("prp_4k", |b| {
        b.iter(|| build_data_pointer(black_box(&one_page[..]), sgl, 0x7000, |_, _| {}))
    });
    g.bench_function("prp_list_64k_contiguous", |b| {
        b.iter(|| {
            build_data_pointer(black_box(&contiguous[..]), sgl, 0x7000, |off, v| {
                list[off / 8] = v
            })
        })
    });
    g.bench_function("prp_list_64k_16_segments", |b| {
        b.iter(|| {
            build_data_pointer(black_box(&scattered[..]), sgl, 0x7000, |off, v| {
                list[off / 8] = v
            })
        })
    });
    g.bench_function("sgl_3_unaligned_segments", |b| {
        b.iter(|| {
            build_data_pointer(black_box(&ragged[..]), sgl, 0x7000, |off, v| {
                list[off / 8] = v
            })
        })
    });
    g.finish();
}

/// Page-aligned zeroed memory standing in for DMA memory and BAR0.
struct Aligned {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(4096), 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("allocation");
        Aligned { ptr, layout }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

fn queue_cycle(c: &mut Criterion) {
    const ENTRIES: u16 = 256;
    const BATCH: usize = 32;
    let (sq_len, cq_len, lists_len) = memory_layout(ENTRIES);
    let memory = Aligned::new(sq_len + cq_len + lists_len);
    let bar = Aligned::new(4096);
    // SAFETY: all offsets lie inside the allocations sized by `memory_layout` above.
    let (cq, lists, cq_doorbell) = unsafe {
        (
            memory.ptr.as_ptr().add(sq_len).cast::<CompletionEntry>(),
            memory.ptr.as_ptr().add(sq_len + cq_len),
            bar.ptr.as_ptr().add(4).cast::<u32>(),
        )
    };
    let mem = QueueMemory {
        sq: memory.ptr.cast(),
        cq: NonNull::new(cq).expect("non-null"),
        lists: NonNull::new(lists).expect("non-null"),
        sq_doorbell: bar.ptr.cast(),
        cq_doorbell: NonNull::new(cq_doorbell).expect("non-null"),
    };
    // SAFETY: `memory` and `bar` outlive the queue pair (dropped after it, at the end of this
    // function) and are touched otherwise only through raw pointers by the stand-in device.
    let mut qp = unsafe { QueuePair::new(1, ENTRIES, mem) };
    let mut device_tail = 0u16;
    let mut device_sq_head = 0u16;
    let mut device_phase = true;
    let mut cids = [0u16; BATCH];

    let mut g = c.benchmark_group("queue_pair");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("submit_ring_reap_batch_of_32", |b| {
        b.iter(|| {
            let now = Instant::now();
            for (i, cid) in cids.iter_mut().enumerate() {
                *cid = qp.reserve().expect("free slot");
                let entry = SubmissionEntry::read(1, i as u64 * 8, 8);
                qp.submit(*cid, entry, i as u64, now)
                    .expect("room in the ring");
            }
            qp.ring_submissions();
            // The stand-in device completes the batch in order.
            for &cid in &cids {
                device_sq_head = (device_sq_head + 1) % ENTRIES;
                let cqe = CompletionEntry {
                    cid,
                    sq_head: device_sq_head,
                    sq_id: 1,
                    status: u16::from(device_phase),
                    ..Default::default()
                };
                // SAFETY: `device_tail < ENTRIES`, inside the completion ring.
                unsafe { cq.add(usize::from(device_tail)).write_volatile(cqe) };
                device_tail += 1;
                if device_tail == ENTRIES {
                    device_tail = 0;
                    device_phase = !device_phase;
                }
            }
            let reaped = qp.poll(usize::MAX, |done| {
                black_box(done.tag);
            });
            assert_eq!(reaped, BATCH);
        })
    });
    g.finish();
    drop(qp);
}

criterion_group!(benches, data_pointers, queue_cycle);
criterion_main!(benches);
