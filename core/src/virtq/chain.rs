//! Walking a descriptor chain (virtio 1.2 §2.7.5) into a fixed-capacity list of [`Segment`]s.

use heapless::Vec;

use crate::mem::{Direction, GuestMemory, MemError, Segment};
use crate::segments::SegmentRange;
use crate::virtio::ring::VirtqDesc;

/// Entries an indirect table can usefully have: `next` is a `u16`, so a walk that starts at entry 0
/// can never reach entry 65536 or beyond. Bounding the walk by this (not by the table's byte length,
/// which the guest controls up to 4 GiB) keeps a hostile table from costing more than 64 Ki reads.
const MAX_REACHABLE_INDIRECT: u32 = 1 << 16;

/// A walked descriptor chain: its head index and the device-readable segments followed by the
/// device-writable ones.
///
/// It has a fixed capacity of `N` segments and never allocates; the target keeps one per queue (or
/// per request slot) and reuses it. Zero-length descriptors are skipped, so every segment holds at
/// least one byte.
#[derive(Debug, Clone)]
pub struct Chain<const N: usize> {
    head: u16,
    segments: Vec<Segment, N>,
    first_writable: usize,
    readable_len: u32,
    writable_len: u32,
    pub(super) descriptors: u32,
}

impl<const N: usize> Default for Chain<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Chain<N> {
    /// An empty chain buffer.
    pub const fn new() -> Self {
        Chain {
            head: 0,
            segments: Vec::new(),
            first_writable: 0,
            readable_len: 0,
            writable_len: 0,
            descriptors: 0,
        }
    }

    /// How many segments this buffer can hold.
    pub const fn capacity(&self) -> usize {
        N
    }

    pub(super) fn reset(&mut self, head: u16) {
        self.head = head;
        self.segments.clear();
        self.first_writable = 0;
        self.readable_len = 0;
        self.writable_len = 0;
        self.descriptors = 0;
    }

    /// The index of the chain's head descriptor: what goes into the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// All non-empty segments, device-readable ones first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The device-readable segments (driver → device).
    #[inline]
    pub fn readable(&self) -> &[Segment] {
        self.segments.get(..self.first_writable).unwrap_or(&[])
    }

    /// The device-writable segments (device → driver).
    #[inline]
    pub fn writable(&self) -> &[Segment] {
        self.segments.get(self.first_writable..).unwrap_or(&[])
    }

    /// Total bytes of the device-readable segments.
    #[inline]
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes of the device-writable segments.
    #[inline]
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// The device-readable bytes, to copy out of ([`SegmentRange::reader`]) or hand on in pieces.
    #[inline]
    pub fn readable_range(&self) -> SegmentRange<'_> {
        SegmentRange::new_unchecked(self.readable(), 0, u64::from(self.readable_len))
    }

    /// The device-writable bytes, to copy into ([`SegmentRange::writer`]) or hand on in pieces.
    #[inline]
    pub fn writable_range(&self) -> SegmentRange<'_> {
        SegmentRange::new_unchecked(self.writable(), 0, u64::from(self.writable_len))
    }

    /// How many descriptors the walk visited, including zero-length and indirect ones.
    pub fn descriptor_count(&self) -> u32 {
        self.descriptors
    }

    pub(super) fn push(&mut self, seg: Segment) -> Result<(), ChainErrorKind> {
        // Lengths are bounded by the walk's total-length check, which runs first.
        match seg.direction {
            Direction::DeviceReadable => {
                if self.first_writable != self.segments.len() {
                    return Err(ChainErrorKind::ReadableAfterWritable);
                }
                self.segments
                    .push(seg)
                    .map_err(|_| ChainErrorKind::CapacityExceeded { capacity: N })?;
                self.first_writable = self.segments.len();
                self.readable_len = self.readable_len.saturating_add(seg.len);
            }
            Direction::DeviceWritable => {
                self.segments
                    .push(seg)
                    .map_err(|_| ChainErrorKind::CapacityExceeded { capacity: N })?;
                self.writable_len = self.writable_len.saturating_add(seg.len);
            }
        }
        Ok(())
    }
}

