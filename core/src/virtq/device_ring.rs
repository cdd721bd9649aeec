//! One interface over both ring layouts: what a device's poll round calls, whichever layout the
//! driver negotiated (`VIRTIO_F_RING_PACKED`).
//!
//! [`DeviceRing`] is implemented by [`SplitQueue`] and [`PackedQueue`] (a device generic over it
//! pays nothing for the choice) and by [`AnyRing`], which holds either and is chosen when a
//! queue starts, for a device whose queues are created before the layout is known.
//!
//! ```
//! use rvhost_core::mem::GuestMemory;
//! use rvhost_core::virtq::{Chain, DeviceRing};
//!
//! /// One poll round of a device that answers every request at once.
//! fn round<R: DeviceRing, M: GuestMemory>(
//!     ring: &mut R,
//!     mem: &M,
//!     heads: &mut [R::Head],
//!     chain: &mut Chain<16>,
//! ) -> Result<bool, R::Error> {
//!     let popped = ring.pop_heads(mem, heads)?;
//!     if popped > 0 {
//!         ring.disable_kicks(mem)?;
//!     }
//!     for &head in heads.iter().take(popped) {
//!         let len = match ring.walk_chain(mem, head, chain) {
//!             Ok(()) => chain.writable_len(),
//!             Err(_) => 0,
//!         };
//!         ring.push_used(mem, head, len)?;
//!     }
//!     ring.publish_used(mem)?;
//!     ring.needs_notification(mem)
//! }
//! ```

use crate::mem::GuestMemory;
use crate::virtq::packed::{PackedHead, PackedQueue, PackedQueueError};
use crate::virtq::{Chain, ChainError, LateNotification, QueueError, SplitQueue};

/// A popped request's handle, kept with the request until it is returned.
pub trait RingHead: Copy + Default + core::fmt::Debug {
    /// What the used ring will carry for it: the split ring's head index, the packed ring's
    /// buffer ID (for logs and for tracking requests in flight).
    fn id(&self) -> u16;
}

impl RingHead for u16 {
    fn id(&self) -> u16 {
        *self
    }
}

impl RingHead for PackedHead {
    fn id(&self) -> u16 {
        self.id
    }
}

/// The device side of a virtqueue, whatever its layout. Every method means what the
/// [`SplitQueue`] method of the same name means; [`PackedQueue`] documents how the packed layout
/// does it.
pub trait DeviceRing {
    /// A popped request: the split ring's head index, or a [`PackedHead`].
    type Head: RingHead;
    /// Why the ring cannot be used any more (the device should set `DEVICE_NEEDS_RESET`).
    type Error: core::error::Error + Copy;

    /// The queue size.
    fn size(&self) -> u16;
    /// Checks that the ring's parts lie inside mapped guest memory.
    fn check_rings<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), Self::Error>;
    /// The position to pop next, as vhost-user's `GET_VRING_BASE` reports it.
    fn last_avail_idx(&self) -> u16;
    /// Sets the position to pop next (vhost-user `SET_VRING_BASE`).
    fn set_last_avail_idx(&mut self, value: u16) -> Result<(), Self::Error>;
    /// Pops up to `heads.len()` requests in the order the driver made them available.
    fn pop_heads<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [Self::Head],
    ) -> Result<usize, Self::Error>;
    /// Pops like [`DeviceRing::pop_heads`], only half of a large backlog.
    fn pop_heads_pipelined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [Self::Head],
    ) -> Result<usize, Self::Error>;
    /// Starts fetching each request's first buffer (a hint).
    fn prefetch_chains<M: GuestMemory + ?Sized>(&self, mem: &M, heads: &[Self::Head]);
    /// Walks the request `head` into `chain`; walk popped requests in pop order.
    fn walk_chain<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: Self::Head,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError>;
    /// Walks `head`, one of the requests the last pop returned, like [`DeviceRing::walk_chain`];
    /// a layout may use what the pop already read (the packed ring's descriptors). Walk them in
    /// pop order, before the next pop.
    #[inline]
    fn walk_popped<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: Self::Head,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        self.walk_chain(mem, head, chain)
    }
    /// Returns `head` with `len` bytes written, visible at the next publish.
    fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: Self::Head,
        len: u32,
    ) -> Result<(), Self::Error>;
    /// Makes everything pushed visible to the driver.
    fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), Self::Error>;
    /// Whether the driver wants a notification for what was published since the last call.
    fn needs_notification<M: GuestMemory + ?Sized>(&mut self, mem: &M)
        -> Result<bool, Self::Error>;
    /// After [`DeviceRing::needs_notification`] said no: whether the driver now waits for a
    /// notification for buffers already published (see [`SplitQueue::late_notification`]).
    fn late_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<LateNotification, Self::Error>;
    /// Poll mode: asks the driver not to kick.
    fn disable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), Self::Error>;
    /// Interrupt mode: asks the driver to kick; returns whether requests are already waiting.
    fn enable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, Self::Error>;
}

