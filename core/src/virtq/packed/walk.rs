//! Walking a popped packed-ring list (virtio 1.2 §2.8, "Next Flag: Descriptor Chaining" and
//! "Indirect Flag: Scatter-Gather Support") into the same [`Chain`] the split ring fills.

use crate::mem::{Direction, GuestMemory, MemError, Segment};
use crate::virtq::chain::{Chain, ChainError, ChainErrorKind};

use super::desc::{is_available, PackedDesc, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use super::PackedHead;

/// Entries of an indirect table the walk reads at most: the bound the split ring's walker puts on
/// an indirect table (a `u16` `next` reaches no further), so both layouts accept the same
/// requests. The spec lets a device limit a list's length; without a bound a hostile table of
/// zero-length entries (up to 4 GiB / 16) would cost 2^28 reads.
pub const MAX_INDIRECT_ENTRIES: u32 = 1 << 16;

/// What the walk needs from the queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct WalkParams {
    pub ring: u64,
    pub size: u16,
    pub indirect: bool,
}

/// The buffer bookkeeping of one walk, as the split ring's walker keeps it: content problems (a
/// buffer that does not translate, a readable after a writable buffer, too many segments or
/// bytes) are remembered and the walk goes on without collecting, so the error can report the
/// list's real last buffer.
struct Contents {
    total: u64,
    first_error: Option<ChainErrorKind>,
    last_segment: Option<Segment>,
}

impl Contents {
    /// [`Contents::add`] as a call: a list's direct descriptors take it out of line (inlined
    /// into the walk of a list it cost 34 instructions a request more), an indirect table's
    /// loop inlines it (out of line there it cost 19 more).
    #[inline(never)]
    fn add_call<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        mem: &M,
        chain: &mut Chain<N>,
        desc: &PackedDesc,
    ) {
        self.add(mem, chain, desc);
    }

    /// The walk's result: the first content problem, reported with the list's last buffer.
    #[inline(always)]
    fn finish(self, head: u16) -> Result<(), ChainError> {
        match self.first_error {
            None => Ok(()),
            Some(kind) => Err(ChainError {
                head,
                kind,
                last_segment: self.last_segment,
            }),
        }
    }

    #[inline(always)]
    fn add<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        mem: &M,
        chain: &mut Chain<N>,
        desc: &PackedDesc,
    ) {
        self.total = self.total.saturating_add(u64::from(desc.len));
        if self.total > u64::from(u32::MAX) && self.first_error.is_none() {
            self.first_error = Some(ChainErrorKind::TotalLengthOverflow);
        }
        if desc.len == 0 {
            return;
        }
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
                self.last_segment = Some(seg);
                if self.first_error.is_none() {
                    if let Err(kind) = chain.push(seg) {
                        self.first_error = Some(kind);
                    }
                }
            }
            Err(err) => {
                self.last_segment = None;
                if self.first_error.is_none() {
                    self.first_error = Some(ChainErrorKind::BufferUnmapped {
                        addr: desc.addr,
                        len: desc.len,
                        err,
                    });
                }
            }
        }
    }
}

/// Reads the 16 bytes of the descriptor at `addr`: the one copy everything below looks at.
#[inline]
fn read_desc<M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Result<PackedDesc, ChainErrorKind> {
    let raw = mem
        .read_array::<{ PackedDesc::SIZE }>(addr)
        .map_err(|err| ChainErrorKind::DescriptorUnreadable { addr, err })?;
    Ok(PackedDesc::from_bytes(&raw))
}

/// Walks the list `head` (as [`super::PackedQueue::pop_heads`] found it) into `chain`, reading
/// its descriptors from the ring.
///
/// Every descriptor is read again and must still be the available descriptor the pop saw (wrap
/// bits of its lap, `NEXT` on all but the last, the buffer ID in the last): the device owns it
/// from the pop on, so a change means a driver that broke the protocol, or a used descriptor
/// written over a list the device had not walked yet.
pub(super) fn walk<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    params: WalkParams,
    head: PackedHead,
    chain: &mut Chain<N>,
) -> Result<(), ChainError> {
    walk_with(mem, params, head, chain, |pos| {
        let addr = u64::from(pos)
            .checked_mul(PackedDesc::SIZE as u64)
            .and_then(|off| params.ring.checked_add(off))
            .ok_or(ChainErrorKind::DescriptorUnreadable {
                addr: params.ring,
                err: MemError::Overflow,
            })?;
        read_desc(mem, addr)
    })
}

