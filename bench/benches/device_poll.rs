//! One poll round of rvhost's vhost-blk and vhost-scsi devices on a null or RAM bdev, driven in
//! process: no socket, no second thread, no scheduler between driver and device, so the figure is
//! what the target's data path costs per request and not what a busy machine lets through.
//!
//! Each iteration is what a poll-mode driver and the reactor do for one batch: the driver puts
//! `batch` 4 KiB reads in the avail ring (the descriptor chains are written once, as rvhost-perf
//! does), the device runs one `poll()` (pop, walk, decode, submit, bdev completion, status or
//! response write, used ring, `used.idx` publish) and the driver checks `used.idx`. Divide the
//! time by `batch` for the cost per request. Run it under `valgrind --tool=callgrind` for exact
//! instruction counts (see bench/README.md). The `*_packed` cases do the same on packed
//! virtqueues (`VIRTIO_F_RING_PACKED`): the driver writes each request's three descriptors into
//! the descriptor ring every round (the packed layout has no table to keep them in), the device
//! writes the used descriptors back in place. The `*_indirect` cases offer each request as one
//! descriptor pointing at an indirect table of the three (`VIRTIO_F_RING_INDIRECT_DESC`), as a
//! Linux guest does, in the split and in the packed layout.

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvhost_core::mem::GuestMemory;
use rvhost_core::virtio::{bit, feature};
use rvhost_platform_linux::{DirtyLog, InflightMemory, LOG_PAGE_SIZE};
use rvhost_target::bdev::iostat::{CountedBdev, HistogramFilter};
use rvhost_target::bdev::malloc::{MallocBdev, MemoryBudget};
use rvhost_target::bdev::null::NullBdev;
use rvhost_target::bdev::Bdev;
use rvhost_target::blk::BlkController;
use rvhost_target::reactor::{self, ManualReactor, Task};
use rvhost_target::scsi::ScsiController;
use rvhost_target::vhost::memory::{GuestMemoryTable, RegionSpec};
use rvhost_target::vhost::{
    ApplyDeviceOp, DeviceBackend, DeviceId, DeviceOp, QueueSetup, VirtioFeatures,
};

const MEM: u64 = 8 << 20;
const QSIZE: u16 = 256;
/// Request metadata (blk header + status, scsi request + response), 256 bytes per slot.
const META: u64 = 0x40_0000;
/// Data buffers, 4 KiB per slot.
const DATA: u64 = 0x50_0000;
/// Indirect tables (`*_indirect` cases), 64 bytes per slot.
const TABLES: u64 = 0x48_0000;
const BLOCKS: u64 = 1 << 19; // 256 MiB of 512-byte blocks
const IO_BYTES: u32 = 4096;
/// The vring of queue `q`: descriptor table, avail ring, used ring, one page each.
fn ring(q: u16) -> (u64, u64, u64) {
    let base = u64::from(q) * 0x3000;
    (base, base + 0x1000, base + 0x2000)
}

