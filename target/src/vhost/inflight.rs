//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the region a session allocates
//! or maps, and the per-queue log the device shell keeps in it.
//!
//! The layout and the reconnect repair are `rvhost_core::inflight`'s (parsed from a private copy
//! of the shared bytes, so a frontend writing the region meanwhile cannot change what was
//! checked); the mapping is `rvhost_platform_linux::InflightMemory`. What is here is the glue and
//! the per-request bookkeeping, which costs nothing when the feature is not negotiated (the queue
//! has no log) and three or four single stores per request when it is.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rvhost_core::inflight::packed::{self as packed_layout, PackedQueueRegion};
use rvhost_core::inflight::{self, QueueRegion};
use rvhost_core::virtq::packed::{PackedDesc, PackedHead};
use rvhost_platform_linux::InflightMemory;

/// The layout of an inflight region's queue parts: the split ring's or the packed ring's
/// (vhost-user.rst, "Inflight I/O tracking"). A region has the layout of the ring the features
/// negotiated when it was allocated or handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightLayout {
    /// `QueueRegionSplit`: 16-byte header, 16 bytes per descriptor.
    Split,
    /// `QueueRegionPacked`: 32-byte header, 32 bytes per descriptor.
    Packed,
}

impl InflightLayout {
    /// The layout for a session that negotiated `VIRTIO_F_RING_PACKED` or not.
    pub fn for_ring(packed: bool) -> Self {
        if packed {
            InflightLayout::Packed
        } else {
            InflightLayout::Split
        }
    }

    fn region_len(self, num_queues: u16, queue_size: u16) -> Option<usize> {
        match self {
            InflightLayout::Split => inflight::region_len(num_queues, queue_size),
            InflightLayout::Packed => packed_layout::region_len(num_queues, queue_size),
        }
    }

    fn queue_range(self, index: u16, queue_size: u16) -> Option<std::ops::Range<usize>> {
        match self {
            InflightLayout::Split => inflight::queue_range(index, queue_size),
            InflightLayout::Packed => packed_layout::queue_range(index, queue_size),
        }
    }
}

/// One session's inflight region: `num_queues` parts for queues of `queue_size` descriptors.
#[derive(Debug)]
pub struct InflightRegion {
    memory: InflightMemory,
    num_queues: u16,
    queue_size: u16,
    layout: InflightLayout,
}

impl InflightRegion {
    /// A new zeroed region (`GET_INFLIGHT_FD`); every queue's part starts uninitialized
    /// (version 0) and is initialized when its queue starts.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        layout: InflightLayout,
    ) -> Result<Self, String> {
        if num_queues == 0 || queue_size == 0 {
            return Err(format!(
                "inflight region for {num_queues} queues of {queue_size}"
            ));
        }
        let len = layout
            .region_len(num_queues, queue_size)
            .ok_or_else(|| "inflight region size overflows".to_string())?;
        let memory = InflightMemory::create(len).map_err(|e| e.to_string())?;
        Ok(InflightRegion {
            memory,
            num_queues,
            queue_size,
            layout,
        })
    }

    /// The layout of the region's queue parts.
    pub fn layout(&self) -> InflightLayout {
        self.layout
    }

    /// Maps the region a frontend handed over (`SET_INFLIGHT_FD`), after checking that it is
    /// large enough for `num_queues` queues of `queue_size`.
    pub fn map(
        file: OwnedFd,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
        layout: InflightLayout,
    ) -> Result<Self, String> {
        if num_queues == 0 || queue_size == 0 {
            return Err(format!(
                "inflight region for {num_queues} queues of {queue_size}"
            ));
        }
        let needed = layout
            .region_len(num_queues, queue_size)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| "inflight region size overflows".to_string())?;
        if mmap_size < needed {
            return Err(format!(
                "inflight region of {mmap_size} bytes; {num_queues} queues of {queue_size} need \
                 {needed}"
            ));
        }
        let memory =
            InflightMemory::map(file, mmap_offset, mmap_size).map_err(|e| e.to_string())?;
        Ok(InflightRegion {
            memory,
            num_queues,
            queue_size,
            layout,
        })
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Whether the region is empty (never).
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// Queues the region has parts for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue part.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The region's memfd, to send to the frontend.
    pub fn file(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memory.file()
    }

    /// Queue `index`'s part, if the region has one.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let range = self.layout.queue_range(index, self.queue_size)?;
        (range.end <= self.memory.len()).then(|| InflightQueue {
            region: Arc::clone(self),
            base: range.start,
        })
    }
}

