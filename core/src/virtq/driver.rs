//! The driver side of a split virtqueue (virtio 1.2 §2.7): the half that offers buffers and reaps
//! them. rvhost is a *driver* of the virtio-vhost-user device (its rxq and txq carry vhost-user
//! messages), so it needs this side as well as the device side ([`super::SplitQueue`]).
//!
//! The device may be buggy or hostile (a hypervisor's emulation, or a test's): nothing it writes is
//! trusted. The free list and each chain's descriptors live in driver-private arrays, never in the
//! descriptor table the device can read and write; a used element is accepted only if its id is a
//! head the driver has outstanding and its length fits the chain's writable buffers.
//!
//! ```
//! use rvhost_core::mem::{ByteMemory, Direction};
//! use rvhost_core::virtio::{bit, feature};
//! use rvhost_core::virtq::{Chain, DriverBuffer, DriverQueue, QueueConfig, SplitQueue};
//!
//! let mut ram = vec![0u8; 0x1_0000];
//! let mem = ByteMemory::new(0, 0x7f00_0000_0000, &mut ram);
//! let config = QueueConfig { size: 8, desc_table: 0x0, avail_ring: 0x100, used_ring: 0x200 };
//! let features = bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_RING_EVENT_IDX);
//!
//! let mut driver: DriverQueue<8> = DriverQueue::new(config, features)?;
//! driver.init(&mem)?;
//! let head = driver.add(&mem, &[DriverBuffer::writable(0x1000, 512)])?;
//! driver.publish(&mem)?;
//! assert!(driver.needs_kick(&mem)?);
//!
//! // The device's side (here in the same process) fills the buffer and returns it.
//! let mut device = SplitQueue::new(config, features)?;
//! let popped = device.pop_head(&mem)?.unwrap();
//! let mut chain: Chain<4> = Chain::new();
//! device.walk_chain(&mem, popped, &mut chain)?;
//! device.add_used(&mem, chain.head(), 100)?;
//!
//! let used = driver.pop_used(&mem)?.unwrap();
//! assert_eq!((used.head, used.len), (head, 100));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::sync::atomic::{fence, Ordering};

use crate::mem::{Direction, GuestMemory, MemError};
use crate::virtio::ring::{
    vring_need_event, VirtqDesc, VirtqUsedElem, RING_ARRAY_OFFSET, RING_FLAGS_OFFSET,
    RING_IDX_OFFSET, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
};
use crate::virtio::{feature, has_feature};

use super::{QueueConfig, QueueError, RingPart, SplitQueue};

/// One buffer of a chain the driver offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverBuffer {
    /// Device-visible address (guest physical or IOVA) of the first byte.
    pub addr: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
    /// Whether the device reads or writes it.
    pub direction: Direction,
}

impl DriverBuffer {
    /// A buffer the device reads.
    pub const fn readable(addr: u64, len: u32) -> Self {
        DriverBuffer {
            addr,
            len,
            direction: Direction::DeviceReadable,
        }
    }

    /// A buffer the device writes.
    pub const fn writable(addr: u64, len: u32) -> Self {
        DriverBuffer {
            addr,
            len,
            direction: Direction::DeviceWritable,
        }
    }
}

/// A chain the device has returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedBuffer {
    /// The chain's head, as [`DriverQueue::add`] returned it.
    pub head: u16,
    /// Bytes the device says it wrote into the chain's writable buffers (checked against their
    /// total length).
    pub len: u32,
}

/// Why the driver side refused an operation. Errors from [`DriverQueue::pop_used`] mean the
/// device broke the ring protocol: the driver should reset the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverError {
    /// The queue's configuration or a ring access failed.
    Ring(QueueError),
    /// The queue is larger than the driver's private tables (`N`).
    QueueTooLarge {
        /// The queue size.
        size: u16,
        /// The capacity of this `DriverQueue`.
        capacity: usize,
    },
    /// [`DriverQueue::add`] was given no buffers.
    EmptyChain,
    /// A buffer of length zero.
    EmptyBuffer,
    /// A device-readable buffer after a device-writable one (§2.7.4: readable ones come first).
    ReadableAfterWritable,
    /// The chain's writable lengths do not fit in a `u32`.
    ChainTooLong,
    /// Not enough free descriptors.
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: u16,
    },
    /// The device's `used.idx` is more than the queue size ahead of what the driver reaped.
    UsedIdxTooFarAhead {
        /// `used.idx` as read.
        used_idx: u16,
        /// The driver's last reaped index.
        last_used: u16,
    },
    /// A used element names a descriptor that is not the head of an outstanding chain (out of
    /// range, not a head, or already returned).
    UsedIdNotOutstanding {
        /// The id as read (32 bits on the wire).
        id: u32,
    },
    /// A used element claims more bytes written than the chain's writable buffers hold.
    UsedLenTooLarge {
        /// The chain's head.
        head: u16,
        /// The length as read.
        len: u32,
        /// The chain's writable capacity.
        writable: u32,
    },
}