fn table() -> Arc<GuestMemoryTable> {
    let path = format!("/dev/shm/rvhost-bench-device-poll-{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("shm file");
    std::fs::remove_file(&path).expect("unlink shm file");
    file.set_len(MEM).expect("size shm file");
    let spec = RegionSpec {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: 0x7000_0000,
        mmap_offset: 0,
    };
    GuestMemoryTable::from_regions([(spec, OwnedFd::from(file))]).expect("memory table")
}

fn write_desc(mem: &GuestMemoryTable, q: u16, index: u16, addr: u64, len: u32, flags: u16) {
    let (desc, _, _) = ring(q);
    let next = if flags & 1 != 0 { index + 1 } else { 0 };
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write(desc + 16 * u64::from(index), &d)
        .expect("descriptor");
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
/// Packed ring descriptor flags (virtio 1.2 §2.8.1).
const AVAIL: u16 = 1 << 7;
const USED: u16 = 1 << 15;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blk,
    Scsi,
}

/// The driver side of one request queue plus the device under test.
struct Rig {
    mem: Arc<GuestMemoryTable>,
    device: Box<dyn Task>,
    /// Keeps the device's (thread-less) reactor handle usable.
    _reactor: ManualReactor,
    queue: u16,
    avail_idx: u16,
    used_seen: u16,
    /// Packed rings: the driver's side.
    packed: Option<PackedDriver>,
}

/// Each request slot's three descriptors (address, length, flags), and the next ring position
/// (with its wrap counter) to make a list available at and to find a used one at.
struct PackedDriver {
    lists: Vec<Vec<(u64, u32, u16)>>,
    avail: (u16, bool),
    used: (u16, bool),
}

/// `(pos, wrap)` moved `n` positions on in a ring of `QSIZE`.
fn advance((pos, wrap): (u16, bool), n: u16) -> (u16, bool) {
    let next = pos + n;
    if next >= QSIZE {
        (next - QSIZE, !wrap)
    } else {
        (next, wrap)
    }
}

impl Rig {
    /// `log`: dirty logging on (a migration in progress), every write marked in a log.
    /// `packed`: packed virtqueues.
    fn new(kind: Kind, bdev: Arc<dyn Bdev>, log: bool, packed: bool) -> Rig {
        Rig::build(kind, bdev, log, packed, false)
    }

    /// [`Rig::new`] without a log, each request one descriptor pointing at an indirect table.
    fn new_indirect(kind: Kind, bdev: Arc<dyn Bdev>, packed: bool) -> Rig {
        Rig::build(kind, bdev, false, packed, true)
    }

    fn build(kind: Kind, bdev: Arc<dyn Bdev>, log: bool, packed: bool, indirect: bool) -> Rig {
        let mem = table();
        // No reactor thread: the bench polls the device itself.
        let (reactor, manual) = reactor::manual(0);
        let mut device = match kind {
            Kind::Blk => BlkController::new("bench", bdev, false)
                .new_device(DeviceId(1), &reactor)
                .expect("blk device"),
            Kind::Scsi => {
                let c = ScsiController::new("bench");
                c.add_target(Some(0), bdev).expect("target");
                c.new_device(DeviceId(1), &reactor).expect("scsi device")
            }
        };
        let mut features = bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_RING_EVENT_IDX);
        if packed {
            features |= bit(feature::VIRTIO_F_RING_PACKED);
        }
        if indirect {
            features |= bit(feature::VIRTIO_F_RING_INDIRECT_DESC);
        }
        // rvhost-perf's queue set: blk queue 0; scsi control, event and one request queue.
        let queues: &[u16] = match kind {
            Kind::Blk => &[0],
            Kind::Scsi => &[0, 1, 2],
        };
        for &q in queues {
            let (desc, avail, used) = ring(q);
            let (tx, rx) = sync_channel(1);
            device.apply_op(DeviceOp::StartQueue {
                index: q,
                setup: QueueSetup {
                    size: QSIZE,
                    desc_gpa: desc,
                    avail_gpa: avail,
                    used_gpa: used,
                    // Packed: position 0, driver wrap counter 1 (bit 15).
                    last_avail: if packed { 0x8000 } else { 0 },
                    features: VirtioFeatures(features),
                    call: None,
                    kick: None,
                    err: None,
                    memory: Arc::clone(&mem),
                    inflight: None,
                    used_log_gpa: None,
                },
                reply: tx,
            });
            rx.recv().expect("reply").expect("queue started");
        }
        if log {
            let (tx, rx) = sync_channel(1);
            device.apply_op(DeviceOp::SetLog {
                log: Some(dirty_log()),
                used_log: queues.iter().map(|&q| (q, Some(ring(q).2))).collect(),
                reply: tx,
            });
            rx.recv().expect("log set");
        }
        let queue = *queues.last().expect("a request queue");
        // Request slot i owns descriptors 3i..3i+2, written once (packed: written into the ring
        // each time the slot is made available).
        let mut lists = Vec::new();
        for i in 0..QSIZE / 3 {
            let meta = META + 256 * u64::from(i);
            let data = DATA + u64::from(IO_BYTES) * u64::from(i);
            let lba = u64::from(i) * 997 % (BLOCKS - 8);
            match kind {
                Kind::Blk => {
                    // virtio_blk_outhdr: type IN (0), reserved, sector.
                    let mut hdr = [0u8; 16];
                    hdr[8..16].copy_from_slice(&lba.to_le_bytes());
                    mem.write(meta, &hdr).expect("header");
                    lists.push(vec![
                        (meta, 16, NEXT),
                        (data, IO_BYTES, NEXT | WRITE),
                        (meta + 64, 1, WRITE),
                    ]);
                }
                Kind::Scsi => {
                    // virtio_scsi_cmd_req: LUN (target 0, LUN 0), tag, attributes, READ(16) of
                    // 8 blocks in a 32-byte CDB.
                    let mut req = [0u8; 51];
                    req[0..8].copy_from_slice(&[1, 0, 0x40, 0, 0, 0, 0, 0]);
                    req[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
                    req[19] = 0x88;
                    req[21..29].copy_from_slice(&lba.to_be_bytes());
                    req[29..33].copy_from_slice(&8u32.to_be_bytes());
                    mem.write(meta, &req).expect("request");
                    lists.push(vec![
                        (meta, 51, NEXT),
                        (meta + 128, 108, NEXT | WRITE),
                        (data, IO_BYTES, WRITE),
                    ]);
                }
            }
        }
        if indirect {
            for (i, list) in (0u64..).zip(lists.iter_mut()) {
                let table = TABLES + 64 * i;
                write_table(&mem, table, list, packed);
                *list = vec![(table, 16 * list.len() as u32, INDIRECT)];
            }
        }
        if packed {
            // Driver event suppression (flags at +2): DISABLE, the bench polls.
            let (_, driver_event, _) = ring(queue);
            mem.store_u16(driver_event + 2, 1, Ordering::Relaxed)
                .expect("driver event");
        } else {
            for (i, list) in (0u16..).zip(&lists) {
                for (j, &(addr, len, flags)) in (0u16..).zip(list) {
                    write_desc(&mem, queue, 3 * i + j, addr, len, flags);
                }
            }
        }
        let mut rig = Rig {
            mem,
            device,
            _reactor: manual,
            queue,
            avail_idx: 0,
            used_seen: 0,
            packed: packed.then_some(PackedDriver {
                lists,
                avail: (0, true),
                used: (0, true),
            }),
        };
        if kind == Kind::Scsi {
            // The LUN reports a power-on unit attention once; take it before measuring.
            rig.round(1);
        }
        rig
    }

    /// One batch: `batch` requests made available, one device poll, the completions reaped.
    fn round(&mut self, batch: u16) {
        if self.packed.is_some() {
            return self.round_packed(batch);
        }
        let (_, avail, used) = ring(self.queue);
        for i in 0..batch {
            let slot = self.avail_idx.wrapping_add(i) % QSIZE;
            let head = 3 * i;
            self.mem
                .write(4 + avail + 2 * u64::from(slot), &head.to_le_bytes())
                .expect("avail entry");
        }
        self.avail_idx = self.avail_idx.wrapping_add(batch);
        self.mem
            .store_u16(avail + 2, self.avail_idx, Ordering::Release)
            .expect("avail idx");
        while self.used_seen != self.avail_idx {
            black_box(self.device.poll());
            self.used_seen = self
                .mem
                .load_u16(used + 2, Ordering::Acquire)
                .expect("used idx");
        }
    }
}

/// Writes `list` as an indirect table at `table` in the ring's layout: split descriptors chained
/// with `NEXT`, or packed ones one after the other with only `WRITE` (buffer ID 0).
fn write_table(mem: &GuestMemoryTable, table: u64, list: &[(u64, u32, u16)], packed: bool) {
    for (j, &(addr, len, flags)) in (0u16..).zip(list) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        if packed {
            d[14..16].copy_from_slice(&(flags & WRITE).to_le_bytes());
        } else {
            let next = if flags & NEXT != 0 { j + 1 } else { 0 };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
        mem.write(table + 16 * u64::from(j), &d)
            .expect("indirect entry");
    }
}

/// A dirty log covering the bench's guest memory, in a sealed memfd as QEMU allocates it.
fn dirty_log() -> Arc<DirtyLog> {
    let bytes = MEM / LOG_PAGE_SIZE / 8;
    let memfd = InflightMemory::create(bytes as usize).expect("log memfd");
    let fd = memfd.file().try_clone_to_owned().expect("dup log fd");
    Arc::new(DirtyLog::map(fd, 0, bytes).expect("map log"))
}

impl Rig {
    /// [`Rig::round`] on a packed ring: `batch` lists of three descriptors (or of one indirect
    /// one) written at the next positions (buffer ID = request slot; the first list's flags
    /// last), device polls until it has written the batch's first used descriptor (which it
    /// writes last).
    fn round_packed(&mut self, batch: u16) {
        let (desc, _, _) = ring(self.queue);
        let Some(p) = self.packed.as_mut() else {
            return;
        };
        let start = p.avail;
        let per_list = p.lists.first().map_or(0, |l| l.len() as u16);
        let mut first_flags = 0;
        for (id, list) in (0u16..).zip(p.lists.iter().take(usize::from(batch))) {
            for &(addr, len, flags) in list {
                let (pos, wrap) = p.avail;
                let flags = flags | if wrap { AVAIL } else { USED };
                let at = desc + 16 * u64::from(pos);
                let mut d = [0u8; 14];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&id.to_le_bytes());
                self.mem.write(at, &d).expect("descriptor");
                if (pos, wrap) == start {
                    first_flags = flags;
                } else {
                    self.mem
                        .store_u16(at + 14, flags, Ordering::Relaxed)
                        .expect("descriptor flags");
                }
                p.avail = advance(p.avail, 1);
            }
        }
        let first_at = desc + 16 * u64::from(start.0) + 14;
        self.mem
            .store_u16(first_at, first_flags, Ordering::Release)
            .expect("first flags");
        let (pos, wrap) = p.used;
        let used = if wrap { AVAIL | USED } else { 0 };
        loop {
            black_box(self.device.poll());
            let flags = self
                .mem
                .load_u16(desc + 16 * u64::from(pos) + 14, Ordering::Acquire)
                .expect("used flags");
            if flags & (AVAIL | USED) == used {
                break;
            }
        }
        p.used = advance(p.used, per_list * batch);
    }
}