impl DeviceRing for SplitQueue {
    type Head = u16;
    type Error = QueueError;

    fn size(&self) -> u16 {
        SplitQueue::size(self)
    }
    fn check_rings<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), QueueError> {
        SplitQueue::check_rings(self, mem)
    }
    fn last_avail_idx(&self) -> u16 {
        SplitQueue::last_avail_idx(self)
    }
    fn set_last_avail_idx(&mut self, value: u16) -> Result<(), QueueError> {
        SplitQueue::set_last_avail_idx(self, value);
        Ok(())
    }
    #[inline]
    fn pop_heads<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [u16],
    ) -> Result<usize, QueueError> {
        SplitQueue::pop_heads(self, mem, heads)
    }
    #[inline]
    fn pop_heads_pipelined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [u16],
    ) -> Result<usize, QueueError> {
        SplitQueue::pop_heads_pipelined(self, mem, heads)
    }
    #[inline]
    fn prefetch_chains<M: GuestMemory + ?Sized>(&self, mem: &M, heads: &[u16]) {
        SplitQueue::prefetch_chains(self, mem, heads)
    }
    #[inline]
    fn walk_chain<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: u16,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        SplitQueue::walk_chain(self, mem, head, chain)
    }
    #[inline]
    fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        SplitQueue::push_used(self, mem, head, len)
    }
    #[inline]
    fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), QueueError> {
        SplitQueue::publish_used(self, mem)
    }
    #[inline]
    fn needs_notification<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, QueueError> {
        SplitQueue::needs_notification(self, mem)
    }
    fn late_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<LateNotification, QueueError> {
        SplitQueue::late_notification(self, mem)
    }
    #[inline]
    fn disable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), QueueError> {
        SplitQueue::disable_kicks(self, mem)
    }
    fn enable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, QueueError> {
        SplitQueue::enable_kicks(self, mem)
    }
}

impl DeviceRing for PackedQueue {
    type Head = PackedHead;
    type Error = PackedQueueError;

    fn size(&self) -> u16 {
        PackedQueue::size(self)
    }
    fn check_rings<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), PackedQueueError> {
        PackedQueue::check_rings(self, mem)
    }
    fn last_avail_idx(&self) -> u16 {
        PackedQueue::last_avail_idx(self)
    }
    fn set_last_avail_idx(&mut self, value: u16) -> Result<(), PackedQueueError> {
        PackedQueue::set_last_avail_idx(self, value)
    }
    #[inline]
    fn pop_heads<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [PackedHead],
    ) -> Result<usize, PackedQueueError> {
        PackedQueue::pop_heads(self, mem, heads)
    }
    #[inline]
    fn pop_heads_pipelined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [PackedHead],
    ) -> Result<usize, PackedQueueError> {
        PackedQueue::pop_heads_pipelined(self, mem, heads)
    }
    #[inline]
    fn prefetch_chains<M: GuestMemory + ?Sized>(&self, mem: &M, heads: &[PackedHead]) {
        PackedQueue::prefetch_chains(self, mem, heads)
    }
    #[inline]
    fn walk_chain<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: PackedHead,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        PackedQueue::walk_chain(self, mem, head, chain)
    }
    #[inline]
    fn walk_popped<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: PackedHead,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        PackedQueue::walk_popped(self, mem, head, chain)
    }
    #[inline]
    fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: PackedHead,
        len: u32,
    ) -> Result<(), PackedQueueError> {
        PackedQueue::push_used(self, mem, head, len)
    }
    #[inline]
    fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), PackedQueueError> {
        PackedQueue::publish_used(self, mem)
    }
    #[inline]
    fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, PackedQueueError> {
        PackedQueue::needs_notification(self, mem)
    }
    fn late_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<LateNotification, PackedQueueError> {
        PackedQueue::late_notification(self, mem)
    }
    #[inline]
    fn disable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), PackedQueueError> {
        PackedQueue::disable_kicks(self, mem)
    }
    fn enable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, PackedQueueError> {
        PackedQueue::enable_kicks(self, mem)
    }
}

