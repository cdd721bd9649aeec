//! Memory for DMA and for the target's own buffers: 2 MiB hugepages when the host has them,
//! 4 KiB pages (with a warning) when it does not. This is the only allocator of DMA memory in
//! rvhost; the NVMe driver takes its queues, admin buffer and bounce buffers from here.
//!
//! Hugepages matter for two reasons: an IOMMU maps a 2 MiB page with one entry instead of 512, and
//! hugetlb pages are never swapped or migrated, so the IOVA the NVMe driver programs stays valid.
//! With an IOMMU in front of the device physical contiguity does not matter, which is why 4 KiB
//! pages are an acceptable fallback. Device addresses follow SPDK's rule IOVA = VA: a buffer is
//! mapped into the IOMMU at its own virtual address by a [`DmaMapper`] (the NVMe driver's VFIO
//! container), so no translation table is needed and any memory of this process mapped the same
//! way (guest memory) can be handed to the device as is.
//!
//! Two shapes, both reachable only through copies and raw pointers (never a Rust reference, since
//! a device or another thread may write the bytes at any time):
//! - [`DmaBuffer`]: one exclusively owned buffer, optionally mapped for a device
//!   ([`DmaBuffer::allocate_for_device`]; unmapped again on drop): NVMe queues, the admin buffer,
//!   bounce buffers;
//! - [`SharedDmaMemory`]: a buffer shared between threads, through [`HostMemory`] and
//!   offset-based copies, because several reactors may write it at once: the RAM bdev's backing
//!   store.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rvhost_core::mem::MemError;

use crate::host::{unmapped, HostMemory, HostRange};

/// Size of the hugepages this module allocates.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

/// Where the kernel reports how many persistent hugepages are reserved.
pub const NR_HUGEPAGES_PATH: &str = "/proc/sys/vm/nr_hugepages";

/// Which pages to back an allocation with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePolicy {
    /// 2 MiB hugepages if possible, else 4 KiB pages with a warning.
    PreferHuge,
    /// 2 MiB hugepages or an error.
    HugeOnly,
    /// Base pages only (tests, or memory that never goes near a device).
    SmallOnly,
}

/// The page size that actually backs a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugetlb pages.
    Huge2MiB,
    /// The host's base pages (4 KiB on x86).
    Base,
}

/// Why DMA memory could not be allocated.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// A zero-sized allocation was asked for.
    #[error("DMA allocation of zero bytes")]
    ZeroSize,
    /// The size, rounded up to whole pages, overflows.
    #[error("DMA allocation of {0} bytes is too large")]
    TooLarge(usize),
    /// `mmap` failed (for hugepages usually: not enough free hugepages).
    #[error("mmap of {len} bytes ({kind:?} pages) failed: {source}")]
    Mmap {
        /// Bytes asked of the kernel.
        len: usize,
        /// Page kind tried.
        kind: PageKind,
        /// The OS error.
        source: io::Error,
    },
    /// The IOMMU mapping failed.
    #[error("IOMMU mapping of {len:#x} bytes at IOVA {iova:#x} failed: {reason}")]
    Map {
        /// IOVA (= virtual address).
        iova: u64,
        /// Length.
        len: u64,
        /// What the IOMMU layer said.
        reason: String,
    },
    /// The IOMMU unmapping failed.
    #[error("IOMMU unmapping of {len:#x} bytes at IOVA {iova:#x} failed: {reason}")]
    Unmap {
        /// IOVA (= virtual address).
        iova: u64,
        /// Length.
        len: u64,
        /// What the IOMMU layer said.
        reason: String,
    },
    /// Zero length, or a length or address that is not page aligned, given to a [`DmaMapper`].
    #[error("DMA range {vaddr:#x}+{len:#x} is empty or not 4 KiB aligned")]
    Alignment {
        /// Start.
        vaddr: u64,
        /// Length.
        len: u64,
    },
}

/// Something that can make memory of this process visible to a device at IOVA = VA: an IOMMU
/// container (the NVMe driver's VFIO container implements it).
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

/// One anonymous mapping; unmapped when the last buffer using it is dropped.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    kind: PageKind,
}

