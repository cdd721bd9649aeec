//! One running virtqueue as the device shell keeps it: started from a [`QueueSetup`], its
//! request slots and free list, the call and error eventfds, stopping once drained
//! (`GET_VRING_BASE`), checking its rings against a new memory table, and publishing the used
//! ring with at most one call-eventfd write per round. Private to the shell: a device type sees a
//! queue only through the shell's request contexts.

use std::sync::Arc;

use rvhost_core::mem::GuestMemory;
use rvhost_core::virtio::feature;
use rvhost_core::virtq::packed::{
    PackedDesc, PackedHead, PackedQueue, EVENT_SUPPRESS_SIZE, RING_EVENT_WRAP_BIT,
};
use rvhost_core::virtq::{
    Chain, ChainError, DeviceRing, LateNotification, QueueConfig, RingHead, SplitQueue,
};
use rvhost_platform_linux::DirtyLog;

use super::super::inflight::{InflightLayout, InflightLog, PackedInflightLog, RingInflightLog};
use super::super::memory::GuestMemoryTable;
use super::super::session::NO_DIRTY_MARKING_ENV;
use super::super::{DeviceId, EventNotifier, QueueSetup};
use super::coalesce::{Coalescer, CoalescingTicks};
use super::DataBytes;
use crate::ops::QueueReport;
use crate::reactor::Reply;

/// Largest virtqueue accepted by `SET_VRING_NUM`; also the per-queue request-slot count.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Segments one chain may have: a chain can never usefully be longer than the queue.
pub const CHAIN_CAPACITY: usize = MAX_QUEUE_SIZE as usize;
/// Heads popped per queue per round: bounds the time one busy queue keeps the others waiting.
pub const POP_BATCH: usize = 32;

/// A ring layout the shell runs queues on: the split ring or the packed ring. A device is generic
/// over it (one layout per session, chosen by `VIRTIO_F_RING_PACKED` when its first queue
/// starts), so the poll path makes no per-request choice between the two.
pub trait ShellRing: DeviceRing<Head: Send> + Send + Sized + 'static {
    /// Whether this is the layout `features` negotiated.
    fn negotiated(features: u64) -> bool;

    /// The ring `setup` describes, positioned as the frontend says (`SET_VRING_BASE`), with the
    /// inflight log and the heads it says to resubmit (last popped first) if the queue has a part
    /// of an inflight region.
    #[doc(hidden)]
    fn start(setup: &QueueSetup) -> Result<Started<Self>, String>;

    /// The inflight log of this layout.
    #[doc(hidden)]
    type Log: RingInflightLog;

    /// Whether resubmitted requests are walked from the log's copies
    /// ([`ShellRing::walk_resubmitted`]) rather than from the ring.
    #[doc(hidden)]
    const RESUBMIT_FROM_LOG: bool;

    /// Records the request `head`, just popped, in the inflight log.
    #[doc(hidden)]
    fn mark_inflight(&self, mem: &GuestMemoryTable, log: &mut Self::Log, head: Self::Head);

    /// Walks a resubmitted request from what the inflight log kept of it.
    #[doc(hidden)]
    fn walk_resubmitted(
        &self,
        mem: &GuestMemoryTable,
        log: &Self::Log,
        head: Self::Head,
        chain: &mut Chain<CHAIN_CAPACITY>,
    ) -> Result<(), ChainError>;

    /// The used index to record in the inflight log after a publish.
    #[doc(hidden)]
    fn published_used_idx(&self) -> u16;

    /// Guest range of the used element the next `push_used` writes, for the dirty log: split,
    /// its element of the used ring at the frontend's log address `used_log_gpa`; packed, the
    /// descriptor at the next used position of the descriptor ring.
    #[doc(hidden)]
    fn next_used_range(&self, used_log_gpa: Option<u64>) -> Option<(u64, u64)>;

    /// Guest ranges of the ring parts the device writes, for the dirty log: split, the used ring
    /// (header, elements, `avail_event`) at `used_log_gpa`; packed, the descriptor ring and the
    /// device event suppression area.
    #[doc(hidden)]
    fn written_ring_ranges(&self, used_log_gpa: Option<u64>) -> [Option<(u64, u64)>; 2];
}

/// A ring as [`ShellRing::start`] made it.
#[doc(hidden)]
#[derive(Debug)]
pub struct Started<V: ShellRing> {
    ring: V,
    inflight: Option<V::Log>,
    resubmit: Vec<V::Head>,
}

fn queue_config(setup: &QueueSetup) -> Result<QueueConfig, String> {
    if setup.size > MAX_QUEUE_SIZE {
        return Err(format!("queue size {} over {MAX_QUEUE_SIZE}", setup.size));
    }
    Ok(QueueConfig {
        size: setup.size,
        desc_table: setup.desc_gpa,
        avail_ring: setup.avail_gpa,
        used_ring: setup.used_gpa,
    })
}

impl ShellRing for SplitQueue {
    #[inline]
    fn negotiated(features: u64) -> bool {
        features & (1 << feature::VIRTIO_F_RING_PACKED) == 0
    }

