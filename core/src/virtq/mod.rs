//! The split virtqueue (virtio 1.2 §2.7) as a poll-mode device sees it.
//! ([`DriverQueue`] is the other side, for the queues rvhost drives as a virtio driver: the
//! virtio-vhost-user device's rxq and txq.)
//!
//! A [`SplitQueue`] holds only the ring addresses (guest physical), the queue size and the device's
//! own indices; guest memory is passed to every call, so a new vhost-user memory table can be swapped
//! in between two polls without touching the queue. Descriptor chains are walked into a
//! caller-provided [`Chain`] (fixed capacity, reused: nothing is allocated per request).
//!
//! The intended poll loop (one round; a reactor runs it for each of its queues):
//!
//! ```
//! use rvhost_core::mem::{ByteMemory, GuestMemory};
//! use rvhost_core::virtio::{bit, feature, ring::VirtqDesc};
//! use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};
//! use core::sync::atomic::Ordering;
//!
//! // A 64 KiB guest with a 16-entry queue: descriptors at 0x0, avail ring at 0x100, used at 0x200.
//! let mut ram = vec![0u8; 0x1_0000];
//! let mem = ByteMemory::new(0, 0x7f00_0000_0000, &mut ram);
//! let config = QueueConfig { size: 16, desc_table: 0x0, avail_ring: 0x100, used_ring: 0x200 };
//! let features = bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_RING_EVENT_IDX);
//! let mut queue = SplitQueue::new(config, features)?;
//! queue.check_rings(&mem)?;
//!
//! // What a driver does: one writable 512-byte buffer in descriptor 0, made available.
//! let desc = VirtqDesc { addr: 0x1000, len: 512, flags: 2, next: 0 };
//! mem.write(0x0, &desc.to_bytes())?;
//! mem.store_u16(0x104, 0, Ordering::Relaxed)?; // avail.ring[0] = head 0
//! mem.store_u16(0x102, 1, Ordering::Release)?; // avail.idx = 1
//!
//! // Allocated once per queue, reused for every request.
//! let mut heads = [0u16; 32];
//! let mut chain: Chain<128> = Chain::new();
//!
//! // --- one poll round ---
//! queue.disable_kicks(&mem)?; // poll mode: the driver need not notify us
//! let popped = queue.pop_heads(&mem, &mut heads)?;
//! for &head in &heads[..popped] {
//!     match queue.walk_chain(&mem, head, &mut chain) {
//!         Ok(()) => {
//!             // Hand chain.segments() to the device model (e.g. `blk::BlkRequest::decode`),
//!             // then, when the I/O completes:
//!             queue.push_used(&mem, chain.head(), chain.writable_len())?;
//!         }
//!         Err(e) => {
//!             // Fail just this request if the device finds its status field in
//!             // `e.status_segment()`, otherwise mark the device DEVICE_NEEDS_RESET.
//!             let _ = e;
//!         }
//!     }
//! }
//! queue.publish_used(&mem)?; // one Release store of used.idx for the whole batch
//! if queue.needs_notification(&mem)? {
//!     // write 1 to the call eventfd
//! }
//! assert_eq!(mem.load_u16(0x202, Ordering::Acquire)?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chain;
mod device_ring;
mod driver;
pub mod packed;

pub use chain::{Chain, ChainError, ChainErrorKind};
pub use device_ring::{AnyHead, AnyRing, AnyRingError, DeviceRing, RingHead};
pub use driver::{DriverBuffer, DriverError, DriverQueue, UsedBuffer};

use core::sync::atomic::{fence, Ordering};

use crate::mem::{GuestMemory, MemError};
use crate::virtio::ring::{
    self, VirtqDesc, VirtqUsedElem, AVAIL_RING_ALIGN, DESC_TABLE_ALIGN, MAX_QUEUE_SIZE,
    RING_ARRAY_OFFSET, RING_FLAGS_OFFSET, RING_IDX_OFFSET, USED_RING_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY,
};
use crate::virtio::{feature, has_feature};

/// [`SplitQueue::pop_heads_pipelined`] takes everything pending up to this many buffers, half
/// of it above.
pub const POP_SPLIT_ABOVE: usize = 16;

/// Available-ring entries read with one copy when popping.
const POP_RUN: usize = 32;

/// Where a split virtqueue lives, as the driver configured it (guest physical addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Number of descriptors: a power of two from 1 to 32768.
    pub size: u16,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest physical address of the used (device) ring.
    pub used_ring: u64,
}

