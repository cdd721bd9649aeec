//! The inflight I/O tracking region for packed virtqueues, as QEMU's
//! `docs/interop/vhost-user.rst` ("Inflight I/O tracking", `QueueRegionPacked`) lays it out.
//!
//! A packed ring has no used index in guest memory, and a used descriptor overwrites a ring
//! position that may still hold a list the device has not completed, so the region keeps more
//! than the split one: a copy of every descriptor of every list in flight, in entries taken from
//! a free list, and the device's used position and wrap counter with an "old" copy of each that
//! says what the driver can have seen.
//!
//! One queue's part (little-endian):
//!
//! ```text
//! offset  size  field
//!      0     8  features
//!      8     2  version                 (0: never initialized; 1: this layout)
//!     10     2  desc_num                (the queue size)
//!     12     2  free_head               (first entry of the free list)
//!     14     2  old_free_head           (free_head as of the last completed step)
//!     16     2  used_idx                (the device's used position)
//!     18     2  old_used_idx            (used_idx as of the last completed step)
//!     20     1  used_wrap_counter
//!     21     1  old_used_wrap_counter
//!     22     7  padding                 (and 3 bytes of alignment: entries start at 32)
//!     32  32*n  desc[n]: +0 inflight (u8), +1 padding, +2 next (u16), +4 last (u16),
//!                        +6 num (u16), +8 counter (u64), +16 id (u16), +18 flags (u16),
//!                        +20 len (u32), +24 addr (u64)
//! ```
//!
//! Each part is padded to [`QUEUE_ALIGN`] bytes, as the split layout's.
//!
//! How rvhost runs the protocol (the spec's steps, with the free-list returns of a batch done when
//! the batch is published, so that a pop never sees a half-returned batch):
//!
//! - **Pop** a list of `n` descriptors: its head entry is `free_head`; `num = n`, `counter` from a
//!   counter that only grows, `inflight = 1`; each descriptor is copied into the entry at
//!   `free_head` and `free_head` follows `next`; the head's `last` is the entry of the last
//!   descriptor; then `old_free_head = free_head`.
//! - **Publish** a batch of used descriptors: each completed list's entries go back to the front
//!   of the free list (`desc[last].next = free_head; free_head = head`); `used_idx` and
//!   `used_wrap_counter` take the new used position; the device writes the batch's first used
//!   flags (what makes it visible); the batch's heads get `inflight = 0`; then the `old_*` fields
//!   take the current ones.
//! - **Reconnect** ([`PackedQueueRegion::recover`]): if `used_idx` (or its wrap counter) differs
//!   from `old_used_idx`, a publish was under way: the ring descriptor at `old_used_idx` tells
//!   whether its flags were written (anything but the available flags of the old lap): then the
//!   batch is committed (`old_* = current`). Then the current fields roll back to the old ones,
//!   every entry on the free list gets `inflight = 0`, and what is still inflight is resubmitted
//!   in counter order from the copies. The next position to pop is the used position plus the
//!   descriptors of the lists still in flight.
//!
//! Every field is checked: the frontend hands over the bytes and may have written anything.

use core::ops::Range;