    fn start(setup: &QueueSetup) -> Result<Started<Self>, String> {
        let mut vq =
            SplitQueue::new(queue_config(setup)?, setup.features.0).map_err(|e| e.to_string())?;
        let mem = setup.memory.as_ref();
        vq.check_rings(mem).map_err(|e| e.to_string())?;
        vq.set_last_avail_idx(setup.last_avail);
        // The used index the driver has seen is what is in the ring (equal to last_avail after a
        // clean stop; after a backend restart it is the only trustworthy value).
        let used_idx = vq.sync_used_idx_from_ring(mem).map_err(|e| e.to_string())?;
        let (inflight, resubmit) = match &setup.inflight {
            Some(part) => {
                let (log, mut resubmit) =
                    InflightLog::start(part.clone(), setup.size, used_idx, setup.features.0)?;
                // The heads still inflight are the ones popped after the last used one (popped in
                // avail order, marked in that order): the next new head follows them. This is
                // what the frontend's base would be had the old backend stopped cleanly.
                let pending = u16::try_from(resubmit.len()).unwrap_or(u16::MAX);
                vq.set_last_avail_idx(used_idx.wrapping_add(pending));
                resubmit.reverse();
                (Some(log), resubmit)
            }
            None => (None, Vec::new()),
        };
        Ok(Started {
            ring: vq,
            inflight,
            resubmit,
        })
    }

    type Log = InflightLog;
    const RESUBMIT_FROM_LOG: bool = false;

    #[inline]
    fn mark_inflight(&self, _mem: &GuestMemoryTable, log: &mut InflightLog, head: u16) {
        log.mark(head);
    }

    fn walk_resubmitted(
        &self,
        mem: &GuestMemoryTable,
        _log: &InflightLog,
        head: u16,
        chain: &mut Chain<CHAIN_CAPACITY>,
    ) -> Result<(), ChainError> {
        self.walk_chain(mem, head, chain)
    }

    #[inline]
    fn published_used_idx(&self) -> u16 {
        self.used_idx()
    }

    fn next_used_range(&self, used_log_gpa: Option<u64>) -> Option<(u64, u64)> {
        let slot = self.used_idx() & self.size().wrapping_sub(1);
        used_log_gpa.map(|gpa| (gpa.wrapping_add(4 + 8 * u64::from(slot)), 8))
    }

    fn written_ring_ranges(&self, used_log_gpa: Option<u64>) -> [Option<(u64, u64)>; 2] {
        let size = u64::from(self.size());
        [used_log_gpa.map(|gpa| (gpa, 4 + 8 * size + 2)), None]
    }
}

impl ShellRing for PackedQueue {
    #[inline]
    fn negotiated(features: u64) -> bool {
        features & (1 << feature::VIRTIO_F_RING_PACKED) != 0
    }

    fn start(setup: &QueueSetup) -> Result<Started<Self>, String> {
        let mut vq =
            PackedQueue::new(queue_config(setup)?, setup.features.0).map_err(|e| e.to_string())?;
        let mem = setup.memory.as_ref();
        vq.check_rings(mem).map_err(|e| e.to_string())?;
        // Position and driver wrap counter (bits 0..15 and 15 of the vring base); the used
        // position follows it, as after a clean stop.
        vq.set_last_avail_idx(setup.last_avail)
            .map_err(|e| e.to_string())?;
        let part = match &setup.inflight {
            Some(part) if part.layout() == InflightLayout::Packed => part,
            Some(_) => {
                // A region allocated while the split ring was negotiated (a frontend that did
                // not free it at the device reset that renegotiated).
                tracing::warn!(
                    "inflight region has the split layout but the queue is packed; the queue runs \
                     without inflight tracking"
                );
                return Ok(Started {
                    ring: vq,
                    inflight: None,
                    resubmit: Vec::new(),
                });
            }
            None => {
                return Ok(Started {
                    ring: vq,
                    inflight: None,
                    resubmit: Vec::new(),
                })
            }
        };
        let desc_ring = setup.desc_gpa;
        let ring_flags = |pos: u16| {
            let addr = desc_ring.checked_add(16 * u64::from(pos) + 14)?;
            mem.load_u16(addr, std::sync::atomic::Ordering::Acquire)
                .ok()
        };
        let (log, resume) = PackedInflightLog::start(
            part.clone(),
            setup.size,
            setup.last_avail,
            setup.features.0,
            ring_flags,
        )?;
        // The packed ring keeps no used index in guest memory, and a frontend that lost its
        // backend cannot know it (QEMU sends the base of the previous start): the log's used
        // position is the one the driver has seen, and the next list to pop follows the ones
        // still in flight.
        if resume.next_avail != setup.last_avail {
            tracing::info!(
                base = format_args!("{:#x}", setup.last_avail),
                used = format_args!("{:#x}", resume.used),
                next = format_args!("{:#x}", resume.next_avail),
                resubmit = resume.resubmit.len(),
                "packed queue resumes where its inflight log says"
            );
        }
        vq.set_last_avail_idx(resume.next_avail)
            .map_err(|e| e.to_string())?;
        vq.set_used_idx(resume.used).map_err(|e| e.to_string())?;
        let mut resubmit = resume.resubmit;
        resubmit.reverse();
        Ok(Started {
            ring: vq,
            inflight: Some(log),
            resubmit,
        })
    }

    type Log = PackedInflightLog;
    const RESUBMIT_FROM_LOG: bool = true;