/// What a late look at the driver's notification suppression found
/// ([`SplitQueue::late_notification`], [`packed::PackedQueue::late_notification`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateNotification {
    /// The driver waits for buffers already published: notify it now.
    Notify,
    /// The driver has not re-armed yet (it may still be processing): look again later.
    Wait,
    /// Nothing to look for: the driver saw everything published, or asked for no notification
    /// this way can tell.
    Settled,
}

/// One of the three parts of a split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingPart {
    /// The descriptor table.
    DescTable,
    /// The available ring.
    Avail,
    /// The used ring.
    Used,
}

/// An error configuring or accessing a virtqueue's rings. Every one of them means the queue
/// cannot be trusted any more: the device should set `DEVICE_NEEDS_RESET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The queue size is zero, above 32768 or not a power of two.
    InvalidSize(u16),
    /// A ring address violates its required alignment (§2.7, "Virtqueue Part Alignment").
    Misaligned {
        /// Which part.
        part: RingPart,
        /// Its guest address.
        addr: u64,
    },
    /// A ring part does not lie inside one mapped region, or an access to it failed.
    Memory {
        /// Which part.
        part: RingPart,
        /// Why.
        err: MemError,
    },
    /// The driver's `avail.idx` is more than the queue size ahead of the device's position: it
    /// claims to have made available more buffers than the queue has.
    AvailIdxTooFarAhead {
        /// `avail.idx` as read.
        avail_idx: u16,
        /// The device's `last_avail_idx`.
        last_avail_idx: u16,
    },
    /// The device tried to return a head index that is not below the queue size.
    UsedIdOutOfRange {
        /// The offending index.
        id: u16,
    },
}

impl core::fmt::Display for QueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            QueueError::InvalidSize(size) => {
                write!(f, "queue size {size} is not a power of two in 1..=32768")
            }
            QueueError::Misaligned { part, addr } => write!(f, "{part:?} ring at {addr:#x} is misaligned"),
            QueueError::Memory { part, err } => write!(f, "{part:?} ring: {err}"),
            QueueError::AvailIdxTooFarAhead { avail_idx, last_avail_idx } => write!(
                f,
                "avail idx {avail_idx} is more than the queue size ahead of last_avail_idx {last_avail_idx}"
            ),
            QueueError::UsedIdOutOfRange { id } => write!(f, "used id {id} is outside the queue"),
        }
    }
}

/// The device side of one split virtqueue.
#[derive(Debug, Clone)]
pub struct SplitQueue {
    config: QueueConfig,
    event_idx: bool,
    indirect: bool,
    /// The device's `last_avail_idx`: the next available-ring slot to consume (free-running).
    next_avail: u16,
    /// The next used-ring slot to fill, including elements not yet published.
    next_used: u16,
    /// The `used.idx` value last stored into guest memory.
    published_used: u16,
    /// `used.idx` at the last notification decision; `None` until the first one, after which the
    /// driver must be notified unconditionally once (it may be waiting for anything).
    signalled_used: Option<u16>,
    /// `used.idx` at the last decision that notified (`None`: none yet): what a late check
    /// ([`SplitQueue::late_notification`]) measures the driver's `used_event` against.
    notified_used: Option<u16>,
    /// Kicks are off (`VIRTQ_USED_F_NO_NOTIFY` set) and `avail_event` was last parked at this
    /// value by [`SplitQueue::disable_kicks`]; `None`: not known (queue start, after
    /// [`SplitQueue::enable_kicks`] or a new `last_avail_idx`), the next disable writes both.
    kicks_parked: Option<u16>,
}

