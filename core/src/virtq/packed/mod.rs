//! The packed virtqueue (virtio 1.2 §2.8) as a poll-mode device sees it.
//!
//! One descriptor ring serves both directions: the driver marks a descriptor available by
//! setting its `AVAIL` bit to the driver's ring wrap counter and `USED` to the inverse; the device
//! marks a list used by writing one used descriptor (buffer ID, written length, `AVAIL` and `USED`
//! both equal to the device's wrap counter) at its own next position, then skips as many
//! positions as the list had descriptors. Both counters start at 1 and flip each time their side
//! passes the end of the ring. Two 4-byte event suppression structures replace the split ring's
//! flags and event indices.
//!
//! [`PackedQueue`] has the split ring's shape (see [`crate::virtq`]), so a device runs the same
//! poll round on either: `pop_heads` (here the heads are [`PackedHead`]s: a list's position,
//! descriptor count and buffer ID), `walk_chain` into the same [`Chain`], `push_used`,
//! `publish_used` once per round, `needs_notification`. The three addresses are those vhost-user
//! and the transports pass for any ring, in a [`QueueConfig`]: `desc_table` is the descriptor
//! ring, `avail_ring` the Driver Area (driver event suppression), `used_ring` the Device Area
//! (device event suppression).
//!
//! ```
//! use rvhost_core::mem::{ByteMemory, GuestMemory};
//! use rvhost_core::virtio::{bit, feature};
//! use rvhost_core::virtq::packed::{avail_bits, PackedDesc, PackedHead, PackedQueue};
//! use rvhost_core::virtq::{Chain, QueueConfig};
//! use core::sync::atomic::Ordering;
//!
//! // A 64 KiB guest with a 16-entry ring at 0x0, driver area at 0x100, device area at 0x104.
//! let mut ram = vec![0u8; 0x1_0000];
//! let mem = ByteMemory::new(0, 0x7f00_0000_0000, &mut ram);
//! let config = QueueConfig { size: 16, desc_table: 0x0, avail_ring: 0x100, used_ring: 0x104 };
//! let features = bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_RING_PACKED);
//! let mut queue = PackedQueue::new(config, features)?;
//! queue.check_rings(&mem)?;
//!
//! // What a driver does: buffer 3, one writable 512-byte element, available in lap 1.
//! let desc = PackedDesc { addr: 0x1000, len: 512, id: 3, flags: 2 | avail_bits(true) };
//! mem.write(0x0, &desc.to_bytes())?;
//!
//! let mut heads = [PackedHead::default(); 32];
//! let mut chain: Chain<128> = Chain::new();
//!
//! // --- one poll round ---
//! queue.disable_kicks(&mem)?;
//! let popped = queue.pop_heads(&mem, &mut heads)?;
//! for &head in &heads[..popped] {
//!     match queue.walk_chain(&mem, head, &mut chain) {
//!         Ok(()) => queue.push_used(&mem, head, chain.writable_len())?,
//!         // As with the split ring: fail the request through its status segment, or return it
//!         // unused if `head_is_valid()`, else mark the device DEVICE_NEEDS_RESET.
//!         Err(e) => { let _ = e; }
//!     }
//! }
//! queue.publish_used(&mem)?; // the batch's first used descriptor's flags, written last
//! if queue.needs_notification(&mem)? {
//!     // write 1 to the call eventfd
//! }
//! let mut used = [0u8; 16];
//! mem.read(0x0, &mut used)?;
//! let used = PackedDesc::from_bytes(&used);
//! assert_eq!((used.id, used.len, used.flags), (3, 512, 0x8082)); // AVAIL|USED|WRITE
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod desc;
mod walk;

pub use desc::{
    avail_bits, is_available, pack_off_wrap, used_bits, EventSuppress, PackedDesc, DESC_RING_ALIGN,
    EVENT_SUPPRESS_ALIGN, EVENT_SUPPRESS_SIZE, MAX_PACKED_QUEUE_SIZE, RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_MASK, RING_EVENT_WRAP_BIT,
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
};
pub use walk::MAX_INDIRECT_ENTRIES;

use core::sync::atomic::{fence, Ordering};

use crate::mem::{GuestMemory, MemError};
use crate::virtio::{feature, has_feature};
use crate::virtq::{Chain, ChainError, LateNotification, QueueConfig, POP_SPLIT_ABOVE};

use desc::{desc_flags, desc_id, AVAIL_USED, FLAGS_OFFSET, LEN_OFFSET};

/// One of the three parts of a packed virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedRingPart {
    /// The descriptor ring (Descriptor Area).
    DescRing,
    /// The driver event suppression structure (Driver Area): read by the device.
    DriverEvent,
    /// The device event suppression structure (Device Area): written by the device.
    DeviceEvent,
}

/// An error configuring or accessing a packed virtqueue. Every one of them means the queue cannot
/// be trusted any more: the device should set `DEVICE_NEEDS_RESET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedQueueError {
    /// The queue size is zero or above 32768.
    InvalidSize(u16),
    /// A part's address violates its required alignment (§2.8, "Structure Size and Alignment").
    Misaligned {
        /// Which part.
        part: PackedRingPart,
        /// Its guest address.
        addr: u64,
    },
    /// A part does not lie inside one mapped region, or an access to it failed.
    Memory {
        /// Which part.
        part: PackedRingPart,
        /// Why.
        err: MemError,
    },
    /// A descriptor after the first of a list (the one before it has `NEXT`) is not marked
    /// available for its lap: the driver must write the whole list before its first descriptor.
    NotAvailable {
        /// Ring position of the descriptor.
        pos: u16,
    },
    /// A list is longer than the queue (a `NEXT` on every descriptor).
    ListTooLong {
        /// Ring position of the list's first descriptor.
        pos: u16,
    },
    /// The driver made available more descriptors than the ring holds: one the device had
    /// popped and not yet returned is marked available again.
    Overcommitted {
        /// Ring position of the list's first descriptor.
        pos: u16,
    },
    /// The device tried to return a buffer ID that is not below the queue size.
    UsedIdOutOfRange {
        /// The offending ID.
        id: u16,
    },
    /// The device tried to return a list of zero descriptors, or more descriptors than it has
    /// popped and not yet returned (a [`PackedHead`] that does not come from this queue).
    UsedCountInvalid {
        /// The list's descriptor count.
        count: u16,
        /// Descriptors popped and not yet returned.
        outstanding: u16,
    },
    /// A ring position (vhost-user vring base: position in bits 0..15, wrap counter in bit 15)
    /// that is not below the queue size, or a used position more than a ring ahead of or behind
    /// the available one.
    InvalidRingState {
        /// The value as given.
        value: u16,
    },
}

impl core::fmt::Display for PackedQueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PackedQueueError::InvalidSize(size) => {
                write!(f, "packed queue size {size} is not in 1..=32768")
            }
            PackedQueueError::Misaligned { part, addr } => {
                write!(f, "{part:?} at {addr:#x} is misaligned")
            }
            PackedQueueError::Memory { part, err } => write!(f, "{part:?}: {err}"),
            PackedQueueError::NotAvailable { pos } => write!(
                f,
                "descriptor at ring position {pos} continues a list but is not available"
            ),
            PackedQueueError::ListTooLong { pos } => write!(
                f,
                "list at ring position {pos} is longer than the queue (loop?)"
            ),
            PackedQueueError::Overcommitted { pos } => write!(
                f,
                "list at ring position {pos} reuses descriptors the device has not returned"
            ),
            PackedQueueError::UsedIdOutOfRange { id } => {
                write!(f, "used buffer id {id} is outside the queue")
            }
            PackedQueueError::UsedCountInvalid { count, outstanding } => write!(
                f,
                "returning {count} descriptors with {outstanding} outstanding"
            ),
            PackedQueueError::InvalidRingState { value } => {
                write!(f, "ring position {value:#x} is outside the queue")
            }
        }
    }
}

impl core::error::Error for PackedQueueError {}

