//! The inflight I/O tracking region of vhost-user (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for
//! split virtqueues, as QEMU's `docs/interop/vhost-user.rst` ("Inflight I/O tracking") lays it
//! out: the backend allocates the region, the frontend keeps it across a backend crash and hands
//! it to the next backend, which repairs the used ring's bookkeeping and resubmits the requests
//! that were popped but never completed.
//!
//! One queue's part of the region (all fields little-endian):
//!
//! ```text
//! offset  size  field
//!      0     8  features        (the queue's negotiated virtio features)
//!      8     2  version         (0: never initialized; 1: this layout)
//!     10     2  desc_num        (the queue size)
//!     12     2  last_batch_head (head of the list of the last used batch)
//!     14     2  used_idx        (used.idx once the last batch's entries were cleared)
//!     16  16*n  desc[n]:  +0 inflight (u8, 0 or 1), +1..6 padding, +6 next (u16),
//!                         +8 counter (u64, the order heads were popped in)
//! ```
//!
//! Each queue's part is padded to [`QUEUE_ALIGN`] bytes; queue `i` starts at
//! `i * queue_region_len(queue_size)`.
//!
//! The protocol: when a head is popped its `counter` is set from a per-queue counter that only
//! grows and then `inflight` is set to 1. When used elements are written, each head is linked
//! into the batch list (`desc[head].next = last_batch_head; last_batch_head = head`); after
//! `used.idx` is published every head of the batch gets `inflight = 0` and then `used_idx` takes
//! the ring's value. A backend that died anywhere in between leaves either `used_idx` equal to the
//! ring's index (the batch was never published: its heads are still inflight and are executed
//! again) or behind it by the batch size (published but not cleared: [`QueueRegion::recover`]
//! clears the batch). Everything still inflight after that is resubmitted in counter order
//! ([`QueueRegion::resubmit_order`]), and the next avail index is the ring's used index plus
//! that count.
//!
//! The frontend may hand over any bytes, so every field read here is checked: the version, the
//! queue size, every inflight flag, the batch list's links and the counters.

use core::fmt;
use core::ops::Range;

pub mod packed;

use crate::wire::{self, Truncated};

/// Bytes of a queue's header (features, version, desc_num, last_batch_head, used_idx).
pub const QUEUE_HEADER_LEN: usize = 16;
/// Bytes of one descriptor's state.
pub const DESC_STATE_LEN: usize = 16;
/// Each queue's part of the region is padded to this many bytes.
pub const QUEUE_ALIGN: usize = 64;
/// Counters at or above this are refused: no queue pops 2^63 heads, so such a value is garbage,
/// and it leaves a counter that only grows room for as many more.
pub const MAX_COUNTER: u64 = 1 << 63;
/// The only layout version; 0 means the queue's part was never initialized.
pub const VERSION: u16 = 1;

mod field {
    use core::ops::Range;

    pub const FEATURES: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..10;
    pub const DESC_NUM: Range<usize> = 10..12;
    pub const LAST_BATCH_HEAD: Range<usize> = 12..14;
    pub const USED_IDX: Range<usize> = 14..16;
    /// Within one descriptor state.
    pub const INFLIGHT: usize = 0;
    pub const NEXT: Range<usize> = 6..8;
    pub const COUNTER: Range<usize> = 8..16;
}

/// Offset of the `features` field in a queue's part.
pub const FEATURES_OFFSET: usize = field::FEATURES.start;
/// Offset of `version`.
pub const VERSION_OFFSET: usize = field::VERSION.start;
/// Offset of `desc_num`.
pub const DESC_NUM_OFFSET: usize = field::DESC_NUM.start;
/// Offset of `last_batch_head`.
pub const LAST_BATCH_HEAD_OFFSET: usize = field::LAST_BATCH_HEAD.start;
/// Offset of `used_idx`.
pub const USED_IDX_OFFSET: usize = field::USED_IDX.start;

/// Offset of descriptor `head`'s state in a queue's part (no overflow: `head` is 16 bits).
#[inline]
pub const fn desc_offset(head: u16) -> usize {
    QUEUE_HEADER_LEN + DESC_STATE_LEN * head as usize
}

