//! SCSI on a bdev: a logical unit whose medium is a bdev, executing the commands a transport hands
//! it.
//!
//! [`BdevLun`] is core's LUN model ([`ScsiLun`]: CDB decoding, mode pages, unit attentions, the
//! answers of immediate commands) joined to one bdev channel. Given a decoded command and where
//! its data lies in guest memory ([`Command`]), [`BdevLun::start`] either answers it at once
//! (immediate data-in and data-out commands, refusals) or runs the model's [`IoPlan`] on the bdev:
//! READ/WRITE straight from and into guest memory, FLUSH, WRITE SAME (as write-zeroes when the
//! pattern is zero and the bdev has them, otherwise as bdev writes whose I/O vectors repeat the
//! pattern block), UNMAP (one bdev unmap per block range), and a flush after a write that must be
//! durable (FUA, or the write cache off). A command served by several bdev I/Os tracks them with
//! [`Fanout`]. [`BdevLun::poll`] collects the bdev's completions and turns each finished command
//! into SCSI status, residual and sense ([`Answer`]).
//!
//! It knows nothing of virtqueues, vhost or sessions: the transport decodes its own headers,
//! routes commands to LUNs, keeps each command's [`LunIo`] in its request slot, gives every
//! command a tag its [`LunIoSlots`] can find the slot by, and writes the answers in its own
//! response format. Nothing here allocates per command or takes a lock: the scratch buffers
//! ([`ExecScratch`]) are allocated once per session.

use rvhost_core::mem::GuestMemory;
use rvhost_core::scsi::lun::{execute_without_lun, IoError, LunConfigError, UnitAttention};
use rvhost_core::scsi::{Completion, IoOp, IoPlan, Outcome, Request, ScsiLun};
use rvhost_core::segments::SegmentRange;

use super::SENSE_SIZE;
use crate::bdev::fanout::Fanout;
use crate::bdev::{BdevChannel, BdevIo, IoKind, IoMemory, IoStatus, IoVec};

/// Immediate data-in (INQUIRY, MODE SENSE, REPORT LUNS ...) is built in a buffer this large.
const DATA_IN_SCRATCH: usize = 4096;
/// Data-out the model reads itself: parameter lists and one WRITE SAME block (largest block size).
const DATA_OUT_SCRATCH: usize = 65536;
/// Blocks one bdev write of a WRITE SAME covers (its I/O vector repeats the pattern).
const WRITE_SAME_BLOCKS_PER_IO: u64 = 64;

/// A command as the transport decoded it.
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    /// The CDB (as long as the transport's CDB field; trailing bytes are ignored).
    pub cdb: &'a [u8],
    /// Data from the initiator: the guest bytes after the transport's request header.
    pub data_out: SegmentRange<'a>,
    /// Room for data to the initiator: the guest bytes after the transport's response.
    pub data_in: SegmentRange<'a>,
}

/// How a command ended, for the transport's response. The sense bytes are
/// [`ExecScratch::sense`]`[..completion.sense_len]`.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// SCSI status, residual and sense length.
    pub completion: Completion,
    /// Bytes written into the initiator's data-in buffers.
    pub data_in: u64,
}

/// What [`BdevLun::start`] did with a command.
#[derive(Debug, Clone, Copy)]
pub enum Started {
    /// Answered at once.
    Done(Answer),
    /// Submitted to the bdev; [`BdevLun::poll`] answers it through [`LunIoSlots::complete`].
    Submitted,
}

/// What completing a planned I/O needs of its plan (the plan itself borrows the data-out copy).
#[derive(Debug, Clone, Copy, Default)]
struct PlanSummary {
    is_read: bool,
    data_len: u64,
    residual: u32,
}

impl PlanSummary {
    fn of(plan: &IoPlan<'_>) -> Self {
        PlanSummary {
            is_read: matches!(plan.op, IoOp::Read { .. }),
            data_len: plan.data_len,
            residual: plan.residual,
        }
    }

    /// A plan equivalent for [`ScsiLun::complete_io`], which looks only at the kind of operation
    /// (read or not), the data length and the residual.
    fn plan(&self) -> IoPlan<'static> {
        let op = if self.is_read {
            IoOp::Read {
                lba: 0,
                blocks: 0,
                fua: false,
            }
        } else {
            IoOp::Flush { lba: 0, blocks: 0 }
        };
        IoPlan {
            op,
            data_len: self.data_len,
            residual: self.residual,
        }
    }
}

