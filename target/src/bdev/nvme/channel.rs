//! The data path of an NVMe bdev: one reactor's channel, owning one I/O queue pair of the
//! controller, its bounce slots and the bookkeeping of bdev I/Os split over several commands
//! (see the module documentation of [`super`] for zero copy and bouncing).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rvhost_nvme::io::{MAX_BLOCKS_PER_COMMAND, MAX_DSM_RANGES};
use rvhost_nvme::prp::{build_data_pointer, SglSupport};
use rvhost_nvme::{ControllerState, DmaBuffer, DmaSegment, IoError, IoQueuePair};

use super::{memory_key, DmaRegistration, NvmeBdev};
use crate::bdev::common::{byte_range, check_iovs};
use crate::bdev::fanout::Fanout;
use crate::bdev::{
    report_completions, Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoMemory, IoStatus, IoVec,
};

/// Submission/completion entries of each channel's I/O queue pair.
const QUEUE_ENTRIES: u16 = 128;
/// Bounce slots per channel: I/O commands carrying data that can be in flight at once.
const BOUNCE_SLOTS: usize = 32;
/// Completions reaped per `IoQueuePair::poll` call.
const POLL_BATCH: usize = 64;
/// Blocks one DSM range may cover (32-bit count).
const MAX_DSM_RANGE_BLOCKS: u64 = u32::MAX as u64;
/// Tag bits that carry the command's bounce slot (plus one; 0 for none).
const SLOT_TAG_BITS: u32 = 16;

/// One bdev I/O, possibly split over several commands.
struct ChannelIo {
    tag: u64,
    /// Its commands still outstanding and how they ended (the first failure wins).
    fanout: Fanout,
    /// Bounce slots held until the I/O completes.
    slots: Vec<usize>,
    /// A zero-copy I/O keeps the mapping of its buffers (and so the memory) until it completes.
    registration: Option<Arc<DmaRegistration>>,
    /// A bounced READ copies its slots out to these buffers when it completes.
    copy_out: Option<CopyOut>,
}

/// Where a bounced READ's data goes once the device has written the slots.
struct CopyOut {
    mem: IoMemory,
    iovs: Vec<IoVec>,
    len: u64,
}

/// One reactor's view of an [`NvmeBdev`].
pub(super) struct NvmeChannel {
    // `qp` and `bounce` are dropped before `bdev`, which keeps the controller open.
    qp: IoQueuePair,
    bounce: DmaBuffer,
    bdev: Arc<NvmeBdev>,
    slot_len: usize,
    free_slots: Vec<usize>,
    scratch: Vec<u8>,
    /// Bytes one zero-copy command moves at most.
    zero_copy_len: usize,
    /// How the controller takes scattered buffers.
    sgl: SglSupport,
    /// Reused for the segments of one command (no allocation per I/O).
    segments: Vec<DmaSegment>,
    /// The registration of the memory the last I/O came with: the registry is consulted only
    /// when the memory object changes.
    dma: Option<Arc<DmaRegistration>>,
    /// Reused by `reap` (no allocation per poll).
    reaped: Vec<(usize, bool)>,
    failure_log: FailureLog,
    ios: Vec<Option<ChannelIo>>,
    free_ios: Vec<usize>,
    completions: VecDeque<(u64, IoStatus)>,
}

/// Logs the first of a run of command failures and how many there were once commands succeed
/// again: a failed controller fails every I/O, and a warning per I/O would flood the log.
#[derive(Debug, Default)]
struct FailureLog {
    /// Failures since the last success (the first was logged).
    run: u64,
}

impl FailureLog {
    fn failed(&mut self, bdev: &str, what: &str, error: &IoError) {
        if self.run == 0 {
            tracing::warn!(%bdev, %error, "{what} (further failures are counted, not logged)");
        }
        self.run = self.run.saturating_add(1);
    }

    fn succeeded(&mut self, bdev: &str) {
        if self.run > 1 {
            tracing::info!(%bdev, failures = self.run, "NVMe commands succeed again");
        }
        self.run = 0;
    }
}