    #[inline]
    fn mark_inflight(&self, mem: &GuestMemoryTable, log: &mut PackedInflightLog, head: PackedHead) {
        if log.is_inflight(head.id) {
            return;
        }
        match self.popped_descs(&head) {
            Some(descs) => log.mark(&head, descs),
            None => {
                // A list too long for the pop's copies: read from the ring (the walk follows and
                // checks the same descriptors).
                let config = self.config();
                let size = u32::from(config.size);
                let descs: Vec<PackedDesc> = (0..u32::from(head.count))
                    .filter_map(|i| {
                        let pos = (u32::from(head.pos) + i) % size.max(1);
                        let addr = config.desc_table.checked_add(16 * u64::from(pos))?;
                        mem.read_array::<{ PackedDesc::SIZE }>(addr)
                            .ok()
                            .map(|raw| PackedDesc::from_bytes(&raw))
                    })
                    .collect();
                log.mark(&head, &descs);
            }
        }
    }

    fn walk_resubmitted(
        &self,
        mem: &GuestMemoryTable,
        log: &PackedInflightLog,
        head: PackedHead,
        chain: &mut Chain<CHAIN_CAPACITY>,
    ) -> Result<(), ChainError> {
        let mut descs: Vec<PackedDesc> = Vec::new();
        log.copies(head.id, &mut descs);
        self.walk_copies(mem, head, &descs, chain)
    }

    #[inline]
    fn published_used_idx(&self) -> u16 {
        self.used_idx()
    }

    fn next_used_range(&self, _used_log_gpa: Option<u64>) -> Option<(u64, u64)> {
        let pos = self.used_idx() & !RING_EVENT_WRAP_BIT;
        let desc = self.config().desc_table;
        Some((desc.wrapping_add(16 * u64::from(pos)), 16))
    }

    fn written_ring_ranges(&self, _used_log_gpa: Option<u64>) -> [Option<(u64, u64)>; 2] {
        let config = self.config();
        [
            Some((config.desc_table, 16 * u64::from(config.size))),
            Some((config.used_ring, EVENT_SUPPRESS_SIZE)),
        ]
    }
}

/// One request slot: what the shell keeps of a request, and what the device type keeps (`R`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Slot<H, R> {
    /// The request's head (split: head index; packed: position, count and buffer ID), returned
    /// on the used ring.
    pub(super) head: H,
    /// Between start and completion.
    pub(super) busy: bool,
    /// The memory-table generation the request's buffers were translated with.
    pub(super) generation: u64,
    /// Time-stamp counter tick of the poll that started the request (its pop batch).
    pub(super) start: u64,
    /// Its payload, as the device type declared it (per-queue statistics).
    pub(super) data: DataBytes,
    /// The device type's per-request state.
    pub(super) request: R,
}

/// Longest latency the per-queue histogram tells apart, in time-stamp counter ticks (about 90 s at
/// 3 GHz); longer ones count as this long.
const LATENCY_HIGHEST_TICKS: u64 = 1 << 38;
/// Significant decimal digits of the per-queue histogram: 1 % resolution at every latency (three
/// digits would take eight times the counters).
const LATENCY_DIGITS: u8 = 2;
/// log2 of the counters per half bucket of an HdrHistogram with [`LATENCY_DIGITS`] digits and a
/// lowest value of 1: it keeps single-tick resolution up to 2 * 10^2, so a bucket has 256
/// sub-buckets and each bucket after the first uses its upper 128.
const LATENCY_HALF_BUCKET_BITS: u32 = 7;
/// The counters such a histogram has: 33 half buckets (bucket 0's two halves, then the upper
/// halves of buckets 1 to 31), for latencies below `2^8 << 31`.
const LATENCY_BUCKETED: usize = 33 << LATENCY_HALF_BUCKET_BITS;
/// Counters of [`LatencyCounts`]: those, and one for the latencies beyond them, which
/// HdrHistogram's `saturating_record` counts as [`LATENCY_HIGHEST_TICKS`] (33 KiB per queue).
const LATENCY_COUNTERS: usize = LATENCY_BUCKETED + 1;

/// Latencies in ticks, counted per request at a few instructions each: a fixed array of counters
/// in the layout of an `hdrhistogram::Histogram` of [`LATENCY_DIGITS`] digits from 1 to
/// [`LATENCY_HIGHEST_TICKS`] (log-linear: bucket from the leading zeros, sub-bucket by a shift),
/// with none of its totals, minimum, maximum or range checks. [`LatencyCounts::histogram`] turns
/// it into that histogram when the per-queue view is read (control path), so the percentiles
/// and the maximum are the ones the histogram itself would report.
#[derive(Clone)]
pub(super) struct LatencyCounts {
    counts: Box<[u64; LATENCY_COUNTERS]>,
}

impl std::fmt::Debug for LatencyCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let recorded = self.counts.iter().fold(0u64, |n, c| n.wrapping_add(*c));
        f.debug_struct("LatencyCounts")
            .field("recorded", &recorded)
            .finish_non_exhaustive()
    }
}

impl LatencyCounts {
    fn new() -> Self {
        LatencyCounts {
            counts: Box::new([0; LATENCY_COUNTERS]),
        }
    }

    /// The counter of `ticks`: the index HdrHistogram computes, or the last counter for a
    /// latency beyond the histogram's counters (`saturating_record` counts those as
    /// [`LATENCY_HIGHEST_TICKS`]; [`LatencyCounts::histogram`] does the same).
    #[inline(always)]
    fn index(ticks: u64) -> usize {
        // Bucket: how many powers of two `ticks` is above what fits in bucket 0 (256 values);
        // `| 255` maps those to bucket 0. 56 = 64 - log2(256). At most 56.
        let bucket = 56 - (ticks | 255).leading_zeros();
        // Sub-bucket: `ticks` shifted into 0..256 (128..256 past bucket 0).
        let sub = (ticks >> bucket) as usize;
        // HdrHistogram's (bucket + 1) * 128 + sub - 128; at most 56 * 128 + 255, no overflow.
        (((bucket as usize) << LATENCY_HALF_BUCKET_BITS) + sub).min(LATENCY_BUCKETED)
    }

