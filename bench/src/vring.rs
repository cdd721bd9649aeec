//! The driver's half of a split virtqueue (virtio 1.2 §2.7): write descriptors, offer heads in
//! the available ring, publish `avail.idx`, decide whether the device wants a kick, and reap the
//! used ring by polling. The same ring drives a packed virtqueue (§2.8, `--packed`): the chains
//! written with `write_desc` are kept as templates and copied into the descriptor ring when their
//! head is offered (buffer ID = head), and used descriptors are reaped from the same ring.
//!
//! With indirect tables (`--indirect`, as a Linux guest offers every request of more than one
//! buffer once `VIRTIO_F_RING_INDIRECT_DESC` is negotiated) a request's head is one descriptor
//! with `INDIRECT` pointing at a table in the driver's memory, written by
//! [`DriverRing::write_table_entry`] in the ring's own descriptor layout: split descriptors
//! chained with `NEXT` for a split ring (§2.7.5.3), packed descriptors one after the other with
//! only `WRITE` for a packed ring (§2.8.19).
//!
//! All ring fields are accessed as atomics in the shared mapping: `avail.idx` is stored with
//! Release (so descriptors, headers and ring entries written before it are visible to a device
//! that loads it with Acquire), `used.idx` is loaded with Acquire (so the status bytes and data the
//! device wrote before publishing it are visible here).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

use rvhost_core::virtio::ring::{
    vring_need_event, VirtqDesc, VirtqUsedElem, RING_ARRAY_OFFSET, RING_FLAGS_OFFSET,
    RING_IDX_OFFSET, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use vm_memory::{MmapRegion, VolatileMemory};

use crate::shm::QueueLayout;
use crate::PerfError;

/// Typed atomic access to the shared memory by offset.
#[derive(Debug, Clone, Copy)]
pub struct Shared<'m> {
    region: &'m MmapRegion,
}

macro_rules! atomic_accessor {
    ($name:ident, $ty:ty) => {
        /// The atomic at `offset` (which must be naturally aligned and inside the mapping).
        #[inline]
        pub fn $name(&self, offset: usize) -> Result<&'m $ty, PerfError> {
            self.region
                .get_atomic_ref::<$ty>(offset)
                .map_err(|source| PerfError::Access { offset, source })
        }
    };
}

impl<'m> Shared<'m> {
    /// Access to `region`.
    pub fn new(region: &'m MmapRegion) -> Self {
        Shared { region }
    }

    atomic_accessor!(u8_at, AtomicU8);
    atomic_accessor!(u16_at, AtomicU16);
    atomic_accessor!(u32_at, AtomicU32);
    atomic_accessor!(u64_at, AtomicU64);

    /// Copies `bytes` to `offset`.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), PerfError> {
        let slice = self
            .region
            .get_slice(offset, bytes.len())
            .map_err(|source| PerfError::Access { offset, source })?;
        slice.copy_from(bytes);
        Ok(())
    }

    /// Copies from `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), PerfError> {
        let slice = self
            .region
            .get_slice(offset, out.len())
            .map_err(|source| PerfError::Access { offset, source })?;
        slice.copy_to(out);
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), PerfError> {
        let slice = self
            .region
            .get_slice(offset, len)
            .map_err(|source| PerfError::Access { offset, source })?;
        // A page at a time keeps the scratch buffer small for any block size.
        let chunk = [byte; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            let part = slice
                .subslice(done, n)
                .map_err(|source| PerfError::Access { offset, source })?;
            part.copy_from(&chunk[..n]);
            done += n;
        }
        Ok(())
    }
}

/// How the driver asks for notifications and decides on kicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated: `avail_event` / `used_event`.
    EventIdx,
    /// The flags: `VRING_USED_F_NO_NOTIFY` / `VRING_AVAIL_F_NO_INTERRUPT`.
    Flags,
}

/// Packed ring descriptor flags and event suppression values (virtio 1.2 §2.8).
const PACKED_F_AVAIL: u16 = 1 << 7;
const PACKED_F_USED: u16 = 1 << 15;
const PACKED_EVENT_DISABLE: u16 = 1;
const PACKED_EVENT_DESC: u16 = 2;

