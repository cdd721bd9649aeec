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

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sealed_file::{SealedFileError, SealedFileMapping};

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
    /// The file could not be mapped (not sealed against shrinking, too short, a failed call).
    #[error("dirty log: {0}")]
    Map(#[from] SealedFileError),
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
}

/// A mapped dirty log. Dropping it unmaps it (a replacement log is mapped first, so the device
/// never runs without one while logging is on).
#[derive(Debug)]
pub struct DirtyLog {
    /// The file from offset 0 to the log's end (so the log's offset need not be page aligned).
    mapping: SealedFileMapping,
    /// Offset of the first log word in the mapping (a multiple of 8).
    offset: usize,
    /// 64-bit words in the log.
    words: u64,
}

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
        let Ok(offset_usize) = usize::try_from(offset) else {
            return Err(bad);
        };
        let mapping = SealedFileMapping::map(file, 0, end)?;
        Ok(DirtyLog {
            mapping,
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
        // SAFETY: `byte + 8 <= offset + size`, the mapping's length (index < words), so inside
        // the mapping, which lives as long as `self`; 8-byte aligned (the mapping is page
        // aligned, the offset a multiple of 8). The memory is only accessed through atomics,
        // here and in the frontend.
        Some(unsafe { AtomicU64::from_ptr(self.mapping.as_ptr().add(byte).cast::<u64>()) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealed_file::unsealed_file;

    /// A memfd sealed against resizing, as QEMU hands over.
    fn sealed_memfd(len: usize) -> OwnedFd {
        let created = SealedFileMapping::create(c"log-test", len).unwrap();
        created.file().try_clone_to_owned().unwrap()
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
            Err(DirtyLogError::Map(SealedFileError::FileTooShort { .. }))
        ));
        let log = DirtyLog::map(dup(), 0, 8).unwrap();
        assert!(log.check_covers(64 * 4096).is_ok());
        assert!(matches!(
            log.check_covers(64 * 4096 + 1),
            Err(DirtyLogError::TooSmall { .. })
        ));
        assert!(matches!(
            DirtyLog::map(unsealed_file(4096), 0, 8),
            Err(DirtyLogError::Map(SealedFileError::NotSealed))
        ));
    }
}