    /// The lowest latency counted at `index` (HdrHistogram's `value_for`; the last counter's
    /// latencies count as [`LATENCY_HIGHEST_TICKS`]).
    fn value(index: usize) -> u64 {
        let half = 1usize << LATENCY_HALF_BUCKET_BITS;
        if index >= LATENCY_BUCKETED {
            return LATENCY_HIGHEST_TICKS;
        }
        if index < 2 * half {
            return index as u64;
        }
        let bucket = (index >> LATENCY_HALF_BUCKET_BITS) - 1;
        let sub = (index & (half - 1)) + half;
        (sub as u64) << bucket
    }

    /// Counts one latency.
    #[inline(always)]
    fn record(&mut self, ticks: u64) {
        // `index` is at most `LATENCY_BUCKETED` by its `min`, which also drops the bounds check.
        let i = Self::index(ticks);
        if let Some(count) = self.counts.get_mut(i) {
            *count = count.wrapping_add(1);
        }
    }

    /// The counts as the HdrHistogram they stand for.
    pub(super) fn histogram(&self) -> hdrhistogram::Histogram<u64> {
        let mut h =
            hdrhistogram::Histogram::new_with_bounds(1, LATENCY_HIGHEST_TICKS, LATENCY_DIGITS)
                .expect("constant histogram bounds are valid");
        for (i, &n) in self.counts.iter().enumerate() {
            if n != 0 {
                h.saturating_record_n(Self::value(i), n);
            }
        }
        h
    }
}

/// What a queue counts of the requests it completed, beyond [`VirtQueue::completed`]: payload
/// bytes and latencies. Plain fields written by the reactor polling the queue; the control side
/// gets a copy through the reactor ([`VirtQueue::report`]).
#[derive(Debug, Clone)]
pub(super) struct QueueIoStats {
    bytes_read: u64,
    bytes_written: u64,
    /// Sum of the latencies, in ticks.
    latency_ticks: u64,
    /// Latencies in ticks, from the poll that popped the request to the completion batch that
    /// returned it.
    latency: LatencyCounts,
}

impl QueueIoStats {
    fn new() -> Self {
        QueueIoStats {
            bytes_read: 0,
            bytes_written: 0,
            latency_ticks: 0,
            latency: LatencyCounts::new(),
        }
    }

    #[inline(always)]
    fn record(&mut self, data: DataBytes, latency: u64) {
        self.bytes_read = self.bytes_read.wrapping_add(u64::from(data.read));
        self.bytes_written = self.bytes_written.wrapping_add(u64::from(data.written));
        self.latency_ticks = self.latency_ticks.wrapping_add(latency);
        self.latency.record(latency);
    }
}

/// One running virtqueue with device-type request state `R` and per-queue state `Q`.
pub(super) struct VirtQueue<V: ShellRing, R, Q> {
    pub(super) vq: V,
    /// Where completions are signalled (`None`: nowhere yet; QEMU may send it later).
    call: Option<Arc<EventNotifier>>,
    /// The frontend's error eventfd, signalled when the driver breaks the queue.
    err: Option<Arc<EventNotifier>>,
    /// The driver's kick eventfd, waited on only while the reactor blocks between requests.
    pub(super) kick: Option<Arc<EventNotifier>>,
    /// The chain being decoded (one per queue, reused).
    pub(super) chain: Box<Chain<CHAIN_CAPACITY>>,
    /// Heads popped this round.
    pub(super) heads: [V::Head; POP_BATCH],
    /// One slot per descriptor a request can start at.
    pub(super) slots: Vec<Slot<V::Head, R>>,
    /// Free slot indices (popped from the end: slot 0 first).
    free: Vec<u16>,
    /// Requests started and not yet completed.
    in_flight: usize,
    /// GET_VRING_BASE / disable / remove in progress: no new requests; reply once drained.
    stopping: Option<Reply<Option<u16>>>,
    /// Remove or process stop in progress: no new requests (the queue goes once drained when
    /// removed).
    closed: bool,
    /// The driver broke the queue (a chain without a place for the answer, rings outside
    /// memory): nothing more is processed until the frontend restarts the queue.
    broken: bool,
    /// Used elements pushed since the last publish.
    pushed: u32,
    /// Requests completed on this queue since it started (used elements published): the
    /// queue's one completion counter. Interrupt coalescing measures the queue's IOPS with it
    /// and the per-queue statistics report it. A plain field: only the queue's reactor writes
    /// it, once per publish rather than once per request.
    completed: u64,
    /// Interrupt coalescing (`None`: off; the device then never calls the coalescing paths).
    coalescer: Option<Coalescer>,
    /// Completions were published and their call is held back by coalescing.
    call_held: bool,
    /// The last notification decision said no: idle rounds look again
    /// ([`VirtQueue::check_late_notification`]) until the driver re-armed.
    late_check: bool,
    /// Notifications sent by that second look: each one a driver that would otherwise have
    /// waited (see [`rvhost_core::virtq::SplitQueue::late_notification`]).
    late_notifications: u64,
    /// The inflight log, when the frontend negotiated `INFLIGHT_SHMFD` and gave a region.
    inflight: Option<V::Log>,
    /// Heads the inflight log says were popped and never completed by an earlier backend, last
    /// popped first (taken from the end): started before any new avail entry.
    resubmit: Vec<V::Head>,
    /// Bytes and latencies of the completed requests.
    stats: QueueIoStats,
    /// Dirty logging while a migration runs (`None`: off, the data path's only cost is this
    /// test). Set by [`VirtQueue::set_logging`].
    logging: Option<Box<QueueLogging>>,
    /// Where the used ring is logged (`SET_VRING_ADDR` with `VHOST_VRING_F_LOG`:
    /// `log_guest_addr`); `None`: the frontend did not ask for the used ring to be logged.
    used_log_gpa: Option<u64>,
    /// What the device type keeps per queue (blk: the request limits negotiated for it).
    pub(super) state: Q,
}