/// One queue's part of an inflight region, handed to the reactor with the queue's setup.
#[derive(Debug, Clone)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
}

impl InflightQueue {
    /// The layout of the region this part belongs to.
    pub fn layout(&self) -> InflightLayout {
        self.region.layout
    }
}

/// What a queue's inflight log does on the data path, whichever its layout.
#[doc(hidden)]
pub trait RingInflightLog: std::fmt::Debug + Send {
    /// The request with buffer (split: head) `id` had its used element written.
    fn link(&mut self, id: u16);
    /// The pushed used elements are about to be published; `used` is the used position after
    /// them (packed only: the region must say so before the driver can see them).
    fn publishing(&mut self, used: u16);
    /// The pushed used elements were published; `used` is the used index / position now.
    fn published(&mut self, used: u16);
}

impl RingInflightLog for InflightLog {
    #[inline]
    fn link(&mut self, id: u16) {
        InflightLog::link(self, id);
    }
    #[inline]
    fn publishing(&mut self, _used: u16) {}
    #[inline]
    fn published(&mut self, used: u16) {
        InflightLog::published(self, used);
    }
}

/// A running queue's inflight log: marks heads when popped, links them into the batch when their
/// used element is written, and clears them once the batch's `used.idx` is published.
#[derive(Debug)]
#[doc(hidden)]
pub struct InflightLog {
    part: InflightQueue,
    /// The counter the next popped head gets.
    counter: u64,
    last_batch_head: u16,
    /// Heads linked since the last publish.
    batch: Vec<u16>,
}

impl InflightLog {
    /// Starts the log of a queue of `queue_size` whose used ring holds `ring_used_idx`: checks
    /// and repairs its part of the region and returns the heads to resubmit, in the order they
    /// were popped.
    pub(super) fn start(
        part: InflightQueue,
        queue_size: u16,
        ring_used_idx: u16,
        features: u64,
    ) -> Result<(Self, Vec<u16>), String> {
        if queue_size != part.region.queue_size {
            return Err(format!(
                "inflight region is for queues of {}, this one has {queue_size}",
                part.region.queue_size
            ));
        }
        let len = inflight::queue_region_len(queue_size);
        let mut copy = vec![0u8; len];
        if !part.region.memory.read(part.base, &mut copy) {
            return Err("inflight queue part outside the region".into());
        }
        let mut view =
            QueueRegion::new_checked(&mut copy[..], queue_size).map_err(|e| e.to_string())?;
        let recovery = view
            .recover(ring_used_idx, features)
            .map_err(|e| e.to_string())?;
        let mut order = vec![0u16; usize::from(queue_size)];
        let resubmit = view
            .resubmit_order(&mut order)
            .map_err(|e| e.to_string())?
            .to_vec();
        let last_batch_head = view.last_batch_head();
        // The descriptor states first, then the header with used_idx: a crash in between leaves
        // used_idx behind the ring, and the next start clears the batch again.
        let header = inflight::QUEUE_HEADER_LEN;
        let (head_bytes, states) = copy.split_at(header);
        let written = part.region.memory.write(part.base + header, states)
            && part.region.memory.write(part.base, head_bytes);
        if !written {
            return Err("inflight queue part outside the region".into());
        }
        if recovery.repaired > 0 || recovery.pending > 0 {
            tracing::info!(
                repaired = recovery.repaired,
                resubmit = recovery.pending,
                "inflight log recovered"
            );
        }
        Ok((
            InflightLog {
                part,
                counter: recovery.next_counter,
                last_batch_head,
                batch: Vec::with_capacity(usize::from(queue_size)),
            },
            resubmit,
        ))
    }

    #[inline]
    fn memory(&self) -> &InflightMemory {
        &self.part.region.memory
    }

    /// Head `head` was popped: its counter, then its flag.
    #[inline]
    pub(super) fn mark(&mut self, head: u16) {
        let base = self.part.base;
        let counter = self.counter;
        self.counter = counter.wrapping_add(1);
        let mem = self.memory();
        mem.store_u64(base + inflight::counter_offset(head), counter);
        mem.store_u8(base + inflight::inflight_offset(head), 1);
    }

