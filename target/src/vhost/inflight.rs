//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the region a session allocates
//! or maps, and the per-queue log the device shell keeps in it.
//!
//! The layout and the reconnect repair are `rvhost_core::inflight`'s (parsed from a private copy
//! of the shared bytes, so a frontend writing the region meanwhile cannot change what was
//! checked); the mapping is `rvhost_platform_linux::InflightMemory`. What is here is the glue and
//! the per-request bookkeeping, which costs nothing when the feature is not negotiated (the queue
//! has no log) and three or four single stores per request when it is.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rvhost_core::inflight::{self, QueueRegion};
use rvhost_platform_linux::InflightMemory;

/// One session's inflight region: `num_queues` parts for queues of `queue_size` descriptors.
#[derive(Debug)]
pub struct InflightRegion {
    memory: InflightMemory,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new zeroed region (`GET_INFLIGHT_FD`); every queue's part starts uninitialized
    /// (version 0) and is initialized when its queue starts.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, String> {
        if num_queues == 0 || queue_size == 0 {
            return Err(format!(
                "inflight region for {num_queues} queues of {queue_size}"
            ));
        }
        let len = inflight::region_len(num_queues, queue_size)
            .ok_or_else(|| "inflight region size overflows".to_string())?;
        let memory = InflightMemory::create(len).map_err(|e| e.to_string())?;
        Ok(InflightRegion {
            memory,
            num_queues,
            queue_size,
        })
    }

    /// Maps the region a frontend handed over (`SET_INFLIGHT_FD`), after checking that it is
    /// large enough for `num_queues` queues of `queue_size`.
    pub fn map(
        file: OwnedFd,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, String> {
        if num_queues == 0 || queue_size == 0 {
            return Err(format!(
                "inflight region for {num_queues} queues of {queue_size}"
            ));
        }
        let needed = inflight::region_len(num_queues, queue_size)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| "inflight region size overflows".to_string())?;
        if mmap_size < needed {
            return Err(format!(
                "inflight region of {mmap_size} bytes; {num_queues} queues of {queue_size} need \
                 {needed}"
            ));
        }
        let memory =
            InflightMemory::map(file, mmap_offset, mmap_size).map_err(|e| e.to_string())?;
        Ok(InflightRegion {
            memory,
            num_queues,
            queue_size,
        })
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Whether the region is empty (never).
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// Queues the region has parts for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue part.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The region's memfd, to send to the frontend.
    pub fn file(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memory.file()
    }

    /// Queue `index`'s part, if the region has one.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let range = inflight::queue_range(index, self.queue_size)?;
        (range.end <= self.memory.len()).then(|| InflightQueue {
            region: Arc::clone(self),
            base: range.start,
        })
    }
}

/// One queue's part of an inflight region, handed to the reactor with the queue's setup.
#[derive(Debug, Clone)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
}

/// A running queue's inflight log: marks heads when popped, links them into the batch when their
/// used element is written, and clears them once the batch's `used.idx` is published.
#[derive(Debug)]
pub(super) struct InflightLog {
    part: InflightQueue,
    /// The counter the next popped head gets.
    counter: u64,
    last_batch_head: u16,
    /// Heads linked since the last publish.
    batch: Vec<u16>,
}

impl InflightLog {
    /// Starts the log of a queue of `queue_size` whose used ring holds `ring_used_idx`: checks
    /// and repairs its part of the region and returns the heads to resubmit, in the order they
    /// were popped.
    pub(super) fn start(
        part: InflightQueue,
        queue_size: u16,
        ring_used_idx: u16,
        features: u64,
    ) -> Result<(Self, Vec<u16>), String> {
        if queue_size != part.region.queue_size {
            return Err(format!(
                "inflight region is for queues of {}, this one has {queue_size}",
                part.region.queue_size
            ));
        }
        let len = inflight::queue_region_len(queue_size);
        let mut copy = vec![0u8; len];
        if !part.region.memory.read(part.base, &mut copy) {
            return Err("inflight queue part outside the region".into());
        }
        let mut view =
            QueueRegion::new_checked(&mut copy[..], queue_size).map_err(|e| e.to_string())?;
        let recovery = view
            .recover(ring_used_idx, features)
            .map_err(|e| e.to_string())?;
        let mut order = vec![0u16; usize::from(queue_size)];
        let resubmit = view
            .resubmit_order(&mut order)
            .map_err(|e| e.to_string())?
            .to_vec();
        let last_batch_head = view.last_batch_head();
        // The descriptor states first, then the header with used_idx: a crash in between leaves
        // used_idx behind the ring, and the next start clears the batch again.
        let header = inflight::QUEUE_HEADER_LEN;
        let (head_bytes, states) = copy.split_at(header);
        let written = part.region.memory.write(part.base + header, states)
            && part.region.memory.write(part.base, head_bytes);
        if !written {
            return Err("inflight queue part outside the region".into());
        }
        if recovery.repaired > 0 || recovery.pending > 0 {
            tracing::info!(
                repaired = recovery.repaired,
                resubmit = recovery.pending,
                "inflight log recovered"
            );
        }
        Ok((
            InflightLog {
                part,
                counter: recovery.next_counter,
                last_batch_head,
                batch: Vec::with_capacity(usize::from(queue_size)),
            },
            resubmit,
        ))
    }

    #[inline]
    fn memory(&self) -> &InflightMemory {
        &self.part.region.memory
    }

    /// Head `head` was popped: its counter, then its flag.
    #[inline]
    pub(super) fn mark(&mut self, head: u16) {
        let base = self.part.base;
        let counter = self.counter;
        self.counter = counter.wrapping_add(1);
        let mem = self.memory();
        mem.store_u64(base + inflight::counter_offset(head), counter);
        mem.store_u8(base + inflight::inflight_offset(head), 1);
    }

    /// Head `head`'s used element was written: it joins the batch list.
    #[inline]
    pub(super) fn link(&mut self, head: u16) {
        let base = self.part.base;
        let previous = self.last_batch_head;
        let mem = self.memory();
        mem.store_u16(base + inflight::next_offset(head), previous);
        mem.store_u16(base + inflight::LAST_BATCH_HEAD_OFFSET, head);
        self.last_batch_head = head;
        self.batch.push(head);
    }

    /// The batch was published with `used.idx = used_idx`: its heads are no longer inflight.
    #[inline]
    pub(super) fn published(&mut self, used_idx: u16) {
        let base = self.part.base;
        let mem = &self.part.region.memory;
        for &head in &self.batch {
            mem.store_u8(base + inflight::inflight_offset(head), 0);
        }
        self.batch.clear();
        mem.store_u16(base + inflight::USED_IDX_OFFSET, used_idx);
    }
}