/// Offset of descriptor `head`'s `inflight` byte.
#[inline]
pub const fn inflight_offset(head: u16) -> usize {
    desc_offset(head) + field::INFLIGHT
}

/// Offset of descriptor `head`'s `next` link (2-byte aligned).
#[inline]
pub const fn next_offset(head: u16) -> usize {
    desc_offset(head) + field::NEXT.start
}

/// Offset of descriptor `head`'s `counter` (8-byte aligned).
#[inline]
pub const fn counter_offset(head: u16) -> usize {
    desc_offset(head) + field::COUNTER.start
}

/// Bytes one queue of `queue_size` descriptors takes in the region (header, states, padding).
#[inline]
pub const fn queue_region_len(queue_size: u16) -> usize {
    let raw = desc_offset(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Bytes a region for `num_queues` queues of `queue_size` descriptors takes.
#[inline]
pub fn region_len(num_queues: u16, queue_size: u16) -> Option<usize> {
    queue_region_len(queue_size).checked_mul(usize::from(num_queues))
}

/// Where queue `index`'s part lies in a region of queues of `queue_size` descriptors.
#[inline]
pub fn queue_range(index: u16, queue_size: u16) -> Option<Range<usize>> {
    let len = queue_region_len(queue_size);
    let start = len.checked_mul(usize::from(index))?;
    Some(start..start.checked_add(len)?)
}

/// Why a queue's part of an inflight region cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightError {
    /// The part is shorter than a queue of this size needs.
    Truncated(Truncated),
    /// A layout version this crate does not know.
    Version(u16),
    /// `desc_num` is not the size of the queue it is used for.
    DescNum {
        /// What the region says.
        desc_num: u16,
        /// The queue's size.
        queue_size: u16,
    },
    /// An `inflight` byte that is neither 0 nor 1.
    InflightFlag {
        /// The descriptor.
        head: u16,
        /// Its value.
        value: u8,
    },
    /// The ring's used index is further ahead of `used_idx` than a queue can hold.
    BatchSize {
        /// `used.idx - used_idx`.
        batch: u16,
        /// The queue's size.
        queue_size: u16,
    },
    /// The last batch's list leads outside the queue.
    BatchLink {
        /// The out-of-range head.
        head: u16,
    },
    /// Two inflight heads carry the same counter, so their order is unknown.
    DuplicateCounter(u64),
    /// An inflight counter at or above [`MAX_COUNTER`].
    CounterExhausted,
    /// Packed layout: an inflight list whose `num`, links or `last` do not describe a list
    /// inside the queue.
    PackedList {
        /// Its head entry.
        head: u16,
    },
    /// Packed layout: the free list leaves the queue or loops.
    PackedFreeList {
        /// The entry where it went wrong.
        entry: u16,
    },
    /// Packed layout: a used position outside the queue or a wrap counter byte not 0 or 1.
    PackedPosition {
        /// The position.
        pos: u16,
        /// The wrap counter byte.
        wrap: u8,
    },
    /// Packed layout: the inflight lists hold more descriptors than the queue.
    PackedOvercommitted {
        /// Descriptors inflight.
        descs: u32,
        /// The queue's size.
        queue_size: u16,
    },
    /// Packed layout: the ring descriptor that says whether a publish was seen cannot be read.
    RingUnreadable,
    /// The output buffer is shorter than the number of inflight heads.
    OrderBuffer {
        /// Inflight heads.
        needed: usize,
        /// Room given.
        got: usize,
    },
}

impl fmt::Display for InflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InflightError::Truncated(t) => write!(f, "inflight queue region: {t}"),
            InflightError::Version(v) => write!(f, "inflight region version {v} (expected 0 or 1)"),
            InflightError::DescNum {
                desc_num,
                queue_size,
            } => write!(
                f,
                "inflight region desc_num {desc_num} for a queue of {queue_size}"
            ),
            InflightError::InflightFlag { head, value } => {
                write!(f, "inflight flag of head {head} is {value}")
            }
            InflightError::BatchSize { batch, queue_size } => write!(
                f,
                "last used batch of {batch} entries in a queue of {queue_size}"
            ),
            InflightError::BatchLink { head } => {
                write!(f, "last used batch links to head {head}, outside the queue")
            }
            InflightError::DuplicateCounter(c) => {
                write!(f, "two inflight heads share counter {c}")
            }
            InflightError::CounterExhausted => f.write_str("inflight counter beyond 2^63"),
            InflightError::PackedList { head } => {
                write!(
                    f,
                    "inflight list at entry {head} is not a list inside the queue"
                )
            }
            InflightError::PackedFreeList { entry } => {
                write!(
                    f,
                    "inflight free list leaves the queue or loops at entry {entry}"
                )
            }
            InflightError::PackedPosition { pos, wrap } => {
                write!(
                    f,
                    "inflight used position {pos} (wrap counter {wrap}) is invalid"
                )
            }
            InflightError::PackedOvercommitted { descs, queue_size } => {
                write!(f, "{descs} descriptors inflight in a queue of {queue_size}")
            }
            InflightError::RingUnreadable => {
                f.write_str("descriptor ring unreadable while recovering the inflight log")
            }
            InflightError::OrderBuffer { needed, got } => {
                write!(f, "{needed} inflight heads, room for {got}")
            }
        }
    }
}