    /// Head `head`'s used element was written: it joins the batch list.
    #[inline]
    pub(super) fn link(&mut self, head: u16) {
        let base = self.part.base;
        let previous = self.last_batch_head;
        let mem = self.memory();
        mem.store_u16(base + inflight::next_offset(head), previous);
        mem.store_u16(base + inflight::LAST_BATCH_HEAD_OFFSET, head);
        self.last_batch_head = head;
        self.batch.push(head);
    }

    /// The batch was published with `used.idx = used_idx`: its heads are no longer inflight.
    #[inline]
    pub(super) fn published(&mut self, used_idx: u16) {
        let base = self.part.base;
        let mem = &self.part.region.memory;
        for &head in &self.batch {
            mem.store_u8(base + inflight::inflight_offset(head), 0);
        }
        self.batch.clear();
        mem.store_u16(base + inflight::USED_IDX_OFFSET, used_idx);
    }
}

/// No entry (in [`PackedInflightLog`]'s maps).
const NO_ENTRY: u16 = u16::MAX;

/// A running packed queue's inflight log (`QueueRegionPacked`; the protocol is
/// `rvhost_core::inflight::packed`'s): copies each popped list into entries taken from the free
/// list, returns a published batch's entries to it, and keeps `used_idx` and the `old_*` fields
/// so that a backend that dies at any point leaves a part the next one can recover.
///
/// The free-list links are mirrored here and only written to the region, never read back, so a
/// frontend writing the region while the queue runs cannot lead the device astray.
#[derive(Debug)]
#[doc(hidden)]
pub struct PackedInflightLog {
    part: InflightQueue,
    size: u16,
    /// The counter the next popped list gets.
    counter: u64,
    free_head: u16,
    /// `next` of every entry.
    next: Vec<u16>,
    /// `last` of every head entry.
    last: Vec<u16>,
    /// Buffer ID -> head entry of the list in flight with it.
    entry_of: Vec<u16>,
    /// Head entries of the lists whose used descriptors were pushed since the last publish.
    batch: Vec<u16>,
    /// Tracking stopped (no free entry for a list: a driver with more descriptors in flight
    /// than the queue, or reused buffer IDs); the queue runs on without it.
    stopped: bool,
}

/// Where a packed queue resumes after [`PackedInflightLog::start`].
#[derive(Debug)]
pub(super) struct PackedResume {
    /// The used position and the next position to pop (vring base form).
    pub used: u16,
    pub next_avail: u16,
    /// Lists to resubmit, in the order they were first popped.
    pub resubmit: Vec<PackedHead>,
}