impl core::fmt::Display for DriverError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            DriverError::Ring(e) => write!(f, "{e}"),
            DriverError::QueueTooLarge { size, capacity } => {
                write!(
                    f,
                    "queue size {size} exceeds the driver's {capacity} entries"
                )
            }
            DriverError::EmptyChain => f.write_str("a chain needs at least one buffer"),
            DriverError::EmptyBuffer => f.write_str("a buffer of length zero"),
            DriverError::ReadableAfterWritable => {
                f.write_str("a device-readable buffer follows a device-writable one")
            }
            DriverError::ChainTooLong => f.write_str("the chain's writable length overflows"),
            DriverError::Full { needed, free } => {
                write!(f, "chain needs {needed} descriptors, {free} free")
            }
            DriverError::UsedIdxTooFarAhead {
                used_idx,
                last_used,
            } => write!(
                f,
                "used idx {used_idx} is more than the queue size ahead of {last_used}"
            ),
            DriverError::UsedIdNotOutstanding { id } => {
                write!(f, "used id {id} is not an outstanding chain")
            }
            DriverError::UsedLenTooLarge {
                head,
                len,
                writable,
            } => write!(
                f,
                "used len {len} of chain {head} exceeds its {writable} writable bytes"
            ),
        }
    }
}

impl core::error::Error for DriverError {}

impl From<QueueError> for DriverError {
    fn from(e: QueueError) -> Self {
        DriverError::Ring(e)
    }
}

/// The driver side of one split virtqueue of at most `N` entries.
///
/// Like [`SplitQueue`] it holds no memory: the rings are reached through the [`GuestMemory`]
/// passed to every call (for a PCI driver, its DMA memory addressed by IOVA).
#[derive(Debug, Clone)]
pub struct DriverQueue<const N: usize> {
    config: QueueConfig,
    event_idx: bool,
    /// Private descriptor links: the free list, and each outstanding chain in order.
    next: [u16; N],
    /// Per head: descriptors in its chain; 0 when the head is not outstanding.
    chain_len: [u16; N],
    /// Per head: total length of its device-writable buffers.
    writable: [u32; N],
    free_head: u16,
    num_free: u16,
    /// `avail.idx` including entries not yet published.
    next_avail: u16,
    /// `avail.idx` as last stored.
    published_avail: u16,
    /// `avail.idx` at the last kick decision (zero at first, like the `avail_event` that
    /// [`DriverQueue::init`] clears: the first publication then kicks).
    kicked_avail: u16,
    /// Used-ring entries reaped so far (free-running).
    last_used: u16,
}

impl<const N: usize> DriverQueue<N> {
    /// A driver queue at `config` with the negotiated `features` (only
    /// `VIRTIO_F_RING_EVENT_IDX` matters; indirect descriptors are not used).
    pub fn new(config: QueueConfig, features: u64) -> Result<Self, DriverError> {
        // The same size and alignment rules as the device side.
        SplitQueue::new(config, features)?;
        if usize::from(config.size) > N {
            return Err(DriverError::QueueTooLarge {
                size: config.size,
                capacity: N,
            });
        }
        let mut next = [0u16; N];
        for (i, link) in next.iter_mut().enumerate() {
            // i < N <= 32768, so i + 1 fits; the last free entry's link is never followed.
            *link = (i as u16).wrapping_add(1);
        }
        Ok(DriverQueue {
            config,
            event_idx: has_feature(features, feature::VIRTIO_F_RING_EVENT_IDX),
            next,
            chain_len: [0; N],
            writable: [0; N],
            free_head: 0,
            num_free: config.size,
            next_avail: 0,
            published_avail: 0,
            kicked_avail: 0,
            last_used: 0,
        })
    }

