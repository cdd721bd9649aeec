//! The driver's half of a split virtqueue (virtio 1.2 §2.7): write descriptors, offer heads in
//! the available ring, publish `avail.idx`, decide whether the device wants a kick, and reap the
//! used ring by polling.
//!
//! All ring fields are accessed as atomics in the shared mapping: `avail.idx` is stored with
//! Release (so descriptors, headers and ring entries written before it are visible to a device
//! that loads it with Acquire), `used.idx` is loaded with Acquire (so the status bytes and data the
//! device wrote before publishing it are visible here).

use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

use rvhost_core::virtio::ring::{
    vring_need_event, VirtqDesc, VirtqUsedElem, RING_ARRAY_OFFSET, RING_FLAGS_OFFSET,
    RING_IDX_OFFSET, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY,
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

/// The driver side of one split virtqueue.
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

    /// The memory the ring lives in.
    pub fn shared(&self) -> Shared<'m> {
        self.mem
    }

    /// The queue's layout.
    pub fn layout(&self) -> &QueueLayout {
        &self.layout
    }

    /// Writes descriptor `index`.
    pub fn write_desc(&self, index: u16, desc: VirtqDesc) -> Result<(), PerfError> {
        let at = self.layout.desc + usize::from(index) * VirtqDesc::SIZE;
        self.mem
            .u64_at(at)?
            .store(desc.addr.to_le(), Ordering::Relaxed);
        self.mem
            .u32_at(at + 8)?
            .store(desc.len.to_le(), Ordering::Relaxed);
        self.mem
            .u16_at(at + 12)?
            .store(desc.flags.to_le(), Ordering::Relaxed);
        self.mem
            .u16_at(at + 14)?
            .store(desc.next.to_le(), Ordering::Relaxed);
        Ok(())
    }

    /// Rewrites only the flags of descriptor `index`.
    pub fn set_desc_flags(&self, index: u16, flags: u16) -> Result<(), PerfError> {
        let at = self.layout.desc + usize::from(index) * VirtqDesc::SIZE + 12;
        self.mem.u16_at(at)?.store(flags.to_le(), Ordering::Relaxed);
        Ok(())
    }

    /// Puts `head` in the next available-ring entry; the device sees it after [`Self::publish`].
    #[inline]
    pub fn offer(&mut self, head: u16) -> Result<(), PerfError> {
        let pos = usize::from(self.next_avail & self.mask);
        let at = self.layout.avail + RING_ARRAY_OFFSET as usize + 2 * pos;
        self.mem.u16_at(at)?.store(head.to_le(), Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publishes every offered head with one `avail.idx` store and returns whether the device
    /// asked to be kicked for them.
    #[inline]
    pub fn publish(&mut self) -> Result<bool, PerfError> {
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

    /// How many used entries are waiting (one Acquire load of `used.idx`).
    #[inline]
    pub fn used_pending(&self) -> Result<u16, PerfError> {
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
        if self.notification == Notification::EventIdx {
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