/// A packed ring's driver-side state.
#[derive(Debug)]
struct PackedDriver {
    /// The chains as `write_desc` wrote them, indexed like a split descriptor table.
    templates: RefCell<Vec<VirtqDesc>>,
    /// Next ring position to make a list available at, and the driver's wrap counter there.
    avail_pos: u16,
    avail_wrap: bool,
    /// Ring position and wrap counter of the first list offered since the last publish, and its
    /// first descriptor's flags (written last, at publish).
    unpublished: Option<(u16, bool, u16)>,
    /// Next ring position to find a used descriptor at, and the device's wrap counter there
    /// (past the used descriptors already read into `found`).
    used_pos: u16,
    used_wrap: bool,
    /// Descriptors each buffer ID's list occupies (by head; 0 once its used descriptor was read).
    counts: Vec<u16>,
    /// Used descriptors read by `used_pending` and not taken yet: buffer ID, written length, and
    /// whether the ID was a list in flight. Each used descriptor is read once, here.
    found: VecDeque<PackedUsed>,
}

/// A used descriptor of a packed ring as `used_pending` read it.
#[derive(Debug, Clone, Copy)]
struct PackedUsed {
    id: u16,
    len: u32,
    /// The ID named a list in flight (else `take_used` reports it).
    offered: bool,
}

/// The driver side of one split (or packed) virtqueue.
#[derive(Debug)]
pub struct DriverRing<'m> {
    mem: Shared<'m>,
    layout: QueueLayout,
    notification: Notification,
    /// `avail.idx` as this driver will publish it next.
    next_avail: u16,
    /// `avail.idx` as last published.
    published: u16,
    /// Next used-ring entry to consume.
    used_seen: u16,
    /// Driver-owned mask for ring positions (`size - 1`; sizes are powers of two).
    mask: u16,
    /// `Some` for a packed ring.
    packed: Option<PackedDriver>,
    /// Requests are offered as one descriptor pointing at an indirect table.
    indirect: bool,
}

/// The last 8 bytes of split descriptor `desc` (`len`, `flags`, `next`) as one word.
fn split_desc_tail(desc: &VirtqDesc) -> u64 {
    u64::from(desc.len) | u64::from(desc.flags) << 32 | u64::from(desc.next) << 48
}

impl<'m> DriverRing<'m> {
    /// A fresh ring (indices 0) over zeroed memory at `layout`; asks the device not to interrupt.
    pub fn new(
        mem: Shared<'m>,
        layout: QueueLayout,
        notification: Notification,
    ) -> Result<Self, PerfError> {
        if !layout.size.is_power_of_two() {
            return Err(PerfError::Options(format!(
                "queue size {} is not a power of two",
                layout.size
            )));
        }
        let ring = DriverRing {
            mem,
            layout,
            notification,
            next_avail: 0,
            published: 0,
            used_seen: 0,
            mask: layout.size - 1,
            packed: None,
            indirect: false,
        };
        ring.mem
            .u16_at(layout.avail + RING_FLAGS_OFFSET as usize)?
            .store(
                match notification {
                    Notification::Flags => VIRTQ_AVAIL_F_NO_INTERRUPT.to_le(),
                    Notification::EventIdx => 0,
                },
                Ordering::Relaxed,
            );
        ring.suppress_interrupts()?;
        Ok(ring)
    }

    /// A fresh packed ring over zeroed memory at `layout` (`desc` is the descriptor ring,
    /// `avail` the driver and `used` the device event suppression structure); asks the device not
    /// to interrupt.
    pub fn new_packed(
        mem: Shared<'m>,
        layout: QueueLayout,
        notification: Notification,
    ) -> Result<Self, PerfError> {
        let size = usize::from(layout.size);
        let ring = DriverRing {
            mem,
            layout,
            notification,
            next_avail: 0,
            published: 0,
            used_seen: 0,
            mask: layout.size.wrapping_sub(1),
            packed: Some(PackedDriver {
                templates: RefCell::new(vec![VirtqDesc::default(); size]),
                avail_pos: 0,
                avail_wrap: true,
                unpublished: None,
                used_pos: 0,
                used_wrap: true,
                counts: vec![0; size],
                found: VecDeque::with_capacity(size),
            }),
            indirect: false,
        };
        // Driver event suppression: flags at +2. We poll: no used-buffer notifications.
        ring.mem
            .u16_at(layout.avail + 2)?
            .store(PACKED_EVENT_DISABLE.to_le(), Ordering::Relaxed);
        Ok(ring)
    }

    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The ring, offering requests through indirect tables from now on (what the request
    /// format asks with [`Self::indirect_tables`]; the ring itself offers whatever heads it is
    /// given).
    pub fn with_indirect_tables(mut self) -> Self {
        self.indirect = true;
        self
    }

    /// Whether requests go through indirect tables.
    pub fn indirect_tables(&self) -> bool {
        self.indirect
    }

    /// The memory the ring lives in.
    pub fn shared(&self) -> Shared<'m> {
        self.mem
    }