// SAFETY: `Mapping` is an owned anonymous mapping; the pointer is not tied to any thread and all
// access to its bytes goes through types that enforce their own aliasing rules.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` exposes only the address and size; see `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize, kind: PageKind) -> Result<Self, DmaError> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        if kind == PageKind::Huge2MiB {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        }
        // SAFETY: an anonymous mapping at an address of the kernel's choosing (no MAP_FIXED) cannot
        // alias any existing Rust object; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DmaError::Mmap {
                len,
                kind,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(DmaError::Mmap {
            len,
            kind,
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        Ok(Mapping { ptr, len, kind })
    }

    fn allocate(len: usize, policy: PagePolicy) -> Result<Self, DmaError> {
        if len == 0 {
            return Err(DmaError::ZeroSize);
        }
        if policy != PagePolicy::SmallOnly {
            let huge_len = round_up(len, HUGEPAGE_SIZE).ok_or(DmaError::TooLarge(len))?;
            match Mapping::new(huge_len, PageKind::Huge2MiB) {
                Ok(m) => return Ok(m),
                Err(e) if policy == PagePolicy::HugeOnly => return Err(e),
                Err(e) => match configured_hugepages() {
                    Some(0) => tracing::warn!(
                        len,
                        "no hugepages configured ({NR_HUGEPAGES_PATH} = 0); using 4 KiB pages for DMA \
                         memory, which costs IOMMU entries and TLB misses; reserve some with \
                         `echo 1024 > {NR_HUGEPAGES_PATH}`"
                    ),
                    _ => tracing::warn!(
                        len,
                        error = %e,
                        "could not allocate 2 MiB hugepages; using 4 KiB pages for DMA memory"
                    ),
                },
            }
        }
        let page = usize::try_from(crate::memory::page_size()).unwrap_or(4096);
        let small_len = round_up(len, page).ok_or(DmaError::TooLarge(len))?;
        Mapping::new(small_len, PageKind::Base)
    }

    /// Pointer to byte `offset` (callers keep `offset <= len`), with the mapping's provenance.
    fn ptr_at(&self, offset: usize) -> *mut u8 {
        self.ptr.as_ptr().wrapping_add(offset)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and every buffer borrowing the mapping
        // holds an `Arc` to it, so nothing can use it after this.
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "munmap of DMA memory failed");
        }
    }
}

fn round_up(len: usize, align: usize) -> Option<usize> {
    len.checked_add(align - 1).map(|v| v / align * align)
}

/// The number of persistent 2 MiB hugepages the kernel has reserved, if it can be read.
pub fn configured_hugepages() -> Option<u64> {
    std::fs::read_to_string(NR_HUGEPAGES_PATH)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The first `len` bytes of a mapping (the rest is rounding to whole pages), with range checks by
/// host address and by offset.
#[derive(Debug)]
struct Window {
    map: Arc<Mapping>,
    len: usize,
}

impl Window {
    fn va(&self) -> u64 {
        self.map.ptr_at(0) as u64
    }

    /// The pointer to `[host_addr, host_addr + len)` if that lies inside this window.
    fn checked(&self, host_addr: u64, len: usize) -> Result<*mut u8, MemError> {
        // Same error precedence as the guest memory table: an overflowing range first.
        let len64 = u64::try_from(len).map_err(|_| MemError::Overflow)?;
        host_addr.checked_add(len64).ok_or(MemError::Overflow)?;
        let start = host_addr
            .checked_sub(self.va())
            .ok_or_else(|| unmapped(host_addr, len))?;
        let start = usize::try_from(start).map_err(|_| unmapped(host_addr, len))?;
        let end = start.checked_add(len).ok_or(MemError::Overflow)?;
        if end > self.len {
            return Err(unmapped(host_addr, len));
        }
        Ok(self.map.ptr_at(start))
    }

    /// The pointer to `[offset, offset + len)` of this window.
    fn checked_offset(&self, offset: usize, len: usize) -> Result<*mut u8, MemError> {
        let end = offset.checked_add(len).ok_or(MemError::Overflow)?;
        if end > self.len {
            let addr = self.va().saturating_add(offset as u64);
            return Err(unmapped(addr, len));
        }
        Ok(self.map.ptr_at(offset))
    }

    fn copy_in(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: callers obtained `dst` from `checked`/`checked_offset` for `src.len()` bytes, so
        // it lies inside the live mapping `self.map`; `src` is a Rust buffer, which cannot overlap
        // memory that is reached only through raw pointers while copies run (see the types' docs).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }

    fn copy_out(&self, src: *const u8, dst: &mut [u8]) {
        // SAFETY: as in `copy_in`, with the roles swapped; `dst` is exclusively borrowed.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) }
    }

    fn fill(&self, dst: *mut u8, len: usize, byte: u8) {
        // SAFETY: callers obtained `dst` from `checked`/`checked_offset` for `len` bytes.
        unsafe { std::ptr::write_bytes(dst, byte, len) }
    }
}

/// An exclusively owned DMA buffer: page aligned (2 MiB aligned on hugepages), zero-filled when
/// allocated, and, from [`DmaBuffer::allocate_for_device`], mapped into a device's IOMMU at
/// IOVA = VA until it is dropped.
///
/// Its bytes are reached only through copies ([`write_at`](Self::write_at),
/// [`read_at`](Self::read_at), [`fill_at`](Self::fill_at)) and raw pointers for device structures
/// ([`ptr_at`](Self::ptr_at)), never through a Rust reference: a device may write them at any time.
pub struct DmaBuffer {
    window: Window,
    /// The IOMMU the whole mapping is mapped into, if any; unmapped on drop.
    device: Option<Arc<dyn DmaMapper>>,
}

impl core::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("va", &format_args!("{:#x}", self.va()))
            .field("len", &self.len())
            .field("pages", &self.page_kind())
            .field("device_mapped", &self.device.is_some())
            .finish()
    }
}

