//! The initiator's "guest memory": one memfd shared with the target, and where each request
//! queue's rings and request buffers live in it.
//!
//! The target maps the memfd itself (vhost-user `SET_MEM_TABLE` passes the fd); guest-physical
//! addresses are offsets into the memfd, and the ring addresses in `SET_VRING_ADDR` are this
//! process's virtual addresses, exactly as QEMU does it.

use std::fs::File;
use std::os::fd::AsRawFd;

use rvhost_core::virtio::ring::{avail_ring_len, desc_table_len, used_ring_len};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, MmapRegion};

use crate::PerfError;

/// Size of the hugepages asked for with `MFD_HUGETLB | MFD_HUGE_2MB`.
pub const HUGEPAGE_SIZE: usize = 2 << 20;
const PAGE_SIZE: usize = 4096;
/// Per-request metadata (virtio-blk header + status, or virtio-scsi request + response) gets a
/// slot of this size, so two requests never share a cache line.
pub const META_SLOT: usize = 256;
/// Offset of the device-writable part (blk status byte, scsi response) inside a metadata slot.
pub const META_IN_OFFSET: usize = 64;
/// Offset of the request's indirect table (`--indirect`: three 16-byte entries) inside a
/// metadata slot: past the scsi response (`META_IN_OFFSET` + 108), in a cache line of its own.
pub const META_TABLE_OFFSET: usize = 192;

/// What backs the shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PageKind {
    /// `MFD_HUGETLB` 2 MiB pages.
    Huge2MiB,
    /// Ordinary shmem pages.
    Base4KiB,
}

/// Where one queue's parts live, as offsets (= guest-physical addresses) into the memory.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    /// Queue size (descriptors).
    pub size: u16,
    /// Descriptor table.
    pub desc: usize,
    /// Available ring.
    pub avail: usize,
    /// Used ring.
    pub used: usize,
    /// First metadata slot; slot `i` is at `meta + i * META_SLOT`.
    pub meta: usize,
    /// First data buffer; buffer `i` is at `data + i * data_stride`.
    pub data: usize,
    /// Distance between data buffers (block size rounded up to a page).
    pub data_stride: usize,
}

impl QueueLayout {
    /// Metadata slot of request `slot`.
    pub fn meta_at(&self, slot: usize) -> usize {
        self.meta + slot * META_SLOT
    }

    /// Indirect table of request `slot`.
    pub fn table_at(&self, slot: usize) -> usize {
        self.meta_at(slot) + META_TABLE_OFFSET
    }

    /// Data buffer of request `slot`.
    pub fn data_at(&self, slot: usize) -> usize {
        self.data + slot * self.data_stride
    }
}

fn round_up(v: usize, to: usize) -> Option<usize> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// Lays out `queue_sizes.len()` queues with `slots` requests of `block_size` bytes each, and
/// returns the layouts and the total size needed.
pub fn layout(
    queue_sizes: &[u16],
    slots: usize,
    block_size: usize,
) -> Result<(Vec<QueueLayout>, usize), PerfError> {
    let too_big = || PerfError::Options("queues x depth x block size overflows".into());
    let data_stride = round_up(block_size.max(1), PAGE_SIZE).ok_or_else(too_big)?;
    let mut next = 0usize;
    let mut out = Vec::with_capacity(queue_sizes.len());
    for &size in queue_sizes {
        let desc = next;
        let avail =
            round_up(desc + desc_table_len(size) as usize, PAGE_SIZE).ok_or_else(too_big)?;
        let used =
            round_up(avail + avail_ring_len(size) as usize, PAGE_SIZE).ok_or_else(too_big)?;
        let meta = round_up(used + used_ring_len(size) as usize, PAGE_SIZE).ok_or_else(too_big)?;
        let meta_len = slots.checked_mul(META_SLOT).ok_or_else(too_big)?;
        let data = round_up(meta + meta_len, PAGE_SIZE).ok_or_else(too_big)?;
        let data_len = slots.checked_mul(data_stride).ok_or_else(too_big)?;
        next = data.checked_add(data_len).ok_or_else(too_big)?;
        out.push(QueueLayout {
            size,
            desc,
            avail,
            used,
            meta,
            data,
            data_stride,
        });
    }
    Ok((out, next))
}

/// The shared memory.
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    region: MmapRegion,
    page_kind: PageKind,
}

