//! Copying to and from memory by host virtual address, for code that is not allowed `unsafe`.
//!
//! A bdev is handed buffers as host virtual addresses (already validated by the guest memory table,
//! or owned by the target itself). [`HostMemory`] lets it copy through such an address without
//! `unsafe`: every implementor first checks that the whole range lies inside memory it keeps mapped
//! for as long as it lives, then does one raw copy. No Rust reference into that memory is ever
//! created, because other threads (a guest vCPU, another reactor, a device) may change it at any
//! time.

use std::marker::PhantomData;

use rvhost_core::mem::MemError;

/// Memory reachable by host virtual address, with every access range-checked.
///
/// Object-safe, so a bdev can take `&dyn HostMemory` and serve guest buffers (a
/// [`crate::MemoryTable`]) and internal ones ([`crate::SharedDmaMemory`]) alike. Errors report the *host* address range in [`MemError::Unmapped`].
pub trait HostMemory: Send + Sync {
    /// Copies `src` to `[host_addr, host_addr + src.len())`.
    fn copy_to_host(&self, host_addr: u64, src: &[u8]) -> Result<(), MemError>;

    /// Copies `[host_addr, host_addr + dst.len())` into `dst`.
    fn copy_from_host(&self, host_addr: u64, dst: &mut [u8]) -> Result<(), MemError>;

    /// Sets the `len` bytes at `host_addr` to `byte`.
    fn fill_host(&self, host_addr: u64, len: usize, byte: u8) -> Result<(), MemError>;

    /// Validates `[host_addr, host_addr + len)` and proves it with a [`HostRange`], which lets
    /// [`copy_between`] copy memory-to-memory without a bounce buffer.
    ///
    /// Only this crate can construct a [`HostRange`], so implementors outside it keep the default,
    /// which makes [`copy_between`] fall back to copying through a stack buffer.
    #[doc(hidden)]
    fn checked_range(
        &self,
        _host_addr: u64,
        _len: usize,
    ) -> Option<Result<HostRange<'_>, MemError>> {
        None
    }
}

impl<M: HostMemory + ?Sized> HostMemory for &M {
    fn copy_to_host(&self, host_addr: u64, src: &[u8]) -> Result<(), MemError> {
        (**self).copy_to_host(host_addr, src)
    }
    fn copy_from_host(&self, host_addr: u64, dst: &mut [u8]) -> Result<(), MemError> {
        (**self).copy_from_host(host_addr, dst)
    }
    fn fill_host(&self, host_addr: u64, len: usize, byte: u8) -> Result<(), MemError> {
        (**self).fill_host(host_addr, len, byte)
    }
    fn checked_range(&self, host_addr: u64, len: usize) -> Option<Result<HostRange<'_>, MemError>> {
        (**self).checked_range(host_addr, len)
    }
}

impl<M: HostMemory + ?Sized> HostMemory for std::sync::Arc<M> {
    fn copy_to_host(&self, host_addr: u64, src: &[u8]) -> Result<(), MemError> {
        (**self).copy_to_host(host_addr, src)
    }
    fn copy_from_host(&self, host_addr: u64, dst: &mut [u8]) -> Result<(), MemError> {
        (**self).copy_from_host(host_addr, dst)
    }
    fn fill_host(&self, host_addr: u64, len: usize, byte: u8) -> Result<(), MemError> {
        (**self).fill_host(host_addr, len, byte)
    }
    fn checked_range(&self, host_addr: u64, len: usize) -> Option<Result<HostRange<'_>, MemError>> {
        (**self).checked_range(host_addr, len)
    }
}

/// Proof that `[ptr, ptr + len)` lies inside a live mapping owned by the [`HostMemory`] that
/// produced it, valid for as long as that owner is borrowed (`'a`).
///
/// Only this crate can make one. The lifetime matters: an implementor outside the crate could
/// otherwise forward the range of a temporary table it drops before the copy, leaving a dangling
/// pointer; with `'a` tied to the borrow of the producing object, the borrow checker forbids that.
///
/// Forwarding the range of memory the implementor owns compiles:
///
/// ```
/// use rvhost_platform_linux::host::HostRange;
/// use rvhost_platform_linux::{HostMemory, MemError, PagePolicy, SharedDmaMemory};
///
/// struct Wrapper(SharedDmaMemory);
///
/// impl HostMemory for Wrapper {
///     fn copy_to_host(&self, a: u64, s: &[u8]) -> Result<(), MemError> { self.0.copy_to_host(a, s) }
///     fn copy_from_host(&self, a: u64, d: &mut [u8]) -> Result<(), MemError> { self.0.copy_from_host(a, d) }
///     fn fill_host(&self, a: u64, l: usize, b: u8) -> Result<(), MemError> { self.0.fill_host(a, l, b) }
///     fn checked_range(&self, a: u64, l: usize) -> Option<Result<HostRange<'_>, MemError>> {
///         self.0.checked_range(a, l)
///     }
/// }
/// # let w = Wrapper(SharedDmaMemory::allocate_with(4096, PagePolicy::SmallOnly).unwrap());
/// # assert!(w.checked_range(w.0.va(), 4096).unwrap().is_ok());
/// ```
///
/// Forwarding the range of a temporary does not:
///
/// ```compile_fail,E0515
/// use rvhost_platform_linux::host::HostRange;
/// use rvhost_platform_linux::{HostMemory, MemError, PagePolicy, SharedDmaMemory};
///
/// struct Dangling;
///
/// impl HostMemory for Dangling {
///     fn copy_to_host(&self, _: u64, _: &[u8]) -> Result<(), MemError> { Ok(()) }
///     fn copy_from_host(&self, _: u64, _: &mut [u8]) -> Result<(), MemError> { Ok(()) }
///     fn fill_host(&self, _: u64, _: usize, _: u8) -> Result<(), MemError> { Ok(()) }
///     fn checked_range(&self, a: u64, l: usize) -> Option<Result<HostRange<'_>, MemError>> {
///         let temporary = SharedDmaMemory::allocate_with(4096, PagePolicy::SmallOnly).ok()?;
///         temporary.checked_range(a, l)
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct HostRange<'a> {
    ptr: *mut u8,
    len: usize,
    owner: PhantomData<&'a ()>,
}

