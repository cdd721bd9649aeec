//! Memory for DMA and for the target's own buffers: 2 MiB hugepages when the host has them,
//! 4 KiB pages (with a warning) when it does not.
//!
//! Hugepages matter for two reasons: an IOMMU maps a 2 MiB page with one entry instead of 512, and
//! hugetlb pages are never swapped or migrated, so the IOVA the NVMe driver programs stays valid.
//! This module only hands out virtual addresses and sizes; the NVMe driver maps them through VFIO
//! and keeps the IOVAs.
//!
//! Three shapes:
//! - [`DmaBuffer`]: one exclusively owned buffer with safe slice access (bounce buffers, queues);
//!   [`DmaBuffer::access`] lends it out as [`HostMemory`] for a bdev to copy into.
//! - [`SharedDmaMemory`]: a buffer shared between threads, reachable only through copies
//!   ([`HostMemory`] and offset-based helpers) because several reactors may write it at once: the
//!   RAM bdev's backing store.
//! - [`DmaPool`]: fixed-size buffers carved from one mapping, returned to the pool on drop.

use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

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

/// A window `[offset, offset + len)` of a mapping, with range checks by host address.
#[derive(Debug)]
struct Window {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl Window {
    fn va(&self) -> u64 {
        self.map.ptr_at(self.offset) as u64
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
        Ok(self.map.ptr_at(self.offset + start))
    }

    /// The pointer to `[offset, offset + len)` of this window.
    fn checked_offset(&self, offset: usize, len: usize) -> Result<*mut u8, MemError> {
        let end = offset.checked_add(len).ok_or(MemError::Overflow)?;
        if end > self.len {
            let addr = self.va().saturating_add(offset as u64);
            return Err(unmapped(addr, len));
        }
        Ok(self.map.ptr_at(self.offset + offset))
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

/// An exclusively owned DMA buffer (page aligned, zero-filled when allocated).
///
/// For a device, use [`va`](Self::va) and [`len`](Self::len) (and [`mapping`](Self::mapping) to
/// map the whole underlying mapping through VFIO once).
#[derive(Debug)]
pub struct DmaBuffer {
    window: Window,
    /// The pool to return the window to on drop, if it came from one.
    pool: Option<Arc<PoolShared>>,
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
            window: Window {
                map,
                offset: 0,
                len,
            },
            pool: None,
        })
    }

    /// Host virtual address of the first byte.
    pub fn va(&self) -> u64 {
        self.window.va()
    }

    /// Length in bytes (as asked for; the mapping may be larger).
    pub fn len(&self) -> usize {
        self.window.len
    }

    /// Whether the buffer has length zero (pool buffers never do; here for completeness).
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

    /// The whole mapping this buffer lies in, as (virtual address, length): what to map through
    /// VFIO so every buffer of a pool is covered by one IOMMU mapping.
    pub fn mapping(&self) -> (u64, usize) {
        (self.window.map.ptr.as_ptr() as u64, self.window.map.len)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the window lies inside a live mapping held by `self.window.map`, is initialised
        // (anonymous memory is zero-filled), and `DmaBuffer` owns it exclusively: only `&mut self`
        // methods write to it, so no write can happen while this shared borrow lives.
        unsafe {
            std::slice::from_raw_parts(self.window.map.ptr_at(self.window.offset), self.window.len)
        }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees no other borrow of the bytes exists.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.window.map.ptr_at(self.window.offset),
                self.window.len,
            )
        }
    }

    /// Lends the buffer out as [`HostMemory`] (by host address), for a bdev to copy into or out of.
    /// The exclusive borrow keeps slices from existing while others write through addresses.
    pub fn access(&mut self) -> DmaBufferAccess<'_> {
        DmaBufferAccess { buffer: self }
    }

    /// Turns the buffer into memory shared between threads (the RAM bdev's backing store).
    pub fn into_shared(mut self) -> SharedDmaMemory {
        let window = Window {
            map: Arc::clone(&self.window.map),
            offset: self.window.offset,
            len: self.window.len,
        };
        // The window now belongs to the shared memory for good; a pool simply has one buffer
        // fewer to hand out.
        self.pool = None;
        SharedDmaMemory {
            window: Arc::new(window),
        }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(self.window.offset);
        }
    }
}

/// A [`DmaBuffer`] lent out as [`HostMemory`]; see [`DmaBuffer::access`].
#[derive(Debug)]
pub struct DmaBufferAccess<'a> {
    buffer: &'a mut DmaBuffer,
}

impl DmaBufferAccess<'_> {
    /// Host virtual address of the buffer's first byte.
    pub fn va(&self) -> u64 {
        self.buffer.va()
    }

    /// Length of the buffer.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
}