fn free_hugepages() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("HugePages_Free:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl SharedMemory {
    /// A memfd of at least `len` bytes, on 2 MiB hugepages when `prefer_huge` and enough are
    /// free, else on ordinary shmem pages. Mapped shared and pre-faulted, so the run never takes
    /// a page fault.
    pub fn new(len: usize, prefer_huge: bool) -> Result<Self, PerfError> {
        let huge_len = round_up(len.max(1), HUGEPAGE_SIZE)
            .ok_or_else(|| PerfError::Memory(format!("{len} bytes is too large")))?;
        if prefer_huge && free_hugepages().unwrap_or(0) * HUGEPAGE_SIZE >= huge_len {
            match Self::create(huge_len, true) {
                Ok(mem) => return Ok(mem),
                Err(e) => eprintln!("rvhost-perf: hugepage memfd failed ({e}); using 4 KiB pages"),
            }
        }
        Self::create(huge_len, false)
    }

    fn create(len: usize, huge: bool) -> Result<Self, PerfError> {
        use rustix::fs::{memfd_create, MemfdFlags};
        let mut flags = MemfdFlags::CLOEXEC;
        if huge {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = memfd_create("rvhost-perf", flags)
            .map_err(|e| PerfError::Memory(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(len as u64)
            .map_err(|e| PerfError::Memory(format!("sizing memfd to {len}: {e}")))?;
        let dup = file
            .try_clone()
            .map_err(|e| PerfError::Memory(format!("dup memfd: {e}")))?;
        // Without MAP_NORESERVE a hugetlb mapping reserves its pages now (or fails cleanly),
        // instead of raising SIGBUS at first touch when the pool runs dry.
        let region = MmapRegion::build(
            Some(FileOffset::new(dup, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
        )
        .map_err(|e| PerfError::Memory(format!("mmap {len} bytes: {e}")))?;
        Ok(SharedMemory {
            file,
            region,
            page_kind: if huge {
                PageKind::Huge2MiB
            } else {
                PageKind::Base4KiB
            },
        })
    }

    /// The mapping.
    pub fn region(&self) -> &MmapRegion {
        &self.region
    }

    /// What backs it.
    pub fn page_kind(&self) -> PageKind {
        self.page_kind
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.region.size()
    }

    /// Whether it is empty (never: `new` rounds up to a hugepage).
    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }

    /// This process's address of offset 0 (what `SET_VRING_ADDR` speaks in).
    pub fn user_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// The region as a vhost-user memory table entry: GPA 0, this process's address, the memfd.
    pub fn vhost_region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len() as u64,
            userspace_addr: self.user_addr(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_rings_aligned_and_disjoint() {
        let (queues, total) = layout(&[256, 256], 32, 4096).unwrap();
        assert_eq!(queues.len(), 2);
        for q in &queues {
            assert_eq!(q.desc % 16, 0);
            assert_eq!(q.used % 4, 0);
            assert!(q.avail >= q.desc + 16 * 256);
            assert!(q.used >= q.avail + 6 + 2 * 256);
            assert!(q.meta >= q.used + 6 + 8 * 256);
            assert!(q.data >= q.meta + 32 * META_SLOT);
            assert_eq!(q.data % 4096, 0);
        }
        assert!(queues[1].desc >= queues[0].data + 32 * 4096);
        assert!(total >= queues[1].data + 32 * 4096);
        // A 512-byte block still gets its own page.
        let (small, _) = layout(&[16], 4, 512).unwrap();
        assert_eq!(small[0].data_stride, 4096);
    }

    #[test]
    fn layout_rejects_overflow() {
        assert!(layout(&[16], usize::MAX / 2, 4096).is_err());
    }

    #[test]
    fn memory_is_shared_through_the_memfd() {
        use vm_memory::{Bytes, VolatileMemory};
        let mem = SharedMemory::new(8192, true).unwrap();
        assert!(mem.len() >= 8192);
        let slice = mem.region().as_volatile_slice();
        slice.write_slice(b"abc", 100).unwrap();
        let region = mem.vhost_region();
        assert_eq!(region.guest_phys_addr, 0);
        assert_eq!(region.memory_size, mem.len() as u64);
        // The fd sees what the mapping wrote: it is the same memory the target will map.
        let mut file =
            std::fs::File::open(format!("/proc/self/fd/{}", region.mmap_handle)).unwrap();
        let mut bytes = vec![0u8; 103];
        std::io::Read::read_exact(&mut file, &mut bytes).unwrap();
        assert_eq!(&bytes[100..], b"abc");
    }
}
