//! I/O queue pairs: one per reactor, no locks on the data path. Commands are written to the
//! submission ring as they come and the doorbell is rung once per batch; completions are polled.
//!
//! Error handling lives here too, because only the owner of a queue pair may touch it: commands
//! that outlive the I/O timeout are aborted, then the controller is reset; after a reset (by any
//! thread) the queue pair fails what it had in flight with [`IoError::Reset`] and creates its
//! queues again; a removed or failed controller fails everything with [`IoError::ControllerFailed`]
//! instead of hanging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cmd::{DsmRange, Status, SubmissionEntry};
use crate::controller::{queue_memory, ControllerState, NvmeError, Shared};
use crate::identify::NamespaceInfo;
use rvhost_platform_linux::dma::{DmaBuffer, PagePolicy};

use crate::prp::{build_data_pointer, total_length, DataPointerError, DmaSegment};
use crate::queue::{memory_layout, Expired, QueuePair};
use crate::regs::{self, ALL_ONES};

/// Most ranges one DATASET MANAGEMENT command carries (one 4 KiB page of 16-byte ranges).
pub const MAX_DSM_RANGES: usize = 256;
/// Most blocks one READ/WRITE/WRITE ZEROES command covers (16-bit 0-based NLB).
pub const MAX_BLOCKS_PER_COMMAND: u32 = 65536;

/// How often the health of the controller and the age of commands are checked while I/O is in
/// flight.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Why an I/O failed or was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The controller completed the command with an error status.
    #[error("command failed: {0}")]
    Status(Status),
    /// The command was in flight when the controller was reset; it may or may not have been
    /// executed, and may be retried.
    #[error("command aborted by a controller reset")]
    Reset,
    /// The controller is removed or failed.
    #[error("controller failed or removed")]
    ControllerFailed,
    /// Every command slot is in use; retry after polling.
    #[error("queue full")]
    QueueFull,
    /// The buffer cannot be described to the controller.
    #[error(transparent)]
    DataPointer(#[from] DataPointerError),
    /// No such namespace.
    #[error("no namespace {0}")]
    NoNamespace(u32),
    /// The range lies beyond the namespace, or the block count is 0 or too large for a command.
    #[error("blocks {lba}+{blocks} outside namespace {nsid} ({size} blocks) or over one command")]
    OutOfRange {
        /// Namespace.
        nsid: u32,
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u64,
        /// Namespace size in blocks.
        size: u64,
    },
    /// The buffer length does not match the block count.
    #[error("buffer is {actual} bytes, the command transfers {expected}")]
    Length {
        /// Bytes the command transfers.
        expected: u64,
        /// Bytes in the segments.
        actual: u64,
    },
    /// The transfer exceeds the controller's MDTS (or the driver's one-list-page limit).
    #[error("transfer of {bytes} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Requested bytes.
        bytes: u64,
        /// The maximum.
        max: u64,
    },
    /// The controller does not implement the command.
    #[error("the controller does not support {0}")]
    Unsupported(&'static str),
}

/// Checks that `[lba, lba + blocks)` is non-empty and inside `ns`.
pub(crate) fn check_block_range(ns: &NamespaceInfo, lba: u64, blocks: u64) -> Result<(), IoError> {
    let in_range = blocks > 0
        && lba
            .checked_add(blocks)
            .is_some_and(|end| end <= ns.size_blocks);
    if !in_range {
        return Err(IoError::OutOfRange {
            nsid: ns.nsid,
            lba,
            blocks,
            size: ns.size_blocks,
        });
    }
    Ok(())
}

/// Checks that `blocks` fits the 16-bit NLB field of one command.
fn check_command_blocks(ns: &NamespaceInfo, lba: u64, blocks: u32) -> Result<(), IoError> {
    if blocks > MAX_BLOCKS_PER_COMMAND {
        let blocks = u64::from(blocks);
        return Err(IoError::OutOfRange {
            nsid: ns.nsid,
            lba,
            blocks,
            size: ns.size_blocks,
        });
    }
    Ok(())
}