/// A queue's dirty logging: the log, and the guest ranges of the ring parts the device writes.
#[derive(Debug)]
struct QueueLogging {
    log: Arc<DirtyLog>,
    /// Split: the whole used ring (header, elements and `avail_event`), if the frontend asked
    /// for it to be logged. Packed: the descriptor ring and the device event area.
    rings: [Option<(u64, u64)>; 2],
    /// Whether the buffers a request wrote are marked (always, but for the negative control of
    /// the migration test: [`NO_DIRTY_MARKING_ENV`]).
    mark_buffers: bool,
}

impl<V: ShellRing, R, Q> std::fmt::Debug for VirtQueue<V, R, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtQueue")
            .field("in_flight", &self.in_flight)
            .field("stopping", &self.stopping.is_some())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<V: ShellRing, R: Default + Copy, Q> VirtQueue<V, R, Q> {
    /// Starts a queue as `setup` describes it: rings checked against the memory table, the next
    /// avail index and the used index taken over, guest kicks turned off (the reactor polls).
    pub(super) fn new(setup: &QueueSetup, state: Q) -> Result<Self, String> {
        let Started {
            ring: mut vq,
            inflight,
            resubmit,
        } = V::start(setup)?;
        let mem = setup.memory.as_ref();
        vq.disable_kicks(mem).map_err(|e| e.to_string())?;
        Ok(VirtQueue {
            vq,
            call: setup.call.clone(),
            err: setup.err.clone(),
            kick: setup.kick.clone(),
            chain: Box::new(Chain::new()),
            heads: [V::Head::default(); POP_BATCH],
            slots: vec![Slot::default(); usize::from(setup.size)],
            free: (0..setup.size).rev().collect(),
            in_flight: 0,
            stats: QueueIoStats::new(),
            stopping: None,
            closed: false,
            broken: false,
            pushed: 0,
            completed: 0,
            coalescer: None,
            call_held: false,
            late_check: false,
            late_notifications: 0,
            inflight,
            resubmit,
            logging: None,
            used_log_gpa: setup.used_log_gpa,
            state,
        })
    }
}

impl<V: ShellRing, R, Q> VirtQueue<V, R, Q> {
    /// Replaces the call eventfd and signals the new one once: QEMU may hand it over only after
    /// the queue started (when the guest unmasks the queue's MSI-X vector), and a completion
    /// published before then was signalled to nobody. A spurious interrupt only makes the
    /// driver look at its ring; a missed one can leave it waiting forever.
    pub(super) fn set_call(&mut self, call: Option<Arc<EventNotifier>>) {
        if let Some(call) = &call {
            call.notify();
        }
        self.call = call;
    }

    /// Turns dirty logging on (`Some(log)`) or off, and sets where the used ring is logged
    /// (`used_log_gpa`, see [`VirtQueue::used_log_gpa`]; `None` leaves it as it is).
    pub(super) fn set_logging(
        &mut self,
        log: Option<&Arc<DirtyLog>>,
        used_log_gpa: Option<Option<u64>>,
    ) {
        if let Some(gpa) = used_log_gpa {
            self.used_log_gpa = gpa;
        }
        let rings = self.vq.written_ring_ranges(self.used_log_gpa);
        let mark_buffers = std::env::var_os(NO_DIRTY_MARKING_ENV).is_none_or(|v| v != "1");
        self.logging = log.map(|log| {
            Box::new(QueueLogging {
                log: Arc::clone(log),
                rings,
                mark_buffers,
            })
        });
        if let Some(logging) = &self.logging {
            // Everything already on the used ring (and avail_event) may be newer than the copy
            // the frontend is about to send.
            logging.mark_used_ring();
        }
    }

    /// Marks the queue broken by the driver and tells the frontend through the error eventfd.
    pub(super) fn fail(&mut self) {
        self.broken = true;
        if let Some(err) = &self.err {
            err.notify();
        }
    }

    /// Stops the queue without telling the frontend (the target could not use its rings).
    pub(super) fn stop_broken(&mut self) {
        self.broken = true;
    }

    /// Whether new requests may be popped.
    #[inline]
    pub(super) fn accepts_requests(&self) -> bool {
        self.stopping.is_none() && !self.broken && !self.closed
    }

    /// Whether heads from the inflight log wait to be resubmitted.
    #[inline]
    pub(super) fn has_resubmit(&self) -> bool {
        !self.resubmit.is_empty()
    }

    /// Moves up to `room` heads waiting for resubmission, in the order they were first popped,
    /// into `heads`; returns how many.
    pub(super) fn take_resubmit(&mut self, room: usize) -> usize {
        let mut n = 0;
        while n < room.min(POP_BATCH) {
            let Some(head) = self.resubmit.pop() else {
                break;
            };
            self.heads[n] = head;
            n += 1;
        }
        n
    }

