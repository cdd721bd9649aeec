//! The dirty-page log of vhost-user live migration (`VHOST_USER_SET_LOG_BASE` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While a VM migrates, the frontend (QEMU) copies guest RAM to the destination and re-sends
//! every page written since it was copied. It sees the writes of the guest's CPUs itself; a
//! backend's writes (read data, status bytes, used rings) it learns only from this log: a bitmap
//! in shared memory, one bit per 4 KiB guest page ([`LOG_PAGE_SIZE`]), indexed by guest physical
//! address, that the backend sets with an atomic OR after each write and the frontend reads and
//! clears with atomic exchanges of 64-bit words.
//!
//! The frontend's file is a memfd sealed against shrinking (QEMU seals it); a file that could be
//! shrunk under the mapping is refused, because the next mark would raise SIGBUS and kill the
//! process rather than fail one device.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Guest bytes one 64-bit word of the log covers.
const WORD_SPAN: u64 = LOG_PAGE_SIZE * 64;

/// Why a log was refused.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// A log of zero bytes, a size or offset not a multiple of 8, or offset plus size
    /// overflowing.
    #[error("dirty log of {size} bytes at offset {offset} is not mappable")]
    BadRange {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
    },
    /// The file is shorter than offset plus size.
    #[error("dirty log file of {file_size} bytes, log needs {needed}")]
    FileTooShort {
        /// The file's size.
        file_size: u64,
        /// Offset plus size.
        needed: u64,
    },
    /// The file may be shrunk under the mapping (no `F_SEAL_SHRINK`).
    #[error("dirty log file is not sealed against shrinking")]
    NotSealed,
    /// The log does not cover the guest memory it must log.
    #[error("dirty log of {size} bytes covers guest addresses below {covered:#x}, memory ends at {needed:#x}")]
    TooSmall {
        /// The log's size in bytes.
        size: u64,
        /// First guest address it does not cover.
        covered: u64,
        /// End of the highest guest memory region.
        needed: u64,
    },
    /// A system call failed.
    #[error("dirty log: {call}: {source}")]
    Os {
        /// Which call.
        call: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn os(call: &'static str) -> DirtyLogError {
    DirtyLogError::Os {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A mapped dirty log. Dropping it unmaps it (a replacement log is mapped first, so the device
/// never runs without one while logging is on).
#[derive(Debug)]
pub struct DirtyLog {
    /// Start of the mapping (page aligned; the file is mapped from offset 0).
    map: NonNull<u8>,
    /// Bytes mapped: the log's offset plus its size.
    map_len: usize,
    /// Offset of the first log word in the mapping (a multiple of 8).
    offset: usize,
    /// 64-bit words in the log.
    words: u64,
}

// SAFETY: the mapping is shared memory owned by this value; it is only accessed through atomic
// read-modify-writes, which are sound from any thread.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; no method hands out a reference into the mapping.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps the `size` bytes at `offset` of a frontend's log file (`SET_LOG_BASE`'s
    /// `mmap_offset` and `mmap_size`). The file must be sealed against shrinking and long enough;
    /// offset and size must be multiples of 8 (the log is read as 64-bit words).
    pub fn map(file: OwnedFd, offset: u64, size: u64) -> Result<Self, DirtyLogError> {
        let bad = DirtyLogError::BadRange { offset, size };
        if size == 0 || size % 8 != 0 || offset % 8 != 0 {
            return Err(bad);
        }
        let Some(end) = offset.checked_add(size) else {
            return Err(bad);
        };
        let (Ok(map_len), Ok(offset_usize)) = (usize::try_from(end), usize::try_from(offset))
        else {
            return Err(bad);
        };
        // SAFETY: plain syscall on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(DirtyLogError::NotSealed);
        }
        // SAFETY: `stat` is plain data; fstat fills it and the result is checked.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a valid, writable stat buffer.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut stat) } != 0 {
            return Err(os("fstat"));
        }
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        if file_size < end {
            return Err(DirtyLogError::FileTooShort {
                file_size,
                needed: end,
            });
        }
        // SAFETY: a fresh shared mapping of a file we hold, at a kernel-chosen address, from
        // offset 0 (so `offset` need not be page aligned); the result is checked. The file cannot
        // shrink (sealed) and is long enough, so every byte of the mapping stays backed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let map = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| os("mmap"))?;
        // The mapping holds its own reference to the file: the descriptor can go.
        drop(file);
        Ok(DirtyLog {
            map,
            map_len,
            offset: offset_usize,
            words: size / 8,
        })
    }

    /// The log's size in bytes.
    pub fn size(&self) -> u64 {
        self.words * 8
    }

    /// The first guest physical address the log does not cover (saturating).
    pub fn covered_end(&self) -> u64 {
        self.words.saturating_mul(WORD_SPAN)
    }

    /// Refuses a log that does not cover guest memory ending at `gpa_end` (exclusive).
    pub fn check_covers(&self, gpa_end: u64) -> Result<(), DirtyLogError> {
        if gpa_end > self.covered_end() {
            return Err(DirtyLogError::TooSmall {
                size: self.size(),
                covered: self.covered_end(),
                needed: gpa_end,
            });
        }
        Ok(())
    }

    /// Word `index` of the log.
    #[inline]
    fn word(&self, index: u64) -> Option<&AtomicU64> {
        if index >= self.words {
            return None;
        }
        let byte = usize::try_from(index)
            .ok()?
            .checked_mul(8)?
            .checked_add(self.offset)?;
        // SAFETY: `byte + 8 <= offset + size == map_len` (index < words), inside the mapping;
        // 8-byte aligned (the mapping is page aligned, the offset a multiple of 8). The memory is
        // only accessed through atomics, here and in the frontend.
        Some(unsafe { AtomicU64::from_ptr(self.map.as_ptr().add(byte).cast::<u64>()) })
    }

    /// Marks the guest pages of `[gpa, gpa + len)` dirty (atomic OR, release: the writes that
    /// dirtied them are visible before the mark). Returns false if part of the range lies
    /// outside the log (that part is not marked); `len == 0` marks nothing.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        let mut page = first;
        while page <= last {
            let word_index = page / 64;
            let bit = page % 64;
            // Pages of this word from `page` up to `last` (at most the rest of the word).
            let count = (last - page + 1).min(64 - bit);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            let Some(word) = self.word(word_index) else {
                return false;
            };
            word.fetch_or(mask.to_le(), Ordering::Release);
            page += count;
        }
        gpa.checked_add(len).is_some()
    }

    /// Reads word `index` (for tests and diagnostics; the frontend clears words, not us).
    pub fn load_word(&self, index: u64) -> Option<u64> {
        self.word(index)
            .map(|w| u64::from_le(w.load(Ordering::Acquire)))
    }
}

