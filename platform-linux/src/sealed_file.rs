//! A `MAP_SHARED` mapping of a memfd shared with a vhost-user frontend: the inflight region
//! ([`crate::inflight`]) and the migration's dirty log ([`crate::dirty_log`]).
//!
//! Another process maps the same file, so the memory is read and written only through copies and
//! atomics, never through Rust references. A file handed over by a frontend is mapped only if it
//! carries `F_SEAL_SHRINK` and is long enough: a file shortened under the mapping would make the
//! next access raise SIGBUS and kill the process, not just fail the device. A file the backend
//! creates is sealed against shrinking and growing.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Why a file was not mapped.
#[derive(Debug, thiserror::Error)]
pub enum SealedFileError {
    /// Zero bytes, or offset plus length overflowing.
    #[error("{len} bytes at offset {offset} are not mappable")]
    BadRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// The offset is not a multiple of the page size.
    #[error("offset {0:#x} is not page aligned")]
    Unaligned(u64),
    /// The file is shorter than offset plus length.
    #[error("file of {size} bytes, mapping needs {needed}")]
    FileTooShort {
        /// The file's size.
        size: u64,
        /// Offset plus length.
        needed: u64,
    },
    /// The file may be shrunk under the mapping (no `F_SEAL_SHRINK`).
    #[error("file is not sealed against shrinking")]
    NotSealed,
    /// A system call failed.
    #[error("{call}: {source}")]
    Os {
        /// Which call.
        call: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn os(call: &'static str) -> SealedFileError {
    SealedFileError::Os {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A shared mapping of (part of) a sealed file; dropping it unmaps it and closes the file.
#[derive(Debug)]
pub struct SealedFileMapping {
    file: OwnedFd,
    /// Start of the mapping (page aligned).
    map: NonNull<u8>,
    /// Bytes mapped.
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; its users access it only
// through copies and atomics, which are sound from any thread.
unsafe impl Send for SealedFileMapping {}
// SAFETY: as above; no method hands out a reference into the mapping.
unsafe impl Sync for SealedFileMapping {}

impl SealedFileMapping {
    /// A new zeroed memfd named `name` of `len` bytes, sealed against shrinking, growing and
    /// further sealing, mapped whole.
    pub fn create(name: &CStr, len: usize) -> Result<Self, SealedFileError> {
        let bad = || SealedFileError::BadRange {
            offset: 0,
            len: u64::try_from(len).unwrap_or(u64::MAX),
        };
        let size = libc::off_t::try_from(len).map_err(|_| bad())?;
        if len == 0 {
            return Err(bad());
        }
        // SAFETY: `name` is NUL-terminated; the result is checked.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::ftruncate(file.as_raw_fd(), size) } != 0 {
            return Err(os("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("F_ADD_SEALS"));
        }
        Self::map_checked(file, 0, len)
    }

    /// Maps the `len` bytes at `offset` (a multiple of the page size) of a file a frontend handed
    /// over: it must be sealed against shrinking and hold at least `offset + len` bytes.
    pub fn map(file: OwnedFd, offset: u64, len: u64) -> Result<Self, SealedFileError> {
        let bad = SealedFileError::BadRange { offset, len };
        let Some(end) = offset.checked_add(len) else {
            return Err(bad);
        };
        let Ok(len_usize) = usize::try_from(len) else {
            return Err(bad);
        };
        if len == 0 {
            return Err(bad);
        }
        // SAFETY: sysconf takes no pointers.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if offset % page.max(1) != 0 {
            return Err(SealedFileError::Unaligned(offset));
        }
        // SAFETY: plain syscall on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(SealedFileError::NotSealed);
        }
        // SAFETY: `stat` is plain data; fstat fills it and the result is checked.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a valid, writable stat buffer.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut stat) } != 0 {
            return Err(os("fstat"));
        }
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        if size < end {
            return Err(SealedFileError::FileTooShort { size, needed: end });
        }
        Self::map_checked(file, offset, len_usize)
    }

    /// Maps `len` bytes at `offset` of `file`, which cannot shrink and is long enough.
    fn map_checked(file: OwnedFd, offset: u64, len: usize) -> Result<Self, SealedFileError> {
        let off = libc::off_t::try_from(offset).map_err(|_| SealedFileError::BadRange {
            offset,
            len: len as u64,
        })?;
        // SAFETY: a fresh shared mapping of a file we own, at a kernel-chosen address; the result
        // is checked. The file cannot shrink (sealed) and is long enough, so every byte of the
        // mapping stays backed.
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
        Ok(SealedFileMapping { file, map, len })
    }

    /// Start of the mapping (page aligned). Valid for [`SealedFileMapping::len`] bytes while
    /// `self` lives; shared with another process, so accessed only through copies and atomics.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Bytes mapped.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never: creating or mapping refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped file (to send to the frontend).
    pub fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for SealedFileMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by this value and nothing refers into it any more.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.len);
        }
    }
}

/// Test fixture: a file of `len` bytes that carries no seal (a plain, already unlinked file in
/// the temporary directory), which could be shrunk under a mapping.
#[cfg(test)]
pub(crate) fn unsealed_file(len: u64) -> OwnedFd {
    let path = std::env::temp_dir().join(format!(
        "rvhost-unsealed-{}-{len}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(len).unwrap();
    OwnedFd::from(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_created_file_is_zeroed_sealed_and_shared_with_a_second_mapping() {
        let created = SealedFileMapping::create(c"sealed-test", 8192).unwrap();
        assert_eq!(created.len(), 8192);
        // SAFETY: plain syscall on a descriptor `created` owns.
        let seals = unsafe { libc::fcntl(created.file().as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        let dup = created.file().try_clone_to_owned().unwrap();
        // SAFETY: sysconf takes no pointers.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let second = SealedFileMapping::map(dup, page, 8192 - page).unwrap();
        // SAFETY: both offsets are inside their mappings and 8-byte aligned; the memory is only
        // accessed through atomics here.
        let (a, b) = unsafe {
            (
                AtomicU64::from_ptr(created.as_ptr().add(page as usize + 8).cast()),
                AtomicU64::from_ptr(second.as_ptr().add(8).cast()),
            )
        };
        assert_eq!(b.load(Ordering::Acquire), 0);
        a.store(0x0102_0304, Ordering::Release);
        assert_eq!(b.load(Ordering::Acquire), 0x0102_0304);
    }

    #[test]
    fn handed_over_files_must_be_sealed_long_enough_and_aligned() {
        let created = SealedFileMapping::create(c"sealed-test", 4096).unwrap();
        let dup = || created.file().try_clone_to_owned().unwrap();
        assert!(matches!(
            SealedFileMapping::map(dup(), 0, 8192),
            Err(SealedFileError::FileTooShort {
                size: 4096,
                needed: 8192
            })
        ));
        assert!(matches!(
            SealedFileMapping::map(dup(), 100, 10),
            Err(SealedFileError::Unaligned(100))
        ));
        assert!(matches!(
            SealedFileMapping::map(dup(), u64::MAX, 10),
            Err(SealedFileError::BadRange { .. })
        ));
        assert!(matches!(
            SealedFileMapping::map(dup(), 0, 0),
            Err(SealedFileError::BadRange { .. })
        ));
        assert!(matches!(
            SealedFileMapping::create(c"sealed-test", 0),
            Err(SealedFileError::BadRange { .. })
        ));
        assert!(matches!(
            SealedFileMapping::map(unsealed_file(4096), 0, 4096),
            Err(SealedFileError::NotSealed)
        ));
    }
}