/// A list popped from the packed ring: what [`PackedQueue::walk_chain`] needs to read it and
/// [`PackedQueue::push_used`] needs to return it. A device keeps it with the request (it is
/// `Copy`, six bytes) as it keeps the head index of a split-ring chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackedHead {
    /// Buffer ID, from the list's last descriptor: what goes into the used descriptor.
    pub id: u16,
    /// Ring position of the list's first descriptor.
    pub pos: u16,
    /// Descriptors the list occupies in the ring (an indirect table counts as one).
    pub count: u16,
    /// The driver's wrap counter in the lap of `pos`.
    pub wrap: bool,
}

/// The device side of one packed virtqueue.
#[derive(Debug, Clone)]
pub struct PackedQueue {
    config: QueueConfig,
    event_idx: bool,
    indirect: bool,
    /// Next ring position to pop, and the driver's wrap counter there.
    next_avail: u16,
    avail_wrap: bool,
    /// Next ring position to write a used descriptor at, and the device's wrap counter there
    /// (includes pushed but unpublished descriptors).
    next_used: u16,
    used_wrap: bool,
    /// Descriptors popped and not yet returned: the ring positions `next_used..next_avail`.
    outstanding: u16,
    /// The first used descriptor pushed since the last publish (position, flags): its flags are
    /// written last, by [`PackedQueue::publish_used`], so the driver (which polls only its next
    /// position) sees the batch at once.
    unpublished_head: Option<(u16, u16)>,
    /// Descriptors pushed since the last publish.
    unpublished: u32,
    /// The used position as last published, and the device's wrap counter there.
    published_used: u16,
    published_wrap: bool,
    /// Descriptors published since the last notification decision.
    unsignalled: u32,
    /// The published used position at the last notification decision; `None` until the first,
    /// after which the driver is notified unconditionally once (as the split ring does).
    signalled: Option<(u16, bool)>,
    /// The published used position at the last decision that notified (`None`: none yet), and
    /// the descriptors published since: what a late check
    /// ([`PackedQueue::late_notification`]) measures the driver's event offset against.
    notified: Option<(u16, bool)>,
    unnotified: u32,
    /// What the device event suppression structure was last set to (so that polling rounds do
    /// not dirty its cache line with the same value).
    kicks: Option<EventSuppress>,
    /// Copies of the descriptors the last [`PackedQueue::pop_heads`] read, for
    /// [`PackedQueue::walk_popped`].
    popped: PoppedDescs,
}

/// Descriptors [`PackedQueue::pop_heads`] keeps for the walk: the pop reads the ring in runs
/// (one guest-memory copy per run, not one per descriptor) and keeps the copies, so the walk need
/// not read them again. They are the ring positions `pos..pos + len` of the lap whose driver
/// wrap counter is `wrap`, in order, and always whole lists that were available when read; a
/// list that does not fit is popped and walked from the ring.
///
/// The lists from `popped_to` on were read but not popped (a pipelined pop read them to count
/// them and took half, or a run read more than the batch took): the next pop moves them to the
/// front and takes them from there, so every descriptor is read from guest memory once.
#[derive(Debug, Clone)]
struct PoppedDescs {
    descs: [PackedDesc; POPPED_DESCS],
    len: u16,
    pos: u16,
    wrap: bool,
    /// Offset of the first kept list not popped yet (`len` if there is none).
    popped_to: u16,
    /// The kept lists in order, as their reads found them: `lists[first..end]` are the ones from
    /// `popped_to` on (not popped yet), so a pop takes the next one without looking at the
    /// copies again.
    lists: [KeptList; POPPED_DESCS],
    first: u16,
    end: u16,
    /// The bytes of the last run read (kept here, not on the stack, so that no pop zeroes a
    /// buffer).
    raw: [[u8; PackedDesc::SIZE]; RUN_MAX as usize],
}

/// A ring position and the wrap counter of its lap.
type RingPos = (u16, bool);

/// What [`PackedQueue::read_list_start`] did.
enum ListStart {
    /// It read the whole list (or found it malformed: then it returned the error).
    Done(Run),
    /// The list goes on past the copied descriptors, which are kept.
    Continue,
    /// It read nothing.
    Declined,
}

/// One whole list among the kept copies: its descriptor count and buffer ID (from its last
/// descriptor), recorded by the read that found its end.
#[derive(Debug, Clone, Copy, Default)]
struct KeptList {
    count: u16,
    id: u16,
}

/// `(pos, wrap)` in a ring of `size` moved `n <= size` positions on.
#[inline]
fn advance(size: u16, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
    let size = u32::from(size);
    let next = u32::from(pos) + u32::from(n);
    if next >= size {
        // `next - size < size <= 32768`.
        ((next - size) as u16, !wrap)
    } else {
        (next as u16, wrap)
    }
}

/// Reads `raw.len() / 16` descriptors of the ring at `config` from position `pos` on (across its
/// end: one copy up to the end and one from the start).
fn copy_ring<M: GuestMemory + ?Sized>(
    config: &QueueConfig,
    mem: &M,
    pos: u16,
    raw: &mut [u8],
) -> Result<(), PackedQueueError> {
    let err = |err| PackedQueueError::Memory {
        part: PackedRingPart::DescRing,
        err,
    };
    let to_end = usize::from(config.size.saturating_sub(pos)) * PackedDesc::SIZE;
    let (head, tail) = raw.split_at_mut(to_end.min(raw.len()));
    let at = (u64::from(pos) * PackedDesc::SIZE as u64)
        .checked_add(config.desc_table)
        .ok_or(err(MemError::Overflow))?;
    mem.read(at, head).map_err(err)?;
    if !tail.is_empty() {
        mem.read(config.desc_table, tail).map_err(err)?;
    }
    Ok(())
}

/// Descriptors a pop keeps: 32 lists (the device shell's batch) of four.
const POPPED_DESCS: usize = 128;

/// Descriptors the first run of a batch reads; each further run reads twice as many, up to
/// [`RUN_MAX`]. Eight cache lines, ten lists of three: a run's fixed costs (flags load, copies,
/// fence, region lookups) paid over more lists than with 16 (device_poll blk null b32 −17
/// instructions per request), without copying a whole 1 KiB at shallow depths (64: −38 more).
const RUN_FIRST: u16 = 32;
/// Descriptors one run reads at most.
const RUN_MAX: u16 = 64;

/// Descriptors the read of a batch's first list copies at once (a request of three or four
/// descriptors, and the next list's first descriptor, whose flags say whether there is one).
const FIRST_READ: u16 = 4;

/// What [`PackedQueue::read_list`] and [`PackedQueue::read_run`] found at the next position.
enum Run {
    /// Whole lists were added to the kept copies.
    Added,
    /// Whole lists were added to the kept copies, and the descriptor after them was not
    /// available when they were read: the ring had no more.
    AddedAll,
    /// Nothing is available.
    Empty,
    /// The list there is longer than the run: read a longer one.
    TooShort,
    /// The list there does not fit in the copies: pop it from the ring.
    Uncopied,
}

impl PoppedDescs {
    const fn empty() -> Self {
        PoppedDescs {
            descs: [PackedDesc {
                addr: 0,
                len: 0,
                id: 0,
                flags: 0,
            }; POPPED_DESCS],
            len: 0,
            pos: 0,
            wrap: true,
            popped_to: 0,
            lists: [KeptList { count: 0, id: 0 }; POPPED_DESCS],
            first: 0,
            end: 0,
            raw: [[0; PackedDesc::SIZE]; RUN_MAX as usize],
        }
    }

    /// Forgets everything kept; the next kept descriptor is the one at `(pos, wrap)`.
    #[inline]
    fn restart(&mut self, pos: u16, wrap: bool) {
        self.len = 0;
        self.pos = pos;
        self.wrap = wrap;
        self.popped_to = 0;
        self.first = 0;
        self.end = 0;
    }

    /// Kept lists not popped yet.
    #[inline]
    fn unpopped(&self) -> u16 {
        self.end.saturating_sub(self.first)
    }

