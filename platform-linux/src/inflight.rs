//! The shared memory of a vhost-user inflight region (`GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`):
//! a sealed memfd mapped `MAP_SHARED`, read and written only through copies and single atomic
//! stores, never through Rust references (the frontend, another process, maps it too).
//!
//! The layout is `rvhost_core::inflight`'s; this module knows only offsets and widths.
//!
//! A region the backend creates is sealed against shrinking and growing, and a region handed over
//! by a frontend is mapped only if it carries the shrink seal and is long enough: a file shortened
//! under the mapping would make the next access raise SIGBUS and kill the process, not just fail
//! the device.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

use crate::sealed_file::{SealedFileError, SealedFileMapping};

/// Errors creating or mapping an inflight region.
#[derive(Debug, thiserror::Error)]
#[error("inflight region: {0}")]
pub struct InflightMemoryError(#[from] pub SealedFileError);

/// A mapped inflight region.
#[derive(Debug)]
pub struct InflightMemory {
    /// The whole region.
    mapping: SealedFileMapping,
}

impl InflightMemory {
    /// A new zeroed region of `len` bytes in a memfd sealed against resizing.
    pub fn create(len: usize) -> Result<Self, InflightMemoryError> {
        let mapping = SealedFileMapping::create(c"rvhost-inflight", len)?;
        Ok(InflightMemory { mapping })
    }

    /// Maps `len` bytes at `offset` of a region a frontend handed over (`SET_INFLIGHT_FD`).
    pub fn map(file: OwnedFd, offset: u64, len: u64) -> Result<Self, InflightMemoryError> {
        let mapping = SealedFileMapping::map(file, offset, len)?;
        Ok(InflightMemory { mapping })
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Whether the region is empty (never: creating or mapping one refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// The region's file, to send to the frontend.
    pub fn file(&self) -> BorrowedFd<'_> {
        self.mapping.file()
    }

    fn in_range(&self, offset: usize, len: usize) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.mapping.len())
    }

    /// Copies `out.len()` bytes at `offset` out of the region; false (nothing copied) if they
    /// are not all inside it.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if !self.in_range(offset, out.len()) {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above); `out` is a distinct local
        // buffer. The frontend may write concurrently; the copy then holds some mix of old and new
        // bytes, which the caller validates like any other frontend input.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.mapping.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        true
    }

    /// Copies `bytes` into the region at `offset`; false (nothing written) if they do not fit.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> bool {
        if !self.in_range(offset, bytes.len()) {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above) and `bytes` is not in it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.mapping.as_ptr().add(offset),
                bytes.len(),
            );
        }
        std::sync::atomic::fence(Ordering::Release);
        true
    }

    /// Stores a byte at `offset` (release: every earlier store is visible first); false outside.
    #[inline]
    pub fn store_u8(&self, offset: usize, value: u8) -> bool {
        if !self.in_range(offset, 1) {
            return false;
        }
        // SAFETY: in range; an AtomicU8 has no alignment requirement; the memory is only ever
        // accessed through atomics or copies.
        unsafe { AtomicU8::from_ptr(self.mapping.as_ptr().add(offset)) }
            .store(value, Ordering::Release);
        true
    }

    /// Stores a little-endian `u16` at `offset` (release); false outside or unaligned.
    #[inline]
    pub fn store_u16(&self, offset: usize, value: u16) -> bool {
        if !self.in_range(offset, 2) || offset % 2 != 0 {
            return false;
        }
        // SAFETY: in range and 2-byte aligned (the mapping is page aligned); accessed only
        // through atomics or copies.
        unsafe { AtomicU16::from_ptr(self.mapping.as_ptr().add(offset).cast::<u16>()) }
            .store(value.to_le(), Ordering::Release);
        true
    }

    /// Stores a little-endian `u64` at `offset` (release); false outside or unaligned.
    #[inline]
    pub fn store_u64(&self, offset: usize, value: u64) -> bool {
        if !self.in_range(offset, 8) || offset % 8 != 0 {
            return false;
        }
        // SAFETY: in range and 8-byte aligned (the mapping is page aligned); accessed only
        // through atomics or copies.
        unsafe { AtomicU64::from_ptr(self.mapping.as_ptr().add(offset).cast::<u64>()) }
            .store(value.to_le(), Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealed_file::unsealed_file;

    #[test]
    fn a_created_region_is_zeroed_sealed_and_shared_with_a_second_mapping() {
        let region = InflightMemory::create(8192).unwrap();
        let mut bytes = [0xffu8; 16];
        assert!(region.read(8176, &mut bytes));
        assert_eq!(bytes, [0u8; 16]);
        assert!(region.store_u64(8, 0x0102_0304_0506_0708));
        assert!(region.store_u16(16, 0xbeef));
        assert!(region.store_u8(18, 7));
        assert!(!region.store_u16(17, 1), "unaligned");
        assert!(!region.store_u64(8192, 1), "outside");
        assert!(!region.read(8190, &mut bytes), "outside");
        let dup = region.file().try_clone_to_owned().unwrap();
        let other = InflightMemory::map(dup, 0, 8192).unwrap();
        let mut seen = [0u8; 11];
        assert!(other.read(8, &mut seen));
        assert_eq!(seen, [8, 7, 6, 5, 4, 3, 2, 1, 0xef, 0xbe, 7]);
        assert!(other.write(100, &[1, 2, 3]));
        let mut back = [0u8; 3];
        assert!(region.read(100, &mut back));
        assert_eq!(back, [1, 2, 3]);
    }

    #[test]
    fn frontend_files_must_be_sealed_long_enough_and_aligned() {
        let region = InflightMemory::create(4096).unwrap();
        let dup = || region.file().try_clone_to_owned().unwrap();
        assert!(matches!(
            InflightMemory::map(dup(), 0, 8192),
            Err(InflightMemoryError(SealedFileError::FileTooShort { .. }))
        ));
        assert!(matches!(
            InflightMemory::map(dup(), 100, 10),
            Err(InflightMemoryError(SealedFileError::Unaligned(100)))
        ));
        assert!(matches!(
            InflightMemory::map(dup(), u64::MAX, 10),
            Err(InflightMemoryError(SealedFileError::BadRange { .. }))
        ));
        assert!(matches!(
            InflightMemory::map(dup(), 0, 0),
            Err(InflightMemoryError(SealedFileError::BadRange { .. }))
        ));
        // An unsealed file could be shrunk under the mapping.
        assert!(matches!(
            InflightMemory::map(unsealed_file(4096), 0, 4096),
            Err(InflightMemoryError(SealedFileError::NotSealed))
        ));
    }
}