impl DmaBuffer {
    /// Allocates `len` bytes, preferring hugepages (see [`PagePolicy::PreferHuge`]).
    pub fn allocate(len: usize) -> Result<Self, DmaError> {
        Self::allocate_with(len, PagePolicy::PreferHuge)
    }

    /// Allocates `len` bytes with an explicit page policy.
    pub fn allocate_with(len: usize, policy: PagePolicy) -> Result<Self, DmaError> {
        let map = Arc::new(Mapping::allocate(len, policy)?);
        Ok(DmaBuffer {
            window: Window { map, len },
            device: None,
        })
    }

    /// Allocates `len` bytes with `policy` and maps the whole underlying mapping (see
    /// [`mapping`](Self::mapping)) for device access at IOVA = VA through `mapper`; the mapping is
    /// removed again when the buffer is dropped.
    pub fn allocate_for_device(
        len: usize,
        policy: PagePolicy,
        mapper: Arc<dyn DmaMapper>,
    ) -> Result<Self, DmaError> {
        let mut buffer = Self::allocate_with(len, policy)?;
        let (va, map_len) = buffer.mapping();
        // SAFETY: the range is this buffer's own fresh mapping, which stays mapped until `Drop`
        // has called `unmap` (or forever, if that fails); `DmaBuffer` never creates a reference
        // into it.
        unsafe { mapper.map(va, map_len as u64)? };
        buffer.device = Some(mapper);
        Ok(buffer)
    }

    /// Host virtual address of the first byte.
    pub fn va(&self) -> u64 {
        self.window.va()
    }

    /// The I/O virtual address of the first byte, for a device: equal to [`va`](Self::va), the
    /// address [`allocate_for_device`](Self::allocate_for_device) maps it at.
    pub fn iova(&self) -> u64 {
        self.va()
    }

    /// Length in bytes (as asked for; the mapping may be larger).
    pub fn len(&self) -> usize {
        self.window.len
    }

    /// Whether the buffer has length zero (never: allocation refuses zero bytes).
    pub fn is_empty(&self) -> bool {
        self.window.len == 0
    }

    /// The pages backing the buffer.
    pub fn page_kind(&self) -> PageKind {
        self.window.map.kind
    }

    /// Whether the buffer lives on 2 MiB hugepages.
    pub fn is_hugepage(&self) -> bool {
        self.window.map.kind == PageKind::Huge2MiB
    }

    /// The whole mapping this buffer lies in, as (virtual address, length): the buffer rounded up
    /// to whole pages, which is what an IOMMU maps.
    pub fn mapping(&self) -> (u64, usize) {
        (self.window.map.ptr.as_ptr() as u64, self.window.map.len)
    }