    /// The queue's layout.
    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// Writes descriptor `index` (packed: of the chain templates).
    pub fn write_desc(&self, index: u16, desc: VirtqDesc) -> Result<(), PerfError> {
        if let Some(p) = &self.packed {
            let mut templates = p.templates.borrow_mut();
            let slot = templates.get_mut(usize::from(index)).ok_or_else(|| {
                PerfError::Options(format!("descriptor {index} outside the ring"))
            })?;
            *slot = desc;
            return Ok(());
        }
        self.store_desc(
            self.layout.desc + usize::from(index) * VirtqDesc::SIZE,
            desc.addr,
            split_desc_tail(&desc),
        )
    }

    /// Stores a 16-byte descriptor at offset `at`: `addr`, then `tail` (its last 8 bytes as one
    /// little-endian word: split `len`, `flags`, `next`; packed `len`, `id`, `flags`).
    fn store_desc(&self, at: usize, addr: u64, tail: u64) -> Result<(), PerfError> {
        self.mem.u64_at(at)?.store(addr.to_le(), Ordering::Relaxed);
        self.mem
            .u64_at(at + 8)?
            .store(tail.to_le(), Ordering::Relaxed);
        Ok(())
    }

    /// Writes entry `i` of the indirect table at offset `table` in this ring's descriptor
    /// layout. Split: `desc` as it is (`NEXT` and `next` chain the entries, `next` counting in
    /// the table). Packed: its address and length, buffer ID 0 and, of its flags, only `WRITE`
    /// (§2.8.19: the entries follow one another, the other flags and the ID are reserved).
    pub fn write_table_entry(
        &self,
        table: usize,
        i: u16,
        desc: VirtqDesc,
    ) -> Result<(), PerfError> {
        let tail = if self.packed.is_some() {
            u64::from(desc.len) | u64::from(desc.flags & VIRTQ_DESC_F_WRITE) << 48
        } else {
            split_desc_tail(&desc)
        };
        self.store_desc(table + usize::from(i) * VirtqDesc::SIZE, desc.addr, tail)
    }

    /// Rewrites only the flags of entry `i` of the indirect table at `table` (as
    /// [`Self::write_table_entry`] would write them).
    pub fn set_table_entry_flags(&self, table: usize, i: u16, flags: u16) -> Result<(), PerfError> {
        let at = table + usize::from(i) * VirtqDesc::SIZE;
        let (at, flags) = if self.packed.is_some() {
            (at + 14, flags & VIRTQ_DESC_F_WRITE)
        } else {
            (at + 12, flags)
        };
        self.mem.u16_at(at)?.store(flags.to_le(), Ordering::Relaxed);
        Ok(())
    }

    /// Rewrites only the flags of descriptor `index`.
    pub fn set_desc_flags(&self, index: u16, flags: u16) -> Result<(), PerfError> {
        if let Some(p) = &self.packed {
            if let Some(d) = p.templates.borrow_mut().get_mut(usize::from(index)) {
                d.flags = flags;
            }
            return Ok(());
        }
        let at = self.layout.desc + usize::from(index) * VirtqDesc::SIZE + 12;
        self.mem.u16_at(at)?.store(flags.to_le(), Ordering::Relaxed);
        Ok(())
    }