/// Checks a READ or WRITE before anything reaches the controller: the range, the per-command
/// block limit, that the buffer holds exactly `blocks` blocks, and the transfer limit.
pub(crate) fn check_transfer(
    ns: &NamespaceInfo,
    lba: u64,
    blocks: u32,
    segments: &[DmaSegment],
    max_transfer_bytes: u64,
) -> Result<(), IoError> {
    check_block_range(ns, lba, u64::from(blocks))?;
    check_command_blocks(ns, lba, blocks)?;
    let expected = u64::from(blocks) * u64::from(ns.block_size());
    let actual = u64::from(total_length(segments)?);
    if expected != actual {
        return Err(IoError::Length { expected, actual });
    }
    if expected > max_transfer_bytes {
        return Err(IoError::TooLarge {
            bytes: expected,
            max: max_transfer_bytes,
        });
    }
    Ok(())
}

impl From<NvmeError> for IoError {
    fn from(e: NvmeError) -> Self {
        match e {
            NvmeError::AdminStatus { status, .. } => IoError::Status(status),
            _ => IoError::ControllerFailed,
        }
    }
}

/// One submission/completion queue pair on a controller, owned by one thread.
pub struct IoQueuePair {
    // `qp` points into `memory`: dropped first.
    qp: QueuePair,
    memory: DmaBuffer,
    shared: Arc<Shared>,
    generation: u64,
    /// The queues must be created (again) on the controller before the next submission.
    needs_create: bool,
    /// Completions to report at the next poll for commands that will never complete on the ring.
    synthetic: Vec<(u64, IoError)>,
    last_health_check: Instant,
    /// Fault injection: submissions are queued but the doorbell is not rung.
    doorbell_held: bool,
}

impl core::fmt::Debug for IoQueuePair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IoQueuePair")
            .field("qid", &self.qp.qid())
            .field("entries", &self.qp.entries())
            .field("in_flight", &self.qp.in_flight())
            .finish_non_exhaustive()
    }
}

impl IoQueuePair {
    pub(crate) fn create(shared: Arc<Shared>, entries: u16) -> Result<Self, NvmeError> {
        if shared.state() == ControllerState::Failed {
            return Err(NvmeError::Failed);
        }
        let entries = entries.clamp(2, shared.cap.max_queue_entries.min(4096) as u16);
        let qid = shared.allocate_qid()?;
        let built = (|| {
            let (sq, cq, lists) = memory_layout(entries);
            let memory = DmaBuffer::allocate_for_device(
                sq + cq + lists,
                PagePolicy::PreferHuge,
                shared.mapper(),
            )?;
            let mem = queue_memory(&memory, shared.bar(), &shared.cap, qid, entries)?;
            // SAFETY: `mem` lies in `memory`, which this queue pair owns and drops after `qp`; the
            // doorbells were bounds-checked against BAR0, which `shared` keeps mapped.
            let qp = unsafe { QueuePair::new(qid, entries, mem) };
            Ok::<_, NvmeError>((qp, memory))
        })();
        let (qp, memory) = match built {
            Ok(parts) => parts,
            Err(e) => {
                shared.release_qid(qid);
                return Err(e);
            }
        };
        let generation = shared.generation();
        if let Err(e) = shared.create_io_queues(&qp) {
            shared.release_qid(qid);
            return Err(e);
        }
        tracing::debug!(qid, entries, "I/O queue pair created");
        Ok(IoQueuePair {
            qp,
            memory,
            shared,
            generation,
            needs_create: false,
            synthetic: Vec::new(),
            last_health_check: Instant::now(),
            doorbell_held: false,
        })
    }

    /// The queue identifier.
    pub fn qid(&self) -> u16 {
        self.qp.qid()
    }

    /// Commands submitted whose completion has not been polled yet.
    pub fn in_flight(&self) -> usize {
        self.qp.in_flight() + self.synthetic.len()
    }

    /// Bytes of driver DMA memory this queue pair uses (whole pages, as mapped).
    pub fn memory_len(&self) -> usize {
        self.memory.mapping().1
    }

    fn namespace(&self, nsid: u32) -> Result<&NamespaceInfo, IoError> {
        self.shared
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or(IoError::NoNamespace(nsid))
    }

    fn check_range(&self, nsid: u32, lba: u64, blocks: u64) -> Result<&NamespaceInfo, IoError> {
        let ns = self.namespace(nsid)?;
        check_block_range(ns, lba, blocks)?;
        Ok(ns)
    }