/// The state of one command on the bdev, kept in the transport's request slot.
#[derive(Debug, Clone, Copy, Default)]
pub struct LunIo {
    plan: PlanSummary,
    fanout: Fanout,
    /// A write that must be made durable (FUA, or write cache off) before it completes.
    flush_after: bool,
}

/// Where the transport keeps each command's [`LunIo`], found by the tag its bdev I/Os carry.
pub trait LunIoSlots {
    /// The state of the command whose I/Os carry `tag`, if it still exists.
    fn io(&mut self, tag: u64) -> Option<&mut LunIo>;
    /// The command with `tag` finished: answer it (its sense bytes are `sense`).
    fn complete(&mut self, tag: u64, answer: &Answer, sense: &[u8]);
}

/// Buffers of the command being started, allocated once per session.
pub struct ExecScratch {
    data_in: Vec<u8>,
    data_out: Vec<u8>,
    sense: [u8; SENSE_SIZE as usize],
    iovs: Vec<IoVec>,
    pattern: Vec<IoVec>,
    /// Tags of writes whose data is on the bdev and that now need a flush.
    to_flush: Vec<u64>,
}

impl ExecScratch {
    /// Scratch for commands of at most `max_segments` guest segments, with room for `max_tags`
    /// commands waiting for their flush.
    pub fn new(max_segments: usize, max_tags: usize) -> Self {
        ExecScratch {
            data_in: vec![0; DATA_IN_SCRATCH],
            data_out: vec![0; DATA_OUT_SCRATCH],
            sense: [0; SENSE_SIZE as usize],
            iovs: Vec::with_capacity(max_segments * 2),
            pattern: Vec::with_capacity(max_segments),
            to_flush: Vec::with_capacity(max_tags),
        }
    }

    /// Sense data of the last answer.
    pub fn sense(&self) -> &[u8] {
        &self.sense
    }
}

impl std::fmt::Debug for ExecScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecScratch").finish_non_exhaustive()
    }
}

/// Answers a command addressed to a LUN that does not exist (REPORT LUNS, INQUIRY for "no LUN",
/// CHECK CONDITION otherwise).
pub fn answer_without_lun<M: GuestMemory + ?Sized>(
    cmd: &Command<'_>,
    mem: &M,
    scratch: &mut ExecScratch,
) -> Answer {
    let r = Request {
        cdb: cmd.cdb,
        data_out: &[],
        data_out_len: cmd.data_out.len(),
        data_in_len: cmd.data_in.len(),
        luns: &[0],
    };
    let c = execute_without_lun(&r, &mut scratch.data_in, &mut scratch.sense);
    immediate(cmd, mem, &scratch.data_in, c)
}

/// Copies an immediate command's data-in to the initiator.
fn immediate<M: GuestMemory + ?Sized>(
    cmd: &Command<'_>,
    mem: &M,
    data_in: &[u8],
    c: Completion,
) -> Answer {
    let n = usize::try_from(c.transferred)
        .unwrap_or(usize::MAX)
        .min(data_in.len());
    // As much as the initiator's buffers take; the residual reports the rest.
    let _ = cmd.data_in.writer().write(mem, &data_in[..n]);
    Answer {
        completion: c,
        data_in: c.transferred,
    }
}

/// Appends host-address vectors for the first `len` bytes of `range`; false if it is shorter.
fn host_iovs(range: &SegmentRange<'_>, len: u64, iovs: &mut Vec<IoVec>) -> bool {
    let Ok(data) = range.sub(0, len) else {
        return false;
    };
    iovs.extend(data.iter().map(|piece| IoVec {
        addr: piece.host_addr,
        len: piece.len,
    }));
    true
}

fn io_error(status: IoStatus) -> Result<(), IoError> {
    match status {
        IoStatus::Success => Ok(()),
        IoStatus::Failed => Err(IoError::Medium),
        IoStatus::Unsupported => Err(IoError::Unsupported),
    }
}