    /// The queue's addresses and size.
    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains offered and not reaped yet.
    pub fn outstanding(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// Checks that the rings lie in `mem` and zeroes the ring headers and event fields, as a
    /// driver does before it enables the queue (the memory is the driver's until then).
    pub fn init<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), DriverError> {
        let size = u64::from(self.config.size);
        SplitQueue::new(self.config, 0)?.check_rings(mem)?;
        for (part, addr) in [
            (RingPart::Avail, self.avail_addr(RING_FLAGS_OFFSET)?),
            (RingPart::Avail, self.avail_addr(RING_IDX_OFFSET)?),
            (
                RingPart::Avail,
                self.avail_addr(RING_ARRAY_OFFSET + 2 * size)?,
            ),
            (RingPart::Used, self.used_addr(RING_FLAGS_OFFSET)?),
            (RingPart::Used, self.used_addr(RING_IDX_OFFSET)?),
            (
                RingPart::Used,
                self.used_addr(RING_ARRAY_OFFSET + VirtqUsedElem::SIZE as u64 * size)?,
            ),
        ] {
            mem.store_u16(addr, 0, Ordering::Relaxed)
                .map_err(|err| QueueError::Memory { part, err })?;
        }
        Ok(())
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

    fn slot(&self, idx: u16) -> u64 {
        // size is a power of two.
        u64::from(idx & (self.config.size - 1))
    }

    fn link(&self, index: u16) -> u16 {
        self.next.get(usize::from(index)).copied().unwrap_or(0)
    }

    /// Offers one chain: writes its descriptors and its avail-ring entry, not yet visible to the
    /// device ([`DriverQueue::publish`] makes a batch visible). Returns the chain's head, which
    /// identifies it when the device returns it.
    pub fn add<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buffers: &[DriverBuffer],
    ) -> Result<u16, DriverError> {
        if buffers.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        if buffers.len() > usize::from(self.num_free) {
            return Err(DriverError::Full {
                needed: buffers.len(),
                free: self.num_free,
            });
        }
        let mut writable = 0u32;
        let mut seen_writable = false;
        for buffer in buffers {
            if buffer.len == 0 {
                return Err(DriverError::EmptyBuffer);
            }
            match buffer.direction {
                Direction::DeviceReadable if seen_writable => {
                    return Err(DriverError::ReadableAfterWritable)
                }
                Direction::DeviceReadable => {}
                Direction::DeviceWritable => {
                    seen_writable = true;
                    writable = writable
                        .checked_add(buffer.len)
                        .ok_or(DriverError::ChainTooLong)?;
                }
            }
        }
        let head = self.free_head;
        let mut index = head;
        let mut last = head;
        for (n, buffer) in buffers.iter().enumerate() {
            let more = n + 1 < buffers.len();
            let next = self.link(index);
            let mut flags = 0;
            if more {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            if buffer.direction == Direction::DeviceWritable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            let desc = VirtqDesc {
                addr: buffer.addr,
                len: buffer.len,
                flags,
                next: if more { next } else { 0 },
            };
            let addr = self
                .config
                .desc_table
                .checked_add(u64::from(index) * VirtqDesc::SIZE as u64)
                .ok_or(QueueError::Memory {
                    part: RingPart::DescTable,
                    err: MemError::Overflow,
                })?;
            mem.write_array(addr, &desc.to_bytes())
                .map_err(|err| QueueError::Memory {
                    part: RingPart::DescTable,
                    err,
                })?;
            last = index;
            index = next;
        }
        let entry = self.avail_addr(RING_ARRAY_OFFSET + 2 * self.slot(self.next_avail))?;
        mem.write_array(entry, &head.to_le_bytes())
            .map_err(|err| QueueError::Memory {
                part: RingPart::Avail,
                err,
            })?;
        // Committed: nothing below can fail.
        self.free_head = self.link(last);
        // buffers.len() <= num_free <= size <= 32768.
        let count = buffers.len() as u16;
        self.num_free -= count;
        if let Some(len) = self.chain_len.get_mut(usize::from(head)) {
            *len = count;
        }
        if let Some(w) = self.writable.get_mut(usize::from(head)) {
            *w = writable;
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(head)
    }

    /// Makes every added chain visible to the device: one Release store of `avail.idx`, which
    /// orders the descriptor and ring-entry writes before it.
    pub fn publish<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), DriverError> {
        if self.next_avail == self.published_avail {
            return Ok(());
        }
        mem.store_u16(
            self.avail_addr(RING_IDX_OFFSET)?,
            self.next_avail,
            Ordering::Release,
        )
        .map_err(|err| QueueError::Memory {
            part: RingPart::Avail,
            err,
        })?;
        self.published_avail = self.next_avail;
        Ok(())
    }

    /// Whether the device wants an available-buffer notification (a kick) for what was published
    /// since the last time this returned: with `VIRTIO_F_RING_EVENT_IDX`, if `avail.idx` moved
    /// across the device's `avail_event`; without it, unless `used.flags` has
    /// `VIRTQ_USED_F_NO_NOTIFY`. Never when nothing was published since the last decision.
    pub fn needs_kick<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, DriverError> {
        let new = self.published_avail;
        let old = self.kicked_avail;
        if old == new {
            return Ok(false);
        }
        // The avail.idx store must be visible before the device's suppression field is read
        // (store→load: a full fence), or a device that just re-enabled kicks sleeps forever.
        fence(Ordering::SeqCst);
        let used_err = |err| QueueError::Memory {
            part: RingPart::Used,
            err,
        };
        let kick = if self.event_idx {
            let addr = self.used_addr(
                RING_ARRAY_OFFSET + VirtqUsedElem::SIZE as u64 * u64::from(self.config.size),
            )?;
            let avail_event = mem.load_u16(addr, Ordering::Acquire).map_err(used_err)?;
            vring_need_event(avail_event, new, old)
        } else {
            let flags = mem
                .load_u16(self.used_addr(RING_FLAGS_OFFSET)?, Ordering::Acquire)
                .map_err(used_err)?;
            flags & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        self.kicked_avail = new;
        Ok(kick)
    }

    /// Used elements the device has published and the driver not reaped.
    pub fn used_pending<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, DriverError> {
        let used_idx = mem
            .load_u16(self.used_addr(RING_IDX_OFFSET)?, Ordering::Acquire)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Used,
                err,
            })?;
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending > self.outstanding() {
            return Err(DriverError::UsedIdxTooFarAhead {
                used_idx,
                last_used: self.last_used,
            });
        }
        Ok(pending)
    }