impl PackedInflightLog {
    /// Starts the log of a packed queue of `queue_size`: checks and recovers its part of the
    /// region. `base` is the frontend's vring base (used for a part never initialized);
    /// `ring_flags(pos)` reads the flags of the ring descriptor at `pos`.
    pub(super) fn start(
        part: InflightQueue,
        queue_size: u16,
        base: u16,
        features: u64,
        ring_flags: impl FnOnce(u16) -> Option<u16>,
    ) -> Result<(Self, PackedResume), String> {
        if part.region.layout != InflightLayout::Packed {
            return Err("inflight region has the split layout; the queue is packed".into());
        }
        if queue_size != part.region.queue_size {
            return Err(format!(
                "inflight region is for queues of {}, this one has {queue_size}",
                part.region.queue_size
            ));
        }
        let len = packed_layout::queue_region_len(queue_size);
        let mut copy = vec![0u8; len];
        if !part.region.memory.read(part.base, &mut copy) {
            return Err("inflight queue part outside the region".into());
        }
        let mut view =
            PackedQueueRegion::new_checked(&mut copy[..], queue_size).map_err(|e| e.to_string())?;
        let recovery = view
            .recover(base, features, ring_flags)
            .map_err(|e| e.to_string())?;
        let mut order = vec![0u16; usize::from(queue_size)];
        let heads = view
            .resubmit_order(&mut order)
            .map_err(|e| e.to_string())?
            .to_vec();
        let mut log = PackedInflightLog {
            part: part.clone(),
            size: queue_size,
            counter: recovery.next_counter,
            free_head: view.free_head(),
            next: (0..queue_size).map(|e| view.next(e)).collect(),
            last: (0..queue_size).map(|e| view.last(e)).collect(),
            entry_of: vec![NO_ENTRY; usize::from(queue_size)],
            batch: Vec::with_capacity(usize::from(queue_size)),
            stopped: false,
        };
        let mut resubmit = Vec::with_capacity(heads.len());
        let mut descs = vec![PackedDesc::default(); usize::from(queue_size)];
        for &entry in &heads {
            let list = view.list(entry, &mut descs).map_err(|e| e.to_string())?;
            let (Some(first), Some(last)) = (list.first(), list.last()) else {
                continue;
            };
            let id = last.id;
            let slot = log
                .entry_of
                .get_mut(usize::from(id))
                .ok_or_else(|| format!("inflight list with buffer id {id} outside the queue"))?;
            if *slot != NO_ENTRY {
                return Err(format!("two inflight lists with buffer id {id}"));
            }
            *slot = entry;
            resubmit.push(PackedHead {
                id,
                // Not a ring position any more (the ring may hold used descriptors there): the
                // list is walked from the region's copies.
                pos: 0,
                count: u16::try_from(list.len()).unwrap_or(u16::MAX),
                wrap: first.flags & rvhost_core::virtq::packed::VIRTQ_DESC_F_AVAIL != 0,
            });
        }
        // The whole part, entries before the header (a crash in between leaves the header as
        // it was, and the next start recovers again).
        let header = packed_layout::QUEUE_HEADER_LEN;
        let (head_bytes, states) = copy.split_at(header);
        let written = part.region.memory.write(part.base + header, states)
            && part.region.memory.write(part.base, head_bytes);
        if !written {
            return Err("inflight queue part outside the region".into());
        }
        if !recovery.initialized {
            tracing::info!(
                resubmit = recovery.pending,
                committed = recovery.committed,
                rolled_back = recovery.rolled_back,
                "packed inflight log recovered"
            );
        }
        let used = recovery.used;
        let next_avail = advance(used, recovery.pending_descs, queue_size);
        Ok((
            log,
            PackedResume {
                used,
                next_avail,
                resubmit,
            },
        ))
    }

    #[inline]
    fn memory(&self) -> &InflightMemory {
        &self.part.region.memory
    }

    /// Whether buffer `id`'s list is in the log (resubmitted after a restart).
    pub(super) fn is_inflight(&self, id: u16) -> bool {
        self.entry_of
            .get(usize::from(id))
            .is_some_and(|&e| e != NO_ENTRY)
    }

    /// The copies of the descriptors of buffer `id`'s list, read back from the region into
    /// `out` (for a resubmitted list: its ring positions may hold other descriptors by now).
    pub(super) fn copies(&self, id: u16, out: &mut Vec<PackedDesc>) {
        out.clear();
        let Some(&head) = self.entry_of.get(usize::from(id)) else {
            return;
        };
        let mut entry = head;
        let num = self.read_u16(packed_layout::num_offset(head)).unwrap_or(0);
        for _ in 0..num.min(self.size) {
            let at = self.part.base + packed_layout::copy_offset(entry);
            let mut raw = [0u8; 16];
            if !self.memory().read(at, &mut raw) {
                return;
            }
            out.push(PackedDesc {
                id: u16::from_le_bytes([raw[0], raw[1]]),
                flags: u16::from_le_bytes([raw[2], raw[3]]),
                len: u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
                addr: u64::from_le_bytes([
                    raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
                ]),
            });
            match self.next.get(usize::from(entry)) {
                Some(&n) => entry = n,
                None => return,
            }
        }
    }

    fn read_u16(&self, offset: usize) -> Option<u16> {
        let mut raw = [0u8; 2];
        self.memory()
            .read(self.part.base + offset, &mut raw)
            .then(|| u16::from_le_bytes(raw))
    }

