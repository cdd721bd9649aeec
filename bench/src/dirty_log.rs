//! `--dirty-log`: the initiator acts as a migrating frontend, so a run measures what the
//! target's dirty logging costs.
//!
//! vhost-user's "Migration" section: the frontend shares a log with the backend (a memfd passed
//! with `SET_LOG_BASE` under `VHOST_USER_PROTOCOL_F_LOG_SHMFD`), one bit per 4 KiB page of guest
//! memory indexed by guest physical address, in 64-bit words; it turns logging on with
//! `VHOST_F_LOG_ALL` in `SET_FEATURES` and names where each used ring is logged with
//! `SET_VRING_ADDR` (`VHOST_VRING_F_LOG`, `log_guest_addr`). From then on the backend sets the
//! bit of every page it writes. QEMU does this under running queues when a migration starts; so
//! does this initiator, after the queues are enabled and before the first request.
//!
//! At the end of the run the marked pages are counted (a real frontend would have read and
//! cleared them): a sanity check that the target marked what it wrote, and nothing while the log
//! was only handed over (`idle`, the state a cancelled migration leaves behind).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::VhostUserDirtyLogRegion;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::shm::QueueLayout;
use crate::PerfError;

/// Guest bytes one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 4096;
/// Guest bytes one 64-bit word of the log covers.
const WORD_SPAN: u64 = LOG_PAGE_SIZE * 64;

/// What `--dirty-log` asks of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyLogMode {
    /// Migration running: `SET_LOG_BASE`, `SET_FEATURES` with `VHOST_F_LOG_ALL`, and
    /// `SET_VRING_ADDR` with `VHOST_VRING_F_LOG` for every vring.
    On,
    /// Only `SET_LOG_BASE`; `VHOST_F_LOG_ALL` stays off (as after a cancelled migration), so
    /// nothing may be marked.
    Idle,
}

/// What the log held at the end of a run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DirtyLogReport {
    /// What was asked of the target.
    pub mode: DirtyLogMode,
    /// Size of the log in bytes.
    pub log_bytes: u64,
    /// Pages whose bit was set.
    pub pages_marked: u64,
    /// Of those, pages of the request queues' data buffers.
    pub data_pages_marked: u64,
    /// Pages of the request queues' data buffers (a read marks the pages of its buffer).
    pub data_pages: u64,
}

/// The frontend's side of the log: a sealed memfd, mapped here to count the marks.
#[derive(Debug)]
pub struct DirtyLogMemory {
    file: File,
    region: MmapRegion,
    words: u64,
}

impl DirtyLogMemory {
    /// A zeroed log covering guest addresses `0..memory_len`, sealed against shrinking and
    /// growing as QEMU seals its own (the target refuses a log that could shrink under it).
    pub fn for_memory(memory_len: u64) -> Result<Self, PerfError> {
        use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
        let words = memory_len.div_ceil(WORD_SPAN).max(1);
        let bytes = words
            .checked_mul(8)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| PerfError::Memory(format!("dirty log for {memory_len} bytes")))?;
        let fd = memfd_create(
            "rvhost-perf-log",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| PerfError::Memory(format!("dirty log memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(bytes as u64)
            .map_err(|e| PerfError::Memory(format!("sizing the dirty log to {bytes}: {e}")))?;
        fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| PerfError::Memory(format!("sealing the dirty log: {e}")))?;
        let dup = file
            .try_clone()
            .map_err(|e| PerfError::Memory(format!("dup dirty log memfd: {e}")))?;
        let region = MmapRegion::build(
            Some(FileOffset::new(dup, 0)),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| PerfError::Memory(format!("mmap dirty log of {bytes} bytes: {e}")))?;
        Ok(DirtyLogMemory {
            file,
            region,
            words,
        })
    }

    /// The log as `SET_LOG_BASE` passes it: the whole memfd from offset 0.
    pub fn region_info(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.words * 8,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Word `index` of the log, read as the frontend reads it (atomically).
    fn word(&self, index: u64) -> Result<u64, PerfError> {
        let offset = usize::try_from(index * 8).unwrap_or(usize::MAX);
        let word = self
            .region
            .get_atomic_ref::<AtomicU64>(offset)
            .map_err(|source| PerfError::Access { offset, source })?;
        Ok(u64::from_le(word.load(Ordering::Acquire)))
    }

    /// Whether guest page `page` is marked.
    fn page_marked(&self, page: u64) -> Result<bool, PerfError> {
        if page / 64 >= self.words {
            return Ok(false);
        }
        Ok(self.word(page / 64)? & (1 << (page % 64)) != 0)
    }

    /// Counts the marks: all of them, and those on the data buffers of `request_queues`
    /// (`slots` requests each).
    pub fn report(
        &self,
        mode: DirtyLogMode,
        request_queues: &[QueueLayout],
        slots: usize,
    ) -> Result<DirtyLogReport, PerfError> {
        let mut pages_marked = 0u64;
        for index in 0..self.words {
            pages_marked += u64::from(self.word(index)?.count_ones());
        }
        let mut data_pages = 0u64;
        let mut data_pages_marked = 0u64;
        for l in request_queues {
            // Data buffers are page aligned and a whole number of pages apart.
            let first = l.data as u64 / LOG_PAGE_SIZE;
            let count = (slots * l.data_stride) as u64 / LOG_PAGE_SIZE;
            for page in first..first + count {
                data_pages += 1;
                if self.page_marked(page)? {
                    data_pages_marked += 1;
                }
            }
        }
        Ok(DirtyLogReport {
            mode,
            log_bytes: self.words * 8,
            pages_marked,
            data_pages_marked,
            data_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::layout;

    #[test]
    fn log_has_one_bit_per_page_in_whole_words_and_counts_marks() {
        // 2 MiB of memory: 512 pages, 8 words.
        let log = DirtyLogMemory::for_memory(2 << 20).unwrap();
        assert_eq!(log.region_info().mmap_size, 64);
        assert_eq!(DirtyLogMemory::for_memory(1).unwrap().words, 1);
        assert_eq!(DirtyLogMemory::for_memory(WORD_SPAN + 1).unwrap().words, 2);
        // The target needs a file that cannot shrink.
        let seals = rustix::fs::fcntl_get_seals(&log.file).unwrap();
        assert!(seals.contains(rustix::fs::SealFlags::SHRINK));

        let (queues, _) = layout(&[8], 2, 4096).unwrap();
        let l = queues[0];
        let empty = log.report(DirtyLogMode::Idle, &queues, 2).unwrap();
        assert_eq!((empty.pages_marked, empty.data_pages_marked), (0, 0));
        assert_eq!(empty.data_pages, 2);
        // Mark, as the target would: the used ring's page and slot 1's data page.
        let mark = |page: u64| {
            let word = log
                .region
                .get_atomic_ref::<AtomicU64>((page / 64 * 8) as usize)
                .unwrap();
            word.fetch_or((1u64 << (page % 64)).to_le(), Ordering::Release);
        };
        mark(l.used as u64 / LOG_PAGE_SIZE);
        mark(l.data_at(1) as u64 / LOG_PAGE_SIZE);
        let r = log.report(DirtyLogMode::On, &queues, 2).unwrap();
        assert_eq!(r.pages_marked, 2);
        assert_eq!(r.data_pages_marked, 1);
        assert_eq!(r.log_bytes, 64);
    }
}