use super::{InflightError, MAX_COUNTER, QUEUE_ALIGN, VERSION};
use crate::virtq::packed::{avail_bits, PackedDesc, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use crate::wire;

/// Bytes of a packed queue part's header (entries start 8-byte aligned after it).
pub const QUEUE_HEADER_LEN: usize = 32;
/// Bytes of one entry (`DescStatePacked`).
pub const DESC_STATE_LEN: usize = 32;

mod field {
    use core::ops::Range;

    pub const FEATURES: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..10;
    pub const DESC_NUM: Range<usize> = 10..12;
    pub const FREE_HEAD: Range<usize> = 12..14;
    pub const OLD_FREE_HEAD: Range<usize> = 14..16;
    pub const USED_IDX: Range<usize> = 16..18;
    pub const OLD_USED_IDX: Range<usize> = 18..20;
    pub const USED_WRAP: usize = 20;
    pub const OLD_USED_WRAP: usize = 21;
    /// Within one entry.
    pub const INFLIGHT: usize = 0;
    pub const NEXT: Range<usize> = 2..4;
    pub const LAST: Range<usize> = 4..6;
    pub const NUM: Range<usize> = 6..8;
    pub const COUNTER: Range<usize> = 8..16;
    pub const ID: Range<usize> = 16..18;
    pub const FLAGS: Range<usize> = 18..20;
    pub const LEN: Range<usize> = 20..24;
    pub const ADDR: Range<usize> = 24..32;
}

/// Offset of `free_head` in a queue's part.
pub const FREE_HEAD_OFFSET: usize = field::FREE_HEAD.start;
/// Offset of `old_free_head`.
pub const OLD_FREE_HEAD_OFFSET: usize = field::OLD_FREE_HEAD.start;
/// Offset of `used_idx`.
pub const USED_IDX_OFFSET: usize = field::USED_IDX.start;
/// Offset of `old_used_idx`.
pub const OLD_USED_IDX_OFFSET: usize = field::OLD_USED_IDX.start;
/// Offset of `used_wrap_counter`.
pub const USED_WRAP_OFFSET: usize = field::USED_WRAP;
/// Offset of `old_used_wrap_counter`.
pub const OLD_USED_WRAP_OFFSET: usize = field::OLD_USED_WRAP;

/// Offset of entry `entry` in a queue's part (no overflow: `entry` is 16 bits).
#[inline]
pub const fn desc_offset(entry: u16) -> usize {
    QUEUE_HEADER_LEN + DESC_STATE_LEN * entry as usize
}

/// Offset of entry `entry`'s `inflight` byte.
#[inline]
pub const fn inflight_offset(entry: u16) -> usize {
    desc_offset(entry) + field::INFLIGHT
}

/// Offset of entry `entry`'s `next` link (2-byte aligned).
#[inline]
pub const fn next_offset(entry: u16) -> usize {
    desc_offset(entry) + field::NEXT.start
}

/// Offset of entry `entry`'s `last` (2-byte aligned).
#[inline]
pub const fn last_offset(entry: u16) -> usize {
    desc_offset(entry) + field::LAST.start
}

/// Offset of entry `entry`'s `num` (2-byte aligned).
#[inline]
pub const fn num_offset(entry: u16) -> usize {
    desc_offset(entry) + field::NUM.start
}

/// Offset of entry `entry`'s `counter` (8-byte aligned).
#[inline]
pub const fn counter_offset(entry: u16) -> usize {
    desc_offset(entry) + field::COUNTER.start
}

/// Offset of entry `entry`'s descriptor copy (`id`, `flags`, `len`, `addr`: 16 bytes).
#[inline]
pub const fn copy_offset(entry: u16) -> usize {
    desc_offset(entry) + field::ID.start
}

/// The 16 bytes an entry keeps of descriptor `desc` (`id`, `flags`, `len`, `addr`: not the
/// ring's order).
#[inline]
pub fn copy_bytes(desc: &PackedDesc) -> [u8; 16] {
    let mut b = [0u8; 16];
    wire::set(&mut b, 0..2, &desc.id.to_le_bytes());
    wire::set(&mut b, 2..4, &desc.flags.to_le_bytes());
    wire::set(&mut b, 4..8, &desc.len.to_le_bytes());
    wire::set(&mut b, 8..16, &desc.addr.to_le_bytes());
    b
}

/// Bytes one packed queue of `queue_size` descriptors takes in the region (header, entries,
/// padding).
#[inline]
pub const fn queue_region_len(queue_size: u16) -> usize {
    desc_offset(queue_size).div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Bytes a region for `num_queues` packed queues of `queue_size` descriptors takes.
#[inline]
pub fn region_len(num_queues: u16, queue_size: u16) -> Option<usize> {
    queue_region_len(queue_size).checked_mul(usize::from(num_queues))
}

/// Where queue `index`'s part lies in a region of packed queues of `queue_size` descriptors.
#[inline]
pub fn queue_range(index: u16, queue_size: u16) -> Option<Range<usize>> {
    let len = queue_region_len(queue_size);
    let start = len.checked_mul(usize::from(index))?;
    Some(start..start.checked_add(len)?)
}

/// What [`PackedQueueRegion::recover`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedRecovery {
    /// Lists still inflight: to resubmit.
    pub pending: u16,
    /// Ring descriptors those lists took: the next position to pop is this far past `used`.
    pub pending_descs: u16,
    /// The device's used position and wrap counter (vhost-user vring base form: position in
    /// bits 0..15, wrap counter in bit 15).
    pub used: u16,
    /// The counter the next popped list gets (above every inflight one).
    pub next_counter: u64,
    /// A publish was under way and had become visible to the driver: it was committed.
    pub committed: bool,
    /// A publish (or pop) was under way and not visible: it was rolled back.
    pub rolled_back: bool,
    /// The part was never initialized (version 0) and now is.
    pub initialized: bool,
}

/// A view of one packed queue's part of an inflight region (zero-copy). The target parses a
/// private copy of the shared bytes with it, never the shared memory itself.
#[derive(Debug, Clone, Copy)]
pub struct PackedQueueRegion<T: AsRef<[u8]>> {
    buffer: T,
    queue_size: u16,
}

impl<T: AsRef<[u8]>> PackedQueueRegion<T> {
    /// A view for a queue of `queue_size` descriptors; checks the length, the version and
    /// `desc_num`. A version-0 part (never initialized) is accepted whatever it holds.
    pub fn new_checked(buffer: T, queue_size: u16) -> Result<Self, InflightError> {
        wire::check_len(buffer.as_ref(), desc_offset(queue_size))?;
        let region = PackedQueueRegion { buffer, queue_size };
        match region.version() {
            0 => {}
            VERSION => {
                if region.desc_num() != queue_size {
                    return Err(InflightError::DescNum {
                        desc_num: region.desc_num(),
                        queue_size,
                    });
                }
            }
            other => return Err(InflightError::Version(other)),
        }
        Ok(region)
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The `features` field.
    pub fn features(&self) -> u64 {
        wire::le_u64(self.bytes(), field::FEATURES)
    }

    /// The `version` field.
    pub fn version(&self) -> u16 {
        wire::le_u16(self.bytes(), field::VERSION)
    }

    /// The `desc_num` field.
    pub fn desc_num(&self) -> u16 {
        wire::le_u16(self.bytes(), field::DESC_NUM)
    }

    /// The `free_head` field.
    pub fn free_head(&self) -> u16 {
        wire::le_u16(self.bytes(), field::FREE_HEAD)
    }

    /// The `old_free_head` field.
    pub fn old_free_head(&self) -> u16 {
        wire::le_u16(self.bytes(), field::OLD_FREE_HEAD)
    }

    /// The `used_idx` field.
    pub fn used_idx(&self) -> u16 {
        wire::le_u16(self.bytes(), field::USED_IDX)
    }

    /// The `old_used_idx` field.
    pub fn old_used_idx(&self) -> u16 {
        wire::le_u16(self.bytes(), field::OLD_USED_IDX)
    }

    /// The `used_wrap_counter` byte.
    pub fn used_wrap(&self) -> u8 {
        wire::byte(self.bytes(), field::USED_WRAP)
    }

    /// The `old_used_wrap_counter` byte.
    pub fn old_used_wrap(&self) -> u8 {
        wire::byte(self.bytes(), field::OLD_USED_WRAP)
    }

    /// Entry `entry`'s `inflight` byte (0 outside the queue).
    pub fn inflight(&self, entry: u16) -> u8 {
        wire::byte(self.bytes(), inflight_offset(entry))
    }

    fn entry_u16(&self, entry: u16, f: Range<usize>) -> u16 {
        let at = desc_offset(entry);
        wire::le_u16(self.bytes(), at + f.start..at + f.end)
    }

    /// Entry `entry`'s `next` link.
    pub fn next(&self, entry: u16) -> u16 {
        self.entry_u16(entry, field::NEXT)
    }

    /// Entry `entry`'s `last`.
    pub fn last(&self, entry: u16) -> u16 {
        self.entry_u16(entry, field::LAST)
    }

    /// Entry `entry`'s `num`.
    pub fn num(&self, entry: u16) -> u16 {
        self.entry_u16(entry, field::NUM)
    }

    /// Entry `entry`'s `counter`.
    pub fn counter(&self, entry: u16) -> u64 {
        let at = desc_offset(entry);
        wire::le_u64(
            self.bytes(),
            at + field::COUNTER.start..at + field::COUNTER.end,
        )
    }

    /// Entry `entry`'s descriptor copy.
    pub fn desc(&self, entry: u16) -> PackedDesc {
        let at = desc_offset(entry);
        let b = self.bytes();
        PackedDesc {
            addr: wire::le_u64(b, at + field::ADDR.start..at + field::ADDR.end),
            len: wire::le_u32(b, at + field::LEN.start..at + field::LEN.end),
            id: wire::le_u16(b, at + field::ID.start..at + field::ID.end),
            flags: wire::le_u16(b, at + field::FLAGS.start..at + field::FLAGS.end),
        }
    }

    /// Copies the descriptors of the inflight list whose head entry is `head` into `out`
    /// (following `next` from the head, `num` entries) and returns them.
    pub fn list<'o>(
        &self,
        head: u16,
        out: &'o mut [PackedDesc],
    ) -> Result<&'o [PackedDesc], InflightError> {
        let num = self.checked_list(head)?;
        let got = out.len();
        let out = out
            .get_mut(..usize::from(num))
            .ok_or(InflightError::OrderBuffer {
                needed: usize::from(num),
                got,
            })?;
        let mut entry = head;
        for slot in out.iter_mut() {
            *slot = self.desc(entry);
            entry = self.next(entry);
        }
        Ok(out)
    }

    /// Checks the list at head entry `head` (its `num`, its links and its `last`) and returns
    /// its length.
    fn checked_list(&self, head: u16) -> Result<u16, InflightError> {
        let size = self.queue_size;
        let num = self.num(head);
        if num == 0 || num > size || head >= size {
            return Err(InflightError::PackedList { head });
        }
        let mut entry = head;
        for _ in 1..num {
            entry = self.next(entry);
            if entry >= size {
                return Err(InflightError::PackedList { head });
            }
        }
        if self.last(head) != entry {
            return Err(InflightError::PackedList { head });
        }
        Ok(num)
    }

    /// The entries on the free list from `start`, each passed to `f`; an error if a link leaves
    /// the queue or the list is longer than the queue (a loop). The list ends at an entry
    /// number `>= desc_num` (the last entry's `next` is `desc_num` in a fresh part).
    fn free_list(&self, start: u16, mut f: impl FnMut(u16)) -> Result<(), InflightError> {
        let size = self.queue_size;
        let mut entry = start;
        let mut steps: u32 = 0;
        while entry < size {
            if steps >= u32::from(size) {
                return Err(InflightError::PackedFreeList { entry });
            }
            steps += 1;
            f(entry);
            entry = self.next(entry);
        }
        if entry != size {
            return Err(InflightError::PackedFreeList { entry });
        }
        Ok(())
    }

    /// Head entries still inflight, in the order they were popped (by counter), into `out`.
    /// Two with the same counter are refused: their order is unknown.
    pub fn resubmit_order<'o>(&self, out: &'o mut [u16]) -> Result<&'o [u16], InflightError> {
        let mut n = 0usize;
        for entry in 0..self.queue_size {
            if self.inflight(entry) == 1 {
                let got = out.len();
                let slot = out.get_mut(n).ok_or(InflightError::OrderBuffer {
                    needed: n.saturating_add(1),
                    got,
                })?;
                *slot = entry;
                n = n.saturating_add(1);
            }
        }
        let heads = out.get_mut(..n).unwrap_or(&mut []);
        heads.sort_unstable_by_key(|&entry| self.counter(entry));
        for pair in heads.windows(2) {
            if let [a, b] = pair {
                if self.counter(*a) == self.counter(*b) {
                    return Err(InflightError::DuplicateCounter(self.counter(*a)));
                }
            }
        }
        Ok(heads)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> PackedQueueRegion<T> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    fn set_u16(&mut self, f: Range<usize>, value: u16) {
        wire::set(self.bytes_mut(), f, &value.to_le_bytes());
    }

    /// Sets `features`.
    pub fn set_features(&mut self, value: u64) {
        wire::set(self.bytes_mut(), field::FEATURES, &value.to_le_bytes());
    }

    /// Sets `version`.
    pub fn set_version(&mut self, value: u16) {
        self.set_u16(field::VERSION, value);
    }

    /// Sets `desc_num`.
    pub fn set_desc_num(&mut self, value: u16) {
        self.set_u16(field::DESC_NUM, value);
    }

    /// Sets `free_head` and `old_free_head`.
    pub fn set_free_heads(&mut self, free_head: u16, old_free_head: u16) {
        self.set_u16(field::FREE_HEAD, free_head);
        self.set_u16(field::OLD_FREE_HEAD, old_free_head);
    }

    /// Sets `used_idx`, `used_wrap_counter` (from a vring-base form position: wrap in bit 15)
    /// and the old copies of both.
    pub fn set_used(&mut self, used: u16, old_used: u16) {
        let (pos, wrap) = split_pos(used);
        let (old_pos, old_wrap) = split_pos(old_used);
        self.set_u16(field::USED_IDX, pos);
        self.set_u16(field::OLD_USED_IDX, old_pos);
        wire::set_byte(self.bytes_mut(), field::USED_WRAP, u8::from(wrap));
        wire::set_byte(self.bytes_mut(), field::OLD_USED_WRAP, u8::from(old_wrap));
    }

    /// Sets entry `entry`'s `inflight` byte.
    pub fn set_inflight(&mut self, entry: u16, value: u8) {
        wire::set_byte(self.bytes_mut(), inflight_offset(entry), value);
    }

    /// Sets entry `entry`'s `next` link.
    pub fn set_next(&mut self, entry: u16, value: u16) {
        let at = next_offset(entry);
        wire::set(self.bytes_mut(), at..at + 2, &value.to_le_bytes());
    }

    /// Sets a head entry's `num`, `last` and `counter`.
    pub fn set_head(&mut self, entry: u16, num: u16, last: u16, counter: u64) {
        let at = desc_offset(entry);
        let b = self.bytes_mut();
        wire::set(
            b,
            at + field::NUM.start..at + field::NUM.end,
            &num.to_le_bytes(),
        );
        wire::set(
            b,
            at + field::LAST.start..at + field::LAST.end,
            &last.to_le_bytes(),
        );
        wire::set(
            b,
            at + field::COUNTER.start..at + field::COUNTER.end,
            &counter.to_le_bytes(),
        );
    }

    /// Sets entry `entry`'s descriptor copy.
    pub fn set_desc(&mut self, entry: u16, desc: &PackedDesc) {
        let at = copy_offset(entry);
        wire::set(self.bytes_mut(), at..at + 16, &copy_bytes(desc));
    }

    /// Brings the part to a consistent state, as the spec's reconnect steps do. `start` is the
    /// used position to begin with if the part was never initialized (the frontend's vring
    /// base); `ring_flags(pos)` reads the flags of the ring descriptor at `pos` (`None`: it
    /// cannot be read), asked only if a publish was under way. Everything is checked before
    /// anything is written, except the commit-or-roll-back of the header.
    pub fn recover(
        &mut self,
        start: u16,
        features: u64,
        ring_flags: impl FnOnce(u16) -> Option<u16>,
    ) -> Result<PackedRecovery, InflightError> {
        let size = self.queue_size;
        if self.version() == 0 {
            let end = desc_offset(size);
            if let Some(states) = self.bytes_mut().get_mut(QUEUE_HEADER_LEN..end) {
                states.fill(0);
            }
            // The free list: every entry, in order, ending at `size`.
            for entry in 0..size {
                self.set_next(entry, entry.saturating_add(1));
            }
            self.set_features(features);
            self.set_desc_num(size);
            self.set_free_heads(0, 0);
            self.set_used(start, start);
            self.set_version(VERSION);
            return Ok(PackedRecovery {
                pending: 0,
                pending_descs: 0,
                used: start,
                next_counter: 1,
                committed: false,
                rolled_back: false,
                initialized: true,
            });
        }
        let current = self.checked_position(self.used_idx(), self.used_wrap())?;
        let old = self.checked_position(self.old_used_idx(), self.old_used_wrap())?;
        for entry in [self.free_head(), self.old_free_head()] {
            if entry > size {
                return Err(InflightError::PackedFreeList { entry });
            }
        }
        let mut committed = false;
        let mut rolled_back = false;
        if current != old || self.free_head() != self.old_free_head() {
            let (old_pos, old_wrap) = split_pos(old);
            let visible = current != old && {
                let flags = ring_flags(old_pos).ok_or(InflightError::RingUnreadable)?;
                flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) != avail_bits(old_wrap)
            };
            if visible {
                committed = true;
                let free_head = self.free_head();
                self.set_free_heads(free_head, free_head);
                self.set_used(current, current);
            } else {
                rolled_back = true;
                let free_head = self.old_free_head();
                self.set_free_heads(free_head, free_head);
                self.set_used(old, old);
            }
        }
        // Every entry on the free list is not inflight; the list is checked whole before any
        // flag is cleared.
        let mut on_free_list = [0u64; 32768 / 64];
        self.free_list(self.free_head(), |entry| {
            if let Some(word) = on_free_list.get_mut(usize::from(entry / 64)) {
                *word |= 1 << (entry % 64);
            }
        })?;
        for entry in 0..size {
            let free = on_free_list
                .get(usize::from(entry / 64))
                .is_some_and(|word| word & (1 << (entry % 64)) != 0);
            if free {
                self.set_inflight(entry, 0);
            }
        }
        let mut pending: u16 = 0;
        let mut pending_descs: u32 = 0;
        let mut highest: Option<u64> = None;
        for entry in 0..size {
            match self.inflight(entry) {
                0 => {}
                1 => {
                    pending = pending.saturating_add(1);
                    pending_descs =
                        pending_descs.saturating_add(u32::from(self.checked_list(entry)?));
                    let c = self.counter(entry);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
                value => return Err(InflightError::InflightFlag { head: entry, value }),
            }
        }
        let pending_descs = u16::try_from(pending_descs)
            .ok()
            .filter(|&n| n <= size)
            .ok_or(InflightError::PackedOvercommitted {
                descs: pending_descs,
                queue_size: size,
            })?;
        let next_counter = match highest {
            None => 1,
            Some(h) if h < MAX_COUNTER => h.saturating_add(1),
            Some(_) => return Err(InflightError::CounterExhausted),
        };
        self.set_features(features);
        Ok(PackedRecovery {
            pending,
            pending_descs,
            used: self.checked_position(self.used_idx(), self.used_wrap())?,
            next_counter,
            committed,
            rolled_back,
            initialized: false,
        })
    }

    /// A position and a wrap-counter byte as a vring-base form position, if both are valid.
    fn checked_position(&self, pos: u16, wrap: u8) -> Result<u16, InflightError> {
        if pos >= self.queue_size || wrap > 1 {
            return Err(InflightError::PackedPosition { pos, wrap });
        }
        Ok(pos | if wrap == 1 { 1 << 15 } else { 0 })
    }
}

