//! Driver-owned DMA memory: anonymous hugepages (2 MiB, `MAP_HUGETLB`) with a fallback to ordinary
//! 4 KiB pages, mapped into the IOMMU with IOVA equal to the virtual address, as SPDK does.
//!
//! IOVA = VA means no translation table in the driver, and that any memory of this process mapped
//! with the same rule (later: the guest memory regions the target serves) can be handed to the
//! device as is, with zero copy. With an IOMMU in front of the device, physical contiguity does not
//! matter, which is why 4 KiB pages are an acceptable fallback.

use core::ptr::NonNull;
use std::sync::Arc;

use crate::prp::PAGE_SIZE;

/// Size of the hugepages asked for.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

/// Errors allocating or mapping DMA memory.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// `mmap` failed for both hugepages and ordinary pages.
    #[error("cannot allocate {len} bytes of DMA memory: {source}")]
    Allocate {
        /// Bytes asked for.
        len: usize,
        /// The `mmap` error.
        source: std::io::Error,
    },
    /// The IOMMU mapping failed.
    #[error("VFIO_IOMMU_MAP_DMA of {len:#x} bytes at {iova:#x} failed: {reason}")]
    Map {
        /// IOVA (= virtual address).
        iova: u64,
        /// Length.
        len: u64,
        /// What the VFIO layer said.
        reason: String,
    },
    /// The IOMMU unmapping failed.
    #[error("VFIO_IOMMU_UNMAP_DMA of {len:#x} bytes at {iova:#x} failed: {reason}")]
    Unmap {
        /// IOVA (= virtual address).
        iova: u64,
        /// Length.
        len: u64,
        /// What the VFIO layer said.
        reason: String,
    },
    /// Zero length, or a length or address that is not page aligned.
    #[error("DMA range {vaddr:#x}+{len:#x} is empty or not 4 KiB aligned")]
    Alignment {
        /// Start.
        vaddr: u64,
        /// Length.
        len: u64,
    },
}

/// Something that can make memory of this process visible to a device at IOVA = VA.
pub trait DmaMapper: Send + Sync + core::fmt::Debug {
    /// Maps `[vaddr, vaddr + len)` for device reads and writes at IOVA `vaddr`.
    ///
    /// # Safety
    /// The range must be mapped memory of this process that stays mapped until [`DmaMapper::unmap`]
    /// is called, and no Rust reference may be used to access it while the device can (the device
    /// writes it at any time; only raw-pointer, volatile or system-call access is sound).
    unsafe fn map(&self, vaddr: u64, len: u64) -> Result<(), DmaError>;

    /// Removes a mapping made by [`DmaMapper::map`] with the same range.
    fn unmap(&self, vaddr: u64, len: u64) -> Result<(), DmaError>;
}

/// A page-aligned, zeroed region of DMA memory, unmapped from the IOMMU and freed on drop.
#[derive(Debug)]
pub struct DmaRegion {
    ptr: NonNull<u8>,
    len: usize,
    hugepages: bool,
    mapper: Option<Arc<dyn DmaMapper>>,
}

// SAFETY: the region exclusively owns its mapping; it is plain memory not tied to a thread.
unsafe impl Send for DmaRegion {}
// SAFETY: shared access only hands out the address; every read and write of the contents goes
// through raw pointers by whoever holds it, as DMA memory requires anyway.
unsafe impl Sync for DmaRegion {}

fn mmap_anonymous(len: usize, extra_flags: libc::c_int) -> Result<NonNull<u8>, std::io::Error> {
    // SAFETY: an anonymous private mapping chosen by the kernel touches no existing memory; the
    // result is checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned NULL"))
}

impl DmaRegion {
    /// Allocates at least `len` bytes (rounded up to 2 MiB if hugepages are available, otherwise
    /// to 4 KiB), zeroed, and maps it with `mapper` if given.
    pub fn allocate(len: usize, mapper: Option<Arc<dyn DmaMapper>>) -> Result<Self, DmaError> {
        let len = len.max(1);
        let huge_len = len.next_multiple_of(HUGEPAGE_SIZE);
        let (ptr, len, hugepages) = match mmap_anonymous(huge_len, libc::MAP_HUGETLB) {
            Ok(p) => (p, huge_len, true),
            Err(huge_err) => {
                let small_len = len.next_multiple_of(PAGE_SIZE as usize);
                tracing::debug!(%huge_err, len = small_len, "no hugepages, using 4 KiB pages for DMA");
                let p = mmap_anonymous(small_len, 0).map_err(|source| DmaError::Allocate {
                    len: small_len,
                    source,
                })?;
                (p, small_len, false)
            }
        };
        let mut region = DmaRegion {
            ptr,
            len,
            hugepages,
            mapper: None,
        };
        let Some(mapper) = mapper else {
            return Ok(region);
        };
        // SAFETY: the range is our own fresh mapping, unmapped only in `Drop` after `unmap`, and
        // this type never creates references into it.
        unsafe { mapper.map(region.iova(), region.len as u64)? };
        region.mapper = Some(mapper);
        Ok(region)
    }