impl HostRange<'_> {
    /// Callers must have checked that `[ptr, ptr + len)` is inside a mapping that stays valid for
    /// the borrow of the object returning this range.
    pub(crate) fn new(ptr: *mut u8, len: usize) -> Self {
        HostRange {
            ptr,
            len,
            owner: PhantomData,
        }
    }
}

/// The unmapped-range error for a host range, saturating the length for the report.
pub(crate) fn unmapped(host_addr: u64, len: usize) -> MemError {
    MemError::Unmapped {
        addr: host_addr,
        len: u64::try_from(len).unwrap_or(u64::MAX),
    }
}

/// Copies `len` bytes from `src_addr` in `src` to `dst_addr` in `dst`, checking both ranges first.
///
/// When both sides are this crate's own memory types this is a single `memmove`; otherwise the data
/// goes through a small stack buffer. With this crate's types nothing is written unless both whole
/// ranges are valid; with other implementors both ends are probed first, but a range that straddles
/// a hole in the middle is only detected chunk by chunk, so `dst` may be partly written when the
/// error is returned. Overlapping ranges are handled like `memmove` on the fast path.
pub fn copy_between(
    dst: &dyn HostMemory,
    dst_addr: u64,
    src: &dyn HostMemory,
    src_addr: u64,
    len: usize,
) -> Result<(), MemError> {
    match (
        dst.checked_range(dst_addr, len),
        src.checked_range(src_addr, len),
    ) {
        (Some(d), Some(s)) => {
            let (d, s) = (d?, s?);
            debug_assert!(d.len == len && s.len == len);
            // SAFETY: both ranges were validated by their owners (this crate's types, the only ones
            // able to build a `HostRange`) to lie inside mappings that stay alive while `dst` and
            // `src` are borrowed (the ranges' lifetimes are tied to those borrows), i.e. for this
            // whole call. `ptr::copy` tolerates overlap. No Rust
            // reference to either range exists; concurrent writers (guest vCPUs) can only make the
            // copied bytes unspecified, as with any shared-memory device.
            unsafe { std::ptr::copy(s.ptr.cast_const(), d.ptr, len) };
            Ok(())
        }
        _ => {
            // Validate both whole ranges up front so a failure leaves `dst` untouched.
            validate(dst, dst_addr, len)?;
            validate(src, src_addr, len)?;
            let mut chunk = [0u8; 4096];
            let mut done = 0usize;
            while done < len {
                let n = chunk.len().min(len - done);
                let off = u64::try_from(done).map_err(|_| MemError::Overflow)?;
                let piece = chunk.get_mut(..n).ok_or(MemError::Overflow)?;
                src.copy_from_host(src_addr.checked_add(off).ok_or(MemError::Overflow)?, piece)?;
                dst.copy_to_host(dst_addr.checked_add(off).ok_or(MemError::Overflow)?, piece)?;
                done += n;
            }
            Ok(())
        }
    }
}

/// Checks a range of a `HostMemory` before anything is written: exactly when the implementor offers
/// the fast-path check, otherwise by reading its first and last byte.
fn validate(mem: &dyn HostMemory, addr: u64, len: usize) -> Result<(), MemError> {
    if let Some(r) = mem.checked_range(addr, len) {
        return r.map(|_| ());
    }
    let end = addr
        .checked_add(u64::try_from(len).map_err(|_| MemError::Overflow)?)
        .ok_or(MemError::Overflow)?;
    if len > 0 {
        let mut probe = [0u8; 1];
        mem.copy_from_host(addr, &mut probe)?;
        mem.copy_from_host(end - 1, &mut probe)?;
    }
    Ok(())
}