/// [`walk`] for a popped list whose copies were not kept (longer than the pop keeps): out of
/// line, so that the walk from the copies, which nearly every list takes, is all that
/// `walk_popped` inlines.
#[cold]
#[inline(never)]
pub(super) fn walk_uncopied<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    params: WalkParams,
    head: PackedHead,
    chain: &mut Chain<N>,
) -> Result<(), ChainError> {
    walk(mem, params, head, chain)
}

/// Walks the list `head` into `chain` from `descs`, copies of its ring descriptors (one per
/// descriptor of the list, in ring order: what the pop read, or what an inflight log kept), with
/// the checks [`walk`] makes but the wrap bits: the pop checked those when it read the copies,
/// and a list resubmitted from an inflight log has no ring position any more.
#[inline]
pub(super) fn walk_copied<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    params: WalkParams,
    head: PackedHead,
    descs: &[PackedDesc],
    chain: &mut Chain<N>,
) -> Result<(), ChainError> {
    let structural = structural_error(head.id);
    begin_walk(params, head, chain).map_err(structural)?;
    // The ring position of the list's `i`-th descriptor (for errors only).
    let pos_of = |i: usize| {
        let i = u32::try_from(i).unwrap_or(u32::MAX) % u32::from(params.size);
        let pos = u32::from(head.pos) + i;
        (pos % u32::from(params.size)) as u16
    };
    let count = usize::from(head.count);
    let Some(list) = descs.get(..count) else {
        return Err(structural(ChainErrorKind::PackedDescriptorChanged {
            pos: pos_of(descs.len()),
        }));
    };
    // `count >= 1` (checked above).
    let Some((last, body)) = list.split_last() else {
        return Err(structural(ChainErrorKind::ChainTooLong {
            limit: u32::from(params.size),
        }));
    };
    let mut contents = Contents {
        total: 0,
        first_error: None,
        last_segment: None,
    };
    // The same checks, in the same order, as `walk_with` makes of each descriptor; a body
    // descriptor is never the last, so `NEXT` is required and an indirect one is in a list.
    for (i, desc) in body.iter().enumerate() {
        chain.descriptors = chain.descriptors.saturating_add(1);
        if desc.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT) != VIRTQ_DESC_F_NEXT {
            let kind = if !desc.is_indirect() {
                ChainErrorKind::PackedDescriptorChanged { pos: pos_of(i) }
            } else if desc.has_next() {
                ChainErrorKind::IndirectWithNext
            } else {
                ChainErrorKind::IndirectInList
            };
            return Err(structural(kind));
        }
        contents.add_call(mem, chain, desc);
    }
    chain.descriptors = chain.descriptors.saturating_add(1);
    if last.is_indirect() {
        if last.has_next() {
            return Err(structural(ChainErrorKind::IndirectWithNext));
        }
        if count != 1 {
            return Err(structural(ChainErrorKind::IndirectInList));
        }
    }
    if last.has_next() || last.id != head.id {
        return Err(structural(ChainErrorKind::PackedDescriptorChanged {
            pos: pos_of(count - 1),
        }));
    }
    if last.is_indirect() {
        walk_indirect(mem, params, last, chain, &mut contents).map_err(structural)?;
    } else {
        contents.add_call(mem, chain, last);
    }
    contents.finish(head.id)
}

/// A structural problem of the list `head` (its shape, not its buffers): reported without a
/// last segment.
#[inline(always)]
fn structural_error(head: u16) -> impl Fn(ChainErrorKind) -> ChainError + Copy {
    move |kind| ChainError {
        head,
        kind,
        last_segment: None,
    }
}

/// The opening of both walks: `chain` emptied for `head`, and the head checked.
#[inline(always)]
fn begin_walk<const N: usize>(
    params: WalkParams,
    head: PackedHead,
    chain: &mut Chain<N>,
) -> Result<(), ChainErrorKind> {
    chain.reset(head.id);
    check_head(params, head)
}