/// A SCSI logical unit on a bdev, in one session: the model and the session's channel.
pub struct BdevLun {
    lun: ScsiLun,
    channel: Option<Box<dyn BdevChannel>>,
    supports_flush: bool,
    supports_write_zeroes: bool,
    /// Commands submitted to the bdev and not yet answered.
    in_flight: usize,
}

impl std::fmt::Debug for BdevLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevLun")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl BdevLun {
    /// `lun` served through `channel`.
    pub fn new(
        lun: ScsiLun,
        channel: Box<dyn BdevChannel>,
        supports_flush: bool,
        supports_write_zeroes: bool,
    ) -> Self {
        BdevLun {
            lun,
            channel: Some(channel),
            supports_flush,
            supports_write_zeroes,
            in_flight: 0,
        }
    }

    /// Commands on the bdev not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// LOGICAL UNIT RESET: mode pages back to their defaults, unit attention.
    pub fn reset(&mut self) {
        self.lun.reset();
    }

    /// The bdev changed size: the LUN reports `num_blocks` from now on, with a CAPACITY DATA HAS
    /// CHANGED unit attention.
    pub fn resize(&mut self, num_blocks: u64) -> Result<(), LunConfigError> {
        self.lun.resize(num_blocks)
    }

    /// I_T NEXUS RESET: a power-on unit attention.
    pub fn nexus_reset(&mut self) {
        self.lun.raise_unit_attention(UnitAttention::PowerOnReset);
    }

    /// Executes `cmd`: answers it at once, or submits its bdev I/O, each carrying `tag`, with its
    /// state in `io` (which the transport keeps until [`LunIoSlots::complete`] for `tag`).
    pub fn start<M: GuestMemory + ?Sized>(
        &mut self,
        cmd: &Command<'_>,
        mem: &M,
        io_mem: &IoMemory,
        tag: u64,
        io: &mut LunIo,
        scratch: &mut ExecScratch,
    ) -> Started {
        let ExecScratch {
            data_in,
            data_out,
            sense,
            iovs,
            pattern,
            ..
        } = scratch;
        let copy = self
            .lun
            .data_out_copy_len(cmd.cdb)
            .min(usize::try_from(cmd.data_out.len()).unwrap_or(usize::MAX))
            .min(data_out.len());
        // Unreadable data-out reaches the model as none (a parameter list length error).
        let copied = cmd
            .data_out
            .reader()
            .read(mem, &mut data_out[..copy])
            .unwrap_or(0);
        let r = Request {
            cdb: cmd.cdb,
            data_out: &data_out[..copied],
            data_out_len: cmd.data_out.len(),
            data_in_len: cmd.data_in.len(),
            luns: &[0],
        };
        let plan = match self.lun.execute(&r, data_in, sense) {
            Outcome::Done(c) => return Started::Done(immediate(cmd, mem, data_in, c)),
            Outcome::Io(plan) => plan,
        };
        *io = LunIo {
            plan: PlanSummary::of(&plan),
            fanout: Fanout::new(),
            flush_after: false,
        };
        let result = self
            .submit(cmd, io, tag, &plan, (iovs, pattern), io_mem)
            .and_then(|()| {
                if io.fanout.is_done() {
                    // Nothing went to the bdev (a flush without a cache), or it refused at once.
                    io_error(io.fanout.status())
                } else {
                    Ok(())
                }
            });
        if result.is_ok() && !io.fanout.is_done() {
            self.in_flight += 1;
            return Started::Submitted;
        }
        let c = self.lun.complete_io(&plan, result, sense);
        Started::Done(Answer {
            completion: c,
            data_in: c.transferred,
        })
    }

    /// Submits `plan`'s bdev I/Os, counted in `io.fanout`; `Err` for a plan that cannot go to the
    /// bdev at all.
    fn submit(
        &mut self,
        cmd: &Command<'_>,
        io: &mut LunIo,
        tag: u64,
        plan: &IoPlan<'_>,
        (iovs, pattern): (&mut Vec<IoVec>, &mut Vec<IoVec>),
        io_mem: &IoMemory,
    ) -> Result<(), IoError> {
        let supports_flush = self.supports_flush;
        let supports_write_zeroes = self.supports_write_zeroes;
        let wce = self.lun.write_cache_enabled();
        let block_size = u64::from(self.lun.config().block_size);
        let Some(channel) = self.channel.as_mut() else {
            return Err(IoError::NotReady);
        };
        let fanout = &mut io.fanout;
        let mut one = |kind: IoKind, offset_blocks: u64, num_blocks: u64, iovs: &[IoVec]| {
            let bdev_io = BdevIo {
                kind,
                offset_blocks,
                num_blocks,
                iovs,
                tag,
                mem: io_mem,
            };
            let submitted = channel.submit(&bdev_io);
            if let Err(err) = &submitted {
                tracing::debug!(%err, "bdev refused I/O");
            }
            fanout.issued(submitted)
        };
        match plan.op {
            IoOp::Read { lba, blocks, .. } => {
                iovs.clear();
                if !host_iovs(&cmd.data_in, plan.data_len, iovs) {
                    return Err(IoError::Medium);
                }
                one(IoKind::Read, lba, blocks, iovs);
            }
            IoOp::Write { lba, blocks, fua } => {
                iovs.clear();
                if !host_iovs(&cmd.data_out, plan.data_len, iovs) {
                    return Err(IoError::Medium);
                }
                one(IoKind::Write, lba, blocks, iovs);
                io.flush_after = supports_flush && (fua || !wce);
            }
            IoOp::Flush { .. } => {
                // Nothing is cached above a bdev that cannot flush: done with nothing submitted.
                if supports_flush {
                    one(IoKind::Flush, 0, 0, &[]);
                }
            }
            IoOp::Unmap(ranges) => {
                for range in ranges.iter() {
                    if !one(IoKind::Unmap, range.lba, range.blocks, &[]) {
                        break;
                    }
                }
            }
            IoOp::WriteZeroes { lba, blocks } => {
                if !supports_write_zeroes {
                    return Err(IoError::Unsupported);
                }
                one(IoKind::WriteZeroes, lba, blocks, &[]);
            }
            IoOp::WriteSame { lba, blocks, block } => {
                if block.iter().all(|&b| b == 0) && supports_write_zeroes {
                    one(IoKind::WriteZeroes, lba, blocks, &[]);
                    return Ok(());
                }
                // The pattern is the first block of the initiator's data-out; the bdev writes it
                // straight from guest memory, repeated in the I/O vector.
                pattern.clear();
                if !host_iovs(&cmd.data_out, block_size, pattern) {
                    return Err(IoError::Unsupported);
                }
                let mut done = 0u64;
                while done < blocks {
                    let n = (blocks - done).min(WRITE_SAME_BLOCKS_PER_IO);
                    iovs.clear();
                    for _ in 0..n {
                        iovs.extend_from_slice(pattern);
                    }
                    if !one(IoKind::Write, lba.saturating_add(done), n, iovs) {
                        break;
                    }
                    done += n;
                }
            }
        }
        Ok(())
    }

    /// Collects the bdev's completions; every command whose last I/O completed is answered through
    /// `slots`. Returns how many bdev completions there were.
    pub fn poll(
        &mut self,
        io_mem: &IoMemory,
        scratch: &mut ExecScratch,
        slots: &mut impl LunIoSlots,
    ) -> usize {
        let BdevLun {
            lun,
            channel,
            in_flight,
            ..
        } = self;
        let Some(channel) = channel.as_mut() else {
            return 0;
        };
        if channel.in_flight() == 0 {
            return 0;
        }
        let ExecScratch {
            sense, to_flush, ..
        } = scratch;
        let work = channel.poll(&mut |tag, status| {
            let Some(io) = slots.io(tag) else {
                return;
            };
            let Some(status) = io.fanout.completed(status) else {
                return;
            };
            if io.flush_after && status == IoStatus::Success {
                io.flush_after = false;
                to_flush.push(tag);
                return;
            }
            let plan = io.plan;
            let c = lun.complete_io(&plan.plan(), io_error(status), &mut sense[..]);
            let answer = Answer {
                completion: c,
                data_in: if plan.is_read { c.transferred } else { 0 },
            };
            slots.complete(tag, &answer, &sense[..]);
            *in_flight = in_flight.saturating_sub(1);
        });
        // Writes that must be durable: flush now, answer when the flush completes.
        while let Some(tag) = to_flush.pop() {
            let Some(io) = slots.io(tag) else {
                continue;
            };
            let flush = BdevIo {
                kind: IoKind::Flush,
                offset_blocks: 0,
                num_blocks: 0,
                iovs: &[],
                tag,
                mem: io_mem,
            };
            let submitted = channel.submit(&flush);
            if let Err(err) = &submitted {
                tracing::debug!(%err, "flush after write refused");
            }
            if io.fanout.issued(submitted) {
                continue;
            }
            let plan = io.plan;
            let c = lun.complete_io(&plan.plan(), Err(IoError::Medium), &mut sense[..]);
            let answer = Answer {
                completion: c,
                data_in: if plan.is_read { c.transferred } else { 0 },
            };
            slots.complete(tag, &answer, &sense[..]);
            *in_flight = in_flight.saturating_sub(1);
        }
        work
    }
}