impl Drop for DirtyLog {
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
    use std::os::fd::FromRawFd;

    fn sealed_memfd(len: u64) -> OwnedFd {
        // SAFETY: NUL-terminated literal name; result checked.
        let raw = unsafe { libc::memfd_create(c"log-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscalls on our descriptor.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            assert_eq!(
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
                ),
                0
            );
        }
        fd
    }

    #[test]
    fn marks_one_bit_per_page_across_words_and_is_seen_by_a_second_mapping() {
        let fd = sealed_memfd(64);
        let other = DirtyLog::map(fd.try_clone().unwrap(), 8, 32).unwrap();
        let log = DirtyLog::map(fd, 8, 32).unwrap();
        assert_eq!(log.covered_end(), 4 * 64 * 4096);
        // One byte in page 3.
        assert!(log.mark(3 * 4096 + 17, 1));
        // Pages 63..=65: the end of word 0 and the start of word 1.
        assert!(log.mark(63 * 4096 + 4095, 4096 + 2));
        // All of word 2.
        assert!(log.mark(128 * 4096, 64 * 4096));
        assert_eq!(other.load_word(0), Some((1 << 3) | (1 << 63)));
        assert_eq!(other.load_word(1), Some(0b11));
        assert_eq!(other.load_word(2), Some(u64::MAX));
        assert_eq!(other.load_word(3), Some(0));
        assert!(log.mark(0, 0));
        // Past the end: refused, nothing written out of bounds.
        assert!(!log.mark(4 * 64 * 4096, 1));
        assert!(!log.mark(u64::MAX - 10, 100));
        assert_eq!(other.load_word(4), None);
    }

    #[test]
    fn refuses_bad_ranges_short_or_unsealed_files_and_small_logs() {
        let fd = sealed_memfd(4096);
        let dup = || fd.try_clone().unwrap();
        assert!(matches!(
            DirtyLog::map(dup(), 0, 0),
            Err(DirtyLogError::BadRange { .. })
        ));
        assert!(matches!(
            DirtyLog::map(dup(), 4, 8),
            Err(DirtyLogError::BadRange { .. })
        ));
        assert!(matches!(
            DirtyLog::map(dup(), 0, 12),
            Err(DirtyLogError::BadRange { .. })
        ));
        assert!(matches!(
            DirtyLog::map(dup(), u64::MAX - 7, 16),
            Err(DirtyLogError::BadRange { .. })
        ));
        assert!(matches!(
            DirtyLog::map(dup(), 4096, 8),
            Err(DirtyLogError::FileTooShort { .. })
        ));
        let log = DirtyLog::map(dup(), 0, 8).unwrap();
        assert!(log.check_covers(64 * 4096).is_ok());
        assert!(matches!(
            log.check_covers(64 * 4096 + 1),
            Err(DirtyLogError::TooSmall { .. })
        ));
        let path = std::env::temp_dir().join(format!("rvhost-log-{}", std::process::id()));
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
            DirtyLog::map(OwnedFd::from(file), 0, 8),
            Err(DirtyLogError::NotSealed)
        ));
    }
}