    /// Keeps a whole list of `count` descriptors, copied to the end of the kept ones, with buffer
    /// ID `id`. `false` if there is no room for its record (there always is: every list holds a
    /// kept descriptor).
    #[inline]
    fn keep_list(&mut self, count: u16, id: u16) -> bool {
        let Some(slot) = self.lists.get_mut(usize::from(self.end)) else {
            return false;
        };
        *slot = KeptList { count, id };
        self.end = self.end.saturating_add(1);
        self.len = self.len.saturating_add(count);
        true
    }

    /// The copies of `head`'s descriptors, if all of them are kept.
    #[inline]
    fn list(&self, head: &PackedHead, size: u16) -> Option<&[PackedDesc]> {
        // Offset of `head.pos` from `self.pos` in linear ring positions, if it is ahead of it
        // by less than a lap.
        let offset = if head.wrap == self.wrap {
            head.pos.checked_sub(self.pos)?
        } else if head.pos < self.pos {
            head.pos.checked_add(size)?.checked_sub(self.pos)?
        } else {
            return None;
        };
        let end = offset.checked_add(head.count)?;
        if end > self.len {
            return None;
        }
        self.descs.get(usize::from(offset)..usize::from(end))
    }
}

impl PackedQueue {
    /// A queue at `config` with the negotiated `features` (only `VIRTIO_F_RING_EVENT_IDX` and
    /// `VIRTIO_F_RING_INDIRECT_DESC` matter here). Both wrap counters start at 1, both positions
    /// at 0 (§2.8, "Driver and Device Ring Wrap Counters").
    pub fn new(config: QueueConfig, features: u64) -> Result<Self, PackedQueueError> {
        if config.size == 0 || config.size > MAX_PACKED_QUEUE_SIZE {
            return Err(PackedQueueError::InvalidSize(config.size));
        }
        for (part, addr, align) in [
            (PackedRingPart::DescRing, config.desc_table, DESC_RING_ALIGN),
            (
                PackedRingPart::DriverEvent,
                config.avail_ring,
                EVENT_SUPPRESS_ALIGN,
            ),
            (
                PackedRingPart::DeviceEvent,
                config.used_ring,
                EVENT_SUPPRESS_ALIGN,
            ),
        ] {
            if addr % align != 0 {
                return Err(PackedQueueError::Misaligned { part, addr });
            }
        }
        Ok(PackedQueue {
            config,
            event_idx: has_feature(features, feature::VIRTIO_F_RING_EVENT_IDX),
            indirect: has_feature(features, feature::VIRTIO_F_RING_INDIRECT_DESC),
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            outstanding: 0,
            unpublished_head: None,
            unpublished: 0,
            published_used: 0,
            published_wrap: true,
            unsignalled: 0,
            signalled: None,
            notified: None,
            unnotified: 0,
            kicks: None,
            popped: PoppedDescs::empty(),
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

    /// Descriptors popped and not yet returned.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Checks that the three parts lie inside mapped guest memory (call after the rings are
    /// configured and after every memory-table change).
    pub fn check_rings<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), PackedQueueError> {
        for (part, addr, len) in [
            (
                PackedRingPart::DescRing,
                self.config.desc_table,
                PackedDesc::SIZE as u64 * u64::from(self.config.size),
            ),
            (
                PackedRingPart::DriverEvent,
                self.config.avail_ring,
                EVENT_SUPPRESS_SIZE,
            ),
            (
                PackedRingPart::DeviceEvent,
                self.config.used_ring,
                EVENT_SUPPRESS_SIZE,
            ),
        ] {
            mem.translate(addr, len)
                .map_err(|err| PackedQueueError::Memory { part, err })?;
        }
        Ok(())
    }

    /// The next position to pop and the driver's wrap counter there, in the vhost-user vring base
    /// form of a packed ring (`GET_VRING_BASE`): position in bits 0..15, wrap counter in bit 15.
    pub fn last_avail_idx(&self) -> u16 {
        pack_off_wrap(self.next_avail, self.avail_wrap)
    }

    /// Sets the next position to pop (vhost-user `SET_VRING_BASE`, the form of
    /// [`PackedQueue::last_avail_idx`]). The used position follows it, with nothing outstanding,
    /// as for a queue that starts or restarts after every buffer was returned; a reconnect with
    /// requests in flight sets it afterwards with [`PackedQueue::set_used_idx`].
    pub fn set_last_avail_idx(&mut self, value: u16) -> Result<(), PackedQueueError> {
        let (pos, wrap) = self.unpack(value)?;
        self.next_avail = pos;
        self.avail_wrap = wrap;
        self.reset_used(pos, wrap);
        self.outstanding = 0;
        self.popped.restart(pos, wrap);
        Ok(())
    }

    /// The next position to write a used descriptor at and the device's wrap counter there
    /// (same form as [`PackedQueue::last_avail_idx`]); includes pushed, unpublished descriptors.
    pub fn used_idx(&self) -> u16 {
        pack_off_wrap(self.next_used, self.used_wrap)
    }

    /// Sets the used position (reconnecting with requests in flight): the descriptors between it
    /// and the available position count as popped and not returned. Drops unpublished used
    /// descriptors and forgets the last notification, so the next
    /// [`PackedQueue::needs_notification`] says yes.
    pub fn set_used_idx(&mut self, value: u16) -> Result<(), PackedQueueError> {
        let (pos, wrap) = self.unpack(value)?;
        let outstanding = self.distance((pos, wrap), (self.next_avail, self.avail_wrap));
        let outstanding =
            u16::try_from(outstanding).map_err(|_| PackedQueueError::InvalidRingState { value })?;
        if outstanding > self.config.size {
            return Err(PackedQueueError::InvalidRingState { value });
        }
        self.reset_used(pos, wrap);
        self.outstanding = outstanding;
        Ok(())
    }

    fn reset_used(&mut self, pos: u16, wrap: bool) {
        self.next_used = pos;
        self.used_wrap = wrap;
        self.published_used = pos;
        self.published_wrap = wrap;
        self.unpublished_head = None;
        self.unpublished = 0;
        self.unsignalled = 0;
        self.signalled = None;
        self.notified = None;
        self.unnotified = 0;
    }

    fn unpack(&self, value: u16) -> Result<(u16, bool), PackedQueueError> {
        let pos = value & !RING_EVENT_WRAP_BIT;
        if pos >= self.config.size {
            return Err(PackedQueueError::InvalidRingState { value });
        }
        Ok((pos, value & RING_EVENT_WRAP_BIT != 0))
    }

    /// A position and wrap counter as one number modulo twice the ring: laps with wrap counter 1
    /// are `0..size`, laps with wrap counter 0 are `size..2 * size`.
    /// Compares and subtractions, not `%`: a division is tens of cycles, and this runs at every
    /// notification decision in `DESC` mode.
    #[inline]
    fn linear(&self, (pos, wrap): (u16, bool)) -> u32 {
        let size = u32::from(self.config.size);
        let twice = 2 * size;
        let mut pos = u32::from(pos);
        if pos >= twice {
            // Only an event offset from the guest can be this far out.
            pos %= twice;
        }
        // `pos < twice` and `size < twice`: one subtraction brings it below `twice`.
        let linear = pos + if wrap { 0 } else { size };
        if linear >= twice {
            linear - twice
        } else {
            linear
        }
    }

    /// How many positions `to` is ahead of `from`, modulo twice the ring.
    #[inline]
    fn distance(&self, from: (u16, bool), to: (u16, bool)) -> u32 {
        let twice = 2 * u32::from(self.config.size);
        // Both below `twice`, so the sum is below `2 * twice`.
        let ahead = self.linear(to) + twice - self.linear(from);
        if ahead >= twice {
            ahead - twice
        } else {
            ahead
        }
    }

    /// `(pos, wrap)` moved `n <= size` positions on.
    fn advance(&self, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
        advance(self.config.size, pos, wrap, n)
    }

    /// Guest address of the descriptor at ring position `pos` plus `offset` bytes.
    fn desc_addr(&self, pos: u16, offset: u64) -> Result<u64, PackedQueueError> {
        (u64::from(pos) * PackedDesc::SIZE as u64 + offset)
            .checked_add(self.config.desc_table)
            .ok_or(PackedQueueError::Memory {
                part: PackedRingPart::DescRing,
                err: MemError::Overflow,
            })
    }

    /// `flags` of the descriptor at `pos`, loaded with Acquire so that the rest of the descriptor
    /// (and of its list, which the driver wrote before the first descriptor's flags) is visible.
    /// Always inlined: the lone pop's and every batch's first load (out of line when `read_run`
    /// grew, +20 instructions a request at batch 1).
    #[inline(always)]
    fn load_flags<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        pos: u16,
    ) -> Result<u16, PackedQueueError> {
        mem.load_u16(self.desc_addr(pos, FLAGS_OFFSET)?, Ordering::Acquire)
            .map_err(|err| PackedQueueError::Memory {
                part: PackedRingPart::DescRing,
                err,
            })
    }

    /// Whether the driver has made a list available at the next position.
    pub fn has_available<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<bool, PackedQueueError> {
        Ok(is_available(
            self.load_flags(mem, self.next_avail)?,
            self.avail_wrap,
        ))
    }

    /// The 16 bytes of the descriptor at `pos`, copied out once.
    #[inline]
    fn read_desc<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        pos: u16,
    ) -> Result<PackedDesc, PackedQueueError> {
        let raw = mem
            .read_array::<{ PackedDesc::SIZE }>(self.desc_addr(pos, 0)?)
            .map_err(|err| PackedQueueError::Memory {
                part: PackedRingPart::DescRing,
                err,
            })?;
        Ok(PackedDesc::from_bytes(&raw))
    }