/// The checks of a head before its descriptors are looked at.
#[inline(always)]
fn check_head(params: WalkParams, head: PackedHead) -> Result<(), ChainErrorKind> {
    if head.id >= params.size {
        return Err(ChainErrorKind::HeadOutOfRange {
            head: head.id,
            size: params.size,
        });
    }
    if head.pos >= params.size {
        return Err(ChainErrorKind::NextOutOfRange {
            next: head.pos,
            table_len: u32::from(params.size),
        });
    }
    if head.count == 0 || head.count > params.size {
        return Err(ChainErrorKind::ChainTooLong {
            limit: u32::from(params.size),
        });
    }
    Ok(())
}

/// The walk from the ring: `next_desc(pos)` gives the list's descriptors at ring positions
/// `pos` in order, each exactly once.
#[inline(always)]
fn walk_with<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    params: WalkParams,
    head: PackedHead,
    chain: &mut Chain<N>,
    mut next_desc: impl FnMut(u16) -> Result<PackedDesc, ChainErrorKind>,
) -> Result<(), ChainError> {
    let structural = structural_error(head.id);
    begin_walk(params, head, chain).map_err(structural)?;

    let mut contents = Contents {
        total: 0,
        first_error: None,
        last_segment: None,
    };
    let mut pos = head.pos;
    let mut wrap = head.wrap;
    for i in 0..head.count {
        chain.descriptors = chain.descriptors.saturating_add(1);
        let desc = next_desc(pos).map_err(structural)?;
        let last = i + 1 == head.count;
        if !is_available(desc.flags, wrap) {
            return Err(structural(ChainErrorKind::PackedDescriptorChanged { pos }));
        }
        if desc.is_indirect() {
            if desc.has_next() {
                return Err(structural(ChainErrorKind::IndirectWithNext));
            }
            if head.count != 1 {
                return Err(structural(ChainErrorKind::IndirectInList));
            }
        }
        if desc.has_next() == last || (last && desc.id != head.id) {
            return Err(structural(ChainErrorKind::PackedDescriptorChanged { pos }));
        }
        if desc.is_indirect() {
            walk_indirect(mem, params, &desc, chain, &mut contents).map_err(structural)?;
        } else {
            contents.add_call(mem, chain, &desc);
        }
        // `pos < size`, so `pos + 1` cannot overflow.
        pos += 1;
        if pos == params.size {
            pos = 0;
            wrap = !wrap;
        }
    }

    contents.finish(head.id)
}

/// Collects the buffers of the indirect table `desc` points at. Its entries follow one another
/// (no `NEXT`); in them only `WRITE` counts: the other flags and the buffer ID are reserved and
/// ignored (§2.8, "Indirect Flag: Scatter-Gather Support"), so an entry marked `INDIRECT` is an
/// ordinary buffer, never a nested table.
fn walk_indirect<M: GuestMemory + ?Sized, const N: usize>(
    mem: &M,
    params: WalkParams,
    desc: &PackedDesc,
    chain: &mut Chain<N>,
    contents: &mut Contents,
) -> Result<(), ChainErrorKind> {
    if !params.indirect {
        return Err(ChainErrorKind::IndirectNotNegotiated);
    }
    if desc.len == 0 || desc.len % PackedDesc::SIZE as u32 != 0 {
        return Err(ChainErrorKind::IndirectTableLength { len: desc.len });
    }
    let entries = desc.len / PackedDesc::SIZE as u32;
    if entries > MAX_INDIRECT_ENTRIES {
        return Err(ChainErrorKind::ChainTooLong {
            limit: MAX_INDIRECT_ENTRIES,
        });
    }
    mem.translate(desc.addr, u64::from(desc.len))
        .map_err(|err| ChainErrorKind::IndirectTableUnmapped {
            addr: desc.addr,
            len: desc.len,
            err,
        })?;
    for k in 0..entries {
        chain.descriptors = chain.descriptors.saturating_add(1);
        // `k * 16 < len` and the table translated, so this cannot overflow; checked anyway.
        let addr = desc
            .addr
            .checked_add(u64::from(k) * PackedDesc::SIZE as u64)
            .ok_or(ChainErrorKind::DescriptorUnreadable {
                addr: desc.addr,
                err: MemError::Overflow,
            })?;
        let entry = read_desc(mem, addr)?;
        contents.add(mem, chain, &entry);
    }
    Ok(())
}