    /// A pointer to byte `offset`, if `[offset, offset + len)` lies inside the buffer: where a
    /// device structure (a queue ring, a PRP list) lives. Access through it must be raw or volatile.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        self.window
            .checked_offset(offset, len)
            .ok()
            .and_then(NonNull::new)
    }

    /// Copies `src` to byte offset `offset`. Sound while a device may access other bytes; the
    /// caller keeps the device off these bytes (before submission or after completion).
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        let dst = self.window.checked_offset(offset, src.len())?;
        self.window.copy_in(dst, src);
        Ok(())
    }

    /// Copies from byte offset `offset` into `dst`; see [`write_at`](Self::write_at).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        let src = self.window.checked_offset(offset, dst.len())?;
        self.window.copy_out(src, dst);
        Ok(())
    }

    /// Sets `len` bytes from offset `offset` to `byte`; see [`write_at`](Self::write_at).
    pub fn fill_at(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError> {
        let dst = self.window.checked_offset(offset, len)?;
        self.window.fill(dst, len, byte);
        Ok(())
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let Some(mapper) = self.device.take() else {
            return;
        };
        let (va, len) = self.mapping();
        if let Err(e) = mapper.unmap(va, len as u64) {
            // The IOMMU may still point at these pages: keep them forever rather than let the
            // kernel hand them to someone else while a device can write them.
            tracing::error!(%e, "leaking DMA memory that could not be unmapped");
            std::mem::forget(Arc::clone(&self.window.map));
        }
    }
}

/// DMA memory shared between threads, reachable only through copies; cheap to clone (`Arc`).
///
/// Several reactors may copy into the same bytes at once (two guests writing the same block of a
/// RAM disk); as with any shared-memory device the result is then some interleaving of the
/// writes, never a broken invariant, because no Rust reference to the bytes is ever created.
#[derive(Debug, Clone)]
pub struct SharedDmaMemory {
    window: Arc<Window>,
}

impl SharedDmaMemory {
    /// Allocates `len` zeroed bytes, preferring hugepages.
    pub fn allocate(len: usize) -> Result<Self, DmaError> {
        Self::allocate_with(len, PagePolicy::PreferHuge)
    }

    /// Allocates `len` zeroed bytes with an explicit page policy.
    pub fn allocate_with(len: usize, policy: PagePolicy) -> Result<Self, DmaError> {
        let map = Arc::new(Mapping::allocate(len, policy)?);
        Ok(SharedDmaMemory {
            window: Arc::new(Window { map, len }),
        })
    }

    /// Host virtual address of the first byte.
    pub fn va(&self) -> u64 {
        self.window.va()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.window.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.window.len == 0
    }

    /// Whether the memory lives on 2 MiB hugepages.
    pub fn is_hugepage(&self) -> bool {
        self.window.map.kind == PageKind::Huge2MiB
    }

    /// Copies `src` to byte offset `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        let dst = self.window.checked_offset(offset, src.len())?;
        self.window.copy_in(dst, src);
        Ok(())
    }

    /// Copies from byte offset `offset` into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        let src = self.window.checked_offset(offset, dst.len())?;
        self.window.copy_out(src, dst);
        Ok(())
    }

    /// Sets `len` bytes from offset `offset` to `byte`.
    pub fn fill_at(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError> {
        let dst = self.window.checked_offset(offset, len)?;
        self.window.fill(dst, len, byte);
        Ok(())
    }

    /// The host address of byte `offset` (for [`crate::copy_between`]); `offset == len` is allowed.
    pub fn host_addr(&self, offset: usize) -> Result<u64, MemError> {
        self.window.checked_offset(offset, 0).map(|p| p as u64)
    }
}

impl HostMemory for SharedDmaMemory {
    fn copy_to_host(&self, host_addr: u64, src: &[u8]) -> Result<(), MemError> {
        let dst = self.window.checked(host_addr, src.len())?;
        self.window.copy_in(dst, src);
        Ok(())
    }

    fn copy_from_host(&self, host_addr: u64, dst: &mut [u8]) -> Result<(), MemError> {
        let src = self.window.checked(host_addr, dst.len())?;
        self.window.copy_out(src, dst);
        Ok(())
    }

    fn fill_host(&self, host_addr: u64, len: usize, byte: u8) -> Result<(), MemError> {
        let dst = self.window.checked(host_addr, len)?;
        self.window.fill(dst, len, byte);
        Ok(())
    }

    fn checked_range(&self, host_addr: u64, len: usize) -> Option<Result<HostRange<'_>, MemError>> {
        Some(
            self.window
                .checked(host_addr, len)
                .map(|p| HostRange::new(p, len)),
        )
    }
}