/// Why a descriptor chain was rejected (virtio 1.2 §2.7.5 driver requirements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainErrorKind {
    /// The head index taken from the available ring is not below the queue size.
    HeadOutOfRange {
        /// The offending head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A `next` field points past the end of its descriptor table.
    NextOutOfRange {
        /// The offending index.
        next: u16,
        /// Entries in the table (queue size, or indirect table length / 16).
        table_len: u32,
    },
    /// The chain visits more descriptors than its table has: a loop, or a chain longer than the
    /// queue size.
    ChainTooLong {
        /// The number of descriptors allowed.
        limit: u32,
    },
    /// A descriptor could not be read from the descriptor table or indirect table.
    DescriptorUnreadable {
        /// Guest address of the descriptor.
        addr: u64,
        /// Why the read failed.
        err: MemError,
    },
    /// An indirect descriptor, but `VIRTIO_F_RING_INDIRECT_DESC` was not negotiated.
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// A descriptor with both `INDIRECT` and `NEXT` set.
    IndirectWithNext,
    /// An indirect table whose length is zero or not a multiple of 16.
    IndirectTableLength {
        /// The offending length in bytes.
        len: u32,
    },
    /// The indirect table does not lie inside one mapped region.
    IndirectTableUnmapped {
        /// Guest address of the table.
        addr: u64,
        /// Length of the table in bytes.
        len: u32,
        /// Why the translation failed.
        err: MemError,
    },
    /// The buffers' lengths add up to more than `u32::MAX` bytes.
    TotalLengthOverflow,
    /// A device-readable descriptor follows a device-writable one.
    ReadableAfterWritable,
    /// A buffer does not lie inside one mapped region.
    BufferUnmapped {
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
        /// Why the translation failed.
        err: MemError,
    },
    /// The chain has more non-empty buffers than the [`Chain`] can hold.
    CapacityExceeded {
        /// The chain buffer's capacity.
        capacity: usize,
    },
    /// Packed ring: a descriptor of a popped list is no longer the available descriptor it was
    /// when popped (its wrap bits, `NEXT` or buffer ID changed while the device owned it).
    PackedDescriptorChanged {
        /// Its position in the descriptor ring.
        pos: u16,
    },
    /// Packed ring: an indirect descriptor in a list of several (§2.8, "Scatter-Gather Support":
    /// a list holds either direct descriptors or one indirect one).
    IndirectInList,
}

impl ChainErrorKind {
    /// Whether the walk could not follow the chain to its end (as opposed to a chain whose shape is
    /// intact but whose contents are unacceptable).
    pub fn is_structural(&self) -> bool {
        !matches!(
            self,
            ChainErrorKind::TotalLengthOverflow
                | ChainErrorKind::ReadableAfterWritable
                | ChainErrorKind::BufferUnmapped { .. }
                | ChainErrorKind::CapacityExceeded { .. }
        )
    }
}