impl core::error::Error for InflightError {}

impl From<Truncated> for InflightError {
    fn from(t: Truncated) -> Self {
        InflightError::Truncated(t)
    }
}

/// What [`QueueRegion::recover`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Heads still inflight: to resubmit, and to skip in the avail ring.
    pub pending: u16,
    /// The counter the next popped head gets (above every inflight one).
    pub next_counter: u64,
    /// Entries of a published but not cleared batch that were cleared.
    pub repaired: u16,
    /// The part was never initialized (version 0) and now is.
    pub initialized: bool,
}

/// A view of one queue's part of an inflight region (zero-copy, smoltcp-wire style). The target
/// parses a private copy of the shared bytes with it, never the shared memory itself.
#[derive(Debug, Clone, Copy)]
pub struct QueueRegion<T: AsRef<[u8]>> {
    buffer: T,
    queue_size: u16,
}

impl<T: AsRef<[u8]>> QueueRegion<T> {
    /// A view for a queue of `queue_size` descriptors; checks the length, the version and
    /// `desc_num`. A version-0 part (never initialized) is accepted whatever its `desc_num`.
    pub fn new_checked(buffer: T, queue_size: u16) -> Result<Self, InflightError> {
        wire::check_len(buffer.as_ref(), desc_offset(queue_size))?;
        let region = QueueRegion { buffer, queue_size };
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

    /// The queue size the view was checked for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
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

    /// The `last_batch_head` field.
    pub fn last_batch_head(&self) -> u16 {
        wire::le_u16(self.bytes(), field::LAST_BATCH_HEAD)
    }

    /// The `used_idx` field.
    pub fn used_idx(&self) -> u16 {
        wire::le_u16(self.bytes(), field::USED_IDX)
    }

    /// Descriptor `head`'s `inflight` byte (0 outside the queue).
    pub fn inflight(&self, head: u16) -> u8 {
        wire::byte(self.bytes(), inflight_offset(head))
    }

    /// Descriptor `head`'s `next` link.
    pub fn next(&self, head: u16) -> u16 {
        let at = next_offset(head);
        wire::le_u16(self.bytes(), at..at + 2)
    }

    /// Descriptor `head`'s `counter`.
    pub fn counter(&self, head: u16) -> u64 {
        let at = counter_offset(head);
        wire::le_u64(self.bytes(), at..at + 8)
    }

    /// Checks every inflight flag; returns how many heads are inflight and the highest counter
    /// among them.
    fn scan(&self) -> Result<(u16, Option<u64>), InflightError> {
        let mut pending: u16 = 0;
        let mut highest: Option<u64> = None;
        for head in 0..self.queue_size {
            match self.inflight(head) {
                0 => {}
                1 => {
                    // At most queue_size (a u16) heads: cannot overflow.
                    pending = pending.saturating_add(1);
                    let c = self.counter(head);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
                value => return Err(InflightError::InflightFlag { head, value }),
            }
        }
        Ok((pending, highest))
    }

    /// Writes the heads still inflight into `out` in the order they were popped (by counter)
    /// and returns them. Two heads with the same counter are refused: their order is unknown,
    /// so the region was not written by this protocol.
    pub fn resubmit_order<'o>(&self, out: &'o mut [u16]) -> Result<&'o [u16], InflightError> {
        let mut n = 0usize;
        for head in 0..self.queue_size {
            if self.inflight(head) == 1 {
                let got = out.len();
                let slot = out.get_mut(n).ok_or(InflightError::OrderBuffer {
                    needed: n.saturating_add(1),
                    got,
                })?;
                *slot = head;
                n = n.saturating_add(1);
            }
        }
        let heads = out.get_mut(..n).unwrap_or(&mut []);
        heads.sort_unstable_by_key(|&head| self.counter(head));
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

impl<T: AsRef<[u8]> + AsMut<[u8]>> QueueRegion<T> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the `features` field.
    pub fn set_features(&mut self, value: u64) {
        wire::set(self.bytes_mut(), field::FEATURES, &value.to_le_bytes());
    }

    /// Sets `version`.
    pub fn set_version(&mut self, value: u16) {
        wire::set(self.bytes_mut(), field::VERSION, &value.to_le_bytes());
    }

    /// Sets `desc_num`.
    pub fn set_desc_num(&mut self, value: u16) {
        wire::set(self.bytes_mut(), field::DESC_NUM, &value.to_le_bytes());
    }

    /// Sets `last_batch_head`.
    pub fn set_last_batch_head(&mut self, value: u16) {
        wire::set(
            self.bytes_mut(),
            field::LAST_BATCH_HEAD,
            &value.to_le_bytes(),
        );
    }

    /// Sets `used_idx`.
    pub fn set_used_idx(&mut self, value: u16) {
        wire::set(self.bytes_mut(), field::USED_IDX, &value.to_le_bytes());
    }

    /// Sets descriptor `head`'s `inflight` byte.
    pub fn set_inflight(&mut self, head: u16, value: u8) {
        wire::set_byte(self.bytes_mut(), inflight_offset(head), value);
    }

    /// Sets descriptor `head`'s `next` link.
    pub fn set_next(&mut self, head: u16, value: u16) {
        let at = next_offset(head);
        wire::set(self.bytes_mut(), at..at + 2, &value.to_le_bytes());
    }

    /// Sets descriptor `head`'s `counter`.
    pub fn set_counter(&mut self, head: u16, value: u64) {
        let at = counter_offset(head);
        wire::set(self.bytes_mut(), at..at + 8, &value.to_le_bytes());
    }

    /// Brings the part to a consistent state for a queue whose used ring holds
    /// `ring_used_idx`, as the spec's reconnect steps do: a never-initialized part is
    /// initialized (nothing inflight); a batch published but not cleared (`used_idx` behind the
    /// ring) has its entries cleared; then every flag is checked and the inflight heads
    /// counted. Nothing is written unless every check passed.
    pub fn recover(
        &mut self,
        ring_used_idx: u16,
        features: u64,
    ) -> Result<Recovery, InflightError> {
        let queue_size = self.queue_size;
        if self.version() == 0 {
            let end = desc_offset(queue_size);
            if let Some(states) = self.bytes_mut().get_mut(QUEUE_HEADER_LEN..end) {
                states.fill(0);
            }
            self.set_features(features);
            self.set_desc_num(queue_size);
            self.set_last_batch_head(0);
            self.set_used_idx(ring_used_idx);
            self.set_version(VERSION);
            return Ok(Recovery {
                pending: 0,
                next_counter: 1,
                repaired: 0,
                initialized: true,
            });
        }
        // Every flag is checked before anything is written.
        self.scan()?;
        let batch = ring_used_idx.wrapping_sub(self.used_idx());
        if batch > queue_size {
            return Err(InflightError::BatchSize { batch, queue_size });
        }
        // Check the whole list before clearing any of it.
        let mut head = self.last_batch_head();
        for i in 0..batch {
            if head >= queue_size {
                return Err(InflightError::BatchLink { head });
            }
            if i.saturating_add(1) < batch {
                head = self.next(head);
            }
        }
        let mut head = self.last_batch_head();
        for _ in 0..batch {
            self.set_inflight(head, 0);
            head = self.next(head);
        }
        self.set_used_idx(ring_used_idx);
        self.set_features(features);
        let (pending, highest) = self.scan()?;
        let next_counter = match highest {
            None => 1,
            Some(h) if h < MAX_COUNTER => h.saturating_add(1),
            Some(_) => return Err(InflightError::CounterExhausted),
        };
        Ok(Recovery {
            pending,
            next_counter,
            repaired: batch,
            initialized: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QS: u16 = 4;

    /// A queue part of 4 descriptors, written byte by byte as the spec lays it out.
    fn part(version: u16, desc_num: u16, last_batch_head: u16, used_idx: u16) -> [u8; 128] {
        let mut b = [0u8; 128];
        b[0..8].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        b[8..10].copy_from_slice(&version.to_le_bytes());
        b[10..12].copy_from_slice(&desc_num.to_le_bytes());
        b[12..14].copy_from_slice(&last_batch_head.to_le_bytes());
        b[14..16].copy_from_slice(&used_idx.to_le_bytes());
        b
    }

    fn desc(b: &mut [u8], head: usize, inflight: u8, next: u16, counter: u64) {
        let at = 16 + 16 * head;
        b[at] = inflight;
        b[at + 6..at + 8].copy_from_slice(&next.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&counter.to_le_bytes());
    }

    #[test]
    fn layout_matches_the_spec() {
        assert_eq!(queue_region_len(4), 128, "16 + 4 * 16 = 80, padded to 64");
        assert_eq!(queue_region_len(128), 16 + 128 * 16 + 48);
        assert_eq!(queue_region_len(1024) % QUEUE_ALIGN, 0);
        assert_eq!(region_len(2, 4), Some(256));
        assert_eq!(queue_range(1, 4), Some(128..256));
        assert_eq!(inflight_offset(0), 16);
        assert_eq!(next_offset(1), 16 + 16 + 6);
        assert_eq!(counter_offset(2), 16 + 32 + 8);
        let mut b = part(1, QS, 3, 7);
        desc(&mut b, 2, 1, 0xbeef, 0x1122_3344_5566_7788);
        let r = QueueRegion::new_checked(&b[..], QS).unwrap();
        assert_eq!(r.features(), 1 << 32);
        assert_eq!(
            (r.version(), r.desc_num(), r.last_batch_head(), r.used_idx()),
            (1, 4, 3, 7)
        );
        assert_eq!(
            (r.inflight(2), r.next(2), r.counter(2)),
            (1, 0xbeef, 0x1122_3344_5566_7788)
        );
        assert_eq!(r.inflight(9), 0, "outside the part: zero, no panic");
    }

    #[test]
    fn setters_write_the_spec_offsets() {
        let mut b = [0u8; 128];
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        r.set_version(1);
        r.set_desc_num(4);
        r.set_last_batch_head(2);
        r.set_used_idx(0x0102);
        r.set_inflight(3, 1);
        r.set_next(3, 0x0a0b);
        r.set_counter(3, 5);
        let mut want = part(1, 4, 2, 0x0102);
        want[0..8].fill(0);
        desc(&mut want, 3, 1, 0x0a0b, 5);
        assert_eq!(b, want);
    }

    #[test]
    fn bad_sizes_versions_and_desc_num_are_refused() {
        let b = part(1, QS, 0, 0);
        assert!(matches!(
            QueueRegion::new_checked(&b[..79], QS),
            Err(InflightError::Truncated(_))
        ));
        assert_eq!(
            QueueRegion::new_checked(&part(2, QS, 0, 0)[..], QS).unwrap_err(),
            InflightError::Version(2)
        );
        assert_eq!(
            QueueRegion::new_checked(&part(1, 8, 0, 0)[..], QS).unwrap_err(),
            InflightError::DescNum {
                desc_num: 8,
                queue_size: 4
            }
        );
        // A queue larger than the part: truncated, whatever desc_num says.
        assert!(matches!(
            QueueRegion::new_checked(&part(1, 64, 0, 0)[..], 64),
            Err(InflightError::Truncated(_))
        ));
    }

    #[test]
    fn a_fresh_part_is_initialized() {
        let mut b = part(0, 0, 0, 0);
        desc(&mut b, 1, 1, 0, 9); // stale bytes in a version-0 part mean nothing
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r.recover(5, 7).unwrap();
        assert_eq!(
            rec,
            Recovery {
                pending: 0,
                next_counter: 1,
                repaired: 0,
                initialized: true
            }
        );
        assert_eq!(
            (r.version(), r.desc_num(), r.used_idx(), r.features()),
            (1, QS, 5, 7)
        );
        assert_eq!(r.inflight(1), 0);
    }

    #[test]
    fn an_unpublished_batch_stays_inflight_and_is_resubmitted_in_counter_order() {
        // Heads 3, 0, 2 popped in that order (counters 10, 11, 12); 0 was completed and linked
        // but used.idx not yet published (used_idx equals the ring).
        let mut b = part(1, QS, 0, 6);
        desc(&mut b, 3, 1, 0, 10);
        desc(&mut b, 0, 1, 1, 11);
        desc(&mut b, 2, 1, 0, 12);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r.recover(6, 0).unwrap();
        assert_eq!((rec.pending, rec.next_counter, rec.repaired), (3, 13, 0));
        let mut out = [0u16; 4];
        assert_eq!(r.resubmit_order(&mut out).unwrap(), &[3, 0, 2]);
        let mut short = [0u16; 2];
        assert_eq!(
            r.resubmit_order(&mut short).unwrap_err(),
            InflightError::OrderBuffer { needed: 3, got: 2 }
        );
    }

    #[test]
    fn a_published_batch_that_was_not_cleared_is_cleared() {
        // Batch list 1 -> 3 published (ring used.idx 9, region still 7); head 2 still inflight.
        let mut b = part(1, QS, 1, 7);
        desc(&mut b, 1, 1, 3, 20);
        desc(&mut b, 3, 1, 0xffff, 21); // the last link is never followed
        desc(&mut b, 2, 1, 0, 22);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r.recover(9, 0).unwrap();
        assert_eq!((rec.pending, rec.next_counter, rec.repaired), (1, 23, 2));
        assert_eq!((r.inflight(1), r.inflight(3), r.used_idx()), (0, 0, 9));
        let mut out = [0u16; 4];
        assert_eq!(r.resubmit_order(&mut out).unwrap(), &[2]);
        // Running recovery again changes nothing (a crash during recovery is repairable too).
        assert_eq!(r.recover(9, 0).unwrap().pending, 1);
    }

    #[test]
    fn the_used_index_wraps() {
        let mut b = part(1, QS, 2, 0xffff);
        desc(&mut b, 2, 1, 0, 1);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        let rec = r.recover(0, 0).unwrap();
        assert_eq!((rec.pending, rec.repaired), (0, 1));
    }

    #[test]
    fn hostile_contents_are_refused_without_writing() {
        // Batch larger than the queue.
        let mut b = part(1, QS, 0, 0);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert_eq!(
            r.recover(5, 0).unwrap_err(),
            InflightError::BatchSize {
                batch: 5,
                queue_size: QS
            }
        );
        // A batch list leaving the queue: nothing is cleared.
        let mut b = part(1, QS, 1, 0);
        desc(&mut b, 1, 1, 7, 1);
        let before = b;
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert_eq!(
            r.recover(2, 0).unwrap_err(),
            InflightError::BatchLink { head: 7 }
        );
        assert_eq!(b, before);
        // A flag that is not 0 or 1.
        let mut b = part(1, QS, 0, 0);
        desc(&mut b, 2, 0x80, 0, 1);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert_eq!(
            r.recover(0, 0).unwrap_err(),
            InflightError::InflightFlag {
                head: 2,
                value: 0x80
            }
        );
        // No counter left.
        let mut b = part(1, QS, 0, 0);
        desc(&mut b, 0, 1, 0, MAX_COUNTER);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert_eq!(
            r.recover(0, 0).unwrap_err(),
            InflightError::CounterExhausted
        );
        // Equal counters: order unknown.
        let mut b = part(1, QS, 0, 0);
        desc(&mut b, 0, 1, 0, 4);
        desc(&mut b, 3, 1, 0, 4);
        let mut r = QueueRegion::new_checked(&mut b[..], QS).unwrap();
        assert_eq!(r.recover(0, 0).unwrap().pending, 2);
        let mut out = [0u16; 4];
        assert_eq!(
            r.resubmit_order(&mut out).unwrap_err(),
            InflightError::DuplicateCounter(4)
        );
    }
}