/// A request popped from an [`AnyRing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyHead {
    /// From a split ring: the head index.
    Split(u16),
    /// From a packed ring.
    Packed(PackedHead),
}

impl Default for AnyHead {
    fn default() -> Self {
        AnyHead::Split(0)
    }
}

impl RingHead for AnyHead {
    fn id(&self) -> u16 {
        match self {
            AnyHead::Split(head) => *head,
            AnyHead::Packed(head) => head.id,
        }
    }
}

/// Why an [`AnyRing`] cannot be used any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyRingError {
    /// The split ring's error.
    Split(QueueError),
    /// The packed ring's error.
    Packed(PackedQueueError),
    /// A head of the other layout was passed back (a device bug, never the guest's doing).
    HeadLayout,
}

impl core::fmt::Display for AnyRingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AnyRingError::Split(err) => err.fmt(f),
            AnyRingError::Packed(err) => err.fmt(f),
            AnyRingError::HeadLayout => f.write_str("head of the other ring layout"),
        }
    }
}

impl core::error::Error for AnyRingError {}

impl From<QueueError> for AnyRingError {
    fn from(err: QueueError) -> Self {
        AnyRingError::Split(err)
    }
}

impl From<PackedQueueError> for AnyRingError {
    fn from(err: PackedQueueError) -> Self {
        AnyRingError::Packed(err)
    }
}

/// A split or a packed ring, chosen when the queue starts (`VIRTIO_F_RING_PACKED`).
#[derive(Debug, Clone)]
// The packed queue carries the descriptor copies its pop keeps (3.5 KiB); an `AnyRing` is made
// once per queue start, and boxing it would need the allocator core does without.
#[allow(clippy::large_enum_variant)]
pub enum AnyRing {
    /// The split layout (virtio 1.2 §2.7).
    Split(SplitQueue),
    /// The packed layout (virtio 1.2 §2.8).
    Packed(PackedQueue),
}

impl AnyRing {
    /// Fills `heads` from `scratch` after a pop of `n` entries into it, in the other layout's
    /// head type (a split pop goes through `u16`s, a packed one through [`PackedHead`]s).
    fn pop_into<H: Copy, const K: usize>(
        heads: &mut [AnyHead],
        scratch: &[H; K],
        n: usize,
        wrap: impl Fn(H) -> AnyHead,
    ) {
        for (out, &h) in heads.iter_mut().zip(scratch.iter()).take(n) {
            *out = wrap(h);
        }
    }

    fn pop<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [AnyHead],
        pipelined: bool,
    ) -> Result<usize, AnyRingError> {
        // Pops in chunks through a small stack buffer: the caller's batch is what a device
        // pops in one round (32 in rvhost), so this is one or two chunks.
        const CHUNK: usize = 32;
        let mut total = 0;
        while total < heads.len() {
            let want = (heads.len() - total).min(CHUNK);
            let Some(out) = heads.get_mut(total..total + want) else {
                break;
            };
            let n = match self {
                AnyRing::Split(q) => {
                    let mut scratch = [0u16; CHUNK];
                    let slots = scratch.get_mut(..want).unwrap_or(&mut []);
                    let n = if pipelined {
                        q.pop_heads_pipelined(mem, slots)?
                    } else {
                        q.pop_heads(mem, slots)?
                    };
                    Self::pop_into(out, &scratch, n, AnyHead::Split);
                    n
                }
                AnyRing::Packed(q) => {
                    let mut scratch = [PackedHead::default(); CHUNK];
                    let slots = scratch.get_mut(..want).unwrap_or(&mut []);
                    let n = if pipelined {
                        q.pop_heads_pipelined(mem, slots)?
                    } else {
                        q.pop_heads(mem, slots)?
                    };
                    Self::pop_into(out, &scratch, n, AnyHead::Packed);
                    n
                }
            };
            total += n;
            // A short chunk means the ring is empty (or, pipelined, that half was left).
            if n < want || pipelined {
                break;
            }
        }
        Ok(total)
    }
}