fn command_tag(io: usize, slot: Option<usize>) -> u64 {
    let slot = slot.map_or(0, |s| s as u64 + 1);
    ((io as u64) << SLOT_TAG_BITS) | slot
}

fn io_of_tag(tag: u64) -> usize {
    (tag >> SLOT_TAG_BITS) as usize
}

/// Calls `each(host_addr, offset_in_piece, len)` for the parts of `iovs` that cover bytes
/// `[start, start + len)` of the transfer.
fn for_each_span(
    iovs: &[IoVec],
    start: u64,
    len: u64,
    mut each: impl FnMut(u64, usize, usize) -> Result<(), BdevError>,
) -> Result<(), BdevError> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| BdevError::InvalidParams("I/O range overflows".into()))?;
    let mut iov_start = 0u64;
    for iov in iovs {
        let iov_end = iov_start.saturating_add(u64::from(iov.len));
        let from = start.max(iov_start);
        let to = end.min(iov_end);
        if from < to {
            let addr = iov
                .addr
                .checked_add(from - iov_start)
                .ok_or_else(|| BdevError::InvalidParams("I/O buffer address overflows".into()))?;
            // Both are below the command length, which is a `usize`.
            each(addr, (from - start) as usize, (to - from) as usize)?;
        }
        if iov_end >= end {
            break;
        }
        iov_start = iov_end;
    }
    Ok(())
}

/// Fills `segments` with the buffers of bytes `[start, start + len)` of the transfer, as the
/// device sees them (IOVA = host VA).
fn command_segments(
    iovs: &[IoVec],
    start: u64,
    len: u64,
    segments: &mut Vec<DmaSegment>,
) -> Result<(), BdevError> {
    segments.clear();
    for_each_span(iovs, start, len, |addr, _, n| {
        let len = u32::try_from(n).map_err(|_| BdevError::Backend("segment too long".into()))?;
        segments.push(DmaSegment { iova: addr, len });
        Ok(())
    })
}

/// Whether the controller can take the buffers of a `len`-byte transfer as they are, cut into
/// commands of `command_len` bytes: each command's buffer list must be describable by PRPs (or
/// SGLs if offered). A split inside a buffer keeps a valid PRP shape: the earlier command ends
/// there (its last entry may end anywhere) and the later one starts there (its first entry may
/// start anywhere).
fn describable(
    iovs: &[IoVec],
    len: u64,
    command_len: u64,
    sgl: SglSupport,
    segments: &mut Vec<DmaSegment>,
) -> bool {
    let mut done = 0u64;
    while done < len {
        let piece = (len - done).min(command_len);
        if command_segments(iovs, done, piece, segments).is_err() {
            return false;
        }
        // A dry run into no list page: the same checks the driver makes when it builds the
        // command.
        if build_data_pointer(segments, sgl, 0, |_, _| {}).is_err() {
            return false;
        }
        done += piece;
    }
    true
}

impl NvmeChannel {
    /// Opens a channel on `bdev`: one I/O queue pair of its controller and the bounce slots.
    pub(super) fn open(bdev: Arc<NvmeBdev>) -> Result<Self, BdevError> {
        if bdev.refuses_io() {
            return Err(BdevError::Removed(bdev.name.clone()));
        }
        let controller = &bdev.ctrl.controller;
        let qp = controller
            .create_io_queue_pair(QUEUE_ENTRIES)
            .map_err(|e| {
                BdevError::Backend(format!(
                    "{}: cannot create an I/O queue pair: {e}",
                    bdev.name
                ))
            })?;
        let slot = usize::try_from(bdev.slot_bytes)
            .map_err(|_| BdevError::Backend("slot size overflow".into()))?;
        let bounce = controller
            .allocate_dma(slot.saturating_mul(BOUNCE_SLOTS))
            .map_err(|e| {
                BdevError::Backend(format!("{}: cannot allocate DMA memory: {e}", bdev.name))
            })?;
        let zero_copy_len = usize::try_from(bdev.zero_copy_bytes)
            .map_err(|_| BdevError::Backend("command size overflow".into()))?;
        let sgl = controller.sgl_support();
        Ok(NvmeChannel {
            scratch: vec![0; slot],
            slot_len: slot,
            zero_copy_len,
            sgl,
            segments: Vec::new(),
            dma: None,
            reaped: Vec::new(),
            failure_log: FailureLog::default(),
            free_slots: (0..BOUNCE_SLOTS).rev().collect(),
            bounce,
            qp,
            bdev,
            ios: Vec::new(),
            free_ios: Vec::new(),
            completions: VecDeque::new(),
        })
    }

