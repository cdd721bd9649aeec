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

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

/// Errors creating or mapping an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightMemoryError {
    /// A region of zero bytes, or offset plus length overflowing.
    #[error("inflight region of {len} bytes at offset {offset} is not mappable")]
    BadRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// The offset is not a multiple of the page size.
    #[error("inflight region offset {0:#x} is not page aligned")]
    Unaligned(u64),
    /// The file is shorter than offset plus length.
    #[error("inflight file of {size} bytes, region needs {needed}")]
    FileTooShort {
        /// The file's size.
        size: u64,
        /// Offset plus length.
        needed: u64,
    },
    /// The file may be shrunk under the mapping (no `F_SEAL_SHRINK`).
    #[error("inflight file is not sealed against shrinking")]
    NotSealed,
    /// A system call failed.
    #[error("inflight region: {call}: {source}")]
    Os {
        /// Which call.
        call: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn os(call: &'static str) -> InflightMemoryError {
    InflightMemoryError::Os {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A mapped inflight region.
#[derive(Debug)]
pub struct InflightMemory {
    file: OwnedFd,
    /// Start of the mapping (page aligned).
    map: NonNull<u8>,
    /// Bytes mapped.
    map_len: usize,
    /// Bytes of the region (the whole mapping).
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// copies or atomics, which are sound from any thread.
unsafe impl Send for InflightMemory {}
// SAFETY: as above; no method hands out a reference into the mapping.
unsafe impl Sync for InflightMemory {}

impl InflightMemory {
    /// A new zeroed region of `len` bytes in a memfd sealed against resizing.
    pub fn create(len: usize) -> Result<Self, InflightMemoryError> {
        let len64 = u64::try_from(len).map_err(|_| InflightMemoryError::BadRange {
            offset: 0,
            len: u64::MAX,
        })?;
        if len == 0 {
            return Err(InflightMemoryError::BadRange { offset: 0, len: 0 });
        }
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"rvhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len64).map_err(|_| InflightMemoryError::BadRange {
            offset: 0,
            len: len64,
        })?;
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::ftruncate(file.as_raw_fd(), size) } != 0 {
            return Err(os("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("F_ADD_SEALS"));
        }
        Self::map_file(file, 0, len)
    }

    /// Maps `len` bytes at `offset` of a region a frontend handed over (`SET_INFLIGHT_FD`).
    pub fn map(file: OwnedFd, offset: u64, len: u64) -> Result<Self, InflightMemoryError> {
        let bad = InflightMemoryError::BadRange { offset, len };
        let end = offset.checked_add(len).ok_or(bad)?;
        let len_usize =
            usize::try_from(len).map_err(|_| InflightMemoryError::BadRange { offset, len })?;
        if len == 0 {
            return Err(InflightMemoryError::BadRange { offset, len });
        }
        // SAFETY: sysconf takes no pointers.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if offset % page.max(1) != 0 {
            return Err(InflightMemoryError::Unaligned(offset));
        }
        // SAFETY: plain syscall on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightMemoryError::NotSealed);
        }
        // SAFETY: `stat` is plain data; fstat fills it and the result is checked.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a valid, writable stat buffer.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut stat) } != 0 {
            return Err(os("fstat"));
        }
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        if size < end {
            return Err(InflightMemoryError::FileTooShort { size, needed: end });
        }
        Self::map_file(file, offset, len_usize)
    }

    fn map_file(file: OwnedFd, offset: u64, len: usize) -> Result<Self, InflightMemoryError> {
        let off = libc::off_t::try_from(offset).map_err(|_| InflightMemoryError::BadRange {
            offset,
            len: len as u64,
        })?;
        // SAFETY: a fresh shared mapping of a file we own, at a kernel-chosen address; the result
        // is checked. The file cannot shrink (sealed), so every byte of the mapping stays backed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let map = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| os("mmap"))?;
        Ok(InflightMemory {
            file,
            map,
            map_len: len,
            len,
        })
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: creating or mapping one refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's file, to send to the frontend.
    pub fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn in_range(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
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
                self.map.as_ptr().add(offset),
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
                self.map.as_ptr().add(offset),
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
        unsafe { AtomicU8::from_ptr(self.map.as_ptr().add(offset)) }
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
        unsafe { AtomicU16::from_ptr(self.map.as_ptr().add(offset).cast::<u16>()) }
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
        unsafe { AtomicU64::from_ptr(self.map.as_ptr().add(offset).cast::<u64>()) }
            .store(value.to_le(), Ordering::Release);
        true
    }
}

impl Drop for InflightMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by this value and nothing refers into it any more.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Err(InflightMemoryError::FileTooShort { .. })
        ));
        assert!(matches!(
            InflightMemory::map(dup(), 100, 10),
            Err(InflightMemoryError::Unaligned(100))
        ));
        assert!(matches!(
            InflightMemory::map(dup(), u64::MAX, 10),
            Err(InflightMemoryError::BadRange { .. })
        ));
        assert!(matches!(
            InflightMemory::map(dup(), 0, 0),
            Err(InflightMemoryError::BadRange { .. })
        ));
        // An unsealed file (a plain tmpfs file) could be shrunk under the mapping.
        let path = std::env::temp_dir().join(format!("rvhost-inflight-{}", std::process::id()));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(4096).unwrap();
        assert!(matches!(
            InflightMemory::map(OwnedFd::from(file), 0, 4096),
            Err(InflightMemoryError::NotSealed)
        ));
    }
}