    /// Brings the queue pair in line with the controller: fails everything if the controller
    /// failed; after a reset, fails what was in flight and re-creates the queues.
    fn sync_with_controller(&mut self) -> Result<(), IoError> {
        match self.shared.state() {
            ControllerState::Failed => {
                self.fail_in_flight(IoError::ControllerFailed);
                return Err(IoError::ControllerFailed);
            }
            ControllerState::Resetting => return Err(IoError::Reset),
            ControllerState::Running => {}
        }
        let generation = self.shared.generation();
        if generation != self.generation {
            self.fail_in_flight(IoError::Reset);
            self.qp.reset();
            self.generation = generation;
            self.needs_create = true;
        }
        if self.needs_create {
            match self.shared.create_io_queues(&self.qp) {
                Ok(()) => {
                    self.needs_create = false;
                    tracing::info!(qid = self.qp.qid(), "I/O queues re-created after reset");
                }
                Err(e) => {
                    tracing::warn!(qid = self.qp.qid(), %e, "re-creating I/O queues failed");
                    return Err(IoError::Reset);
                }
            }
        }
        Ok(())
    }

    fn fail_in_flight(&mut self, error: IoError) {
        let synthetic = &mut self.synthetic;
        self.qp
            .drain_in_flight(|tag, _| synthetic.push((tag, error.clone())));
    }

    fn submit(&mut self, cid: u16, entry: SubmissionEntry, tag: u64) -> Result<(), IoError> {
        match self.qp.submit(cid, entry, tag, Instant::now()) {
            Ok(()) => Ok(()),
            Err(_) => {
                self.qp.release(cid);
                Err(IoError::QueueFull)
            }
        }
    }

    fn submit_transfer(
        &mut self,
        entry: SubmissionEntry,
        segments: &[DmaSegment],
        tag: u64,
    ) -> Result<(), IoError> {
        let cid = self.qp.reserve().map_err(|_| IoError::QueueFull)?;
        let list_iova = self.qp.list_iova(cid);
        let qp = &mut self.qp;
        let dptr = build_data_pointer(segments, self.shared.sgl, list_iova, |offset, value| {
            qp.write_list(cid, offset, value)
        });
        let dptr = match dptr {
            Ok(d) => d,
            Err(e) => {
                self.qp.release(cid);
                return Err(e.into());
            }
        };
        let mut entry = entry;
        entry.set_data_pointer(dptr);
        self.submit(cid, entry, tag)
    }

    fn rw(
        &mut self,
        write: bool,
        nsid: u32,
        lba: u64,
        blocks: u32,
        segments: &[DmaSegment],
        tag: u64,
    ) -> Result<(), IoError> {
        self.sync_with_controller()?;
        let ns = self.namespace(nsid)?;
        check_transfer(ns, lba, blocks, segments, self.shared.max_transfer_bytes)?;
        let entry = if write {
            SubmissionEntry::write(nsid, lba, blocks)
        } else {
            SubmissionEntry::read(nsid, lba, blocks)
        };
        self.submit_transfer(entry, segments, tag)
    }

    /// Queues a READ of `blocks` blocks at `lba` into `segments` (memory mapped for DMA: driver
    /// memory from [`crate::Controller::allocate_dma`] or caller memory mapped with
    /// [`crate::Controller::map_dma`]). The doorbell is rung by [`IoQueuePair::ring`] or the next
    /// poll.
    pub fn read(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        segments: &[DmaSegment],
        tag: u64,
    ) -> Result<(), IoError> {
        self.rw(false, nsid, lba, blocks, segments, tag)
    }

    /// Queues a WRITE of `blocks` blocks at `lba` from `segments`; see [`IoQueuePair::read`].
    pub fn write(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        segments: &[DmaSegment],
        tag: u64,
    ) -> Result<(), IoError> {
        self.rw(true, nsid, lba, blocks, segments, tag)
    }

    /// Queues a FLUSH of the namespace's volatile write cache. Without a volatile write cache the
    /// command is still sent (the controller completes it at once), so callers need not special-case.
    pub fn flush(&mut self, nsid: u32, tag: u64) -> Result<(), IoError> {
        self.sync_with_controller()?;
        self.namespace(nsid)?;
        let cid = self.qp.reserve().map_err(|_| IoError::QueueFull)?;
        self.submit(cid, SubmissionEntry::flush(nsid), tag)
    }

    /// Queues a WRITE ZEROES of `blocks` blocks at `lba`; `deallocate` allows the controller to
    /// deallocate them instead (they still read back as zeroes).
    pub fn write_zeroes(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        deallocate: bool,
        tag: u64,
    ) -> Result<(), IoError> {
        self.sync_with_controller()?;
        if !self.shared.info.supports_write_zeroes() {
            return Err(IoError::Unsupported("WRITE ZEROES"));
        }
        let ns = self.namespace(nsid)?;
        check_block_range(ns, lba, u64::from(blocks))?;
        check_command_blocks(ns, lba, blocks)?;
        let cid = self.qp.reserve().map_err(|_| IoError::QueueFull)?;
        self.submit(
            cid,
            SubmissionEntry::write_zeroes(nsid, lba, blocks, deallocate),
            tag,
        )
    }