    /// The list `head` was popped with descriptors `descs`: they are copied into entries from
    /// the free list, the head entry marked inflight, then `old_free_head` follows.
    pub(super) fn mark(&mut self, head: &PackedHead, descs: &[PackedDesc]) {
        if self.stopped || self.is_inflight(head.id) {
            // Resubmitted (already in the log), or tracking stopped.
            return;
        }
        let base = self.part.base;
        let first = self.free_head;
        let mut entry = first;
        let mut last = first;
        for desc in descs {
            if entry >= self.size {
                return self.stop("no free inflight entry for a list");
            }
            self.memory().write(
                base + packed_layout::copy_offset(entry),
                &packed_layout::copy_bytes(desc),
            );
            last = entry;
            entry = self
                .next
                .get(usize::from(entry))
                .copied()
                .unwrap_or(NO_ENTRY);
        }
        let Some(slot) = self.entry_of.get_mut(usize::from(head.id)) else {
            return self.stop("buffer id outside the queue");
        };
        *slot = first;
        if let Some(l) = self.last.get_mut(usize::from(first)) {
            *l = last;
        }
        let counter = self.counter;
        self.counter = counter.wrapping_add(1);
        let num = u16::try_from(descs.len()).unwrap_or(u16::MAX);
        let mem = self.memory();
        mem.store_u16(base + packed_layout::num_offset(first), num);
        mem.store_u16(base + packed_layout::last_offset(first), last);
        mem.store_u64(base + packed_layout::counter_offset(first), counter);
        mem.store_u8(base + packed_layout::inflight_offset(first), 1);
        mem.store_u16(base + packed_layout::FREE_HEAD_OFFSET, entry);
        mem.store_u16(base + packed_layout::OLD_FREE_HEAD_OFFSET, entry);
        self.free_head = entry;
    }

    fn stop(&mut self, why: &str) {
        tracing::error!(
            why,
            "packed inflight tracking stopped; a restart will not resubmit"
        );
        self.stopped = true;
    }
}

/// `base` (vring base form) moved `n <= size` positions on in a ring of `size`.
fn advance(base: u16, n: u16, size: u16) -> u16 {
    let pos = u32::from(base & 0x7fff) + u32::from(n);
    let wrap = base & 0x8000 != 0;
    let (pos, wrap) = if pos >= u32::from(size) {
        (pos - u32::from(size), !wrap)
    } else {
        (pos, wrap)
    };
    (pos as u16 & 0x7fff) | if wrap { 0x8000 } else { 0 }
}

impl RingInflightLog for PackedInflightLog {
    #[inline]
    fn link(&mut self, id: u16) {
        if self.stopped {
            return;
        }
        if let Some(slot) = self.entry_of.get_mut(usize::from(id)) {
            if *slot != NO_ENTRY {
                self.batch.push(*slot);
                *slot = NO_ENTRY;
            }
        }
    }

    fn publishing(&mut self, used: u16) {
        if self.stopped {
            return;
        }
        let base = self.part.base;
        // The batch's entries go back to the front of the free list, then used_idx moves: a
        // crash before the driver sees the batch rolls both back (old_* are unchanged).
        let batch = std::mem::take(&mut self.batch);
        for &head in &batch {
            let Some(&last) = self.last.get(usize::from(head)) else {
                continue;
            };
            if let Some(n) = self.next.get_mut(usize::from(last)) {
                *n = self.free_head;
            }
            self.memory()
                .store_u16(base + packed_layout::next_offset(last), self.free_head);
            self.free_head = head;
        }
        self.batch = batch;
        let mem = self.memory();
        mem.store_u16(base + packed_layout::FREE_HEAD_OFFSET, self.free_head);
        mem.store_u16(base + packed_layout::USED_IDX_OFFSET, used & 0x7fff);
        mem.store_u8(
            base + packed_layout::USED_WRAP_OFFSET,
            u8::from(used & 0x8000 != 0),
        );
    }

    fn published(&mut self, used: u16) {
        if self.stopped {
            return;
        }
        let base = self.part.base;
        let mem = &self.part.region.memory;
        for &head in &self.batch {
            mem.store_u8(base + packed_layout::inflight_offset(head), 0);
        }
        self.batch.clear();
        mem.store_u16(base + packed_layout::OLD_FREE_HEAD_OFFSET, self.free_head);
        mem.store_u16(base + packed_layout::OLD_USED_IDX_OFFSET, used & 0x7fff);
        mem.store_u8(
            base + packed_layout::OLD_USED_WRAP_OFFSET,
            u8::from(used & 0x8000 != 0),
        );
    }
}