/// A vring-base form position (wrap counter in bit 15) as position and wrap counter.
#[inline]
fn split_pos(value: u16) -> (u16, bool) {
    (value & 0x7fff, value & 0x8000 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtq::packed::used_bits;

    const QS: u16 = 4;

    fn fresh() -> [u8; 192] {
        [0u8; 192]
    }

    fn d(id: u16, addr: u64) -> PackedDesc {
        PackedDesc {
            addr,
            len: 512,
            id,
            flags: 0x80,
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        // 32-byte header (29 bytes of fields, the entries 8-byte aligned) and 32-byte entries.
        assert_eq!(queue_region_len(4), 192, "32 + 4 * 32 = 160, padded to 64");
        assert_eq!(queue_region_len(128), 32 + 128 * 32 + 32);
        assert_eq!(region_len(2, 4), Some(384));
        assert_eq!(queue_range(1, 4), Some(192..384));
        assert_eq!(
            (
                inflight_offset(0),
                next_offset(0),
                last_offset(0),
                num_offset(0)
            ),
            (32, 34, 36, 38)
        );
        assert_eq!((counter_offset(1), copy_offset(1)), (64 + 8, 64 + 16));
        let mut b = fresh();
        b[0..8].copy_from_slice(&7u64.to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b[10..12].copy_from_slice(&QS.to_le_bytes());
        b[12..14].copy_from_slice(&2u16.to_le_bytes()); // free_head
        b[14..16].copy_from_slice(&3u16.to_le_bytes()); // old_free_head
        b[16..18].copy_from_slice(&1u16.to_le_bytes()); // used_idx
        b[18..20].copy_from_slice(&0u16.to_le_bytes()); // old_used_idx
        b[20] = 0;
        b[21] = 1;
        // Entry 1: inflight, next 2, last 3, num 2, counter 9, id 5, flags 0x81, len 16, addr.
        let e = 32 + 32;
        b[e] = 1;
        b[e + 2..e + 4].copy_from_slice(&2u16.to_le_bytes());
        b[e + 4..e + 6].copy_from_slice(&3u16.to_le_bytes());
        b[e + 6..e + 8].copy_from_slice(&2u16.to_le_bytes());
        b[e + 8..e + 16].copy_from_slice(&9u64.to_le_bytes());
        b[e + 16..e + 18].copy_from_slice(&5u16.to_le_bytes());
        b[e + 18..e + 20].copy_from_slice(&0x81u16.to_le_bytes());
        b[e + 20..e + 24].copy_from_slice(&16u32.to_le_bytes());
        b[e + 24..e + 32].copy_from_slice(&0x1122_3344u64.to_le_bytes());
        let r = PackedQueueRegion::new_checked(&b[..], QS).unwrap();
        assert_eq!((r.features(), r.version(), r.desc_num()), (7, 1, QS));
        assert_eq!((r.free_head(), r.old_free_head()), (2, 3));
        assert_eq!(
            (
                r.used_idx(),
                r.old_used_idx(),
                r.used_wrap(),
                r.old_used_wrap()
            ),
            (1, 0, 0, 1)
        );
        assert_eq!(
            (r.inflight(1), r.next(1), r.last(1), r.num(1), r.counter(1)),
            (1, 2, 3, 2, 9)
        );
        assert_eq!(
            r.desc(1),
            PackedDesc {
                addr: 0x1122_3344,
                len: 16,
                id: 5,
                flags: 0x81
            }
        );
        // The setters write the same bytes.
        let mut c = fresh();
        let mut w = PackedQueueRegion::new_checked(&mut c[..], QS).unwrap();
        w.set_features(7);
        w.set_version(1);
        w.set_desc_num(QS);
        w.set_free_heads(2, 3);
        w.set_used(1, 0x8000);
        w.set_inflight(1, 1);
        w.set_next(1, 2);
        w.set_head(1, 2, 3, 9);
        w.set_desc(
            1,
            &PackedDesc {
                addr: 0x1122_3344,
                len: 16,
                id: 5,
                flags: 0x81,
            },
        );
        assert_eq!(c, b);
    }

    /// Pops a list of `descs` into the part as the protocol does; returns its head entry.
    fn pop(r: &mut PackedQueueRegion<&mut [u8]>, descs: &[PackedDesc], counter: u64) -> u16 {
        let head = r.free_head();
        let mut entry = head;
        let mut last = head;
        for desc in descs {
            r.set_desc(entry, desc);
            last = entry;
            entry = r.next(entry);
        }
        r.set_head(head, descs.len() as u16, last, counter);
        r.set_inflight(head, 1);
        r.set_free_heads(entry, entry);
        head
    }

    /// Returns the list at `head` to the free list (the first step of a publish).
    fn give_back(r: &mut PackedQueueRegion<&mut [u8]>, head: u16) {
        let last = r.last(head);
        let free = r.free_head();
        r.set_next(last, free);
        let old = r.old_free_head();
        r.set_free_heads(head, old);
    }

    #[test]
    fn a_fresh_part_is_initialized_at_the_frontend_base() {
        let mut b = fresh();
        b[40] = 1; // stale bytes in a version-0 part mean nothing
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r.recover(0x8002, 5, |_| panic!("no ring read")).unwrap();
        assert!(rec.initialized);
        assert_eq!((rec.pending, rec.used, rec.next_counter), (0, 0x8002, 1));
        assert_eq!((r.version(), r.desc_num(), r.features()), (1, QS, 5));
        assert_eq!((r.used_idx(), r.used_wrap(), r.old_used_wrap()), (2, 1, 1));
        for e in 0..QS {
            assert_eq!(r.next(e), e + 1, "free list in order, ending at desc_num");
        }
        assert_eq!(r.inflight(0), 0);
    }

    #[test]
    fn inflight_lists_are_resubmitted_in_counter_order_with_their_copies() {
        let mut b = fresh();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        r.recover(0x8000, 0, |_| None).unwrap();
        let a = pop(&mut r, &[d(7, 0x1000), d(7, 0x2000)], 1);
        let c = pop(&mut r, &[d(2, 0x3000)], 2);
        // `a` completes and is published (used position 0 -> 2, wrap 1).
        give_back(&mut r, a);
        r.set_used(0x8002, 0x8000);
        r.set_inflight(a, 0);
        let free = r.free_head();
        r.set_free_heads(free, free);
        r.set_used(0x8002, 0x8002);
        // Another list after it.
        let e = pop(&mut r, &[d(1, 0x4000)], 3);
        let rec = r.recover(0, 0, |_| panic!("nothing under way")).unwrap();
        assert_eq!(
            (rec.pending, rec.pending_descs, rec.used, rec.next_counter),
            (2, 2, 0x8002, 4)
        );
        assert!(!rec.committed && !rec.rolled_back);
        let mut order = [0u16; 4];
        let heads = r.resubmit_order(&mut order).unwrap();
        assert_eq!(heads, [c, e]);
        let mut out = [PackedDesc::default(); 4];
        assert_eq!(r.list(c, &mut out).unwrap(), [d(2, 0x3000)]);
        assert_eq!(r.list(e, &mut out).unwrap(), [d(1, 0x4000)]);
    }

    /// A part with list `a` (2 descriptors at ring positions 0..2, lap 1) published up to the
    /// point where `used_idx` says 2 and the ring flags are or are not written.
    fn publish_under_way() -> ([u8; 192], u16) {
        let mut b = fresh();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        r.recover(0x8000, 0, |_| None).unwrap();
        let a = pop(&mut r, &[d(7, 0x1000), d(7, 0x2000)], 1);
        give_back(&mut r, a);
        r.set_used(0x8002, 0x8000);
        (b, a)
    }

    #[test]
    fn a_publish_the_driver_saw_is_committed() {
        let (mut b, a) = publish_under_way();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r
            .recover(0, 0, |pos| {
                assert_eq!(pos, 0);
                Some(used_bits(true))
            })
            .unwrap();
        assert!(rec.committed && !rec.rolled_back);
        assert_eq!((rec.pending, rec.used), (0, 0x8002));
        assert_eq!(r.inflight(a), 0);
    }

    #[test]
    fn a_publish_the_driver_did_not_see_is_rolled_back() {
        let (mut b, a) = publish_under_way();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r.recover(0, 0, |_| Some(avail_bits(true) | 1)).unwrap();
        assert!(rec.rolled_back && !rec.committed);
        assert_eq!((rec.pending, rec.pending_descs, rec.used), (1, 2, 0x8000));
        assert_eq!(r.inflight(a), 1);
        // An unreadable ring refuses the part rather than guessing.
        let (mut b, _) = publish_under_way();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert_eq!(
            r.recover(0, 0, |_| None).unwrap_err(),
            InflightError::RingUnreadable
        );
    }

    #[test]
    fn a_pop_under_way_is_rolled_back() {
        let mut b = fresh();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        r.recover(0x8000, 0, |_| None).unwrap();
        // Entry 0 marked and free_head moved, old_free_head not yet.
        r.set_desc(0, &d(3, 0x1000));
        r.set_head(0, 1, 0, 1);
        r.set_inflight(0, 1);
        r.set_free_heads(1, 0);
        let rec = r.recover(0, 0, |_| panic!("used did not move")).unwrap();
        assert!(rec.rolled_back);
        assert_eq!((rec.pending, r.free_head(), r.inflight(0)), (0, 0, 0));
    }

    #[test]
    fn hostile_parts_are_refused() {
        let fresh_part = || {
            let mut b = fresh();
            PackedQueueRegion::new_checked(&mut b[..], QS)
                .unwrap()
                .recover(0x8000, 0, |_| None)
                .unwrap();
            b
        };
        // A free list that loops.
        let mut b = fresh_part();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        r.set_next(3, 0);
        assert!(matches!(
            r.recover(0, 0, |_| None),
            Err(InflightError::PackedFreeList { .. })
        ));
        // A link past the end marker.
        let mut b = fresh_part();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        r.set_next(1, 9);
        assert_eq!(
            r.recover(0, 0, |_| None).unwrap_err(),
            InflightError::PackedFreeList { entry: 9 }
        );
        // A used position outside the queue, a wrap byte that is not 0 or 1.
        let mut b = fresh_part();
        b[16] = 4;
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert!(matches!(
            r.recover(0, 0, |_| None),
            Err(InflightError::PackedPosition { .. })
        ));
        let mut b = fresh_part();
        b[21] = 2;
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert!(matches!(
            r.recover(0, 0, |_| None),
            Err(InflightError::PackedPosition { .. })
        ));
        // An inflight head (not on the free list) whose list is longer than the queue.
        let mut b = fresh_part();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        let a = pop(&mut r, &[d(1, 0)], 1);
        r.set_head(a, 9, a, 1);
        assert_eq!(
            r.recover(0, 0, |_| None).unwrap_err(),
            InflightError::PackedList { head: a }
        );
        // Two lists with one counter.
        let mut b = fresh_part();
        let mut r = PackedQueueRegion::new_checked(&mut b[..], QS).unwrap();
        pop(&mut r, &[d(1, 0)], 5);
        pop(&mut r, &[d(2, 0)], 5);
        r.recover(0, 0, |_| None).unwrap();
        let mut order = [0u16; 4];
        assert_eq!(
            r.resubmit_order(&mut order).unwrap_err(),
            InflightError::DuplicateCounter(5)
        );
        // A bad version, a desc_num of another queue, a part too short.
        let mut b = fresh_part();
        b[8] = 2;
        assert_eq!(
            PackedQueueRegion::new_checked(&b[..], QS).unwrap_err(),
            InflightError::Version(2)
        );
        let b = fresh_part();
        assert!(matches!(
            PackedQueueRegion::new_checked(&b[..], 2),
            Err(InflightError::DescNum { .. })
        ));
        assert!(matches!(
            PackedQueueRegion::new_checked(&b[..100], QS),
            Err(InflightError::Truncated(_))
        ));
    }
}