    fn new_io(&mut self, tag: u64) -> usize {
        let io = ChannelIo {
            tag,
            fanout: Fanout::new(),
            slots: Vec::new(),
            registration: None,
            copy_out: None,
        };
        match self.free_ios.pop() {
            Some(i) => {
                if let Some(entry) = self.ios.get_mut(i) {
                    *entry = Some(io);
                }
                i
            }
            None => {
                self.ios.push(Some(io));
                self.ios.len() - 1
            }
        }
    }

    /// Ends I/O `index`: copies a bounced READ out, releases its slots and mapping, and records
    /// its completion.
    fn finish(&mut self, index: usize) {
        let Some(mut io) = self.ios.get_mut(index).and_then(Option::take) else {
            return;
        };
        if let Some(out) = io.copy_out.take() {
            if io.fanout.status() == IoStatus::Success {
                if let Err(e) = self.copy_out(&io.slots, &out) {
                    tracing::warn!(bdev = %self.bdev.name, %e, "copying read data to the guest failed");
                    io.fanout.fail(IoStatus::Failed);
                }
            }
        }
        self.free_slots.extend(io.slots);
        self.free_ios.push(index);
        let status = io.fanout.status();
        if status != IoStatus::Success {
            self.bdev
                .ctrl
                .stats
                .failed_ios
                .fetch_add(1, Ordering::Relaxed);
        }
        self.completions.push_back((io.tag, status));
    }

    /// Reaps completions from the queue pair into the I/Os they belong to; returns how many
    /// commands finished. `hold` is an I/O still being submitted, which must not end yet.
    fn reap(&mut self, hold: Option<usize>) -> usize {
        let mut finished = std::mem::take(&mut self.reaped);
        finished.clear();
        let bdev = &self.bdev.name;
        let failures = &mut self.failure_log;
        let n = self.qp.poll(POLL_BATCH, |tag, result| {
            match &result {
                Err(e) => failures.failed(bdev, "NVMe command failed", e),
                Ok(()) => failures.succeeded(bdev),
            }
            finished.push((io_of_tag(tag), result.is_ok()));
        });
        for &(index, ok) in &finished {
            let Some(Some(io)) = self.ios.get_mut(index) else {
                tracing::error!(index, "NVMe completion for an unknown I/O");
                continue;
            };
            let status = if ok {
                IoStatus::Success
            } else {
                IoStatus::Failed
            };
            let last = io.fanout.completed(status).is_some();
            if last && hold != Some(index) {
                self.finish(index);
            }
        }
        self.reaped = finished;
        n
    }

    fn io_outstanding(&self, index: usize) -> u32 {
        match self.ios.get(index) {
            Some(Some(io)) => io.fanout.outstanding(),
            _ => 0,
        }
    }

    fn mark_failed(&mut self, index: usize) {
        if let Some(Some(io)) = self.ios.get_mut(index) {
            io.fanout.fail(IoStatus::Failed);
        }
    }

    /// When a wait in `submit` gives up; `None` for never (a timeout too large to add).
    fn deadline(&self) -> Option<Instant> {
        // The driver aborts after one timeout and resets after another; allow a third for the
        // reset itself before giving up on the wait.
        Instant::now().checked_add(self.bdev.ctrl.io_timeout.saturating_mul(3))
    }