    /// Pops the list at the next position, if the driver made one available (see
    /// [`PackedQueue::pop_heads`]).
    pub fn pop_head<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<PackedHead>, PackedQueueError> {
        let mut head = [PackedHead::default(); 1];
        Ok(match self.pop_heads(mem, &mut head)? {
            0 => None,
            _ => head.first().copied(),
        })
    }

    /// Pops the list at the next position from the ring, descriptor by descriptor, keeping no
    /// copies: for a list too long for the kept copies. Follows its `NEXT` flags (each
    /// descriptor must be available in its lap) to its last descriptor, whose buffer ID it takes.
    fn pop_uncopied<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<PackedHead>, PackedQueueError> {
        let start = (self.next_avail, self.avail_wrap);
        // The first descriptor's flags with Acquire: the driver writes them last, after the rest
        // of the list, so everything read after this load is what it wrote.
        let first_flags = self.load_flags(mem, start.0)?;
        if !is_available(first_flags, start.1) {
            return Ok(None);
        }
        let size = self.config.size;
        let (mut pos, mut wrap) = start;
        let mut count: u16 = 0;
        let mut desc = self.read_desc(mem, pos)?;
        desc.flags = first_flags;
        let id = loop {
            if count == size {
                return Err(PackedQueueError::ListTooLong { pos: start.0 });
            }
            count += 1;
            if u32::from(self.outstanding) + u32::from(count) > u32::from(size) {
                return Err(PackedQueueError::Overcommitted { pos: start.0 });
            }
            (pos, wrap) = self.advance(pos, wrap, 1);
            if !desc.has_next() {
                break desc.id;
            }
            desc = self.read_desc(mem, pos)?;
            if !is_available(desc.flags, wrap) {
                return Err(PackedQueueError::NotAvailable { pos });
            }
        };
        self.next_avail = pos;
        self.avail_wrap = wrap;
        self.outstanding += count;
        // The copies start after it.
        self.popped.restart(pos, wrap);
        Ok(Some(PackedHead {
            id,
            pos: start.0,
            count,
            wrap: start.1,
        }))
    }

    /// Pops the first kept list not popped yet (the caller checked there is one): its
    /// descriptors were read, found available and checked to form a whole list when they were
    /// kept; what is left is the count against what the device holds.
    /// (The lone pop's; a batch takes its lists with [`PackedQueue::pop_copied_into`], which
    /// through a one-element slice costs the lone pop 18 instructions more.)
    #[inline(always)]
    fn pop_copied(&mut self) -> Result<PackedHead, PackedQueueError> {
        let p = &self.popped;
        let from = p.popped_to;
        let start = (self.next_avail, self.avail_wrap);
        // The caller checked that a kept list is left, so this is only a guard.
        let Some(&KeptList { count, id }) = p
            .lists
            .get(usize::from(p.first))
            .filter(|_| p.first < p.end)
        else {
            return Err(PackedQueueError::NotAvailable { pos: start.0 });
        };
        if u32::from(self.outstanding) + u32::from(count) > u32::from(self.config.size) {
            return Err(PackedQueueError::Overcommitted { pos: start.0 });
        }
        (self.next_avail, self.avail_wrap) = self.advance(start.0, start.1, count);
        self.outstanding += count;
        // `from + count <= len <= 128`.
        self.popped.popped_to = from.saturating_add(count);
        self.popped.first = self.popped.first.saturating_add(1);
        Ok(PackedHead {
            id,
            pos: start.0,
            count,
            wrap: start.1,
        })
    }

    /// Pops kept lists not popped yet into `heads`, as many as there are room and lists for,
    /// each checked as [`PackedQueue::pop_copied`] checks one; the position, the count held and
    /// the kept copies' offsets are updated once for all of them. Fails if the first list would
    /// overcommit the ring (or none is kept); stops before a later one that would, which the
    /// next pop then reports.
    #[inline]
    fn pop_copied_into(&mut self, heads: &mut [PackedHead]) -> Result<usize, PackedQueueError> {
        let size = self.config.size;
        let start = (self.next_avail, self.avail_wrap);
        let p = &self.popped;
        let lists = p
            .lists
            .get(usize::from(p.first)..usize::from(p.end))
            .unwrap_or(&[]);
        let (mut pos, mut wrap) = start;
        let mut held = u32::from(self.outstanding);
        let mut popped: u16 = 0;
        let mut descs: u16 = 0;
        for (out, &KeptList { count, id }) in heads.iter_mut().zip(lists) {
            held += u32::from(count);
            if held > u32::from(size) {
                break;
            }
            *out = PackedHead {
                id,
                pos,
                count,
                wrap,
            };
            (pos, wrap) = advance(size, pos, wrap, count);
            // At most 128 lists of at most 128 descriptors each.
            popped = popped.wrapping_add(1);
            descs = descs.wrapping_add(count);
        }
        if popped == 0 {
            return Err(if lists.is_empty() || heads.is_empty() {
                PackedQueueError::NotAvailable { pos: start.0 }
            } else {
                PackedQueueError::Overcommitted { pos: start.0 }
            });
        }
        (self.next_avail, self.avail_wrap) = (pos, wrap);
        // `held <= size`.
        self.outstanding = self.outstanding.wrapping_add(descs);
        // `popped_to + descs <= len <= 128`, `first + popped <= end <= 128`.
        self.popped.popped_to = self.popped.popped_to.saturating_add(descs);
        self.popped.first = self.popped.first.saturating_add(popped);
        Ok(usize::from(popped))
    }

    /// The opening of [`PackedQueue::read_list`] and [`PackedQueue::read_run`]: the position to
    /// read (the end of the kept copies if lists are kept that were not popped yet, else the next
    /// position to pop) and its flags, loaded with Acquire (the driver writes a list's first
    /// flags last, after the rest of it, so everything read after this load is what it wrote), or
    /// `None` if nothing is available there; the kept copies start over at that position unless
    /// they end there.
    #[inline(always)]
    fn begin_read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<(u16, RingPos)>, PackedQueueError> {
        let end = self.advance(self.popped.pos, self.popped.wrap, self.popped.len);
        let at = if self.popped.popped_to < self.popped.len {
            end
        } else {
            (self.next_avail, self.avail_wrap)
        };
        let flags = self.load_flags(mem, at.0)?;
        if !is_available(flags, at.1) {
            return Ok(None);
        }
        if end != at {
            self.popped.restart(at.0, at.1);
        }
        Ok(Some((flags, at)))
    }