#[cfg(test)]
mod tests {
    //! A LUN on a scripted bdev channel, without any transport: what goes to the bdev for each
    //! plan, and when and how the command is answered.

    use std::sync::{Arc, Mutex};

    use rvhost_core::mem::{ByteMemory, Direction, Segment};
    use rvhost_core::scsi::lun::LunConfig;
    use rvhost_core::scsi::ScsiStatus;

    use super::*;
    use crate::bdev::testing::TestMemory;
    use crate::bdev::BdevError;

    /// Guest memory of the tests: data-out at 0, data-in at 0x1_0000.
    const OUT: u64 = 0;
    const IN: u64 = 0x1_0000;
    const MEM: usize = 0x2_0000;

    #[derive(Debug, Default)]
    struct Script {
        /// (kind, offset, blocks, iovs) of every accepted submission.
        submitted: Vec<(IoKind, u64, u64, usize)>,
        /// Tags accepted and not yet completed.
        pending: Vec<u64>,
        /// Submission number (0-based) the channel refuses.
        refuse: Option<usize>,
        /// Statuses given to completions, in order (Success once exhausted).
        statuses: Vec<IoStatus>,
        attempts: usize,
    }

    struct ScriptChannel(Arc<Mutex<Script>>);

    impl BdevChannel for ScriptChannel {
        fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
            let mut s = self.0.lock().unwrap();
            let n = s.attempts;
            s.attempts += 1;
            if s.refuse == Some(n) {
                return Err(BdevError::Backend("refused".into()));
            }
            s.submitted
                .push((io.kind, io.offset_blocks, io.num_blocks, io.iovs.len()));
            s.pending.push(io.tag);
            Ok(())
        }
        fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
            let (tags, statuses): (Vec<u64>, Vec<IoStatus>) = {
                let mut s = self.0.lock().unwrap();
                let tags: Vec<u64> = s.pending.drain(..).collect();
                let statuses = tags
                    .iter()
                    .map(|_| {
                        if s.statuses.is_empty() {
                            IoStatus::Success
                        } else {
                            s.statuses.remove(0)
                        }
                    })
                    .collect();
                (tags, statuses)
            };
            for (&t, &st) in tags.iter().zip(&statuses) {
                done(t, st);
            }
            tags.len()
        }
        fn in_flight(&self) -> usize {
            self.0.lock().unwrap().pending.len()
        }
    }

    /// The transport's side: one command slot, tag 7.
    #[derive(Default)]
    struct OneSlot {
        io: LunIo,
        answers: Vec<(Answer, Vec<u8>)>,
    }

    impl LunIoSlots for OneSlot {
        fn io(&mut self, tag: u64) -> Option<&mut LunIo> {
            (tag == 7).then_some(&mut self.io)
        }
        fn complete(&mut self, tag: u64, answer: &Answer, sense: &[u8]) {
            assert_eq!(tag, 7);
            self.answers
                .push((*answer, sense[..answer.completion.sense_len].to_vec()));
        }
    }

    struct Rig {
        lun: BdevLun,
        script: Arc<Mutex<Script>>,
        scratch: ExecScratch,
        io_mem: TestMemory,
        bytes: Vec<u8>,
        slot: OneSlot,
    }

    impl Rig {
        /// 512-byte blocks, 4096 of them, unmap, write-zeroes and flush, write cache on.
        fn new() -> Rig {
            let mut config = LunConfig::new(512, 4096, [3; 16]);
            config.supports_unmap = true;
            config.supports_write_zeroes = true;
            config.supports_flush = true;
            config.write_cache = true;
            let script = Arc::new(Mutex::new(Script::default()));
            let channel = Box::new(ScriptChannel(Arc::clone(&script)));
            let lun = BdevLun::new(ScsiLun::new(config).unwrap(), channel, true, true);
            let mut rig = Rig {
                lun,
                script,
                scratch: ExecScratch::new(16, 16),
                io_mem: TestMemory::new(4096),
                bytes: vec![0; MEM],
                slot: OneSlot::default(),
            };
            // A unit attention, if the model raises one at power-on, is reported once.
            let tur = [0u8; 6];
            rig.start(&tur, &[]);
            match rig.start(&tur, &[]) {
                Started::Done(a) => assert_eq!(a.completion.status, ScsiStatus::Good),
                Started::Submitted => panic!("TEST UNIT READY went to the bdev"),
            }
            rig
        }

        /// Starts `cdb` with `out` as its data-out and 4 KiB of data-in room.
        fn start(&mut self, cdb: &[u8], out: &[u8]) -> Started {
            self.bytes[..out.len()].copy_from_slice(out);
            let host = self.bytes.as_ptr() as u64;
            let mem = ByteMemory::new(0, host, &mut self.bytes);
            let out_seg = [Segment {
                guest_addr: OUT,
                host_addr: host + OUT,
                len: out.len() as u32,
                direction: Direction::DeviceReadable,
            }];
            let in_seg = [Segment {
                guest_addr: IN,
                host_addr: host + IN,
                len: 4096,
                direction: Direction::DeviceWritable,
            }];
            let cmd = Command {
                cdb,
                data_out: SegmentRange::whole(if out.is_empty() { &[] } else { &out_seg }),
                data_in: SegmentRange::whole(&in_seg),
            };
            self.lun.start(
                &cmd,
                &mem,
                self.io_mem.io_memory(),
                7,
                &mut self.slot.io,
                &mut self.scratch,
            )
        }

        fn poll(&mut self) -> usize {
            self.lun
                .poll(self.io_mem.io_memory(), &mut self.scratch, &mut self.slot)
        }

        fn submitted(&self) -> Vec<(IoKind, u64, u64, usize)> {
            self.script.lock().unwrap().submitted.clone()
        }
    }

    fn sense_key(sense: &[u8]) -> u8 {
        sense[2] & 0x0f
    }

    #[test]
    fn write_same_is_split_into_bdev_writes_repeating_the_pattern_and_answered_after_the_last() {
        let mut rig = Rig::new();
        // WRITE SAME(16), LBA 100, 200 blocks, a non-zero pattern.
        let mut cdb = [0u8; 16];
        cdb[0] = 0x93;
        cdb[2..10].copy_from_slice(&100u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&200u32.to_be_bytes());
        assert!(matches!(rig.start(&cdb, &[0x5a; 512]), Started::Submitted));
        assert_eq!(
            rig.submitted(),
            vec![
                (IoKind::Write, 100, 64, 64),
                (IoKind::Write, 164, 64, 64),
                (IoKind::Write, 228, 64, 64),
                (IoKind::Write, 292, 8, 8),
            ]
        );
        assert_eq!(rig.lun.in_flight(), 1);
        assert_eq!(rig.poll(), 4);
        assert_eq!(rig.slot.answers.len(), 1);
        assert_eq!(rig.slot.answers[0].0.completion.status, ScsiStatus::Good);
        assert_eq!(rig.lun.in_flight(), 0);
    }

    #[test]
    fn unmap_fans_out_per_range_and_a_failed_range_fails_the_command_once_all_completed() {
        let mut rig = Rig::new();
        let ranges: [(u64, u32); 3] = [(0, 8), (64, 16), (1000, 1)];
        let mut list = vec![0u8; 8 + 16 * ranges.len()];
        list[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
        list[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
        for (i, (lba, n)) in ranges.iter().enumerate() {
            let d = &mut list[8 + 16 * i..8 + 16 * (i + 1)];
            d[0..8].copy_from_slice(&lba.to_be_bytes());
            d[8..12].copy_from_slice(&n.to_be_bytes());
        }
        let mut cdb = [0u8; 10];
        cdb[0] = 0x42;
        cdb[7..9].copy_from_slice(&(list.len() as u16).to_be_bytes());
        rig.script.lock().unwrap().statuses =
            vec![IoStatus::Success, IoStatus::Failed, IoStatus::Success];
        assert!(matches!(rig.start(&cdb, &list), Started::Submitted));
        assert_eq!(
            rig.submitted(),
            vec![
                (IoKind::Unmap, 0, 8, 0),
                (IoKind::Unmap, 64, 16, 0),
                (IoKind::Unmap, 1000, 1, 0),
            ]
        );
        rig.poll();
        assert_eq!(rig.slot.answers.len(), 1);
        let (answer, sense) = &rig.slot.answers[0];
        assert_eq!(answer.completion.status, ScsiStatus::CheckCondition);
        assert_eq!(sense_key(sense), 0x3, "MEDIUM ERROR");
    }

    #[test]
    fn a_refusal_mid_fan_out_stops_submitting_and_fails_after_the_submitted_ones() {
        let mut rig = Rig::new();
        rig.script.lock().unwrap().refuse = Some(1);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x93;
        cdb[10..14].copy_from_slice(&300u32.to_be_bytes());
        assert!(matches!(rig.start(&cdb, &[1; 512]), Started::Submitted));
        assert_eq!(rig.submitted(), vec![(IoKind::Write, 0, 64, 64)]);
        rig.poll();
        assert_eq!(rig.slot.answers.len(), 1);
        let (answer, sense) = &rig.slot.answers[0];
        assert_eq!(answer.completion.status, ScsiStatus::CheckCondition);
        assert_eq!(sense_key(sense), 0x3);
        assert_eq!(rig.lun.in_flight(), 0);
    }

    #[test]
    fn a_refused_read_is_answered_at_once() {
        let mut rig = Rig::new();
        rig.script.lock().unwrap().refuse = Some(0);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[10..14].copy_from_slice(&8u32.to_be_bytes());
        let Started::Done(answer) = rig.start(&cdb, &[]) else {
            panic!("a refused read must not be in flight");
        };
        assert_eq!(answer.completion.status, ScsiStatus::CheckCondition);
        assert_eq!(sense_key(rig.scratch.sense()), 0x3);
        assert_eq!(rig.lun.in_flight(), 0);
    }

    #[test]
    fn a_fua_write_is_flushed_before_it_is_answered_and_a_refused_flush_fails_it() {
        let mut rig = Rig::new();
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        cdb[1] = 0x08; // FUA
        cdb[2..10].copy_from_slice(&5u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(rig.start(&cdb, &[9; 512]), Started::Submitted));
        assert_eq!(rig.submitted(), vec![(IoKind::Write, 5, 1, 1)]);
        rig.poll();
        assert!(rig.slot.answers.is_empty(), "answered before the flush");
        assert_eq!(
            rig.submitted(),
            vec![(IoKind::Write, 5, 1, 1), (IoKind::Flush, 0, 0, 0)]
        );
        rig.poll();
        assert_eq!(rig.slot.answers.len(), 1);
        assert_eq!(rig.slot.answers[0].0.completion.status, ScsiStatus::Good);

        rig.slot.answers.clear();
        rig.script.lock().unwrap().refuse = Some(3);
        assert!(matches!(rig.start(&cdb, &[9; 512]), Started::Submitted));
        rig.poll();
        assert_eq!(rig.slot.answers.len(), 1);
        assert_eq!(
            rig.slot.answers[0].0.completion.status,
            ScsiStatus::CheckCondition
        );
        assert_eq!(rig.lun.in_flight(), 0);
    }

    #[test]
    fn a_zero_pattern_write_same_becomes_one_write_zeroes() {
        let mut rig = Rig::new();
        let mut cdb = [0u8; 16];
        cdb[0] = 0x93;
        cdb[10..14].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(rig.start(&cdb, &[0; 512]), Started::Submitted));
        assert_eq!(rig.submitted(), vec![(IoKind::WriteZeroes, 0, 1000, 0)]);
        rig.poll();
        assert_eq!(rig.slot.answers[0].0.completion.status, ScsiStatus::Good);
    }
}