    /// Queues a DATASET MANAGEMENT deallocate (TRIM/UNMAP) of `ranges` (`(lba, blocks)`, at most
    /// 256, each at most 2^32 - 1 blocks). Deallocated blocks read back as whatever the namespace
    /// reports for deallocated blocks (zeroes on most controllers, but not guaranteed).
    pub fn deallocate(
        &mut self,
        nsid: u32,
        ranges: &[(u64, u32)],
        tag: u64,
    ) -> Result<(), IoError> {
        self.sync_with_controller()?;
        if !self.shared.info.supports_dsm() {
            return Err(IoError::Unsupported("DATASET MANAGEMENT"));
        }
        if ranges.is_empty() || ranges.len() > MAX_DSM_RANGES {
            return Err(IoError::Unsupported(
                "an empty or over-long deallocate range list",
            ));
        }
        for &(lba, blocks) in ranges {
            self.check_range(nsid, lba, u64::from(blocks))?;
        }
        let cid = self.qp.reserve().map_err(|_| IoError::QueueFull)?;
        // The range list goes into the slot's list page (4096 bytes = 256 ranges).
        for (i, &(slba, blocks)) in ranges.iter().enumerate() {
            let bytes = DsmRange {
                attributes: 0,
                blocks,
                slba,
            }
            .to_bytes();
            let mut lo = [0u8; 8];
            let mut hi = [0u8; 8];
            lo.copy_from_slice(&bytes[0..8]);
            hi.copy_from_slice(&bytes[8..16]);
            self.qp.write_list(cid, i * 16, u64::from_le_bytes(lo));
            self.qp.write_list(cid, i * 16 + 8, u64::from_le_bytes(hi));
        }
        let list = self.qp.list_iova(cid);
        self.submit(
            cid,
            SubmissionEntry::deallocate(nsid, ranges.len() as u16, list),
            tag,
        )
    }

    /// Rings the submission doorbell for everything queued since the last ring.
    pub fn ring(&mut self) {
        // After a reset the queue no longer exists on the controller under this ring state: the
        // next poll or submission re-creates it and fails what was queued.
        if self.in_sync() && !self.doorbell_held {
            self.qp.ring_submissions();
        }
    }

    /// Fault injection for tests: while `held`, commands are queued but the doorbell is not
    /// rung, so to the driver's timeout logic the controller looks stalled (commands time out,
    /// are aborted, and finally reset the controller).
    pub fn hold_doorbell(&mut self, held: bool) {
        self.doorbell_held = held;
    }

    fn in_sync(&self) -> bool {
        self.shared.state() == ControllerState::Running
            && self.shared.generation() == self.generation
            && !self.needs_create
    }

    /// Rings pending submissions, then reports up to `max` finished commands as `done(tag,
    /// result)`. Also aborts commands that exceeded the timeout, resets the controller when an
    /// abort did not help, and detects a removed controller. Returns the number reported.
    pub fn poll(&mut self, max: usize, mut done: impl FnMut(u64, Result<(), IoError>)) -> usize {
        let in_sync = self.in_sync();
        if in_sync && !self.doorbell_held {
            self.qp.ring_submissions();
        }
        // Entries already on the ring were posted before any reset and are genuine completions;
        // only what is left in flight afterwards is failed by `sync_with_controller`.
        let mut reported = 0;
        self.qp.poll(max, |c| {
            let status = c.entry.status();
            let result = if status.is_success() {
                Ok(())
            } else {
                Err(IoError::Status(status))
            };
            reported += 1;
            done(c.tag, result);
        });
        if !in_sync {
            let _ = self.sync_with_controller();
        }
        if self.qp.in_flight() > 0 {
            let now = Instant::now();
            if now.saturating_duration_since(self.last_health_check) >= HEALTH_CHECK_INTERVAL {
                self.last_health_check = now;
                self.check_health(now);
            }
        }
        if !self.synthetic.is_empty() && reported < max {
            let take = (max - reported).min(self.synthetic.len());
            for (tag, error) in self.synthetic.drain(..take) {
                done(tag, Err(error));
            }
            reported += take;
        }
        reported
    }