impl DeviceRing for AnyRing {
    type Head = AnyHead;
    type Error = AnyRingError;

    fn size(&self) -> u16 {
        match self {
            AnyRing::Split(q) => q.size(),
            AnyRing::Packed(q) => q.size(),
        }
    }
    fn check_rings<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), AnyRingError> {
        match self {
            AnyRing::Split(q) => Ok(q.check_rings(mem)?),
            AnyRing::Packed(q) => Ok(q.check_rings(mem)?),
        }
    }
    fn last_avail_idx(&self) -> u16 {
        match self {
            AnyRing::Split(q) => q.last_avail_idx(),
            AnyRing::Packed(q) => q.last_avail_idx(),
        }
    }
    fn set_last_avail_idx(&mut self, value: u16) -> Result<(), AnyRingError> {
        match self {
            AnyRing::Split(q) => {
                q.set_last_avail_idx(value);
                Ok(())
            }
            AnyRing::Packed(q) => Ok(q.set_last_avail_idx(value)?),
        }
    }
    fn pop_heads<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [AnyHead],
    ) -> Result<usize, AnyRingError> {
        self.pop(mem, heads, false)
    }
    fn pop_heads_pipelined<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        heads: &mut [AnyHead],
    ) -> Result<usize, AnyRingError> {
        self.pop(mem, heads, true)
    }
    fn prefetch_chains<M: GuestMemory + ?Sized>(&self, mem: &M, heads: &[AnyHead]) {
        for head in heads {
            match (self, head) {
                (AnyRing::Split(q), AnyHead::Split(h)) => {
                    q.prefetch_chains(mem, core::slice::from_ref(h))
                }
                (AnyRing::Packed(q), AnyHead::Packed(h)) => {
                    q.prefetch_chains(mem, core::slice::from_ref(h))
                }
                _ => {}
            }
        }
    }
    fn walk_chain<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: AnyHead,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        match (self, head) {
            (AnyRing::Split(q), AnyHead::Split(h)) => q.walk_chain(mem, h, chain),
            (AnyRing::Packed(q), AnyHead::Packed(h)) => q.walk_chain(mem, h, chain),
            // Not a head of this ring: refused as one outside the queue.
            (ring, head) => Err(ChainError {
                head: head.id(),
                kind: crate::virtq::ChainErrorKind::HeadOutOfRange {
                    head: head.id(),
                    size: ring.size(),
                },
                last_segment: None,
            }),
        }
    }
    fn walk_popped<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        mem: &M,
        head: AnyHead,
        chain: &mut Chain<N>,
    ) -> Result<(), ChainError> {
        match (self, head) {
            (AnyRing::Packed(q), AnyHead::Packed(h)) => q.walk_popped(mem, h, chain),
            _ => self.walk_chain(mem, head, chain),
        }
    }
    fn push_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: AnyHead,
        len: u32,
    ) -> Result<(), AnyRingError> {
        match (self, head) {
            (AnyRing::Split(q), AnyHead::Split(h)) => Ok(q.push_used(mem, h, len)?),
            (AnyRing::Packed(q), AnyHead::Packed(h)) => Ok(q.push_used(mem, h, len)?),
            _ => Err(AnyRingError::HeadLayout),
        }
    }
    fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), AnyRingError> {
        match self {
            AnyRing::Split(q) => Ok(q.publish_used(mem)?),
            AnyRing::Packed(q) => Ok(q.publish_used(mem)?),
        }
    }
    fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, AnyRingError> {
        match self {
            AnyRing::Split(q) => Ok(q.needs_notification(mem)?),
            AnyRing::Packed(q) => Ok(q.needs_notification(mem)?),
        }
    }
    fn late_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<LateNotification, AnyRingError> {
        match self {
            AnyRing::Split(q) => Ok(q.late_notification(mem)?),
            AnyRing::Packed(q) => Ok(q.late_notification(mem)?),
        }
    }
    fn disable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), AnyRingError> {
        match self {
            AnyRing::Split(q) => Ok(q.disable_kicks(mem)?),
            AnyRing::Packed(q) => Ok(q.disable_kicks(mem)?),
        }
    }
    fn enable_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, AnyRingError> {
        match self {
            AnyRing::Split(q) => Ok(q.enable_kicks(mem)?),
            AnyRing::Packed(q) => Ok(q.enable_kicks(mem)?),
        }
    }
}