impl HostMemory for DmaBufferAccess<'_> {
    fn copy_to_host(&self, host_addr: u64, src: &[u8]) -> Result<(), MemError> {
        let w = &self.buffer.window;
        let dst = w.checked(host_addr, src.len())?;
        w.copy_in(dst, src);
        Ok(())
    }

    fn copy_from_host(&self, host_addr: u64, dst: &mut [u8]) -> Result<(), MemError> {
        let w = &self.buffer.window;
        let src = w.checked(host_addr, dst.len())?;
        w.copy_out(src, dst);
        Ok(())
    }

    fn fill_host(&self, host_addr: u64, len: usize, byte: u8) -> Result<(), MemError> {
        let w = &self.buffer.window;
        let dst = w.checked(host_addr, len)?;
        w.fill(dst, len, byte);
        Ok(())
    }

    fn checked_range(&self, host_addr: u64, len: usize) -> Option<Result<HostRange<'_>, MemError>> {
        Some(
            self.buffer
                .window
                .checked(host_addr, len)
                .map(|p| HostRange::new(p, len)),
        )
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
        Ok(DmaBuffer::allocate(len)?.into_shared())
    }

    /// Allocates `len` zeroed bytes with an explicit page policy.
    pub fn allocate_with(len: usize, policy: PagePolicy) -> Result<Self, DmaError> {
        Ok(DmaBuffer::allocate_with(len, policy)?.into_shared())
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

/// The part of a pool that buffers hand their window back to.
#[derive(Debug)]
struct PoolShared {
    map: Arc<Mapping>,
    buffer_size: usize,
    count: usize,
    /// Offsets of free buffers (a stack: the most recently freed buffer is still in cache).
    free: Mutex<Vec<usize>>,
}

impl PoolShared {
    fn give_back(&self, offset: usize) {
        // A poisoned lock only means another thread panicked mid-push/pop of a plain Vec<usize>,
        // which leaves it consistent; keep going.
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(offset);
    }
}

/// Fixed-size DMA buffers (bounce buffers, request buffers) carved from one mapping.
///
/// Every buffer is aligned to 4 KiB (so a buffer up to 4 KiB never crosses a page, which NVMe PRP
/// lists like). Allocation pops a free list under an uncontended lock; buffers go back on drop,
/// from any thread. The free list is preallocated, so the pool never allocates after creation.
#[derive(Debug, Clone)]
pub struct DmaPool {
    shared: Arc<PoolShared>,
}

/// Alignment of every pool buffer.
pub const DMA_POOL_ALIGN: usize = 4096;

impl DmaPool {
    /// A pool of `count` buffers of `buffer_size` bytes each (rounded up to 4 KiB multiples).
    pub fn new(buffer_size: usize, count: usize, policy: PagePolicy) -> Result<Self, DmaError> {
        if buffer_size == 0 || count == 0 {
            return Err(DmaError::ZeroSize);
        }
        let stride =
            round_up(buffer_size, DMA_POOL_ALIGN).ok_or(DmaError::TooLarge(buffer_size))?;
        let total = stride
            .checked_mul(count)
            .ok_or(DmaError::TooLarge(buffer_size))?;
        let map = Arc::new(Mapping::allocate(total, policy)?);
        // Reverse order so the first allocations come from the start of the mapping.
        let free: Vec<usize> = (0..count).rev().map(|i| i * stride).collect();
        Ok(DmaPool {
            shared: Arc::new(PoolShared {
                map,
                buffer_size,
                count,
                free: Mutex::new(free),
            }),
        })
    }

    /// Takes a buffer, or `None` if all are in use.
    pub fn alloc(&self) -> Option<DmaBuffer> {
        let offset = self
            .shared
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()?;
        Some(DmaBuffer {
            window: Window {
                map: Arc::clone(&self.shared.map),
                offset,
                len: self.shared.buffer_size,
            },
            pool: Some(Arc::clone(&self.shared)),
        })
    }

    /// Size of each buffer (as asked for).
    pub fn buffer_size(&self) -> usize {
        self.shared.buffer_size
    }

    /// Number of buffers the pool was created with.
    pub fn capacity(&self) -> usize {
        self.shared.count
    }

    /// Number of buffers available right now.
    pub fn available(&self) -> usize {
        self.shared
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the pool's mapping is on 2 MiB hugepages.
    pub fn is_hugepage(&self) -> bool {
        self.shared.map.kind == PageKind::Huge2MiB
    }

    /// The pool's whole mapping as (virtual address, length), to map through VFIO once.
    pub fn mapping(&self) -> (u64, usize) {
        (self.shared.map.ptr.as_ptr() as u64, self.shared.map.len)
    }
}