    /// Walks a request [`VirtQueue::take_resubmit`] gave into the queue's chain, from what the
    /// inflight log kept of it.
    pub(super) fn walk_resubmitted(
        &mut self,
        mem: &GuestMemoryTable,
        head: V::Head,
    ) -> Result<(), ChainError> {
        match &self.inflight {
            Some(log) => self.vq.walk_resubmitted(mem, log, head, &mut self.chain),
            None => self.vq.walk_chain(mem, head, &mut *self.chain),
        }
    }

    /// Free request slots.
    #[inline]
    pub(super) fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Requests started and not yet completed.
    #[inline]
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The queue's counters for the per-queue view (a copy of its histogram included).
    pub(super) fn report(&self, index: u16) -> QueueReport {
        QueueReport {
            queue: index,
            requests: self.completed(),
            in_flight: self.in_flight as u64,
            bytes_read: self.stats.bytes_read,
            bytes_written: self.stats.bytes_written,
            latency_ticks: self.stats.latency_ticks,
            latency: self.stats.latency.histogram(),
            late_notifications: self.late_notifications,
        }
    }

    /// Takes a free slot for the request at `head`, popped by the poll that read tick `start`;
    /// `None` if none is free.
    #[inline]
    pub(super) fn take_slot(
        &mut self,
        head: V::Head,
        generation: u64,
        start: u64,
        mem: &GuestMemoryTable,
    ) -> Option<usize>
    where
        R: Default,
    {
        let index = usize::from(self.free.pop()?);
        let slot = self.slots.get_mut(index)?;
        slot.head = head;
        slot.busy = true;
        slot.generation = generation;
        slot.start = start;
        slot.data = DataBytes::default();
        slot.request = R::default();
        self.in_flight += 1;
        if let Some(log) = &mut self.inflight {
            self.vq.mark_inflight(mem, log, head);
        }
        Some(index)
    }

    /// Frees slot `index` (its request completed or was abandoned).
    #[inline]
    pub(super) fn release_slot(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index) {
            if !slot.busy {
                return;
            }
            slot.busy = false;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Ok(free) = u16::try_from(index) {
            self.free.push(free);
        }
    }

    /// Completes the request in slot `index` with `used_len` at tick `now`: its head goes on the
    /// used ring, its bytes and latency are counted, the slot is freed.
    #[inline(always)]
    pub(super) fn complete(
        &mut self,
        mem: &GuestMemoryTable,
        index: usize,
        used_len: u32,
        device: DeviceId,
        now: u64,
    ) {
        // One slot lookup for the head, the statistics and the release.
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if !slot.busy {
            return;
        }
        slot.busy = false;
        let (head, start, data) = (slot.head, slot.start, slot.data);
        self.push_used(mem, head, used_len, device);
        self.stats.record(data, now.saturating_sub(start));
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Ok(free) = u16::try_from(index) {
            self.free.push(free);
        }
    }

    /// Checks the rings against a new memory table; a queue whose rings left guest memory stops.
    pub(super) fn check_rings(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) {
        if let Err(err) = self.vq.check_rings(mem) {
            tracing::error!(device = device.0, queue, %err, "rings left guest memory; queue stopped");
            self.broken = true;
        }
    }

    /// Pushes a used element (published by [`VirtQueue::publish`]); a ring that cannot be
    /// written stops the queue. Always inlined: it is on every request's path, and the inflight
    /// branch made the compiler leave it out of line (a call per request).
    #[inline(always)]
    pub(super) fn push_used(
        &mut self,
        mem: &GuestMemoryTable,
        head: V::Head,
        len: u32,
        device: DeviceId,
    ) {
        self.pushed = self.pushed.wrapping_add(1);
        // The one dirty-log hook of the data path: one branch while no migration logs.
        if self.logging.is_some() {
            return self.push_used_logged(mem, head, len, device);
        }
        if let Err(err) = self.vq.push_used(mem, head, len) {
            tracing::error!(device = device.0, %err, "used ring write failed; queue stopped");
            self.broken = true;
            return;
        }
        if let Some(log) = &mut self.inflight {
            log.link(head.id());
        }
    }

    /// [`VirtQueue::push_used`] while a migration logs: the request's data and status are
    /// written, its used element is about to be; both are marked before `publish` makes them
    /// visible. The chain is walked again before the used element is written (a packed ring's
    /// used descriptor may overwrite the list), and marked after. Out of line: it runs only
    /// while a migration logs.
    #[cold]
    #[inline(never)]
    fn push_used_logged(
        &mut self,
        mem: &GuestMemoryTable,
        head: V::Head,
        len: u32,
        device: DeviceId,
    ) {
        let walked = self.vq.walk_chain(mem, head, &mut *self.chain);
        let used = self.vq.next_used_range(self.used_log_gpa);
        let pushed = self.vq.push_used(mem, head, len);
        if let Some(logging) = &self.logging {
            logging.mark_completion(walked, &self.chain, used);
        }
        if let Err(err) = pushed {
            tracing::error!(device = device.0, %err, "used ring write failed; queue stopped");
            self.broken = true;
            return;
        }
        if let Some(log) = &mut self.inflight {
            log.link(head.id());
        }
    }