impl core::fmt::Display for ChainErrorKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ChainErrorKind::HeadOutOfRange { head, size } => {
                write!(f, "head index {head} is not below the queue size {size}")
            }
            ChainErrorKind::NextOutOfRange { next, table_len } => {
                write!(
                    f,
                    "next index {next} is outside a table of {table_len} descriptors"
                )
            }
            ChainErrorKind::ChainTooLong { limit } => {
                write!(f, "chain is longer than {limit} descriptors (loop?)")
            }
            ChainErrorKind::DescriptorUnreadable { addr, err } => {
                write!(f, "descriptor at {addr:#x} is unreadable: {err}")
            }
            ChainErrorKind::IndirectNotNegotiated => {
                f.write_str("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
            }
            ChainErrorKind::NestedIndirect => {
                f.write_str("indirect descriptor inside an indirect table")
            }
            ChainErrorKind::IndirectWithNext => {
                f.write_str("descriptor has both INDIRECT and NEXT")
            }
            ChainErrorKind::IndirectTableLength { len } => {
                write!(
                    f,
                    "indirect table length {len} is zero or not a multiple of 16"
                )
            }
            ChainErrorKind::IndirectTableUnmapped { addr, len, err } => {
                write!(f, "indirect table {addr:#x}+{len:#x} is not mapped: {err}")
            }
            ChainErrorKind::TotalLengthOverflow => f.write_str("chain is longer than 4 GiB"),
            ChainErrorKind::ReadableAfterWritable => {
                f.write_str("device-readable descriptor after a device-writable one")
            }
            ChainErrorKind::BufferUnmapped { addr, len, err } => {
                write!(f, "buffer {addr:#x}+{len:#x} is not mapped: {err}")
            }
            ChainErrorKind::CapacityExceeded { capacity } => {
                write!(f, "chain has more than {capacity} segments")
            }
            ChainErrorKind::PackedDescriptorChanged { pos } => {
                write!(
                    f,
                    "descriptor at ring position {pos} changed after it was popped"
                )
            }
            ChainErrorKind::IndirectInList => {
                f.write_str("indirect descriptor in a list of several descriptors")
            }
        }
    }
}

/// A rejected descriptor chain, with what the caller needs to decide how to fail it.
///
/// - If [`ChainError::last_segment`] is `Some`, the walk reached the chain's end and its last
///   non-empty buffer is mapped: a device whose protocol puts a status field at the end of the chain
///   (virtio-blk, virtio-scsi) can fail just this request and return the head to the used ring.
/// - Otherwise the chain's end is unknown; [`ChainError::head_is_valid`] says whether the head can
///   still be returned to the used ring (with length 0). A device that cannot make sense of the
///   queue any more should set `DEVICE_NEEDS_RESET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainError {
    /// The head index of the rejected chain, as read from the available ring.
    pub head: u16,
    /// What was wrong (the first problem found).
    pub kind: ChainErrorKind,
    /// The chain's last non-empty buffer, if the walk reached the end of the chain and that buffer
    /// translated.
    pub last_segment: Option<Segment>,
}

impl ChainError {
    /// Whether `head` names a descriptor of the queue, so it may be put on the used ring.
    pub fn head_is_valid(&self) -> bool {
        !matches!(self.kind, ChainErrorKind::HeadOutOfRange { .. })
    }

    /// The last device-writable segment, where a device puts its status byte(s), if known.
    pub fn status_segment(&self) -> Option<Segment> {
        self.last_segment
            .filter(|s| s.direction == Direction::DeviceWritable)
    }
}

impl core::fmt::Display for ChainError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "descriptor chain at head {}: {}", self.head, self.kind)
    }
}

/// The parameters of a walk that come from the queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkParams {
    pub desc_table: u64,
    pub size: u16,
    pub indirect: bool,
}