    /// Reads what is available at the next position into the kept copies: a batch's first list
    /// (`first`) descriptor by descriptor with [`PackedQueue::read_list`], later ones in a run of
    /// up to `want` descriptors with [`PackedQueue::read_run`].
    #[inline(always)]
    fn read_next<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        first: bool,
        want: u16,
    ) -> Result<Run, PackedQueueError> {
        match self.begin_read(mem)? {
            Some((flags, at)) if first => self.read_list(mem, flags, at),
            Some((flags, at)) => self.read_run(mem, want, flags, at),
            None => Ok(Run::Empty),
        }
    }

    /// Reads the list at `start`, where `begin_read` found `first_flags` available, into the
    /// copies: the first list of a batch, where one list is all there often is and a run's fixed
    /// costs would not pay. Its first [`FIRST_READ`] descriptors are copied at once (see
    /// [`PackedQueue::read_list_start`]), any further ones one by one. Checks what
    /// [`PackedQueue::pop_uncopied`] checks.
    fn read_list<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        first_flags: u16,
        start: RingPos,
    ) -> Result<Run, PackedQueueError> {
        let size = self.config.size;
        let base = usize::from(self.popped.len);
        // Descriptors the device holds: popped and not returned, and kept but not popped.
        let held = u32::from(self.outstanding)
            + u32::from(self.popped.len.saturating_sub(self.popped.popped_to));
        let (mut pos, mut wrap) = start;
        let mut count: u16 = 0;
        let mut desc = match self.read_list_start(mem, first_flags, start, held)? {
            ListStart::Done(run) => return Ok(run),
            ListStart::Continue => {
                // The first `FIRST_READ` descriptors are kept and all have `NEXT`.
                count = FIRST_READ;
                (pos, wrap) = self.advance(pos, wrap, FIRST_READ);
                let desc = self.read_desc(mem, pos)?;
                if !is_available(desc.flags, wrap) {
                    return Err(PackedQueueError::NotAvailable { pos });
                }
                desc
            }
            ListStart::Declined => {
                let mut desc = self.read_desc(mem, pos)?;
                desc.flags = first_flags;
                desc
            }
        };
        let id = loop {
            if count == size {
                return Err(PackedQueueError::ListTooLong { pos: start.0 });
            }
            let Some(slot) = self.popped.descs.get_mut(base + usize::from(count)) else {
                return Ok(Run::Uncopied);
            };
            *slot = desc;
            count += 1;
            if held + u32::from(count) > u32::from(size) {
                return Err(PackedQueueError::Overcommitted { pos: start.0 });
            }
            (pos, wrap) = self.advance(pos, wrap, 1);
            if !desc.has_next() {
                break desc.id;
            }
            desc = self.read_desc(mem, pos)?;
            if !is_available(desc.flags, wrap) {
                return Err(PackedQueueError::NotAvailable { pos });
            }
        };
        // `base + count <= POPPED_DESCS`: every descriptor found a slot.
        if !self.popped.keep_list(count, id) {
            return Ok(Run::Uncopied);
        }
        Ok(Run::Added)
    }

    /// The start of [`PackedQueue::read_list`]: the first [`FIRST_READ`] descriptors from
    /// `start` in one copy (one region lookup, not one per descriptor), checked as `read_list`
    /// checks them one by one, in the same order. If the list ends among them it is kept, and the
    /// descriptor after it, if copied, says whether another list was available when the list was
    /// read ([`Run::AddedAll`] if not: the pop need not load its flags again). Declined (the
    /// caller reads descriptor by descriptor) when the copy would pass the ring's end or the kept
    /// copies' room, or cannot be read.
    #[inline]
    fn read_list_start<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        first_flags: u16,
        start: RingPos,
        held: u32,
    ) -> Result<ListStart, PackedQueueError> {
        const BYTES: usize = FIRST_READ as usize * PackedDesc::SIZE;
        let size = self.config.size;
        let base = usize::from(self.popped.len);
        if u32::from(start.0) + u32::from(FIRST_READ) > u32::from(size) {
            return Ok(ListStart::Declined);
        }
        let Some(slots) = self
            .popped
            .descs
            .get_mut(base..base + usize::from(FIRST_READ))
        else {
            return Ok(ListStart::Declined);
        };
        let Ok(raw) = self
            .config
            .desc_table
            .checked_add(u64::from(start.0) * PackedDesc::SIZE as u64)
            .ok_or(MemError::Overflow)
            .and_then(|addr| mem.read_array::<BYTES>(addr))
        else {
            return Ok(ListStart::Declined);
        };
        // The copied descriptors, in order.
        let copies = || {
            raw.chunks_exact(PackedDesc::SIZE)
                .filter_map(|d| <&[u8; PackedDesc::SIZE]>::try_from(d).ok())
        };
        let flags_at = FLAGS_OFFSET as usize;
        // The list's length among the copies: the first descriptor without `NEXT` ends it.
        // `start.0 + count < size`: every copied descriptor is in `start`'s lap.
        let mut count: u16 = 0;
        let mut ended = false;
        for d in copies() {
            let flags = if count == 0 {
                first_flags
            } else {
                crate::wire::le_u16(d, flags_at..flags_at + 2)
            };
            if count > 0 && !is_available(flags, start.1) {
                return Err(PackedQueueError::NotAvailable {
                    pos: start.0 + count,
                });
            }
            count += 1;
            if held + u32::from(count) > u32::from(size) {
                return Err(PackedQueueError::Overcommitted { pos: start.0 });
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                ended = true;
                break;
            }
        }
        // All the copies are kept (the first with the flags loaded with Acquire); only the
        // list's are counted.
        for (slot, d) in slots.iter_mut().zip(copies()) {
            *slot = PackedDesc::from_bytes(d);
        }
        if let Some(first) = slots.first_mut() {
            first.flags = first_flags;
        }
        if !ended {
            return Ok(ListStart::Continue);
        }
        // `1 <= count <= FIRST_READ`: the last descriptor is copied, the one after it may be.
        let last = usize::from(count).saturating_sub(1) * PackedDesc::SIZE;
        let id = crate::wire::le_u16(&raw, last + 12..last + 14);
        // Whether another list was available after it when it was read (yes if not copied).
        let after = last + PackedDesc::SIZE + flags_at;
        let more =
            after >= BYTES || is_available(crate::wire::le_u16(&raw, after..after + 2), start.1);
        Ok(ListStart::Done(if !self.popped.keep_list(count, id) {
            Run::Uncopied
        } else if more {
            Run::Added
        } else {
            Run::AddedAll
        }))
    }

    /// Reads a run of up to `want` descriptors from `at`, where `begin_read` found `first`
    /// available, and keeps the whole lists among them that the driver made available.
    ///
    /// The first descriptor's flags are loaded alone with Acquire before anything else (the idle
    /// poll costs that one load); the run is copied after it, so the first list is whole in the
    /// copy (the driver writes a list's first flags last, with Release), and the copy takes the
    /// loaded flags (what the pop decides on is what the walk checks). The copy also says how
    /// many descriptors in a row are available; if that is more than the first list, an Acquire
    /// fence follows and they are copied again: a list whose first descriptor the first copy saw
    /// available is whole in the second.
    fn read_run<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        want: u16,
        first: u16,
        at: RingPos,
    ) -> Result<Run, PackedQueueError> {
        let size = self.config.size;
        // `len <= POPPED_DESCS`.
        let room = POPPED_DESCS as u16 - self.popped.len;
        let n = want.min(RUN_MAX).min(room).min(size);
        if n == 0 {
            return Ok(Run::Uncopied);
        }
        // Run offsets from `to_end` on are in the next lap. The wrap bits of an available
        // descriptor at run offset `i`, in its lap: the same for the whole run unless it passes
        // the ring's end (a constant there, not a compare per descriptor in both scans: 19
        // instructions a request at batch 32).
        let to_end = size.saturating_sub(at.0);
        let (this_lap, next_lap) = (avail_bits(at.1), avail_bits(!at.1));
        if to_end >= n {
            self.read_run_with(mem, want, first, at, n, |_| this_lap)
        } else {
            self.read_run_with(mem, want, first, at, n, |i| {
                if i < to_end {
                    this_lap
                } else {
                    next_lap
                }
            })
        }
    }

    /// The body of [`PackedQueue::read_run`] for a run of `n` descriptors whose offset `i` is
    /// available with the wrap bits `lap_bits(i)`.
    #[inline(always)]
    fn read_run_with<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        want: u16,
        first: u16,
        at: RingPos,
        n: u16,
        lap_bits: impl Fn(u16) -> u16,
    ) -> Result<Run, PackedQueueError> {
        let size = self.config.size;
        let base = self.popped.len;
        let config = self.config;
        let PoppedDescs {
            raw,
            descs,
            lists: kept_lists,
            end: kept_end,
            ..
        } = &mut self.popped;
        // The run as descriptors' bytes (`[u8; 16]` each: the loops below index no slice).
        let Some(run) = raw.get_mut(..usize::from(n)) else {
            return Ok(Run::Uncopied);
        };
        let first_bytes = first.to_le_bytes();
        let flags_at = FLAGS_OFFSET as usize;
        copy_ring(&config, mem, at.0, run.as_flattened_mut())?;
        if let Some(d) = run.first_mut() {
            crate::wire::set(d, flags_at..flags_at + 2, &first_bytes);
        }
        // Descriptors available in a row, in their laps.
        let mut avail: u16 = 0;
        for d in run.iter() {
            if desc_flags(d) & AVAIL_USED != lap_bits(avail) {
                break;
            }
            avail += 1;
        }
        // The end of the first list among them (a loop of its own, over the first list only:
        // kept in the loop above it cost a test per descriptor). The first list was read after
        // the Acquire load of its first flags; what follows it is read again after the fence.
        let first_end = run
            .get(..usize::from(avail))
            .unwrap_or(&[])
            .iter()
            .position(|d| desc_flags(d) & VIRTQ_DESC_F_NEXT == 0)
            .map_or(avail, |i| (i as u16).saturating_add(1));
        if avail > first_end {
            fence(Ordering::Acquire);
            let Some(rest) = raw.get_mut(usize::from(first_end)..usize::from(avail)) else {
                return Ok(Run::Uncopied);
            };
            let (pos, _) = advance(size, at.0, at.1, first_end);
            copy_ring(&config, mem, pos, rest.as_flattened_mut())?;
        }
        let Some(run) = raw.get(..usize::from(avail)) else {
            return Ok(Run::Uncopied);
        };

        // Keep the whole lists; `end`: descriptors up to the end of the last one.
        let mut end: u16 = 0;
        let mut lists: u16 = 0;
        let mut index: u16 = 0;
        let mut problem = None;
        let kept = descs.get_mut(usize::from(base)..).unwrap_or(&mut []);
        // Every list holds a kept descriptor, so there is a record for each.
        let mut records = kept_lists
            .get_mut(usize::from(*kept_end)..)
            .unwrap_or(&mut [])
            .iter_mut();
        // The lists' ends from the flags alone; the whole lists are converted after, in a loop
        // with no branch (interleaved, the conversion and the slot store cost 40 instructions a
        // request more).
        for d in run {
            let flags = desc_flags(d);
            if flags & AVAIL_USED != lap_bits(index) {
                // Not available in the second copy though it was in the first: a driver
                // that took back what it offered. A list's first descriptor ends the run; a
                // later one of the list fails it.
                if index != end {
                    let pos = advance(size, at.0, at.1, index).0;
                    problem = Some(PackedQueueError::NotAvailable { pos });
                }
                break;
            }
            index += 1;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                let Some(record) = records.next() else {
                    break;
                };
                *record = KeptList {
                    count: index - end,
                    id: desc_id(d),
                };
                end = index;
                lists += 1;
            }
        }
        for (slot, d) in kept
            .iter_mut()
            .zip(run.get(..usize::from(end)).unwrap_or(&[]))
        {
            *slot = PackedDesc::from_bytes(d);
        }
        if problem.is_none() && end == 0 && avail < n {
            // The first list runs into a descriptor that is not available (its first
            // descriptor was loaded with Acquire before the first copy, so the copy is not
            // stale): the driver exposed a partial list.
            let pos = advance(size, at.0, at.1, index).0;
            problem = Some(PackedQueueError::NotAvailable { pos });
        }
        if end > 0 {
            self.popped.len = base + end;
            self.popped.end = self.popped.end.saturating_add(lists);
            return Ok(Run::Added);
        }
        if let Some(problem) = problem {
            return Err(problem);
        }
        if n == size {
            // `NEXT` on every descriptor of the ring: the list comes back to its first position,
            // in the next lap.
            let again = self.read_desc(mem, at.0)?;
            if !is_available(again.flags, !at.1) {
                return Err(PackedQueueError::NotAvailable { pos: at.0 });
            }
            return Err(PackedQueueError::ListTooLong { pos: at.0 });
        }
        if n < want.min(RUN_MAX) || n == RUN_MAX {
            // Limited by the room left in the copies or by the run's length.
            return Ok(Run::Uncopied);
        }
        Ok(Run::TooShort)
    }

    /// The pop of a queue with one request in flight, before the batch machinery: when no list
    /// read ahead is waiting, loads the next position's flags (nothing available: `Some(0)`,
    /// the idle poll's one load) and reads the list there with [`PackedQueue::read_list`]; if
    /// the descriptor after it was not available, the list is the batch and is popped at once
    /// (`Some(1)`; a list too long for the copies is popped from the ring). If more was
    /// available, `None`: [`PackedQueue::begin_pop`] finds the list kept at the front and the
    /// batch goes on from there.
    #[inline(always)]
    fn pop_lone<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [PackedHead],
    ) -> Result<Option<usize>, PackedQueueError> {
        if self.popped.popped_to < self.popped.len {
            return Ok(None);
        }
        let Some(out) = heads.first_mut() else {
            return Ok(Some(0));
        };
        let at = (self.next_avail, self.avail_wrap);
        let flags = self.load_flags(mem, at.0)?;
        if !is_available(flags, at.1) {
            return Ok(Some(0));
        }
        self.popped.restart(at.0, at.1);
        match self.read_list(mem, flags, at)? {
            Run::AddedAll => {
                *out = self.pop_copied()?;
                Ok(Some(1))
            }
            Run::Uncopied => {
                let head = self.pop_uncopied(mem)?;
                Ok(Some(head.map_or(0, |head| {
                    *out = head;
                    1
                })))
            }
            Run::Added | Run::Empty | Run::TooShort => Ok(None),
        }
    }

    /// Starts a batch: copies of lists not popped yet (put back by a pipelined pop, or read by a
    /// run beyond what the last batch took) move to the front and are taken from there; anything
    /// else kept is forgotten.
    #[inline]
    fn begin_pop(&mut self) {
        let at = (self.next_avail, self.avail_wrap);
        let size = self.config.size;
        let p = &mut self.popped;
        let (from, len) = (p.popped_to, p.len);
        if from < len && advance(size, p.pos, p.wrap, from) == at {
            if from == 0 {
                // Already at the front (read by `fill` just now).
                return;
            }
            p.descs.copy_within(usize::from(from)..usize::from(len), 0);
            p.lists
                .copy_within(usize::from(p.first)..usize::from(p.end), 0);
            p.pos = at.0;
            p.wrap = at.1;
            p.popped_to = 0;
            p.len = len - from;
            p.end = p.end.saturating_sub(p.first);
            p.first = 0;
            return;
        }
        p.restart(at.0, at.1);
    }

    /// Pops up to `heads.len()` lists in the order the driver made them available and returns
    /// how many were written to `heads`.
    ///
    /// The first list is read descriptor by descriptor, what follows it in runs (see
    /// `read_run`: one Acquire load and one or two copies of a run of descriptors, instead of a
    /// load and a copy per descriptor); the lists found are kept for
    /// [`PackedQueue::walk_popped`].
    ///
    /// A malformed list (see [`PackedQueueError`]) stops the batch: the lists before it are
    /// returned, and the error comes from the next call, which starts at the malformed list.
    pub fn pop_heads<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [PackedHead],
    ) -> Result<usize, PackedQueueError> {
        if let Some(popped) = self.pop_lone(mem, heads)? {
            return Ok(popped);
        }
        self.begin_pop();
        let mut popped = 0;
        let mut want = RUN_FIRST;
        // Whether a read found nothing after what it kept.
        let mut drained = false;
        while let Some(out) = heads.get_mut(popped) {
            let next = if self.popped.popped_to < self.popped.len {
                match self.pop_copied_into(heads.get_mut(popped..).unwrap_or(&mut [])) {
                    Ok(n) => {
                        popped += n;
                        continue;
                    }
                    Err(err) if popped == 0 => return Err(err),
                    Err(_) => break,
                }
            } else if drained {
                break;
            } else {
                match self.read_next(mem, popped == 0, want) {
                    Ok(Run::Added) => {
                        want = want.saturating_mul(2);
                        continue;
                    }
                    Ok(Run::AddedAll) => {
                        drained = true;
                        continue;
                    }
                    Ok(Run::Empty) => break,
                    Ok(Run::TooShort) => {
                        want = want.saturating_mul(2);
                        continue;
                    }
                    Ok(Run::Uncopied) if popped == 0 => self.pop_uncopied(mem),
                    Ok(Run::Uncopied) => break,
                    Err(err) => Err(err),
                }
            };
            match next {
                Ok(Some(head)) => *out = head,
                Ok(None) => break,
                Err(err) if popped == 0 => return Err(err),
                Err(_) => break,
            }
            popped += 1;
        }
        Ok(popped)
    }

    /// Reads lists into the kept copies, as `pop_heads` would pop them, until `limit` are kept
    /// and not popped, or the ring has no more, or the next one cannot be kept (too long for the
    /// copies, or malformed: the pop that follows stops there and reports it). Returns the lists
    /// kept and whether the ring had no more.
    fn fill<M: GuestMemory + ?Sized>(&mut self, mem: &M, limit: usize) -> (usize, bool) {
        self.begin_pop();
        let mut want = RUN_FIRST;
        loop {
            let lists = usize::from(self.popped.unpopped());
            if lists >= limit {
                return (lists, false);
            }
            match self.read_next(mem, lists == 0, want) {
                Ok(Run::Added) | Ok(Run::TooShort) => want = want.saturating_mul(2),
                Ok(Run::AddedAll) => return (usize::from(self.popped.unpopped()), true),
                Ok(Run::Empty) => return (lists, true),
                Ok(Run::Uncopied) | Err(_) => return (lists, false),
            }
        }
    }

    /// Pops like [`PackedQueue::pop_heads`], but only half (rounded up) of the lists when more
    /// than [`POP_SPLIT_ABOVE`] are available, for the reason
    /// [`crate::virtq::SplitQueue::pop_heads_pipelined`] gives. A packed ring has no index that
    /// says how many lists are pending, so this first reads up to `heads.len()` of them into the
    /// kept copies to count them, then pops half; the other half stays read for the next pop.
    pub fn pop_heads_pipelined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [PackedHead],
    ) -> Result<usize, PackedQueueError> {
        if let Some(popped) = self.pop_lone(mem, heads)? {
            return Ok(popped);
        }
        if heads.len() > POP_SPLIT_ABOVE {
            let (lists, drained) = self.fill(mem, heads.len());
            // Everything available is kept (`drained`), or more than the split point: pop from
            // the copies without looking at the ring again.
            let take = if lists > POP_SPLIT_ABOVE {
                Some(lists.div_ceil(2))
            } else {
                drained.then_some(lists)
            };
            if let Some(take) = take {
                let take = take.min(heads.len());
                if take == 0 {
                    return Ok(0);
                }
                return self.pop_copied_into(heads.get_mut(..take).unwrap_or(&mut []));
            }
        }
        self.pop_heads(mem, heads)
    }

    /// Starts fetching the first buffer of each list (a virtio-blk or virtio-scsi header) before
    /// any is walked, as [`crate::virtq::SplitQueue::prefetch_chains`] does. Only a hint.
    pub fn prefetch_chains<M: GuestMemory + ?Sized>(&self, mem: &M, heads: &[PackedHead]) {
        for head in heads {
            if let Some(first) = self
                .popped
                .list(head, self.config.size)
                .and_then(|d| d.first())
            {
                mem.prefetch(first.addr, false);
                continue;
            }
            let Ok(addr) = self.desc_addr(head.pos, 0) else {
                continue;
            };
            let mut raw = [0u8; PackedDesc::SIZE];
            if mem.read(addr, &mut raw).is_ok() {
                let desc = PackedDesc::from_bytes(&raw);
                mem.prefetch(desc.addr, false);
            }
        }
    }

    /// What a walk of this ring's lists needs to know of the ring.
    #[inline]
    fn walk_params(&self) -> walk::WalkParams {
        walk::WalkParams {
            ring: self.config.desc_table,
            size: self.config.size,
            indirect: self.indirect,
        }
    }

    /// Walks the popped list `head` into `chain` (see [`ChainError`] for how rejections are
    /// reported; [`ChainError::head`] is the buffer ID). Walk the lists in the order they were
    /// popped, each before a used descriptor is pushed for a later one: a used descriptor
    /// overwrites the ring position it is written at, which may hold a popped list.
    pub fn walk_chain<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: PackedHead,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        let params = self.walk_params();
        walk::walk(mem, params, head, chain)
    }

    /// Walks the list `head`, popped by the last [`PackedQueue::pop_heads`], into `chain` like
    /// [`PackedQueue::walk_chain`], from the copies of its descriptors the pop kept (the ring is
    /// read once per descriptor); a list whose copies were not kept is read from the ring. For
    /// a list popped earlier (resubmitted, or walked again at its completion) use
    /// [`PackedQueue::walk_chain`]: its ring positions may hold another lap's list by then.
    #[inline]
    pub fn walk_popped<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: PackedHead,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        let params = self.walk_params();
        match self.popped.list(&head, self.config.size) {
            Some(descs) => walk::walk_copied(mem, params, head, descs, chain),
            None => walk::walk_uncopied(mem, params, head, chain),
        }
    }

    /// The copies of `head`'s descriptors the last [`PackedQueue::pop_heads`] kept, if it kept
    /// all of them (what an inflight log records of a popped list).
    #[inline]
    pub fn popped_descs(&self, head: &PackedHead) -> Option<&[PackedDesc]> {
        self.popped.list(head, self.config.size)
    }

    /// Walks the list `head` into `chain` from `descs`, copies of its descriptors kept elsewhere
    /// (an inflight log's, for a list resubmitted after a backend restart: its ring positions
    /// may hold used descriptors by now). The checks are [`PackedQueue::walk_chain`]'s but the
    /// wrap bits (the list has no ring lap any more); `head.pos` is not used. Fewer copies than
    /// `head.count` fail the request.
    pub fn walk_copies<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: PackedHead,
        descs: &[PackedDesc],
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        let params = self.walk_params();
        let head = PackedHead { pos: 0, ..head };
        walk::walk_copied(mem, params, head, descs, chain)
    }

    /// Writes the used descriptor for `head` (its buffer ID, `len` = bytes written into the
    /// list, `WRITE` if that is not zero, `AVAIL` and `USED` equal to the device's wrap counter)
    /// at the next used position, and moves that position on by the list's descriptor count.
    /// The first descriptor pushed after a publish becomes visible only with
    /// [`PackedQueue::publish_used`]; the driver polls that position, so it sees none of the
    /// batch before all of it.
    pub fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: PackedHead,
        len: u32,
    ) -> Result<(), PackedQueueError> {
        if head.id >= self.config.size {
            return Err(PackedQueueError::UsedIdOutOfRange { id: head.id });
        }
        if head.count == 0 || head.count > self.outstanding {
            return Err(PackedQueueError::UsedCountInvalid {
                count: head.count,
                outstanding: self.outstanding,
            });
        }
        let pos = self.next_used;
        let memory_err = |err| PackedQueueError::Memory {
            part: PackedRingPart::DescRing,
            err,
        };
        let flags = used_bits(self.used_wrap) | if len > 0 { VIRTQ_DESC_F_WRITE } else { 0 };
        let addr = self.desc_addr(pos, LEN_OFFSET)?;
        // `len`, `id` and `flags` are adjacent (bytes 8..16): one fixed-size write, one region
        // lookup (inlined, no `memcpy`).
        if self.unpublished_head.is_none() {
            // The batch's first: its flags wait for `publish_used` (the driver polls them).
            let [l0, l1, l2, l3] = len.to_le_bytes();
            let [i0, i1] = head.id.to_le_bytes();
            mem.write_array(addr, &[l0, l1, l2, l3, i0, i1])
                .map_err(memory_err)?;
            self.unpublished_head = Some((pos, flags));
        } else {
            // A later one: the driver reads it only after the batch's first flags, which
            // `publish_used` stores with Release after this write, so its flags need no
            // ordering of their own and go with `len` and `id`, composed as one little-endian
            // word (one store; the eight single bytes cost the batch 13 instructions more).
            let word = u64::from(len) | u64::from(head.id) << 32 | u64::from(flags) << 48;
            mem.write_array(addr, &word.to_le_bytes())
                .map_err(memory_err)?;
        }
        (self.next_used, self.used_wrap) = self.advance(pos, self.used_wrap, head.count);
        self.outstanding -= head.count;
        self.unpublished = self.unpublished.saturating_add(u32::from(head.count));
        Ok(())
    }

    /// Makes every pushed used descriptor visible to the driver: one Release store of the flags
    /// of the first one, which orders every other write of the batch before it.
    pub fn publish_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), PackedQueueError> {
        let Some((pos, flags)) = self.unpublished_head.take() else {
            return Ok(());
        };
        mem.store_u16(self.desc_addr(pos, FLAGS_OFFSET)?, flags, Ordering::Release)
            .map_err(|err| PackedQueueError::Memory {
                part: PackedRingPart::DescRing,
                err,
            })?;
        self.published_used = self.next_used;
        self.published_wrap = self.used_wrap;
        self.unsignalled = self.unsignalled.saturating_add(self.unpublished);
        self.unnotified = self.unnotified.saturating_add(self.unpublished);
        self.unpublished = 0;
        Ok(())
    }

    /// [`PackedQueue::push_used`] and [`PackedQueue::publish_used`] in one.
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: PackedHead,
        len: u32,
    ) -> Result<(), PackedQueueError> {
        self.push_used(mem, head, len)?;
        self.publish_used(mem)
    }

    /// The driver event suppression structure, `flags` loaded (Acquire) before `off_wrap`: the
    /// driver writes `off_wrap` first. `off_wrap` is loaded only in `DESC` mode, the one that
    /// uses it.
    pub fn driver_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<EventSuppress, PackedQueueError> {
        let err = |err| PackedQueueError::Memory {
            part: PackedRingPart::DriverEvent,
            err,
        };
        let base = self.config.avail_ring;
        let flags_addr = base.checked_add(2).ok_or(err(MemError::Overflow))?;
        let flags = mem.load_u16(flags_addr, Ordering::Acquire).map_err(err)?;
        let off_wrap = if flags & RING_EVENT_FLAGS_MASK == RING_EVENT_FLAGS_DESC {
            mem.load_u16(base, Ordering::Acquire).map_err(err)?
        } else {
            0
        };
        Ok(EventSuppress::from_fields(off_wrap, flags))
    }

    /// Whether the driver wants a used-buffer notification for what was published since the last
    /// time this returned (§2.8, "Driver and Device Event Suppression"): `ENABLE` yes, `DISABLE`
    /// no, `DESC` if one of the used descriptors published since then was written at the
    /// structure's offset in the lap of its wrap counter. Without `VIRTIO_F_RING_EVENT_IDX` a
    /// `DESC` (and the reserved mode) counts as `ENABLE`: a notification too many is harmless, a
    /// missing one hangs the driver. Never if nothing was published since the last decision.
    /// Call it once per poll round after [`PackedQueue::publish_used`].
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, PackedQueueError> {
        let new = (self.published_used, self.published_wrap);
        let advanced = self.unsignalled;
        let old = self.signalled;
        if old.is_some() && advanced == 0 {
            return Ok(false);
        }
        // The used flags store must be globally visible before the driver's structure is read,
        // or a driver that just enabled notifications and saw no used descriptor waits forever.
        fence(Ordering::SeqCst);
        let event = self.driver_event(mem)?;
        self.signalled = Some(new);
        self.unsignalled = 0;
        let notify = match (event, old) {
            (EventSuppress::Disable, _) => false,
            (EventSuppress::Desc { offset, wrap }, Some(old)) if self.event_idx => {
                self.crossed((offset, wrap), old, advanced)
            }
            _ => true,
        };
        if notify {
            self.notified = Some(new);
            self.unnotified = 0;
        }
        Ok(notify)
    }

    /// A second look after [`PackedQueue::needs_notification`] said no, as
    /// [`crate::virtq::SplitQueue::late_notification`] for the split ring: with
    /// `VIRTIO_F_RING_EVENT_IDX`, a driver event structure in `DESC` mode whose offset the device
    /// passed since its last notification means the driver re-armed behind what it was shown and
    /// waits ([`LateNotification::Notify`]); an offset at the published position means it saw
    /// everything ([`LateNotification::Settled`]). Other modes, or no EVENT_IDX: settled.
    pub fn late_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<LateNotification, PackedQueueError> {
        let new = (self.published_used, self.published_wrap);
        let Some(old) = self.notified.filter(|_| self.event_idx) else {
            return Ok(LateNotification::Settled);
        };
        if self.unnotified == 0 {
            return Ok(LateNotification::Settled);
        }
        fence(Ordering::SeqCst);
        let EventSuppress::Desc { offset, wrap } = self.driver_event(mem)? else {
            return Ok(LateNotification::Settled);
        };
        Ok(if (offset, wrap) == new {
            LateNotification::Settled
        } else if self.crossed((offset, wrap), old, self.unnotified) {
            self.notified = Some(new);
            self.unnotified = 0;
            self.signalled = Some(new);
            self.unsignalled = 0;
            LateNotification::Notify
        } else {
            LateNotification::Wait
        })
    }

    /// Whether moving the used position `advanced` descriptors on from `old` wrote at `event`.
    fn crossed(&self, event: (u16, bool), old: (u16, bool), advanced: u32) -> bool {
        if advanced >= u32::from(self.config.size) {
            // Past every position once: whichever lap the driver meant, say yes.
            return true;
        }
        self.distance(old, event) < advanced
    }

    fn set_device_event<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        event: EventSuppress,
    ) -> Result<(), PackedQueueError> {
        if self.kicks == Some(event) {
            return Ok(());
        }
        let err = |err| PackedQueueError::Memory {
            part: PackedRingPart::DeviceEvent,
            err,
        };
        let raw = event.to_bytes();
        let base = self.config.used_ring;
        let flags_addr = base.checked_add(2).ok_or(err(MemError::Overflow))?;
        // `off_wrap` first, `flags` (what the driver tests first) last.
        mem.store_u16(base, crate::wire::le_u16(&raw, 0..2), Ordering::Release)
            .map_err(err)?;
        mem.store_u16(
            flags_addr,
            crate::wire::le_u16(&raw, 2..4),
            Ordering::Release,
        )
        .map_err(err)?;
        self.kicks = Some(event);
        Ok(())
    }

    /// Poll mode: asks the driver not to notify (kick) the device (`RING_EVENT_FLAGS_DISABLE`
    /// in the device event suppression structure, honoured with or without EVENT_IDX). Written
    /// once; later calls cost a comparison.
    pub fn disable_kicks<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), PackedQueueError> {
        self.set_device_event(mem, EventSuppress::Disable)
    }

    /// Interrupt mode: asks the driver to kick for the next list it makes available (with
    /// EVENT_IDX: `DESC` at the next position to pop; without: `ENABLE`), then re-checks the
    /// ring. Returns whether a list is already available (then poll again instead of sleeping).
    pub fn enable_kicks<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, PackedQueueError> {
        let event = if self.event_idx {
            EventSuppress::Desc {
                offset: self.next_avail,
                wrap: self.avail_wrap,
            }
        } else {
            EventSuppress::Enable
        };
        self.set_device_event(mem, event)?;
        fence(Ordering::SeqCst);
        self.has_available(mem)
    }
}