    /// Publishes the used elements pushed since the last call (one `used.idx` store) and writes
    /// the call eventfd if the driver asked to be notified of them. A queue with nothing pushed
    /// costs one test (a round publishes every queue).
    #[inline]
    pub(super) fn publish(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) {
        if self.pushed != 0 {
            self.completed = self.completed.wrapping_add(u64::from(self.pushed));
            self.pushed = 0;
            self.publish_pushed(mem, device, queue);
        }
    }

    /// Requests completed on this queue since it started (published on the used ring).
    #[inline]
    pub(super) fn completed(&self) -> u64 {
        self.completed
    }

    fn publish_pushed(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) {
        if self.publish_used_ring(mem, device, queue) {
            self.call_if_needed(mem, device, queue);
        }
    }

    /// Stores `used.idx` for what was pushed (and logs and records it); `false` if the ring
    /// could not be written (the queue is then stopped).
    #[inline(always)]
    fn publish_used_ring(
        &mut self,
        mem: &GuestMemoryTable,
        device: DeviceId,
        queue: usize,
    ) -> bool {
        if let Some(log) = &mut self.inflight {
            log.publishing(self.vq.published_used_idx());
        }
        if let Err(err) = self.vq.publish_used(mem) {
            tracing::error!(device = device.0, queue, %err, "publishing used ring failed; queue stopped");
            self.broken = true;
            return false;
        }
        if let Some(logging) = &self.logging {
            logging.mark_used_ring();
        }
        if let Some(log) = &mut self.inflight {
            log.published(self.vq.published_used_idx());
        }
        true
    }

    /// Writes the call eventfd if the driver asked to be told of what was published since the
    /// last decision; returns whether it did.
    #[inline(always)]
    fn call_if_needed(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) -> bool {
        match self.vq.needs_notification(mem) {
            Ok(true) => {
                if let Some(call) = &self.call {
                    call.notify();
                }
                self.late_check = false;
                true
            }
            Ok(false) => {
                self.late_check = true;
                false
            }
            Err(err) => {
                self.suppression_unreadable(device, queue, &err);
                false
            }
        }
    }

    /// The driver's notification suppression could not be read: the queue is broken (its ring
    /// memory no longer translates) and no late check stays open.
    #[cold]
    #[inline(never)]
    fn suppression_unreadable(
        &mut self,
        device: DeviceId,
        queue: usize,
        err: &dyn std::fmt::Display,
    ) {
        tracing::error!(device = device.0, queue, %err, "reading notification suppression failed");
        self.late_check = false;
        self.broken = true;
    }

    /// After a decision not to notify, on a round that found no work: looks at the driver's
    /// suppression field again and calls if the driver re-armed behind what was published (its
    /// store→load ordering against the device's failed, and it sleeps with buffers on its used
    /// ring), until the driver re-armed. One guest load per idle round while a check is open.
    #[inline]
    pub(super) fn check_late_notification(
        &mut self,
        mem: &GuestMemoryTable,
        device: DeviceId,
        queue: usize,
    ) {
        if self.late_check {
            self.late_notification(mem, device, queue);
        }
    }

    #[cold]
    #[inline(never)]
    fn late_notification(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) {
        match self.vq.late_notification(mem) {
            Ok(LateNotification::Wait) => {}
            Ok(LateNotification::Settled) => self.late_check = false,
            Ok(LateNotification::Notify) => {
                self.late_check = false;
                self.late_notifications = self.late_notifications.wrapping_add(1);
                tracing::debug!(
                    device = device.0,
                    queue,
                    "driver re-armed behind the used ring without a notification; notified late"
                );
                if let Some(call) = &self.call {
                    call.notify();
                }
            }
            Err(err) => self.suppression_unreadable(device, queue, &err),
        }
    }

    /// Turns coalescing on (`Some`) or off for this queue at tick `now`. Turning it off sends a
    /// call held back until now.
    pub(super) fn set_coalescing(
        &mut self,
        settings: Option<CoalescingTicks>,
        now: u64,
        mem: Option<&GuestMemoryTable>,
        device: DeviceId,
        queue: usize,
    ) {
        self.coalescer = settings.map(|s| Coalescer::new(s, now, self.completed));
        if settings.is_none() {
            self.release_held_call(mem, device, queue);
        }
    }

    /// Sends a call coalescing holds back, if the driver still wants one.
    pub(super) fn release_held_call(
        &mut self,
        mem: Option<&GuestMemoryTable>,
        device: DeviceId,
        queue: usize,
    ) {
        if !std::mem::take(&mut self.call_held) {
            return;
        }
        if let Some(mem) = mem {
            self.call_if_needed(mem, device, queue);
        }
    }

    /// [`VirtQueue::publish`] with coalescing on, at tick `now`: publishes what was pushed at
    /// once, and calls if the queue's delay has passed since its last call (or it takes no new
    /// requests any more: a stopping, closed or broken queue gets its call now). Returns whether
    /// a call is still held back. Out of line: only devices that coalesce come here.
    #[inline(never)]
    pub(super) fn publish_coalesced(
        &mut self,
        mem: &GuestMemoryTable,
        device: DeviceId,
        queue: usize,
        now: u64,
    ) -> bool {
        if self.pushed != 0 {
            self.completed = self.completed.wrapping_add(u64::from(self.pushed));
            self.pushed = 0;
            if self.publish_used_ring(mem, device, queue) {
                self.call_held = true;
            }
        }
        if !self.call_held {
            return false;
        }
        let due = match &mut self.coalescer {
            Some(c) => c.call_due(now, self.completed) || !self.accepts_requests(),
            None => true,
        };
        if !due {
            return true;
        }
        self.call_held = false;
        if self.call_if_needed(mem, device, queue) {
            if let Some(c) = &mut self.coalescer {
                c.called(now);
            }
        }
        false
    }