    /// Reaps the next used element, if the device published one, and frees its chain.
    pub fn pop_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<UsedBuffer>, DriverError> {
        if self.used_pending(mem)? == 0 {
            return Ok(None);
        }
        let addr = self.used_addr(
            RING_ARRAY_OFFSET + VirtqUsedElem::SIZE as u64 * self.slot(self.last_used),
        )?;
        let raw = mem
            .read_array::<{ VirtqUsedElem::SIZE }>(addr)
            .map_err(|err| QueueError::Memory {
                part: RingPart::Used,
                err,
            })?;
        let elem = VirtqUsedElem::from_bytes(&raw);
        let not_outstanding = DriverError::UsedIdNotOutstanding { id: elem.id };
        let head = u16::try_from(elem.id).map_err(|_| not_outstanding)?;
        if head >= self.config.size {
            return Err(not_outstanding);
        }
        let count = self
            .chain_len
            .get(usize::from(head))
            .copied()
            .filter(|&c| c != 0)
            .ok_or(not_outstanding)?;
        let writable = self.writable.get(usize::from(head)).copied().unwrap_or(0);
        if elem.len > writable {
            return Err(DriverError::UsedLenTooLarge {
                head,
                len: elem.len,
                writable,
            });
        }
        // Return the chain to the free list: its private links still run head -> ... -> last.
        let mut last = head;
        for _ in 1..count {
            last = self.link(last);
        }
        if let Some(link) = self.next.get_mut(usize::from(last)) {
            *link = self.free_head;
        }
        self.free_head = head;
        self.num_free += count;
        if let Some(c) = self.chain_len.get_mut(usize::from(head)) {
            *c = 0;
        }
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedBuffer {
            head,
            len: elem.len,
        }))
    }

    fn set_avail_flags<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        flags: u16,
    ) -> Result<(), DriverError> {
        mem.store_u16(
            self.avail_addr(RING_FLAGS_OFFSET)?,
            flags,
            Ordering::Release,
        )
        .map_err(|err| {
            DriverError::Ring(QueueError::Memory {
                part: RingPart::Avail,
                err,
            })
        })
    }

    fn set_used_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        value: u16,
    ) -> Result<(), DriverError> {
        let addr = self.avail_addr(RING_ARRAY_OFFSET + 2 * u64::from(self.config.size))?;
        mem.store_u16(addr, value, Ordering::Release)
            .map_err(|err| {
                DriverError::Ring(QueueError::Memory {
                    part: RingPart::Avail,
                    err,
                })
            })
    }

    /// Poll mode: asks the device not to interrupt. Sets `VIRTQ_AVAIL_F_NO_INTERRUPT`, and with
    /// `VIRTIO_F_RING_EVENT_IDX` parks `used_event` just behind what was reaped.
    pub fn disable_interrupts<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), DriverError> {
        self.set_avail_flags(mem, VIRTQ_AVAIL_F_NO_INTERRUPT)?;
        if self.event_idx {
            self.set_used_event(mem, self.last_used.wrapping_sub(1))?;
        }
        Ok(())
    }

    /// Interrupt mode: asks the device to interrupt for the next used element, then re-checks the
    /// used ring. Returns whether elements are already pending (then reap instead of sleeping).
    pub fn enable_interrupts<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<bool, DriverError> {
        self.set_avail_flags(mem, 0)?;
        if self.event_idx {
            self.set_used_event(mem, self.last_used)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.used_pending(mem)? != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::ByteMemory;
    use crate::virtio::bit;
    use crate::virtq::Chain;
    use std::vec;

    const CONFIG: QueueConfig = QueueConfig {
        size: 8,
        desc_table: 0x0,
        avail_ring: 0x100,
        used_ring: 0x200,
    };

    fn features(event_idx: bool) -> u64 {
        let mut f = bit(feature::VIRTIO_F_VERSION_1);
        if event_idx {
            f |= bit(feature::VIRTIO_F_RING_EVENT_IDX);
        }
        f
    }

    /// The device completes one chain: checks what it sees, writes `len` bytes of `fill`.
    fn device_complete(device: &mut SplitQueue, mem: &ByteMemory<'_>, fill: u8) -> (u16, u32) {
        let head = device.pop_head(mem).unwrap().expect("a chain is pending");
        let mut chain: Chain<8> = Chain::new();
        device.walk_chain(mem, head, &mut chain).unwrap();
        let out = chain.writable()[0];
        let len = out.len.min(16);
        mem.write(out.guest_addr, &vec![fill; len as usize])
            .unwrap();
        device.push_used(mem, head, len).unwrap();
        device.publish_used(mem).unwrap();
        (head, len)
    }

    #[test]
    fn chains_round_trip_through_the_device_side_with_wraparound() {
        let mut ram = vec![0u8; 0x1_0000];
        let mem = ByteMemory::new(0, 0x7f00_0000_0000, &mut ram);
        let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(true)).unwrap();
        driver.init(&mem).unwrap();
        let mut device = SplitQueue::new(CONFIG, features(true)).unwrap();
        // 3 descriptors per chain, 2 chains in flight: free-list reuse and index wraparound
        // (more than 2^16 / 8 rounds is not needed; 100 rounds wrap the 8-slot ring many times).
        for round in 0..100u32 {
            let base = 0x1000 + u64::from(round % 4) * 0x1000;
            let chain = [
                DriverBuffer::readable(base, 12),
                DriverBuffer::readable(base + 0x100, 20),
                DriverBuffer::writable(base + 0x200, 64),
            ];
            let a = driver.add(&mem, &chain).unwrap();
            let b = driver.add(&mem, &chain).unwrap();
            assert_ne!(a, b);
            assert_eq!(driver.num_free(), 2);
            assert_eq!(driver.outstanding(), 2);
            driver.publish(&mem).unwrap();

            // The device sees exactly the buffers offered.
            let mut chain_seen: Chain<8> = Chain::new();
            let head = device.pop_head(&mem).unwrap().unwrap();
            assert_eq!(head, a);
            device.walk_chain(&mem, head, &mut chain_seen).unwrap();
            let lens: std::vec::Vec<_> = chain_seen.segments().iter().map(|s| s.len).collect();
            assert_eq!(lens, [12, 20, 64]);
            assert_eq!(chain_seen.readable_len(), 32);
            assert_eq!(chain_seen.writable_len(), 64);
            device.add_used(&mem, head, 16).unwrap();
            let (b_seen, _) = device_complete(&mut device, &mem, round as u8);
            assert_eq!(b_seen, b);

            assert_eq!(driver.used_pending(&mem).unwrap(), 2);
            assert_eq!(
                driver.pop_used(&mem).unwrap(),
                Some(UsedBuffer { head: a, len: 16 })
            );
            assert_eq!(
                driver.pop_used(&mem).unwrap(),
                Some(UsedBuffer { head: b, len: 16 })
            );
            assert_eq!(driver.pop_used(&mem).unwrap(), None);
            assert_eq!(driver.num_free(), 8);
            let mut data = [0u8; 16];
            mem.read(base + 0x200, &mut data).unwrap();
            assert_eq!(data, [round as u8; 16]);
        }
    }

    #[test]
    fn a_full_ring_and_malformed_chains_are_refused() {
        let mut ram = vec![0u8; 0x1_0000];
        let mem = ByteMemory::new(0, 0, &mut ram);
        let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(false)).unwrap();
        driver.init(&mem).unwrap();
        let five = [DriverBuffer::writable(0x1000, 8); 5];
        driver.add(&mem, &five).unwrap();
        assert_eq!(
            driver.add(&mem, &five),
            Err(DriverError::Full { needed: 5, free: 3 })
        );
        assert_eq!(driver.add(&mem, &[]), Err(DriverError::EmptyChain));
        assert_eq!(
            driver.add(&mem, &[DriverBuffer::readable(0x1000, 0)]),
            Err(DriverError::EmptyBuffer)
        );
        assert_eq!(
            driver.add(
                &mem,
                &[
                    DriverBuffer::writable(0x1000, 8),
                    DriverBuffer::readable(0x2000, 8)
                ]
            ),
            Err(DriverError::ReadableAfterWritable)
        );
        assert_eq!(
            driver.add(
                &mem,
                &[
                    DriverBuffer::writable(0x1000, u32::MAX),
                    DriverBuffer::writable(0x2000, 1)
                ]
            ),
            Err(DriverError::ChainTooLong)
        );
        // Refusals left the ring as it was.
        assert_eq!(driver.num_free(), 3);
        assert_eq!(driver.outstanding(), 1);
        assert!(matches!(
            DriverQueue::<4>::new(CONFIG, 0),
            Err(DriverError::QueueTooLarge {
                size: 8,
                capacity: 4
            })
        ));
        assert!(matches!(
            DriverQueue::<8>::new(QueueConfig { size: 6, ..CONFIG }, 0),
            Err(DriverError::Ring(QueueError::InvalidSize(6)))
        ));
        // Rings outside memory are found at init.
        let mut small_ram = [0u8; 0x100];
        let small = ByteMemory::new(0, 0, &mut small_ram);
        assert!(matches!(
            driver.init(&small),
            Err(DriverError::Ring(QueueError::Memory {
                part: RingPart::Avail,
                ..
            }))
        ));
    }

    #[test]
    fn kick_follows_the_devices_avail_event() {
        let mut ram = vec![0u8; 0x1_0000];
        let mem = ByteMemory::new(0, 0, &mut ram);
        let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(true)).unwrap();
        driver.init(&mem).unwrap();
        let mut device = SplitQueue::new(CONFIG, features(true)).unwrap();
        let buf = [DriverBuffer::writable(0x1000, 64)];

        // Nothing published: no kick.
        assert!(!driver.needs_kick(&mem).unwrap());
        // The first publication always kicks.
        driver.add(&mem, &buf).unwrap();
        driver.publish(&mem).unwrap();
        assert!(driver.needs_kick(&mem).unwrap());
        assert!(!driver.needs_kick(&mem).unwrap());

        // A polling device (avail_event trailing) wants no kicks.
        device.pop_head(&mem).unwrap().unwrap();
        device.disable_kicks(&mem).unwrap();
        driver.add(&mem, &buf).unwrap();
        driver.publish(&mem).unwrap();
        assert!(!driver.needs_kick(&mem).unwrap());

        // A device going to sleep wants a kick for the next buffer after what it consumed.
        device.pop_head(&mem).unwrap().unwrap();
        assert!(!device.enable_kicks(&mem).unwrap());
        driver.add(&mem, &buf).unwrap();
        driver.add(&mem, &buf).unwrap();
        driver.publish(&mem).unwrap();
        assert!(driver.needs_kick(&mem).unwrap());
        // It has not consumed since: more buffers need no second kick.
        driver.add(&mem, &buf).unwrap();
        driver.publish(&mem).unwrap();
        assert!(!driver.needs_kick(&mem).unwrap());
    }

    /// A polling driver and device for `requests` requests in rounds of 1 to 8: the device pops
    /// what is pending, calls `disable_kicks` when `rewrite` (else only once, at the start),
    /// completes it all. Returns the kicks the driver found it needed and how often the device
    /// wrote `avail_event`.
    fn poll_mode(requests: u32, rewrite: bool) -> (u32, u32) {
        let mut ram = vec![0u8; 0x1_0000];
        let mem = ByteMemory::new(0, 0, &mut ram);
        let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(true)).unwrap();
        driver.init(&mem).unwrap();
        let mut device = SplitQueue::new(CONFIG, features(true)).unwrap();
        let avail_event = CONFIG.used_ring + 4 + 8 * u64::from(CONFIG.size);
        let parked = |mem: &ByteMemory<'_>| mem.load_u16(avail_event, Ordering::Relaxed).unwrap();
        device.disable_kicks(&mem).unwrap();
        let buf = [DriverBuffer::writable(0x1000, 64)];
        let (mut done, mut kicks, mut writes) = (0u32, 0u32, 0u32);
        let mut round = 0u32;
        while done < requests {
            for _ in 0..1 + round % 8 {
                driver.add(&mem, &buf).unwrap();
            }
            driver.publish(&mem).unwrap();
            if driver.needs_kick(&mem).unwrap() {
                kicks += 1;
            }
            let mut heads = [0u16; 8];
            let mut n = 0;
            while let Some(head) = device.pop_head(&mem).unwrap() {
                heads[n] = head;
                n += 1;
            }
            if rewrite {
                let before = parked(&mem);
                device.disable_kicks(&mem).unwrap();
                writes += u32::from(parked(&mem) != before);
            }
            for &head in &heads[..n] {
                device.push_used(&mem, head, 0).unwrap();
            }
            device.publish_used(&mem).unwrap();
            while driver.pop_used(&mem).unwrap().is_some() {}
            done += n as u32;
            round += 1;
        }
        (kicks, writes)
    }

    #[test]
    fn a_polling_device_parks_avail_event_rarely_and_is_never_kicked() {
        // Three wraps of the 16-bit indices, in about 44,000 rounds.
        let (kicks, writes) = poll_mode(3 << 16, true);
        assert_eq!(kicks, 0);
        // Parked again each time it trails by 2^15 - 8: six times, not once per round.
        assert!((5..=7).contains(&writes), "{writes} avail_event writes");
        // Negative control: parked once and never again, the driver's avail.idx reaches it.
        let (kicks, _) = poll_mode(3 << 16, false);
        assert!(kicks >= 2, "{kicks} kicks");
    }

    /// Runs `f` on a fresh driver and device over the same ring, with or without EVENT_IDX.
    fn with_ring(
        event_idx: bool,
        f: impl FnOnce(&ByteMemory<'_>, &mut DriverQueue<8>, &mut SplitQueue),
    ) {
        let mut ram = vec![0u8; 0x1_0000];
        let mem = ByteMemory::new(0, 0, &mut ram);
        let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(event_idx)).unwrap();
        driver.init(&mem).unwrap();
        let mut device = SplitQueue::new(CONFIG, features(event_idx)).unwrap();
        f(&mem, &mut driver, &mut device);
    }

    /// The driver offers one buffer and publishes it; returns whether it must kick.
    fn offer_one(driver: &mut DriverQueue<8>, mem: &ByteMemory<'_>) -> bool {
        driver
            .add(mem, &[DriverBuffer::writable(0x1000, 64)])
            .unwrap();
        driver.publish(mem).unwrap();
        driver.needs_kick(mem).unwrap()
    }

    #[test]
    fn kicks_turn_off_again_right_after_they_were_turned_on() {
        for event_idx in [false, true] {
            with_ring(event_idx, |mem, driver, device| {
                device.disable_kicks(mem).unwrap();
                assert!(!offer_one(driver, mem));
                device.pop_head(mem).unwrap().unwrap();
                device.disable_kicks(mem).unwrap();
                // Going to sleep, then woken before the driver added anything: polling again
                // with nothing popped in between must still turn kicks off.
                assert!(!device.enable_kicks(mem).unwrap());
                device.disable_kicks(mem).unwrap();
                assert!(!offer_one(driver, mem), "event_idx {event_idx}");
                // And on again: the next buffer kicks.
                device.pop_head(mem).unwrap().unwrap();
                assert!(!device.enable_kicks(mem).unwrap());
                assert!(offer_one(driver, mem), "event_idx {event_idx}");
            });
        }
    }

    #[test]
    fn kick_follows_no_notify_without_event_idx() {
        with_ring(false, |mem, driver, device| {
            device.disable_kicks(mem).unwrap();
            assert!(!offer_one(driver, mem));
            device.enable_kicks(mem).unwrap();
            assert!(offer_one(driver, mem));
        });
    }

    #[test]
    fn interrupt_suppression_reaches_the_device_side() {
        for event_idx in [false, true] {
            let mut ram = vec![0u8; 0x1_0000];
            let mem = ByteMemory::new(0, 0, &mut ram);
            let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(event_idx)).unwrap();
            driver.init(&mem).unwrap();
            let mut device = SplitQueue::new(CONFIG, features(event_idx)).unwrap();
            let buf = [DriverBuffer::writable(0x1000, 64)];
            for _ in 0..3 {
                driver.add(&mem, &buf).unwrap();
            }
            driver.publish(&mem).unwrap();

            assert!(!driver.enable_interrupts(&mem).unwrap());
            device_complete(&mut device, &mem, 1);
            assert!(device.needs_notification(&mem).unwrap());
            driver.pop_used(&mem).unwrap().unwrap();

            driver.disable_interrupts(&mem).unwrap();
            device_complete(&mut device, &mem, 2);
            assert!(!device.needs_notification(&mem).unwrap());

            // Re-enabling finds the element published meanwhile; after reaping it, the driver
            // re-enables (nothing pending) and the next completion interrupts.
            assert!(driver.enable_interrupts(&mem).unwrap());
            driver.pop_used(&mem).unwrap().unwrap();
            assert!(!driver.enable_interrupts(&mem).unwrap());
            device_complete(&mut device, &mem, 3);
            assert!(device.needs_notification(&mem).unwrap());
        }
    }

    /// Writes used element `slot` and `used.idx` as a hostile device would.
    fn forge_used(mem: &ByteMemory<'_>, slot: u64, id: u32, len: u32, used_idx: u16) {
        let elem = VirtqUsedElem { id, len };
        mem.write(CONFIG.used_ring + 4 + 8 * slot, &elem.to_bytes())
            .unwrap();
        mem.store_u16(CONFIG.used_ring + 2, used_idx, Ordering::Release)
            .unwrap();
    }

    #[test]
    fn a_hostile_used_ring_is_rejected_without_corrupting_the_free_list() {
        let mut ram = vec![0u8; 0x1_0000];
        let mem = ByteMemory::new(0, 0, &mut ram);
        let mut driver: DriverQueue<8> = DriverQueue::new(CONFIG, features(true)).unwrap();
        driver.init(&mem).unwrap();
        let head = driver
            .add(
                &mem,
                &[
                    DriverBuffer::readable(0x1000, 8),
                    DriverBuffer::writable(0x2000, 64),
                ],
            )
            .unwrap();
        driver.publish(&mem).unwrap();

        // used.idx claims more than is outstanding.
        forge_used(&mem, 0, u32::from(head), 0, 2);
        assert_eq!(
            driver.pop_used(&mem),
            Err(DriverError::UsedIdxTooFarAhead {
                used_idx: 2,
                last_used: 0
            })
        );
        // Ids that are no outstanding head: out of range, huge, the chain's second descriptor.
        for id in [8, u32::MAX, u32::from(head) + 1] {
            forge_used(&mem, 0, id, 0, 1);
            assert_eq!(
                driver.pop_used(&mem),
                Err(DriverError::UsedIdNotOutstanding { id })
            );
        }
        // More written than the chain can hold.
        forge_used(&mem, 0, u32::from(head), 65, 1);
        assert_eq!(
            driver.pop_used(&mem),
            Err(DriverError::UsedLenTooLarge {
                head,
                len: 65,
                writable: 64
            })
        );
        assert_eq!(driver.num_free(), 6);
        // The honest element is accepted; returning it a second time is not.
        forge_used(&mem, 0, u32::from(head), 64, 1);
        assert_eq!(
            driver.pop_used(&mem).unwrap(),
            Some(UsedBuffer { head, len: 64 })
        );
        assert_eq!(driver.num_free(), 8);
        forge_used(&mem, 1, u32::from(head), 64, 2);
        assert_eq!(
            driver.pop_used(&mem),
            Err(DriverError::UsedIdxTooFarAhead {
                used_idx: 2,
                last_used: 1
            })
        );
    }
}