/// Walks the chain starting at `head` into `chain`.
///
/// Structural problems (the chain cannot be followed) stop the walk at once. Content problems
/// (a buffer that does not translate, a readable after a writable buffer, too many segments, too
/// many bytes) are remembered and the walk goes on without collecting, so that the error can report
/// the chain's real last buffer.
///
/// `#[inline]`: each ring's `walk_chain` is its one caller, and without the hint whether it was
/// inlined there depended on how the downstream crate's code happened to fall into codegen
/// units (out of line it cost the split ring 30-55 instructions per request in `device_poll`).
#[inline]
pub(crate) fn walk<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    params: WalkParams,
    head: u16,
    chain: &mut Chain<N>,
) -> Result<(), ChainError> {
    chain.reset(head);
    let structural = |kind| ChainError {
        head,
        kind,
        last_segment: None,
    };
    if head >= params.size {
        return Err(structural(ChainErrorKind::HeadOutOfRange {
            head,
            size: params.size,
        }));
    }

    let mut table_base = params.desc_table;
    let mut table_len = u32::from(params.size);
    let mut budget = table_len;
    let mut index = u32::from(head);
    let mut in_indirect = false;

    let mut total: u64 = 0;
    let mut first_error: Option<ChainErrorKind> = None;
    // The last non-empty buffer seen so far: `Some` if it translated, `None` if it did not.
    let mut last_segment: Option<Segment> = None;

    loop {
        if budget == 0 {
            return Err(structural(ChainErrorKind::ChainTooLong {
                limit: table_len,
            }));
        }
        budget -= 1;
        chain.descriptors = chain.descriptors.saturating_add(1);

        let desc_addr = u64::from(index)
            .checked_mul(VirtqDesc::SIZE as u64)
            .and_then(|off| table_base.checked_add(off));
        let Some(desc_addr) = desc_addr else {
            return Err(structural(ChainErrorKind::DescriptorUnreadable {
                addr: table_base,
                err: MemError::Overflow,
            }));
        };
        // Copied out exactly once: everything below looks only at this local copy.
        let mut raw = [0u8; VirtqDesc::SIZE];
        mem.read(desc_addr, &mut raw).map_err(|err| {
            structural(ChainErrorKind::DescriptorUnreadable {
                addr: desc_addr,
                err,
            })
        })?;
        let desc = VirtqDesc::from_bytes(&raw);

        if desc.is_indirect() {
            if in_indirect {
                return Err(structural(ChainErrorKind::NestedIndirect));
            }
            if !params.indirect {
                return Err(structural(ChainErrorKind::IndirectNotNegotiated));
            }
            if desc.has_next() {
                return Err(structural(ChainErrorKind::IndirectWithNext));
            }
            if desc.len == 0 || desc.len % VirtqDesc::SIZE as u32 != 0 {
                return Err(structural(ChainErrorKind::IndirectTableLength {
                    len: desc.len,
                }));
            }
            mem.translate(desc.addr, u64::from(desc.len))
                .map_err(|err| {
                    structural(ChainErrorKind::IndirectTableUnmapped {
                        addr: desc.addr,
                        len: desc.len,
                        err,
                    })
                })?;
            table_base = desc.addr;
            table_len = desc.len / VirtqDesc::SIZE as u32;
            budget = table_len.min(MAX_REACHABLE_INDIRECT);
            index = 0;
            in_indirect = true;
            continue;
        }

        total = total.saturating_add(u64::from(desc.len));
        if total > u64::from(u32::MAX) && first_error.is_none() {
            first_error = Some(ChainErrorKind::TotalLengthOverflow);
        }
        if desc.len > 0 {
            let direction = if desc.is_write_only() {
                Direction::DeviceWritable
            } else {
                Direction::DeviceReadable
            };
            match mem.translate(desc.addr, u64::from(desc.len)) {
                Ok(host_addr) => {
                    let seg = Segment {
                        guest_addr: desc.addr,
                        host_addr,
                        len: desc.len,
                        direction,
                    };
                    last_segment = Some(seg);
                    if first_error.is_none() {
                        if let Err(kind) = chain.push(seg) {
                            first_error = Some(kind);
                        }
                    }
                }
                Err(err) => {
                    last_segment = None;
                    if first_error.is_none() {
                        first_error = Some(ChainErrorKind::BufferUnmapped {
                            addr: desc.addr,
                            len: desc.len,
                            err,
                        });
                    }
                }
            }
        }

        if !desc.has_next() {
            break;
        }
        if u32::from(desc.next) >= table_len {
            return Err(structural(ChainErrorKind::NextOutOfRange {
                next: desc.next,
                table_len,
            }));
        }
        index = u32::from(desc.next);
    }

    match first_error {
        None => Ok(()),
        Some(kind) => Err(ChainError {
            head,
            kind,
            last_segment,
        }),
    }
}