impl SplitQueue {
    /// A queue at `config` with the negotiated `features` (only `VIRTIO_F_RING_EVENT_IDX` and
    /// `VIRTIO_F_RING_INDIRECT_DESC` matter here). Indices start at zero.
    pub fn new(config: QueueConfig, features: u64) -> Result<Self, QueueError> {
        if config.size == 0 || config.size > MAX_QUEUE_SIZE || !config.size.is_power_of_two() {
            return Err(QueueError::InvalidSize(config.size));
        }
        for (part, addr, align) in [
            (RingPart::DescTable, config.desc_table, DESC_TABLE_ALIGN),
            (RingPart::Avail, config.avail_ring, AVAIL_RING_ALIGN),
            (RingPart::Used, config.used_ring, USED_RING_ALIGN),
        ] {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { part, addr });
            }
        }
        Ok(SplitQueue {
            config,
            event_idx: has_feature(features, feature::VIRTIO_F_RING_EVENT_IDX),
            indirect: has_feature(features, feature::VIRTIO_F_RING_INDIRECT_DESC),
            next_avail: 0,
            next_used: 0,
            published_used: 0,
            signalled_used: None,
            notified_used: None,
            kicks_parked: None,
        })
    }

    /// The queue's addresses and size.
    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.config.size
    }

    /// Whether `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub fn event_idx_enabled(&self) -> bool {
        self.event_idx
    }

    /// Whether `VIRTIO_F_RING_INDIRECT_DESC` was negotiated.
    pub fn indirect_enabled(&self) -> bool {
        self.indirect
    }

    /// Checks that all three ring parts lie inside mapped guest memory (call after the rings are
    /// configured and after every memory-table change).
    pub fn check_rings<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), QueueError> {
        let size = self.config.size;
        for (part, addr, len) in [
            (
                RingPart::DescTable,
                self.config.desc_table,
                ring::desc_table_len(size),
            ),
            (
                RingPart::Avail,
                self.config.avail_ring,
                ring::avail_ring_len(size),
            ),
            (
                RingPart::Used,
                self.config.used_ring,
                ring::used_ring_len(size),
            ),
        ] {
            mem.translate(addr, len)
                .map_err(|err| QueueError::Memory { part, err })?;
        }
        Ok(())
    }

    /// The device's `last_avail_idx` (vhost-user `GET_VRING_BASE`).
    pub fn last_avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Sets `last_avail_idx` (vhost-user `SET_VRING_BASE`).
    pub fn set_last_avail_idx(&mut self, idx: u16) {
        self.next_avail = idx;
        self.kicks_parked = None;
    }

    /// The device's used index: the next used slot, including pushed but unpublished elements.
    pub fn used_idx(&self) -> u16 {
        self.next_used
    }

    /// Sets the used index (e.g. on reconnect). Drops unpublished elements and forgets the last
    /// notification, so the next [`SplitQueue::needs_notification`] says yes.
    pub fn set_used_idx(&mut self, idx: u16) {
        self.next_used = idx;
        self.published_used = idx;
        self.signalled_used = None;
        self.notified_used = None;
    }

    /// Takes `used.idx` from guest memory as the device's used index (reconnecting to a running
    /// ring, where the frontend only knows `last_avail_idx`).
    pub fn sync_used_idx_from_ring<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<u16, QueueError> {
        let idx = mem
            .load_u16(self.used_addr(RING_IDX_OFFSET)?, Ordering::Acquire)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Used,
                err,
            })?;
        self.set_used_idx(idx);
        Ok(idx)
    }

    fn avail_addr(&self, offset: u64) -> Result<u64, QueueError> {
        self.config
            .avail_ring
            .checked_add(offset)
            .ok_or(QueueError::Memory {
                part: RingPart::Avail,
                err: MemError::Overflow,
            })
    }

    fn used_addr(&self, offset: u64) -> Result<u64, QueueError> {
        self.config
            .used_ring
            .checked_add(offset)
            .ok_or(QueueError::Memory {
                part: RingPart::Used,
                err: MemError::Overflow,
            })
    }

    /// Ring slot of a free-running index.
    fn slot(&self, idx: u16) -> u64 {
        // size is a power of two, so this is `idx % size`.
        u64::from(idx & (self.config.size - 1))
    }

    /// `avail.idx`, loaded with Acquire so the ring entries and descriptors it covers are visible.
    pub fn avail_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        mem.load_u16(self.avail_addr(RING_IDX_OFFSET)?, Ordering::Acquire)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Avail,
                err,
            })
    }

    /// How many buffers the driver has made available that the device has not consumed yet.
    /// `#[inline]`: the poll loop's pop calls it, and so does `enable_kicks` (a reactor's kick
    /// wait); a second caller otherwise leaves it out of line in the pop too.
    #[inline]
    pub fn pending<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        let avail_idx = self.avail_idx(mem)?;
        self.pending_from(avail_idx)
    }

    fn pending_from(&self, avail_idx: u16) -> Result<u16, QueueError> {
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.config.size {
            return Err(QueueError::AvailIdxTooFarAhead {
                avail_idx,
                last_avail_idx: self.next_avail,
            });
        }
        Ok(pending)
    }

    /// Pops up to `heads.len()` head indices from the available ring (one Acquire load of
    /// `avail.idx` for the whole batch) and returns how many were written to `heads`.
    ///
    /// The heads are not validated here; [`SplitQueue::walk_chain`] does that.
    pub fn pop_heads<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [u16],
    ) -> Result<usize, QueueError> {
        let pending = self.pending(mem)?;
        self.pop_pending(mem, heads, usize::from(pending))
    }

    /// Pops like [`SplitQueue::pop_heads`], but only half (rounded up) of what is pending when
    /// more than [`POP_SPLIT_ABOVE`] buffers are.
    ///
    /// A device that takes everything the driver made available, completes it and publishes it
    /// in one round runs in lock-step with a driver that resubmits what it reaps: each side
    /// waits while the other works (at queue depth 32 with 32-head batches, every round took
    /// exactly 32 requests). Taking half lets the driver reap and resubmit the first half while
    /// the device works on the second, as a device publishing per request would. Up to
    /// [`POP_SPLIT_ABOVE`] pending buffers are taken at once: smaller batches would pay the
    /// round's fixed costs (the `avail.idx` miss, the `used.idx` publish and its fence) for too
    /// few requests, and a driver that submits a burst and waits for all of it gets its burst
    /// back in two rounds, not in a halving series.
    pub fn pop_heads_pipelined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [u16],
    ) -> Result<usize, QueueError> {
        let pending = usize::from(self.pending(mem)?);
        let take = if pending > POP_SPLIT_ABOVE {
            pending.div_ceil(2)
        } else {
            pending
        };
        self.pop_pending(mem, heads, take)
    }

    fn pop_pending<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [u16],
        pending: usize,
    ) -> Result<usize, QueueError> {
        let count = pending.min(heads.len());
        // The entries are read in runs (up to the ring's end, at most `POP_RUN` at a time): one
        // translation and one copy per run instead of per head (30 instructions per request at
        // 16 heads a round).
        let mut done = 0;
        while let Some(out) = heads.get_mut(done..count).filter(|rest| !rest.is_empty()) {
            let slot = self.slot(self.next_avail);
            let to_ring_end = usize::from(self.config.size) - slot as usize;
            let run = out.len().min(to_ring_end).min(POP_RUN);
            let entry = self.avail_addr(RING_ARRAY_OFFSET + 2 * slot)?;
            let avail_err = |err| QueueError::Memory {
                part: RingPart::Avail,
                err,
            };
            if let [head] = out {
                // A fixed-size copy: a lone head is the common case at low queue depth.
                let mut raw = [0u8; 2];
                mem.read(entry, &mut raw).map_err(avail_err)?;
                *head = u16::from_le_bytes(raw);
            } else {
                let mut raw = [0u8; 2 * POP_RUN];
                let Some(raw) = raw.get_mut(..2 * run) else {
                    break;
                };
                mem.read(entry, raw).map_err(avail_err)?;
                for (head, bytes) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    if let &[lo, hi] = bytes {
                        *head = u16::from_le_bytes([lo, hi]);
                    }
                }
            }
            self.next_avail = self.next_avail.wrapping_add(run as u16);
            done += run;
        }
        Ok(done)
    }

    /// Pops one head index, if the driver made one available.
    pub fn pop_head<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<u16>, QueueError> {
        let mut head = [0u16; 1];
        Ok(match self.pop_heads(mem, &mut head)? {
            0 => None,
            _ => Some(head[0]),
        })
    }

    /// Starts fetching the first buffer of each chain at `heads` (a virtio-blk or virtio-scsi
    /// request header) before any chain is walked. The driver has just written those lines, so
    /// each is a cache miss on this core; issued together they overlap, where walking and
    /// decoding one request at a time takes them one after the other. Only a hint: nothing is
    /// validated or returned, and a malformed chain is left for [`SplitQueue::walk_chain`].
    // Out of line: inlined into a large poll loop (virtio-scsi's), its descriptor read and
    // translations were left as calls, about 90 instructions per request; on its own it is ~50.
    #[inline(never)]
    pub fn prefetch_chains<M: GuestMemory + ?Sized>(&self, mem: &M, heads: &[u16]) {
        for &head in heads {
            if let Some(desc) = self.read_desc(mem, head) {
                mem.prefetch(desc.addr, false);
            }
        }
    }

    /// Descriptor `index` of the table, if it is inside the queue and readable.
    #[inline]
    fn read_desc<M: GuestMemory + ?Sized>(&self, mem: &M, index: u16) -> Option<VirtqDesc> {
        if index >= self.config.size {
            return None;
        }
        let addr = self
            .config
            .desc_table
            .checked_add(u64::from(index) * VirtqDesc::SIZE as u64)?;
        let mut raw = [0u8; VirtqDesc::SIZE];
        mem.read(addr, &mut raw).ok()?;
        Some(VirtqDesc::from_bytes(&raw))
    }

    /// Walks the descriptor chain starting at `head` into `chain` (see [`ChainError`] for how
    /// rejections are reported). Out of line: inlined into the device's poll loop (with
    /// `chain::walk` left out of line instead) it cost 21 instructions more per request.
    #[inline(never)]
    pub fn walk_chain<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: u16,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        let params = chain::WalkParams {
            desc_table: self.config.desc_table,
            size: self.config.size,
            indirect: self.indirect,
        };
        chain::walk(mem, params, head, chain)
    }

    /// Writes a used element (`id` = chain head, `len` = bytes written into the chain) into the next
    /// used slot without publishing it; [`SplitQueue::publish_used`] makes a batch visible.
    pub fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        id: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if id >= self.config.size {
            return Err(QueueError::UsedIdOutOfRange { id });
        }
        let elem = VirtqUsedElem {
            id: u32::from(id),
            len,
        };
        let addr = self.used_addr(
            RING_ARRAY_OFFSET + VirtqUsedElem::SIZE as u64 * self.slot(self.next_used),
        )?;
        mem.write_array(addr, &elem.to_bytes())
            .map_err(|err| QueueError::Memory {
                part: RingPart::Used,
                err,
            })?;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Makes every pushed used element visible to the driver: one Release store of `used.idx`, which
    /// orders the element writes before it.
    pub fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), QueueError> {
        if self.next_used == self.published_used {
            return Ok(());
        }
        mem.store_u16(
            self.used_addr(RING_IDX_OFFSET)?,
            self.next_used,
            Ordering::Release,
        )
        .map_err(|err| QueueError::Memory {
            part: RingPart::Used,
            err,
        })?;
        self.published_used = self.next_used;
        Ok(())
    }

    /// [`SplitQueue::push_used`] and [`SplitQueue::publish_used`] in one.
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        id: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        self.push_used(mem, id, len)?;
        self.publish_used(mem)
    }

    /// The driver's `used_event` (the avail ring's trailing field, read with EVENT_IDX).
    #[inline]
    fn used_event<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        let addr = self.avail_addr(RING_ARRAY_OFFSET + 2 * u64::from(self.config.size))?;
        mem.load_u16(addr, Ordering::Acquire)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Avail,
                err,
            })
    }

    /// Whether the driver wants a used-buffer notification (call eventfd) for what was published
    /// since the last time this returned.
    ///
    /// Without `VIRTIO_F_RING_EVENT_IDX`: unless `avail.flags` has `VIRTQ_AVAIL_F_NO_INTERRUPT`.
    /// With it: if publishing moved `used.idx` across the driver's `used_event` (`vring_need_event`,
    /// §2.7.10). Never if nothing was published since the last decision. Call it once per poll round
    /// after [`SplitQueue::publish_used`].
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        let new = self.published_used;
        let old = self.signalled_used;
        if old == Some(new) {
            return Ok(false);
        }
        // The used.idx store must be globally visible before the driver's suppression field is read;
        // otherwise a driver that just re-enabled interrupts and saw the old used.idx waits forever
        // (the store→load ordering needs a full fence, not just Release/Acquire).
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let used_event = self.used_event(mem)?;
            match old {
                None => true,
                Some(old) => ring::vring_need_event(used_event, new, old),
            }
        } else {
            let flags = mem
                .load_u16(self.avail_addr(RING_FLAGS_OFFSET)?, Ordering::Acquire)
                .map_err(|err| QueueError::Memory {
                    part: RingPart::Avail,
                    err,
                })?;
            flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        };
        self.signalled_used = Some(new);
        if notify {
            self.notified_used = Some(new);
        }
        Ok(notify)
    }

    /// A second look after [`SplitQueue::needs_notification`] said no: whether the driver now
    /// waits for a notification for buffers already published. With `VIRTIO_F_RING_EVENT_IDX`
    /// the driver re-arms by writing its last seen used index into `used_event` and then reading
    /// `used.idx` again; if the two sides' store→load orderings fail (a TCG vCPU that elides the
    /// guest's barrier, as QEMU before 8.1 does for a single vCPU), both read the old value: the
    /// device decides not to notify and the driver sleeps with buffers on its used ring.
    /// `used_event` then names an index the device passed since its last notification, which is
    /// what this reports ([`LateNotification::Notify`], counted as a notification). A driver
    /// still processing leaves `used_event` behind that notification ([`LateNotification::Wait`]);
    /// one that saw everything sets it to the published index ([`LateNotification::Settled`]).
    /// Without EVENT_IDX the flags cannot tell a driver that saw everything from one that did
    /// not, and this is always settled.
    pub fn late_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<LateNotification, QueueError> {
        let new = self.published_used;
        let Some(old) = self.notified_used.filter(|_| self.event_idx) else {
            return Ok(LateNotification::Settled);
        };
        if old == new {
            return Ok(LateNotification::Settled);
        }
        fence(Ordering::SeqCst);
        let used_event = self.used_event(mem)?;
        Ok(if used_event == new {
            LateNotification::Settled
        } else if ring::vring_need_event(used_event, new, old) {
            self.notified_used = Some(new);
            self.signalled_used = Some(new);
            LateNotification::Notify
        } else {
            LateNotification::Wait
        })
    }

    /// Writes `avail_event` (the `used` ring's trailing field): with `VIRTIO_F_RING_EVENT_IDX` the
    /// driver notifies the device when `avail.idx` moves past this value.
    pub fn set_avail_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        value: u16,
    ) -> Result<(), QueueError> {
        let addr = self.used_addr(
            RING_ARRAY_OFFSET + VirtqUsedElem::SIZE as u64 * u64::from(self.config.size),
        )?;
        mem.store_u16(addr, value, Ordering::Release)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Used,
                err,
            })
    }

    fn set_used_flags<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        flags: u16,
    ) -> Result<(), QueueError> {
        mem.store_u16(self.used_addr(RING_FLAGS_OFFSET)?, flags, Ordering::Release)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Used,
                err,
            })
    }

    /// Poll mode: asks the driver not to notify (kick) the device. Sets `VIRTQ_USED_F_NO_NOTIFY`,
    /// and with `VIRTIO_F_RING_EVENT_IDX` (where the driver ignores that flag) parks `avail_event`
    /// just behind `last_avail_idx`, which `avail.idx` can only cross after a full 2^16 wrap. Call it
    /// when the queue starts, and after each poll round that popped buffers, so `avail_event` keeps
    /// trailing; skipping empty rounds avoids dirtying the used ring's cache lines for nothing.
    ///
    /// Once parked, the two fields are written again only when `avail_event` trails by
    /// [`SplitQueue::park_slack`] or more: the driver kicks when `avail.idx` moves across
    /// `avail_event` (§2.7.10), and `avail.idx` is never below a value `last_avail_idx` had since
    /// the park nor more than the queue size above the present one, so while the parked value
    /// trails by less than `2^16 - 2 * size` (the slack, plus at most a queue's worth popped
    /// before this call) the driver cannot reach its next alias. In poll mode the fields then
    /// cost a store each per 2^15 - size requests instead of per round.
    pub fn disable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), QueueError> {
        let trailing = self.next_avail.wrapping_sub(1);
        if let Some(parked) = self.kicks_parked {
            if trailing.wrapping_sub(parked) < self.park_slack() {
                return Ok(());
            }
        }
        self.set_used_flags(mem, VIRTQ_USED_F_NO_NOTIFY)?;
        if self.event_idx {
            self.set_avail_event(mem, trailing)?;
        }
        self.kicks_parked = Some(trailing);
        Ok(())
    }

    /// How far a parked `avail_event` may trail `last_avail_idx - 1` before
    /// [`SplitQueue::disable_kicks`] parks it again: `2^15 - size` (at least `2^14` for the queue
    /// sizes drivers use; 0, so every call writes, for the largest queue of 2^15).
    fn park_slack(&self) -> u16 {
        0x8000u16.saturating_sub(self.config.size)
    }

    /// Interrupt mode: asks the driver to kick for the next buffer it adds, then re-checks the ring.
    /// Returns whether buffers are already pending (then the caller must poll again instead of
    /// sleeping: the driver may have added them before it saw the request).
    pub fn enable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, QueueError> {
        self.kicks_parked = None;
        self.set_used_flags(mem, 0)?;
        if self.event_idx {
            self.set_avail_event(mem, self.next_avail)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? != 0)
    }
}

impl core::error::Error for QueueError {}
impl core::error::Error for ChainError {}
impl core::error::Error for ChainErrorKind {}