fn null() -> Arc<dyn Bdev> {
    NullBdev::new("Null0", BLOCKS, 512, [1; 16]).expect("null bdev")
}

fn malloc() -> Arc<dyn Bdev> {
    let budget = MemoryBudget::new(1 << 30);
    MallocBdev::new("Malloc0", BLOCKS, 512, [2; 16], &budget).expect("malloc bdev")
}

/// A null bdev as the registry holds it: every channel counts its I/O for `bdev_get_iostat`
/// (`bdev::iostat`). Beside `blk_null`, what that counting costs per request.
fn counted_null() -> Arc<dyn Bdev> {
    Arc::new(CountedBdev::new(null()))
}

/// The counted null bdev with its latency histogram on (`bdev_enable_histogram`).
fn histogram_null() -> Arc<dyn Bdev> {
    let counted = CountedBdev::new(null());
    counted.stats().set_histogram(Some(HistogramFilter::All));
    Arc::new(counted)
}

/// Makes the bdev a case runs on.
type MakeBdev = fn() -> Arc<dyn Bdev>;

fn device_poll(c: &mut Criterion) {
    // `_log`: dirty logging on, as while a migration runs.
    // `_packed`: packed virtqueues.
    let cases: [(&str, Kind, MakeBdev, bool, bool); 12] = [
        ("blk_null", Kind::Blk, null, false, false),
        ("blk_null_iostat", Kind::Blk, counted_null, false, false),
        (
            "blk_null_histogram",
            Kind::Blk,
            histogram_null,
            false,
            false,
        ),
        ("scsi_null", Kind::Scsi, null, false, false),
        ("blk_malloc", Kind::Blk, malloc, false, false),
        ("scsi_malloc", Kind::Scsi, malloc, false, false),
        ("blk_null_log", Kind::Blk, null, true, false),
        ("scsi_null_log", Kind::Scsi, null, true, false),
        ("blk_null_packed", Kind::Blk, null, false, true),
        ("scsi_null_packed", Kind::Scsi, null, false, true),
        ("blk_malloc_packed", Kind::Blk, malloc, false, true),
        ("scsi_malloc_packed", Kind::Scsi, malloc, false, true),
    ];
    for (name, kind, bdev, log, packed) in cases {
        bench_case(c, name, || Rig::new(kind, bdev(), log, packed));
    }
    // `_indirect`: each request one ring descriptor pointing at an indirect table.
    let indirect: [(&str, Kind, bool); 4] = [
        ("blk_null_indirect", Kind::Blk, false),
        ("scsi_null_indirect", Kind::Scsi, false),
        ("blk_null_packed_indirect", Kind::Blk, true),
        ("scsi_null_packed_indirect", Kind::Scsi, true),
    ];
    for (name, kind, packed) in indirect {
        bench_case(c, name, || Rig::new_indirect(kind, null(), packed));
    }
}

/// The group `name`: batches of 1 and 32 reads, each on a fresh rig from `make`.
fn bench_case(c: &mut Criterion, name: &str, make: impl Fn() -> Rig) {
    let mut g = c.benchmark_group(name);
    for batch in [1u16, 32] {
        let mut rig = make();
        g.throughput(Throughput::Elements(u64::from(batch)));
        g.bench_function(format!("read4k_batch{batch}"), |b| {
            b.iter(|| rig.round(batch))
        });
    }
    g.finish();
}

criterion_group!(benches, device_poll);
criterion_main!(benches);