    /// First byte, for raw-pointer access.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The I/O virtual address of the first byte (equal to its virtual address).
    pub fn iova(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (regions have at least one page); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region is backed by hugepages.
    pub fn is_hugepage(&self) -> bool {
        self.hugepages
    }

    /// A pointer `offset` bytes in, if `offset + len` stays inside the region.
    pub fn slice_ptr(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset <= self.len`, inside (or one past) the allocation.
        NonNull::new(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Copies `src` into the region at `offset`. Only sound to call while the device is not
    /// accessing those bytes (before submission or after completion), which is what DMA buffers
    /// need anyway. Returns `false` if the range is outside the region.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> bool {
        let Some(dst) = self.slice_ptr(offset, src.len()) else {
            return false;
        };
        // SAFETY: `dst..dst+src.len()` is inside the region (checked above); `src` is ordinary
        // memory, which cannot overlap our private mapping.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), src.len()) };
        true
    }

    /// Copies region bytes at `offset` into `dst`; see [`DmaRegion::write_bytes`].
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> bool {
        let Some(src) = self.slice_ptr(offset, dst.len()) else {
            return false;
        };
        // SAFETY: `src..src+dst.len()` is inside the region (checked above) and cannot overlap
        // `dst`.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Fills `len` bytes at `offset` with `byte`; see [`DmaRegion::write_bytes`].
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> bool {
        let Some(dst) = self.slice_ptr(offset, len) else {
            return false;
        };
        // SAFETY: inside the region (checked above).
        unsafe { core::ptr::write_bytes(dst.as_ptr(), byte, len) };
        true
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if let Some(mapper) = self.mapper.take() {
            if let Err(e) = mapper.unmap(self.iova(), self.len as u64) {
                // The IOMMU may still point at these pages: leaking them is the safe choice.
                tracing::error!(%e, "leaking DMA memory that could not be unmapped");
                return;
            }
        }
        // SAFETY: `ptr`/`len` are exactly the mapping made in `allocate`, no longer in the IOMMU,
        // and this type handed out no references into it.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::error!(err = %std::io::Error::last_os_error(), "munmap of DMA memory failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct RecordingMapper {
        log: Mutex<Vec<(&'static str, u64, u64)>>,
    }

    impl DmaMapper for RecordingMapper {
        unsafe fn map(&self, vaddr: u64, len: u64) -> Result<(), DmaError> {
            self.log.lock().unwrap().push(("map", vaddr, len));
            Ok(())
        }
        fn unmap(&self, vaddr: u64, len: u64) -> Result<(), DmaError> {
            self.log.lock().unwrap().push(("unmap", vaddr, len));
            Ok(())
        }
    }

    #[test]
    fn allocation_is_aligned_zeroed_and_mapped_with_iova_equal_to_va() {
        let mapper = Arc::new(RecordingMapper::default());
        let region = DmaRegion::allocate(10_000, Some(mapper.clone())).unwrap();
        assert_eq!(region.iova() % PAGE_SIZE, 0);
        assert!(region.len() >= 10_000);
        assert_eq!(region.len() % PAGE_SIZE as usize, 0);
        if region.is_hugepage() {
            assert_eq!(region.len() % HUGEPAGE_SIZE, 0);
        }
        let mut buf = vec![0xAAu8; 64];
        assert!(region.read_bytes(region.len() - 64, &mut buf));
        assert!(buf.iter().all(|&b| b == 0));
        assert!(region.write_bytes(100, b"hello"));
        let mut back = [0u8; 5];
        assert!(region.read_bytes(100, &mut back));
        assert_eq!(&back, b"hello");
        assert!(
            !region.write_bytes(region.len() - 2, b"abc"),
            "out of range write refused"
        );
        assert!(region.slice_ptr(usize::MAX, 2).is_none());
        let (iova, len) = (region.iova(), region.len() as u64);
        drop(region);
        assert_eq!(
            *mapper.log.lock().unwrap(),
            vec![("map", iova, len), ("unmap", iova, len)]
        );
    }
}