    fn check_health(&mut self, now: Instant) {
        let csts = self.shared.bar().read32(regs::CSTS);
        if csts == ALL_ONES {
            self.shared.mark_failed(&NvmeError::Removed);
        } else if csts & regs::CSTS_CFS != 0 {
            tracing::error!(qid = self.qp.qid(), "controller fatal status; resetting");
            let _ = self.shared.reset(self.generation);
        }
        if self.sync_with_controller().is_err() {
            return;
        }
        let timeout = self.shared.io_timeout();
        for expired in self.qp.expired(now, timeout) {
            match expired {
                Expired::NeedsAbort { cid } => {
                    let opcode = self.qp.command(cid).map(|c| c.opcode);
                    tracing::warn!(qid = self.qp.qid(), cid, ?opcode, "I/O timed out; aborting");
                    self.qp.mark_abort_sent(cid, now);
                    if let Err(e) = self.shared.abort(self.qp.qid(), cid) {
                        tracing::warn!(%e, "ABORT failed; the command will time out into a reset");
                    }
                }
                Expired::NeedsReset { cid } => {
                    tracing::error!(
                        qid = self.qp.qid(),
                        cid,
                        "I/O still stuck after ABORT; resetting controller"
                    );
                    if let Err(e) = self.shared.reset(self.generation) {
                        tracing::error!(%e, "controller reset failed");
                    }
                    let _ = self.sync_with_controller();
                    return;
                }
            }
        }
    }
}

impl Drop for IoQueuePair {
    fn drop(&mut self) {
        let live = self.shared.state() == ControllerState::Running
            && self.shared.generation() == self.generation
            && !self.needs_create;
        if live {
            if let Err(e) = self.shared.delete_io_queues(self.qp.qid()) {
                tracing::warn!(qid = self.qp.qid(), %e, "deleting I/O queues failed");
            }
        }
        self.shared.release_qid(self.qp.qid());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::LbaFormat;

    fn namespace(blocks: u64, shift: u8) -> NamespaceInfo {
        let format = LbaFormat {
            metadata_size: 0,
            data_size_shift: shift,
            relative_performance: 0,
        };
        NamespaceInfo {
            nsid: 1,
            size_blocks: blocks,
            capacity_blocks: blocks,
            utilization_blocks: 0,
            format,
            format_index: 0,
            formats: vec![format],
        }
    }

    fn seg(len: u32) -> [DmaSegment; 1] {
        [DmaSegment {
            iova: 0x10_0000,
            len,
        }]
    }

    #[test]
    fn block_ranges() {
        let ns = namespace(1000, 9);
        assert_eq!(check_block_range(&ns, 0, 1000), Ok(()));
        assert_eq!(check_block_range(&ns, 999, 1), Ok(()));
        for (lba, blocks) in [
            (999, 2),
            (1000, 1),
            (0, 0),
            (u64::MAX, 2),
            (u64::MAX - 1, 1),
        ] {
            assert_eq!(
                check_block_range(&ns, lba, blocks),
                Err(IoError::OutOfRange {
                    nsid: 1,
                    lba,
                    blocks,
                    size: 1000
                }),
                "lba {lba} blocks {blocks}"
            );
        }
    }

    #[test]
    fn transfers() {
        let ns = namespace(1 << 30, 12);
        let max = 512 * 1024;
        assert_eq!(check_transfer(&ns, 0, 2, &seg(8192), max), Ok(()));
        assert_eq!(
            check_transfer(&ns, 0, 2, &seg(4096), max),
            Err(IoError::Length {
                expected: 8192,
                actual: 4096
            })
        );
        assert_eq!(
            check_transfer(&ns, 0, 256, &seg(1 << 20), max),
            Err(IoError::TooLarge {
                bytes: 1 << 20,
                max
            })
        );
        assert!(matches!(
            check_transfer(&ns, 0, 65537, &seg(1 << 20), u64::MAX),
            Err(IoError::OutOfRange { blocks: 65537, .. })
        ));
        assert_eq!(
            check_transfer(&ns, 0, 1, &[], max),
            Err(IoError::DataPointer(DataPointerError::Empty))
        );
        // The largest command (65536 blocks) against an oversized buffer.
        assert!(matches!(
            check_transfer(&ns, 0, 65536, &seg(u32::MAX), u64::MAX),
            Err(IoError::Length { .. })
        ));
    }
}