    /// Puts `head` in the next available-ring entry; the device sees it after [`Self::publish`].
    #[inline]
    pub fn offer(&mut self, head: u16) -> Result<(), PerfError> {
        if self.packed.is_some() {
            return self.offer_packed(head);
        }
        let pos = usize::from(self.next_avail & self.mask);
        let at = self.layout.avail + RING_ARRAY_OFFSET as usize + 2 * pos;
        self.mem.u16_at(at)?.store(head.to_le(), Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Packed: copies the chain at `head` into the ring as one list with buffer ID `head`; its
    /// first descriptor's flags wait for [`Self::publish`] if it is the batch's first list.
    fn offer_packed(&mut self, head: u16) -> Result<(), PerfError> {
        let size = self.layout.size;
        let desc_base = self.layout.desc;
        let mem = self.mem;
        let Some(p) = self.packed.as_mut() else {
            return Ok(());
        };
        let templates = p.templates.borrow();
        let mut index = head;
        let mut count = 0u16;
        loop {
            let d = *templates
                .get(usize::from(index))
                .ok_or_else(|| PerfError::Options(format!("chain past descriptor {index}")))?;
            count += 1;
            if count > size {
                return Err(PerfError::Options(format!("chain at {head} loops")));
            }
            let pos = p.avail_pos;
            let at = desc_base + usize::from(pos) * VirtqDesc::SIZE;
            let ring_flags = if p.avail_wrap {
                PACKED_F_AVAIL
            } else {
                PACKED_F_USED
            };
            let flags = (d.flags & !(PACKED_F_AVAIL | PACKED_F_USED)) | ring_flags;
            mem.u64_at(at)?.store(d.addr.to_le(), Ordering::Relaxed);
            if count == 1 && p.unpublished.is_none() {
                mem.u32_at(at + 8)?.store(d.len.to_le(), Ordering::Relaxed);
                mem.u16_at(at + 12)?.store(head.to_le(), Ordering::Relaxed);
                p.unpublished = Some((pos, p.avail_wrap, flags));
            } else {
                // `len`, `id` and `flags` in one store: the device reads this descriptor only
                // after the batch's first flags, which `publish` stores with Release after it.
                let tail = u64::from(d.len) | u64::from(head) << 32 | u64::from(flags) << 48;
                mem.u64_at(at + 8)?.store(tail.to_le(), Ordering::Relaxed);
            }
            p.avail_pos += 1;
            if p.avail_pos == size {
                p.avail_pos = 0;
                p.avail_wrap = !p.avail_wrap;
            }
            if d.flags & 1 == 0 {
                break;
            }
            index = d.next;
        }
        if let Some(c) = p.counts.get_mut(usize::from(head)) {
            *c = count;
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publishes every offered head with one `avail.idx` store (packed: one store of the
    /// batch's first flags) and returns whether the device asked to be kicked for them.
    #[inline]
    pub fn publish(&mut self) -> Result<bool, PerfError> {
        if self.packed.is_some() {
            return self.publish_packed();
        }
        let old = self.published;
        let new = self.next_avail;
        if old == new {
            return Ok(false);
        }
        self.mem
            .u16_at(self.layout.avail + RING_IDX_OFFSET as usize)?
            .store(new.to_le(), Ordering::Release);
        self.published = new;
        // The device may be setting NO_NOTIFY / avail_event just as we publish; the full fence
        // orders our idx store before the load below (virtio 1.2 §2.7.13.4's memory barrier).
        fence(Ordering::SeqCst);
        Ok(match self.notification {
            Notification::EventIdx => {
                let event_at = self.layout.used
                    + RING_ARRAY_OFFSET as usize
                    + 8 * usize::from(self.layout.size);
                let event = u16::from_le(self.mem.u16_at(event_at)?.load(Ordering::Relaxed));
                vring_need_event(event, new, old)
            }
            Notification::Flags => {
                let flags = u16::from_le(
                    self.mem
                        .u16_at(self.layout.used + RING_FLAGS_OFFSET as usize)?
                        .load(Ordering::Relaxed),
                );
                flags & VIRTQ_USED_F_NO_NOTIFY == 0
            }
        })
    }

    fn publish_packed(&mut self) -> Result<bool, PerfError> {
        let desc_base = self.layout.desc;
        let event_at = self.layout.used;
        let mem = self.mem;
        let Some(p) = self.packed.as_mut() else {
            return Ok(false);
        };
        let Some((pos, start_wrap, flags)) = p.unpublished.take() else {
            return Ok(false);
        };
        mem.u16_at(desc_base + usize::from(pos) * VirtqDesc::SIZE + 14)?
            .store(flags.to_le(), Ordering::Release);
        self.published = self.next_avail;
        fence(Ordering::SeqCst);
        // Device event suppression: off_wrap at +0, flags at +2.
        let event_flags = u16::from_le(mem.u16_at(event_at + 2)?.load(Ordering::Acquire)) & 3;
        Ok(match event_flags {
            PACKED_EVENT_DISABLE => false,
            PACKED_EVENT_DESC => {
                // Kick if the list at the event's offset (in its lap) was made available in this
                // batch: the offset lies in [pos, avail_pos) in ring order.
                let off_wrap = u16::from_le(mem.u16_at(event_at)?.load(Ordering::Acquire));
                let size = u32::from(self.layout.size);
                let linear = |pos: u16, wrap: bool| {
                    (u32::from(pos) + if wrap { 0 } else { size }) % (2 * size)
                };
                let event = linear(off_wrap & 0x7fff, off_wrap & 0x8000 != 0);
                let start = linear(pos, start_wrap);
                let end = linear(p.avail_pos, p.avail_wrap);
                let span = (end + 2 * size - start) % (2 * size);
                (event + 2 * size - start) % (2 * size) < span
            }
            _ => true,
        })
    }

    /// Packed: reads the used descriptors that follow each other from the next used position
    /// into `found` (each once: an Acquire load of its flags, then one load of its length and
    /// ID) and returns how many are there to take.
    fn packed_used_pending(&mut self) -> Result<u16, PerfError> {
        let in_flight = self.in_flight();
        let (desc, size, mem) = (self.layout.desc, u32::from(self.layout.size), self.mem);
        let Some(p) = self.packed.as_mut() else {
            return Ok(0);
        };
        while p.found.len() < usize::from(in_flight) {
            let at = desc + usize::from(p.used_pos) * VirtqDesc::SIZE;
            let flags = u16::from_le(mem.u16_at(at + 14)?.load(Ordering::Acquire));
            let used_bits = if p.used_wrap {
                PACKED_F_AVAIL | PACKED_F_USED
            } else {
                0
            };
            if flags & (PACKED_F_AVAIL | PACKED_F_USED) != used_bits {
                break;
            }
            let tail = u64::from_le(mem.u64_at(at + 8)?.load(Ordering::Relaxed));
            let (len, id) = (tail as u32, (tail >> 32) as u16);
            let count = p
                .counts
                .get_mut(usize::from(id))
                .map(std::mem::take)
                .unwrap_or(0);
            p.found.push_back(PackedUsed {
                id,
                len,
                offered: count != 0,
            });
            if count == 0 {
                // Not a list in flight: take_used reports it.
                break;
            }
            let next = u32::from(p.used_pos) + u32::from(count);
            if next >= size {
                p.used_pos = (next - size) as u16;
                p.used_wrap = !p.used_wrap;
            } else {
                p.used_pos = next as u16;
            }
        }
        Ok(p.found.len() as u16)
    }

    /// How many used entries are waiting (one Acquire load of `used.idx`; packed: the used
    /// descriptors found one after the other from the next used position).
    #[inline]
    pub fn used_pending(&mut self) -> Result<u16, PerfError> {
        if self.packed.is_some() {
            return self.packed_used_pending();
        }
        let idx = u16::from_le(
            self.mem
                .u16_at(self.layout.used + RING_IDX_OFFSET as usize)?
                .load(Ordering::Acquire),
        );
        Ok(idx.wrapping_sub(self.used_seen))
    }

    /// Consumes the next used entry; call only after [`Self::used_pending`] reported it.
    #[inline]
    pub fn take_used(&mut self) -> Result<VirtqUsedElem, PerfError> {
        if let Some(p) = self.packed.as_mut() {
            let used = p.found.pop_front().ok_or_else(|| {
                PerfError::Options("take_used without a used descriptor pending".into())
            })?;
            if !used.offered {
                return Err(PerfError::Options(format!(
                    "used buffer id {} was not offered",
                    used.id
                )));
            }
            self.used_seen = self.used_seen.wrapping_add(1);
            return Ok(VirtqUsedElem {
                id: u32::from(used.id),
                len: used.len,
            });
        }
        let pos = usize::from(self.used_seen & self.mask);
        let at = self.layout.used + RING_ARRAY_OFFSET as usize + 8 * pos;
        let id = u32::from_le(self.mem.u32_at(at)?.load(Ordering::Relaxed));
        let len = u32::from_le(self.mem.u32_at(at + 4)?.load(Ordering::Relaxed));
        self.used_seen = self.used_seen.wrapping_add(1);
        Ok(VirtqUsedElem { id, len })
    }

    /// With EVENT_IDX, keeps `used_event` half a ring-index space ahead of what was consumed, so
    /// the device never finds a reason to signal the call eventfd (we poll).
    #[inline]
    pub fn suppress_interrupts(&self) -> Result<(), PerfError> {
        if self.notification == Notification::EventIdx && self.packed.is_none() {
            let at =
                self.layout.avail + RING_ARRAY_OFFSET as usize + 2 * usize::from(self.layout.size);
            self.mem.u16_at(at)?.store(
                self.used_seen.wrapping_add(0x8000).to_le(),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// Heads offered but not yet returned in the used ring.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.used_seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::{layout, SharedMemory};

    fn ring_mem() -> (SharedMemory, QueueLayout) {
        let (l, total) = layout(&[8], 2, 512).unwrap();
        (SharedMemory::new(total, false).unwrap(), l[0])
    }

    /// Plays the device: takes every available head and returns it used with `len`.
    fn device_complete(
        mem: &Shared<'_>,
        l: &QueueLayout,
        used_idx: &mut u16,
        avail_seen: &mut u16,
        len: u32,
    ) {
        let avail_idx = mem.u16_at(l.avail + 2).unwrap().load(Ordering::Acquire);
        while *avail_seen != avail_idx {
            let head = mem
                .u16_at(l.avail + 4 + 2 * usize::from(*avail_seen % l.size))
                .unwrap()
                .load(Ordering::Relaxed);
            let at = l.used + 4 + 8 * usize::from(*used_idx % l.size);
            mem.u32_at(at)
                .unwrap()
                .store(u32::from(head), Ordering::Relaxed);
            mem.u32_at(at + 4).unwrap().store(len, Ordering::Relaxed);
            *used_idx = used_idx.wrapping_add(1);
            *avail_seen = avail_seen.wrapping_add(1);
        }
        mem.u16_at(l.used + 2)
            .unwrap()
            .store(*used_idx, Ordering::Release);
    }

    #[test]
    fn offer_publish_and_reap_round_trip_with_wraparound() {
        let (shm, l) = ring_mem();
        let mem = Shared::new(shm.region());
        let mut ring = DriverRing::new(mem, l, Notification::Flags).unwrap();
        // NO_INTERRUPT set for a polling driver.
        assert_eq!(mem.u16_at(l.avail).unwrap().load(Ordering::Relaxed), 1);
        let (mut used_idx, mut avail_seen) = (0u16, 0u16);
        // 5 rounds of 3 requests on an 8-entry ring crosses the ring end twice.
        for round in 0..5u16 {
            for h in 0..3u16 {
                ring.offer(h * 2).unwrap();
            }
            assert_eq!(ring.in_flight(), 3);
            // No NO_NOTIFY from the device: it wants the kick.
            assert!(ring.publish().unwrap());
            assert!(!ring.publish().unwrap(), "nothing new, no kick");
            assert_eq!(
                mem.u16_at(l.avail + 2).unwrap().load(Ordering::Relaxed),
                (round + 1) * 3
            );
            assert_eq!(ring.used_pending().unwrap(), 0);
            device_complete(&mem, &l, &mut used_idx, &mut avail_seen, 7);
            assert_eq!(ring.used_pending().unwrap(), 3);
            for h in 0..3u32 {
                let e = ring.take_used().unwrap();
                assert_eq!((e.id, e.len), (h * 2, 7));
            }
            assert_eq!(ring.used_pending().unwrap(), 0);
        }
    }

    #[test]
    fn kick_follows_no_notify_flag() {
        let (shm, l) = ring_mem();
        let mem = Shared::new(shm.region());
        let mut ring = DriverRing::new(mem, l, Notification::Flags).unwrap();
        mem.u16_at(l.used)
            .unwrap()
            .store(VIRTQ_USED_F_NO_NOTIFY, Ordering::Relaxed);
        ring.offer(0).unwrap();
        assert!(!ring.publish().unwrap(), "device polls: no kick");
        mem.u16_at(l.used).unwrap().store(0, Ordering::Relaxed);
        ring.offer(1).unwrap();
        assert!(ring.publish().unwrap());
    }

    #[test]
    fn kick_follows_avail_event() {
        let (shm, l) = ring_mem();
        let mem = Shared::new(shm.region());
        let mut ring = DriverRing::new(mem, l, Notification::EventIdx).unwrap();
        // used_event parked far ahead of anything the device will publish.
        let used_event = mem
            .u16_at(l.avail + 4 + 2 * 8)
            .unwrap()
            .load(Ordering::Relaxed);
        assert_eq!(used_event, 0x8000);
        let avail_event = mem.u16_at(l.used + 4 + 8 * 8).unwrap();
        // Device wants a kick once avail.idx passes 2: publishing 0 -> 1 does not cross it...
        avail_event.store(2, Ordering::Relaxed);
        ring.offer(0).unwrap();
        assert!(!ring.publish().unwrap());
        // ...1 -> 3 crosses it.
        ring.offer(1).unwrap();
        ring.offer(2).unwrap();
        assert!(ring.publish().unwrap());
        // 3 -> 4 does not (event 2 is behind).
        ring.offer(3).unwrap();
        assert!(!ring.publish().unwrap());
    }

    /// Plays a packed ring's device: reads the lists made available from `*pos` on and writes
    /// one used descriptor per list (buffer ID, `len`), each list's flags last, in order.
    fn device_complete_packed(
        mem: &Shared<'_>,
        l: &QueueLayout,
        pos: &mut u16,
        wrap: &mut bool,
        used_pos: &mut u16,
        used_wrap: &mut bool,
        len: u32,
    ) -> usize {
        let desc = |p: u16| l.desc + 16 * usize::from(p);
        let step = |p: &mut u16, w: &mut bool| {
            *p += 1;
            if *p == l.size {
                *p = 0;
                *w = !*w;
            }
        };
        let mut lists = 0;
        loop {
            let flags = mem.u16_at(desc(*pos) + 14).unwrap().load(Ordering::Acquire);
            let avail = if *wrap { PACKED_F_AVAIL } else { PACKED_F_USED };
            if flags & (PACKED_F_AVAIL | PACKED_F_USED) != avail {
                return lists;
            }
            // Walk the list to its last descriptor (the buffer ID is in every one here).
            let mut count = 0u16;
            let id = loop {
                let flags = mem.u16_at(desc(*pos) + 14).unwrap().load(Ordering::Acquire);
                let id = mem.u16_at(desc(*pos) + 12).unwrap().load(Ordering::Relaxed);
                let addr = mem.u64_at(desc(*pos)).unwrap().load(Ordering::Relaxed);
                let len = mem.u32_at(desc(*pos) + 8).unwrap().load(Ordering::Relaxed);
                // What `packed_offer_publish_and_reap_round_trip_across_laps` wrote.
                assert_eq!(addr, 0x1000 * u64::from(id) + 16 * u64::from(count));
                assert_eq!(
                    (len, flags & 3),
                    if count == 0 { (16, 1) } else { (512, 2) }
                );
                step(pos, wrap);
                count += 1;
                if flags & 1 == 0 {
                    break id;
                }
            };
            let at = desc(*used_pos);
            mem.u32_at(at + 8).unwrap().store(len, Ordering::Relaxed);
            mem.u16_at(at + 12).unwrap().store(id, Ordering::Relaxed);
            let used = if *used_wrap {
                PACKED_F_AVAIL | PACKED_F_USED
            } else {
                0
            };
            mem.u16_at(at + 14).unwrap().store(used, Ordering::Release);
            for _ in 0..count {
                step(used_pos, used_wrap);
            }
            lists += 1;
        }
    }

    #[test]
    fn packed_offer_publish_and_reap_round_trip_across_laps() {
        let (shm, l) = ring_mem();
        let mem = Shared::new(shm.region());
        let mut ring = DriverRing::new_packed(mem, l, Notification::Flags).unwrap();
        // Chains of two descriptors at heads 0, 2 and 4 (the second device-writable).
        for head in [0u16, 2, 4] {
            let chain = [
                VirtqDesc {
                    addr: 0x1000 * u64::from(head),
                    len: 16,
                    flags: 1,
                    next: head + 1,
                },
                VirtqDesc {
                    addr: 0x1000 * u64::from(head) + 16,
                    len: 512,
                    flags: 2,
                    next: 0,
                },
            ];
            for (i, d) in (head..).zip(chain) {
                ring.write_desc(i, d).unwrap();
            }
        }
        let (mut pos, mut wrap, mut used_pos, mut used_wrap) = (0u16, true, 0u16, true);
        // 3 lists of 2 descriptors a round on an 8-entry ring: 6 rounds pass its end 4 times.
        for round in 0..6u32 {
            for head in [0u16, 2, 4] {
                ring.offer(head).unwrap();
            }
            ring.publish().unwrap();
            assert_eq!(ring.used_pending().unwrap(), 0, "round {round}");
            let done = device_complete_packed(
                &mem,
                &l,
                &mut pos,
                &mut wrap,
                &mut used_pos,
                &mut used_wrap,
                7 + round,
            );
            assert_eq!(done, 3, "round {round}");
            assert_eq!(ring.used_pending().unwrap(), 3, "round {round}");
            // A second look reads nothing new and keeps what was found.
            assert_eq!(ring.used_pending().unwrap(), 3, "round {round}");
            for head in [0u32, 2, 4] {
                let e = ring.take_used().unwrap();
                assert_eq!((e.id, e.len), (head, 7 + round), "round {round}");
            }
            assert_eq!(ring.used_pending().unwrap(), 0, "round {round}");
            assert_eq!(ring.in_flight(), 0);
        }
        assert!(ring.take_used().is_err(), "nothing pending");
    }

    #[test]
    fn packed_used_id_not_in_flight_is_reported() {
        let (shm, l) = ring_mem();
        let mem = Shared::new(shm.region());
        let mut ring = DriverRing::new_packed(mem, l, Notification::Flags).unwrap();
        ring.write_desc(
            0,
            VirtqDesc {
                addr: 0x1000,
                len: 512,
                flags: 2,
                next: 0,
            },
        )
        .unwrap();
        ring.offer(0).unwrap();
        ring.publish().unwrap();
        // A device that answers with buffer ID 5, which was never offered.
        mem.u32_at(l.desc + 8)
            .unwrap()
            .store(512, Ordering::Relaxed);
        mem.u16_at(l.desc + 12).unwrap().store(5, Ordering::Relaxed);
        mem.u16_at(l.desc + 14)
            .unwrap()
            .store(PACKED_F_AVAIL | PACKED_F_USED, Ordering::Release);
        assert_eq!(ring.used_pending().unwrap(), 1);
        let err = ring.take_used().unwrap_err().to_string();
        assert!(err.contains("used buffer id 5 was not offered"), "{err}");
    }

    #[test]
    fn descriptors_are_little_endian_on_the_wire() {
        let (shm, l) = ring_mem();
        let mem = Shared::new(shm.region());
        let ring = DriverRing::new(mem, l, Notification::Flags).unwrap();
        ring.write_desc(
            1,
            VirtqDesc {
                addr: 0x1122_3344_5566_7788,
                len: 0x200,
                flags: 3,
                next: 2,
            },
        )
        .unwrap();
        let mut raw = [0u8; 16];
        mem.read(l.desc + 16, &mut raw).unwrap();
        assert_eq!(
            raw,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0x02, 0, 0, 3, 0, 2, 0]
        );
        ring.set_desc_flags(1, 1).unwrap();
        mem.read(l.desc + 16, &mut raw).unwrap();
        assert_eq!(raw[12], 1);
    }
}