    /// Polls until `ready` holds or the controller cannot make progress; `false` on failure.
    fn wait_until(&mut self, hold: Option<usize>, ready: impl Fn(&Self) -> bool) -> bool {
        let deadline = self.deadline();
        loop {
            if ready(self) {
                return true;
            }
            let reaped = self.reap(hold);
            if reaped == 0 {
                if self.bdev.ctrl.controller.state() == ControllerState::Failed
                    && self.qp.in_flight() == 0
                {
                    return ready(self);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    tracing::error!(bdev = %self.bdev.name, "NVMe I/O wait timed out");
                    return false;
                }
                std::hint::spin_loop();
            }
        }
    }

    fn take_slot(&mut self, hold: Option<usize>) -> Option<usize> {
        if self.free_slots.is_empty() && !self.wait_until(hold, |ch| !ch.free_slots.is_empty()) {
            return None;
        }
        self.free_slots.pop()
    }

    /// Issues one command with `issue`, retrying while the queue is full.
    fn issue(
        &mut self,
        index: usize,
        slot: Option<usize>,
        mut issue: impl FnMut(&mut IoQueuePair, u64) -> Result<(), IoError>,
    ) -> bool {
        let tag = command_tag(index, slot);
        let deadline = self.deadline();
        loop {
            match issue(&mut self.qp, tag) {
                Ok(()) => {
                    if let Some(Some(io)) = self.ios.get_mut(index) {
                        io.fanout.issued(Ok::<(), IoError>(()));
                    }
                    self.bdev
                        .ctrl
                        .stats
                        .commands
                        .fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(IoError::QueueFull) if deadline.is_none_or(|d| Instant::now() < d) => {
                    self.reap(Some(index));
                }
                Err(e) => {
                    self.failure_log
                        .failed(&self.bdev.name, "NVMe command not submitted", &e);
                    // The I/O fails; the caller issues no further commands for it.
                    if let Some(Some(io)) = self.ios.get_mut(index) {
                        io.fanout.issued(Err(e));
                    }
                    return false;
                }
            }
        }
    }

    /// The registration of `mem`, from the channel's memory of the last one when it matches.
    fn registration_for(&mut self, mem: &IoMemory) -> Arc<DmaRegistration> {
        match &self.dma {
            Some(reg) if reg.key == memory_key(mem) => Arc::clone(reg),
            _ => {
                let reg = self.bdev.ctrl.dma_registration(mem);
                self.dma = Some(Arc::clone(&reg));
                reg
            }
        }
    }

    /// Whether `io` can go to the device without copying; counts the reason when not.
    fn zero_copy_possible(&mut self, io: &BdevIo<'_>, len: u64) -> Option<Arc<DmaRegistration>> {
        let reg = self.registration_for(io.mem);
        let stats = &self.bdev.ctrl.stats;
        if !reg.covers(io.iovs) {
            stats.bounced_unmapped_ios.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !describable(
            io.iovs,
            len,
            self.zero_copy_len as u64,
            self.sgl,
            &mut self.segments,
        ) {
            stats.bounced_unaligned_ios.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(reg)
    }

    /// Submits the commands of a zero-copy READ or WRITE, pointing at the I/O's own buffers;
    /// `false` once one could not be issued (commands already issued still complete).
    fn submit_zero_copy(
        &mut self,
        index: usize,
        io: &BdevIo<'_>,
        len: u64,
        registration: Arc<DmaRegistration>,
    ) -> Result<bool, BdevError> {
        if let Some(Some(entry)) = self.ios.get_mut(index) {
            entry.registration = Some(registration);
        }
        let nsid = self.bdev.nsid;
        let block_size = u64::from(self.bdev.block_size);
        let write = io.kind == IoKind::Write;
        let mut segments = std::mem::take(&mut self.segments);
        let mut done = 0u64;
        let mut issued_all = true;
        while done < len {
            let piece = (len - done).min(self.zero_copy_len as u64);
            command_segments(io.iovs, done, piece, &mut segments)?;
            let lba = io.offset_blocks + done / block_size;
            let blocks = (piece / block_size) as u32;
            let issued = self.issue(index, None, |qp, tag| {
                if write {
                    qp.write(nsid, lba, blocks, &segments, tag)
                } else {
                    qp.read(nsid, lba, blocks, &segments, tag)
                }
            });
            if !issued {
                issued_all = false;
                break;
            }
            done += piece;
        }
        self.segments = segments;
        if issued_all {
            self.bdev
                .ctrl
                .stats
                .zero_copy_ios
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(issued_all)
    }

    /// Submits the data commands of a bounced READ or WRITE; `false` once one could not be
    /// issued (the I/O is then marked failed; commands already issued still complete).
    fn submit_bounced(
        &mut self,
        index: usize,
        io: &BdevIo<'_>,
        len: u64,
    ) -> Result<bool, BdevError> {
        let nsid = self.bdev.nsid;
        let block_size = u64::from(self.bdev.block_size);
        let write = io.kind == IoKind::Write;
        if !write {
            if let Some(Some(entry)) = self.ios.get_mut(index) {
                entry.copy_out = Some(CopyOut {
                    mem: Arc::clone(io.mem),
                    iovs: io.iovs.to_vec(),
                    len,
                });
            }
        }
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(self.slot_len as u64);
            let Some(slot) = self.take_slot(Some(index)) else {
                return Ok(false);
            };
            if let Some(Some(entry)) = self.ios.get_mut(index) {
                entry.slots.push(slot);
            }
            let slot_offset = slot * self.slot_len;
            if write {
                let scratch = &mut self.scratch;
                let bounce = &self.bounce;
                let mem = io.mem;
                for_each_span(io.iovs, done, piece, |addr, at, n| {
                    let buf = scratch
                        .get_mut(at..at + n)
                        .ok_or_else(|| BdevError::Backend("span beyond the bounce slot".into()))?;
                    mem.copy_from_host(addr, buf).map_err(BdevError::Memory)?;
                    if bounce.write_at(slot_offset + at, buf).is_ok() {
                        Ok(())
                    } else {
                        Err(BdevError::Backend("bounce slot out of range".into()))
                    }
                })?;
            }
            let lba = io.offset_blocks + done / block_size;
            let blocks = (piece / block_size) as u32;
            let segment = [DmaSegment {
                iova: self.bounce.iova() + slot_offset as u64,
                len: piece as u32,
            }];
            let issued = self.issue(index, Some(slot), |qp, tag| {
                if write {
                    qp.write(nsid, lba, blocks, &segment, tag)
                } else {
                    qp.read(nsid, lba, blocks, &segment, tag)
                }
            });
            if !issued {
                return Ok(false);
            }
            done += piece;
        }
        let stats = &self.bdev.ctrl.stats;
        stats.bounced_ios.fetch_add(1, Ordering::Relaxed);
        stats.bounced_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// Copies the slots of a finished READ into the guest buffers.
    fn copy_out(&mut self, slots: &[usize], out: &CopyOut) -> Result<(), BdevError> {
        let mut done = 0u64;
        for &slot in slots {
            if done >= out.len {
                break;
            }
            let piece = (out.len - done).min(self.slot_len as u64);
            let slot_offset = slot * self.slot_len;
            let scratch = &mut self.scratch;
            let bounce = &self.bounce;
            for_each_span(&out.iovs, done, piece, |addr, at, n| {
                let buf = scratch
                    .get_mut(at..at + n)
                    .ok_or_else(|| BdevError::Backend("span beyond the bounce slot".into()))?;
                if bounce.read_at(slot_offset + at, buf).is_err() {
                    return Err(BdevError::Backend("bounce slot out of range".into()));
                }
                out.mem.copy_to_host(addr, buf).map_err(BdevError::Memory)
            })?;
            done += piece;
        }
        if done < out.len {
            return Err(BdevError::Backend("read data short of its slots".into()));
        }
        Ok(())
    }

    fn submit_unmap(&mut self, index: usize, io: &BdevIo<'_>) -> bool {
        let nsid = self.bdev.nsid;
        let mut lba = io.offset_blocks;
        let end = io.offset_blocks + io.num_blocks;
        while lba < end {
            let mut ranges: Vec<(u64, u32)> = Vec::new();
            while lba < end && ranges.len() < MAX_DSM_RANGES {
                let blocks = (end - lba).min(MAX_DSM_RANGE_BLOCKS);
                ranges.push((lba, blocks as u32));
                lba += blocks;
            }
            if !self.issue(index, None, |qp, tag| qp.deallocate(nsid, &ranges, tag)) {
                return false;
            }
        }
        true
    }

    fn submit_write_zeroes(&mut self, index: usize, io: &BdevIo<'_>) -> bool {
        let nsid = self.bdev.nsid;
        let mut lba = io.offset_blocks;
        let end = io.offset_blocks + io.num_blocks;
        while lba < end {
            let blocks = (end - lba).min(u64::from(MAX_BLOCKS_PER_COMMAND)) as u32;
            if !self.issue(index, None, |qp, tag| {
                qp.write_zeroes(nsid, lba, blocks, false, tag)
            }) {
                return false;
            }
            lba += u64::from(blocks);
        }
        true
    }

    /// Ends an I/O after its submission stopped early: it fails once the commands already
    /// issued have completed.
    fn fail_after_issued(&mut self, index: usize) {
        self.mark_failed(index);
        if self.io_outstanding(index) == 0 {
            self.finish(index);
        }
    }

    /// Ends an I/O whose submission went through once its commands have completed (they may
    /// all have completed while later ones were being issued).
    fn end_submission(&mut self, index: usize) {
        if self.io_outstanding(index) == 0 {
            self.finish(index);
        }
    }
}

impl BdevChannel for NvmeChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        let bdev = Arc::clone(&self.bdev);
        if bdev.refuses_io() {
            return Err(BdevError::Removed(bdev.name.clone()));
        }
        if !bdev.supports(io.kind) {
            self.completions.push_back((io.tag, IoStatus::Unsupported));
            return Ok(());
        }
        if io.kind == IoKind::Flush {
            let index = self.new_io(io.tag);
            let nsid = bdev.nsid;
            if !self.issue(index, None, |qp, tag| qp.flush(nsid, tag)) {
                self.fail_after_issued(index);
            }
            self.qp.ring();
            return Ok(());
        }
        let (_, len) = byte_range(io, bdev.num_blocks, bdev.block_size)?;
        if io.num_blocks == 0 {
            self.completions.push_back((io.tag, IoStatus::Success));
            return Ok(());
        }
        match io.kind {
            IoKind::Read | IoKind::Write => {
                check_iovs(io, len, bdev.num_blocks)?;
                let index = self.new_io(io.tag);
                let submitted = match self.zero_copy_possible(io, len) {
                    Some(reg) => self.submit_zero_copy(index, io, len, reg),
                    None => self.submit_bounced(index, io, len),
                };
                let submitted = submitted.unwrap_or_else(|e| {
                    // Guest buffers went bad midway: commands already issued still complete.
                    tracing::warn!(bdev = %bdev.name, %e, "I/O buffer error");
                    false
                });
                if submitted {
                    self.end_submission(index);
                } else {
                    self.fail_after_issued(index);
                }
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                let index = self.new_io(io.tag);
                let ok = if io.kind == IoKind::Unmap {
                    self.submit_unmap(index, io)
                } else {
                    self.submit_write_zeroes(index, io)
                };
                if ok {
                    self.end_submission(index);
                } else {
                    self.fail_after_issued(index);
                }
            }
            IoKind::Flush => {}
        }
        // One doorbell write per submitted I/O rather than waiting for the next poll.
        self.qp.ring();
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        if self.ios.len() > self.free_ios.len() {
            self.reap(None);
        } else if self.dma.as_ref().is_some_and(|reg| reg.abandoned()) {
            // Idle, and the vhost device has let go of the memory this channel last saw (a new
            // table, or the session ended): stop holding it, so the registry can unmap it.
            self.dma = None;
        }
        report_completions(&mut self.completions, done)
    }

    fn in_flight(&self) -> usize {
        self.ios.iter().filter(|io| io.is_some()).count() + self.completions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(addr: u64, len: u32) -> IoVec {
        IoVec { addr, len }
    }

    #[test]
    fn prp_shaped_buffers_go_straight_to_the_device() {
        let prp_only = SglSupport::default();
        let sgl = SglSupport {
            supported: true,
            dword_aligned: true,
            prefer: false,
        };
        let mut segs = Vec::new();
        // virtio-blk as Linux sends it: page-sized buffers; the first may start mid-page.
        let pages = [
            iov(0x10_0200, 0xe00),
            iov(0x20_0000, 0x1000),
            iov(0x30_0000, 0x200),
        ];
        assert!(describable(&pages, 0x2000, 0x10_0000, prp_only, &mut segs));
        // Split into 4 KiB commands inside the first and second buffers: still PRP-shaped.
        assert!(describable(&pages, 0x2000, 0x1000, prp_only, &mut segs));
        // A middle buffer that does not end on a page boundary breaks PRP rules; SGLs take it.
        let ragged = [iov(0x10_0000, 0x800), iov(0x20_0000, 0x800)];
        assert!(!describable(
            &ragged, 0x1000, 0x10_0000, prp_only, &mut segs
        ));
        assert!(describable(&ragged, 0x1000, 0x10_0000, sgl, &mut segs));
        // Byte-aligned buffers: neither PRPs nor dword-aligned SGLs.
        let odd = [iov(0x10_0001, 0x1000)];
        assert!(!describable(&odd, 0x1000, 0x10_0000, prp_only, &mut segs));
        assert!(!describable(&odd, 0x1000, 0x10_0000, sgl, &mut segs));
    }

    #[test]
    fn command_segments_follow_the_split() {
        let iovs = [iov(0x10_0000, 0x1800), iov(0x20_0000, 0x800)];
        let mut segs = Vec::new();
        command_segments(&iovs, 0x1000, 0x1000, &mut segs).unwrap();
        assert_eq!(
            segs,
            vec![
                DmaSegment {
                    iova: 0x10_1000,
                    len: 0x800
                },
                DmaSegment {
                    iova: 0x20_0000,
                    len: 0x800
                }
            ]
        );
    }

    #[test]
    fn tags_carry_io_and_slot() {
        for (io, slot) in [(0, None), (0, Some(0)), (7, Some(31)), (1 << 40, Some(5))] {
            let tag = command_tag(io, slot);
            assert_eq!(io_of_tag(tag), io);
            assert_eq!(tag & 0xffff, slot.map_or(0, |s| s as u64 + 1));
        }
    }

    #[test]
    fn spans_split_iovs_at_piece_boundaries() {
        let iovs = [
            IoVec {
                addr: 0x1000,
                len: 100,
            },
            IoVec {
                addr: 0x9000,
                len: 50,
            },
            IoVec {
                addr: 0x20000,
                len: 106,
            },
        ];
        let collect = |start, len| {
            let mut spans = Vec::new();
            for_each_span(&iovs, start, len, |addr, at, n| {
                spans.push((addr, at, n));
                Ok(())
            })
            .unwrap();
            spans
        };
        assert_eq!(
            collect(0, 256),
            vec![(0x1000, 0, 100), (0x9000, 100, 50), (0x20000, 150, 106)]
        );
        assert_eq!(collect(0, 128), vec![(0x1000, 0, 100), (0x9000, 100, 28)]);
        assert_eq!(
            collect(128, 128),
            vec![(0x9000 + 28, 0, 22), (0x20000, 22, 106)]
        );
        assert_eq!(collect(100, 50), vec![(0x9000, 0, 50)]);
        assert!(for_each_span(&iovs, u64::MAX, 2, |_, _, _| Ok(())).is_err());
    }
}