    /// Starts stopping: no new requests; `reply` is answered once drained. A stop that was already
    /// waiting is answered at once (the frontend sent two).
    pub(super) fn stop(&mut self, reply: Reply<Option<u16>>) {
        if let Some(earlier) = self.stopping.replace(reply) {
            let _ = earlier.send(Some(self.vq.last_avail_idx()));
        }
    }

    /// Whether a stop is waiting.
    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Removal: answers a waiting stop now and accepts no new requests; the queue goes once its
    /// in-flight requests completed.
    pub(super) fn remove(&mut self) {
        if let Some(stop) = self.stopping.take() {
            let _ = stop.send(Some(self.vq.last_avail_idx()));
        }
        self.closed = true;
    }

    /// Takes no new requests from now on; those in flight complete as usual (process stop).
    pub(super) fn close(&mut self) {
        self.closed = true;
    }

    /// Whether the queue is stopping and has drained, so its stop can be answered.
    pub(super) fn drained(&self) -> bool {
        self.stopping.is_some() && self.in_flight == 0
    }

    /// Answers a drained queue's stop with the next avail index to process.
    pub(super) fn finish_stop(self) {
        if let Some(reply) = self.stopping {
            let _ = reply.send(Some(self.vq.last_avail_idx()));
        }
    }
}

impl QueueLogging {
    /// Marks what completing a request wrote: every device-writable buffer of its chain (read
    /// data, status byte, SCSI response and sense) as `walked` into `chain` again from the ring,
    /// and its used element (`used`).
    fn mark_completion(
        &self,
        walked: Result<(), rvhost_core::virtq::ChainError>,
        chain: &Chain<CHAIN_CAPACITY>,
        used: Option<(u64, u64)>,
    ) {
        match walked {
            _ if !self.mark_buffers => {}
            Ok(()) => {
                for segment in chain.writable() {
                    self.log.mark(segment.guest_addr, u64::from(segment.len));
                }
            }
            // A refused chain was answered in its last writable descriptor, if it had one.
            Err(err) => {
                if let Some(status) = err.status_segment() {
                    self.log.mark(status.guest_addr, u64::from(status.len));
                }
            }
        }
        if let Some((gpa, len)) = used {
            self.log.mark(gpa, len);
        }
    }

    /// Marks the ring parts the device writes (after a publish, or when logging starts).
    #[cold]
    #[inline(never)]
    fn mark_used_ring(&self) {
        for (gpa, len) in self.rings.iter().flatten() {
            self.log.mark(*gpa, *len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latencies across the whole range: every single-tick value of bucket 0, each power of two
    /// and its neighbours, a spread of odd values, and values beyond the highest (clamped).
    fn latencies() -> Vec<u64> {
        let mut v: Vec<u64> = (0..600).collect();
        for shift in 8..64 {
            let p = 1u64 << shift;
            v.extend([p - 1, p, p + 1, p + p / 3, p + p / 2 + 7]);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x >> (x % 40 + 24));
        }
        v.push(u64::MAX);
        v
    }

    fn direct(values: &[u64]) -> hdrhistogram::Histogram<u64> {
        let mut h =
            hdrhistogram::Histogram::new_with_bounds(1, LATENCY_HIGHEST_TICKS, LATENCY_DIGITS)
                .unwrap();
        for &v in values {
            h.saturating_record(v);
        }
        h
    }

    fn counted(values: &[u64]) -> hdrhistogram::Histogram<u64> {
        let mut c = LatencyCounts::new();
        for &v in values {
            c.record(v);
        }
        c.histogram()
    }

    #[test]
    fn latency_counts_land_where_hdrhistogram_records() {
        let h = direct(&[]);
        for v in latencies() {
            let clamped = if v >= 1 << 39 {
                LATENCY_HIGHEST_TICKS
            } else {
                v
            };
            let i = LatencyCounts::index(v);
            assert!(i < LATENCY_COUNTERS, "{v}: index {i}");
            // The counter's lowest value is in the same HdrHistogram bucket as the latency.
            let low = LatencyCounts::value(i);
            assert_eq!(low, h.lowest_equivalent(clamped), "{v}");
            assert!(h.equivalent(low, clamped), "{v}");
        }
    }

    #[test]
    fn latency_counts_report_what_the_histogram_would() {
        let values = latencies();
        let (d, c) = (direct(&values), counted(&values));
        assert_eq!(c.len(), d.len());
        assert_eq!(c.max(), d.max());
        assert_eq!(c.min(), d.min());
        assert_eq!(c.min_nz(), d.min_nz());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
            assert_eq!(
                c.value_at_quantile(q),
                d.value_at_quantile(q),
                "quantile {q}"
            );
        }
        let buckets = |h: &hdrhistogram::Histogram<u64>| {
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect::<Vec<_>>()
        };
        assert_eq!(buckets(&c), buckets(&d));
        // Negative control: one latency more in the counts changes what is compared.
        let mut more = values.clone();
        more.push(12_345);
        assert_ne!(buckets(&counted(&more)), buckets(&d));
    }

    #[test]
    fn no_latency_counted_is_an_empty_histogram() {
        let h = LatencyCounts::new().histogram();
        assert!(h.is_empty());
    }
}
