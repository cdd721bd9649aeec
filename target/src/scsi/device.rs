//! A vhost-scsi session's data path, owned by one reactor.
//!
//! Queue 0 is the control queue (task management, asynchronous notification), queue 1 the event
//! queue (hot-plug events), queues 2.. the request queues. Every request queue slot is allocated
//! with the queue, and each target's LUN gets one bdev channel per session, so nothing is
//! allocated per request and the data path takes no lock.
//!
//! Target changes (hot-attach, hot-detach) arrive from the controller on [`TargetOp`]s, drained at
//! the start of every poll round.

use std::collections::VecDeque;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use rvhost_core::mem::{GuestMemory, Segment};
use rvhost_core::scsi::lun::{execute_without_lun, IoError};
use rvhost_core::scsi::{Completion, IoOp, IoPlan, Outcome, Request, ScsiLun};
use rvhost_core::virtio_scsi::{
    cmd_req_len, cmd_resp_len, tmf_resp, AnRespRepr, CmdReq, CmdRespRepr, ControlRequest,
    EventRepr, LunAddress, Response, TmfReqRepr, TmfSubtype, EVENT_LEN, TMF_REQ_LEN,
};
use rvhost_core::virtio_scsi::{event, feature as scsi_feature};

use super::{TargetOp, CDB_SIZE, MAX_QUEUE_SIZE, MAX_TARGETS, SENSE_SIZE};
use crate::bdev::{BdevChannel, BdevIo, IoKind, IoMemory, IoStatus, IoVec};
use crate::reactor::{Message, Reply, Task};
use crate::vhost::memory::GuestMemoryTable;
use crate::vhost::vqueue::{self, VirtQueue, CHAIN_CAPACITY, POP_BATCH};
use crate::vhost::{DeviceId, DeviceOp};
use crate::vhost::{QueueSetup, VirtioFeatures};

/// Index of the control queue.
pub const CONTROL_QUEUE: usize = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Index of the first request queue.
pub const FIRST_REQUEST_QUEUE: usize = 2;

/// Events held while the driver has no event buffer posted; more are reported as missed.
pub const MAX_PENDING_EVENTS: usize = 64;
/// Immediate data-in (INQUIRY, MODE SENSE, REPORT LUNS ...) is built in a buffer this large.
const DATA_IN_SCRATCH: usize = 4096;
/// Data-out the model reads itself: parameter lists and one WRITE SAME block (largest block size).
const DATA_OUT_SCRATCH: usize = 65536;
/// Blocks one bdev write of a WRITE SAME covers (its I/O vector repeats the pattern).
const WRITE_SAME_BLOCKS_PER_IO: u64 = 64;
/// Busy rounds between two looks at the control queue, the event queue and target changes. Those
/// are rare, so a round that served commands skips them (saving a ring-index load and a channel
/// check per round); a round without command work always looks. A task management function or a
/// target change waits at most this many busy rounds, a few microseconds.
const MGMT_INTERVAL: u32 = 32;
/// Response segments remembered per request; Linux uses one.
const RESP_SEGMENTS: usize = 4;

/// Length of a command request header (no T10 PI: it is not offered).
const REQ_LEN: usize = cmd_req_len(CDB_SIZE);
/// Length of a command response (header and sense buffer).
const RESP_LEN: usize = cmd_resp_len(SENSE_SIZE);

/// One attached target: its LUN 0 and the bdev channel that serves it in this session.
pub struct AttachedTarget {
    lun: ScsiLun,
    channel: Option<Box<dyn BdevChannel>>,
    supports_flush: bool,
    supports_write_zeroes: bool,
    /// Requests submitted to the bdev and not yet completed.
    in_flight: usize,
    /// Hot-detach in progress: new requests get BAD_TARGET; reply once drained.
    removing: Option<Reply<()>>,
    /// Sequence number given to the next request, so a reset waits only for older ones.
    next_seq: u64,
}

impl AttachedTarget {
    /// A target serving `lun` through `channel`.
    pub fn new(
        lun: ScsiLun,
        channel: Box<dyn BdevChannel>,
        supports_flush: bool,
        supports_write_zeroes: bool,
    ) -> Self {
        AttachedTarget {
            lun,
            channel: Some(channel),
            supports_flush,
            supports_write_zeroes,
            in_flight: 0,
            removing: None,
            next_seq: 0,
        }
    }
}

impl std::fmt::Debug for AttachedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedTarget")
            .field("in_flight", &self.in_flight)
            .field("removing", &self.removing.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a response goes: up to [`RESP_SEGMENTS`] guest ranges at the start of the writable part.
#[derive(Debug, Clone, Copy, Default)]
struct RespTarget {
    segs: [(u64, u32); RESP_SEGMENTS],
    count: u8,
}

impl RespTarget {
    /// The first `len` writable bytes of `writable`, or `None` if they need more segments.
    fn of(writable: &[Segment], len: usize) -> Option<RespTarget> {
        let mut r = RespTarget::default();
        let mut left = len;
        for seg in writable {
            if left == 0 {
                break;
            }
            let take = left.min(usize::try_from(seg.len).unwrap_or(usize::MAX));
            let slot = r.segs.get_mut(usize::from(r.count))?;
            *slot = (seg.guest_addr, u32::try_from(take).unwrap_or(u32::MAX));
            r.count += 1;
            left -= take;
        }
        (left == 0).then_some(r)
    }

    fn write(&self, mem: &GuestMemoryTable, mut bytes: &[u8]) -> bool {
        for &(addr, len) in self.segs.iter().take(usize::from(self.count)) {
            let n = bytes.len().min(len as usize);
            if mem.write(addr, &bytes[..n]).is_err() {
                return false;
            }
            bytes = &bytes[n..];
        }
        true
    }
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

/// One command between submission and completion.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    head: u16,
    target: u8,
    /// The driver's tag, for ABORT TASK / QUERY TASK.
    tag: u64,
    seq: u64,
    active: bool,
    resp: RespTarget,
    plan: PlanSummary,
    pending: u32,
    failed: Option<IoError>,
    /// A write that must be made durable (FUA, or write cache off) before it completes.
    flush_after: bool,
}

/// One running virtqueue.
type ScsiQueue = VirtQueue<Slot, ()>;

impl ScsiQueue {
    fn take_slot(&mut self) -> Option<usize> {
        let s = self.free.pop()?;
        self.in_flight += 1;
        Some(usize::from(s))
    }

    fn release_slot(&mut self, si: usize) {
        if let Some(slot) = self.slots.get_mut(si) {
            slot.active = false;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Ok(s) = u16::try_from(si) {
            self.free.push(s);
        }
    }
}

/// What a pending task management function waits for.
#[derive(Debug, Clone, Copy)]
enum TmfWait {
    /// The command with this tag is no longer in flight (ABORT TASK).
    Task(u64),
    /// Every command that arrived before the TMF completed (task set aborts, resets).
    OlderThan(u64),
}

/// What happens to the LUN once a pending TMF's wait is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TmfEffect {
    None,
    /// LOGICAL UNIT RESET: mode pages back to defaults, unit attention.
    LunReset,
    /// I_T NEXUS RESET: unit attention only.
    NexusReset,
}

#[derive(Debug, Clone, Copy)]
struct PendingTmf {
    head: u16,
    resp: RespTarget,
    target: u8,
    wait: TmfWait,
    effect: TmfEffect,
}

/// Hot-plug events waiting for an event-queue buffer.
#[derive(Debug, Default)]
struct EventBacklog {
    pending: VecDeque<EventRepr>,
    missed: bool,
}

impl EventBacklog {
    fn push(&mut self, e: EventRepr) {
        if self.pending.len() >= MAX_PENDING_EVENTS {
            self.missed = true;
        } else {
            self.pending.push_back(e);
        }
    }

    fn has_work(&self) -> bool {
        self.missed || !self.pending.is_empty()
    }

    /// The next event to deliver, carrying the EVENTS_MISSED flag if events were dropped.
    fn next(&mut self) -> Option<EventRepr> {
        let mut e = match self.pending.pop_front() {
            Some(e) => e,
            None if self.missed => EventRepr {
                event: event::VIRTIO_SCSI_T_NO_EVENT,
                events_missed: true,
                lun: [0; 8],
                reason: 0,
            },
            None => return None,
        };
        if self.missed {
            e.events_missed = true;
            self.missed = false;
        }
        Some(e)
    }

    fn unpop(&mut self, e: EventRepr) {
        if e.events_missed {
            self.missed = true;
        }
        if e.event != event::VIRTIO_SCSI_T_NO_EVENT {
            let mut e = e;
            e.events_missed = false;
            self.pending.push_front(e);
        }
    }
}

/// The LUN field of an event for `target`'s LUN 0, as QEMU writes it (single-level peripheral
/// format for LUNs under 256: Linux reads `lun[2..4]` as the LUN number).
fn event_lun(target: u8) -> [u8; 8] {
    [1, target, 0, 0, 0, 0, 0, 0]
}

fn transport_reset(target: u8, reason: u32) -> EventRepr {
    EventRepr {
        event: event::VIRTIO_SCSI_T_TRANSPORT_RESET,
        events_missed: false,
        lun: event_lun(target),
        reason,
    }
}

/// Walks bytes `skip..skip + total` of the segments piece by piece, calling `access(guest_addr,
/// range)` with each piece's guest address and its range within `0..total`; stops at the first
/// piece `access` refuses. Returns how many bytes were accessed.
fn walk_segments(
    segs: &[Segment],
    mut skip: u64,
    total: usize,
    mut access: impl FnMut(u64, std::ops::Range<usize>) -> bool,
) -> usize {
    let mut done = 0usize;
    for seg in segs {
        if done == total {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(total - done);
        if !access(seg.guest_addr.saturating_add(skip), done..done + n) {
            break;
        }
        done += n;
        skip = 0;
    }
    done
}

/// Copies `out.len()` bytes starting `skip` bytes into the segments; returns how many were copied.
fn gather(mem: &GuestMemoryTable, segs: &[Segment], skip: u64, out: &mut [u8]) -> usize {
    let total = out.len();
    walk_segments(segs, skip, total, |addr, range| {
        mem.read(addr, &mut out[range]).is_ok()
    })
}

/// Writes `data` starting `skip` bytes into the segments; returns how many bytes were written.
fn scatter(mem: &GuestMemoryTable, segs: &[Segment], skip: u64, data: &[u8]) -> usize {
    walk_segments(segs, skip, data.len(), |addr, range| {
        mem.write(addr, &data[range]).is_ok()
    })
}

/// Appends host-address vectors for bytes `skip..skip + len` of the segments; false if the
/// segments are shorter.
fn sub_iovs(segs: &[Segment], mut skip: u64, mut len: u64, iovs: &mut Vec<IoVec>) -> bool {
    for seg in segs {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len);
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        iovs.push(IoVec {
            addr: seg.host_addr.saturating_add(skip),
            len: n32,
        });
        len -= n;
        skip = 0;
    }
    len == 0
}

fn tag(queue: usize, slot: usize) -> u64 {
    ((queue as u64) << 32) | (slot as u64 & 0xffff_ffff)
}

fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

/// Scratch buffers of the command being started (allocated once per session).
struct Scratch {
    header: [u8; REQ_LEN],
    data_in: Vec<u8>,
    data_out: Vec<u8>,
    sense: [u8; SENSE_SIZE as usize],
    iovs: Vec<IoVec>,
    pattern: Vec<IoVec>,
}

/// A vhost-scsi session on its reactor.
pub struct ScsiDevice {
    id: DeviceId,
    control: Receiver<TargetOp>,
    targets: Vec<Option<AttachedTarget>>,
    features: VirtioFeatures,
    memory: Option<Arc<GuestMemoryTable>>,
    /// The same table as [`BdevIo::mem`] wants it; made once per table, not per request.
    io_memory: Option<IoMemory>,
    retired: Vec<Arc<GuestMemoryTable>>,
    /// Started queues; grows to the highest queue started (capacity for all of them is reserved
    /// up front), so a round scans only queues a frontend can use.
    queues: Vec<Option<ScsiQueue>>,
    max_queues: u16,
    /// Busy rounds since the management queues and target changes were last looked at.
    rounds_since_mgmt: u32,
    /// Something waits for [`ScsiDevice::settle`] (a stopping queue, a removed target, a TMF, a
    /// retired table, a detach or removal); cleared by `settle` once nothing does.
    settle_pending: bool,
    events: EventBacklog,
    tmfs: Vec<PendingTmf>,
    scratch: Scratch,
    /// Writes whose bdev part completed and that now need a flush: (queue, slot).
    to_flush: Vec<(usize, usize)>,
    remove_reply: Option<Reply<()>>,
    removed: bool,
}

impl std::fmt::Debug for ScsiDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDevice")
            .field("id", &self.id)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl ScsiDevice {
    /// A session device with the targets attached when it was created, taking later target
    /// changes from `control`.
    pub fn new(
        id: DeviceId,
        targets: Vec<Option<AttachedTarget>>,
        max_queues: u16,
        control: Receiver<TargetOp>,
    ) -> Self {
        let mut targets = targets;
        targets.resize_with(MAX_TARGETS, || None);
        ScsiDevice {
            id,
            control,
            targets,
            features: VirtioFeatures(0),
            memory: None,
            io_memory: None,
            retired: Vec::new(),
            queues: Vec::with_capacity(usize::from(max_queues)),
            max_queues,
            rounds_since_mgmt: 0,
            settle_pending: false,
            events: EventBacklog::default(),
            tmfs: Vec::new(),
            scratch: Scratch {
                header: [0; REQ_LEN],
                data_in: vec![0; DATA_IN_SCRATCH],
                data_out: vec![0; DATA_OUT_SCRATCH],
                sense: [0; SENSE_SIZE as usize],
                iovs: Vec::with_capacity(CHAIN_CAPACITY * 2),
                pattern: Vec::with_capacity(CHAIN_CAPACITY),
            },
            to_flush: Vec::with_capacity(usize::from(MAX_QUEUE_SIZE)),
            remove_reply: None,
            removed: false,
        }
    }

    fn hotplug(&self) -> bool {
        self.features.has(scsi_feature::VIRTIO_SCSI_F_HOTPLUG)
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().flatten().map(|q| q.in_flight).sum()
    }

    fn target_op(&mut self, op: TargetOp) {
        match op {
            TargetOp::Attach {
                target,
                attached,
                reply,
            } => {
                let t = usize::from(target);
                if let Some(slot) = self.targets.get_mut(t) {
                    if slot.as_ref().is_some_and(|old| old.in_flight > 0) {
                        // The controller never reuses a slot before its detach completed.
                        tracing::error!(
                            device = self.id.0,
                            target,
                            "attach over a busy target refused"
                        );
                    } else {
                        *slot = Some(*attached);
                        if self.hotplug() {
                            self.events
                                .push(transport_reset(target, event::VIRTIO_SCSI_EVT_RESET_RESCAN));
                        }
                        tracing::info!(device = self.id.0, target, "target attached");
                    }
                }
                let _ = reply.send(());
            }
            TargetOp::Detach { target, reply } => {
                match self
                    .targets
                    .get_mut(usize::from(target))
                    .and_then(Option::as_mut)
                {
                    Some(t) => {
                        t.removing = Some(reply);
                        self.settle_pending = true;
                    }
                    None => {
                        let _ = reply.send(());
                    }
                }
            }
        }
    }

    fn start_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), String> {
        // Range and in-flight checks first, so a refused start changes nothing.
        vqueue::queue_slot(&mut self.queues, index, self.max_queues)?;
        let queue = ScsiQueue::new(&setup, ())?;
        if let Some(current) = &self.memory {
            if !Arc::ptr_eq(current, &setup.memory) {
                self.retired.push(Arc::clone(current));
                self.settle_pending = true;
            }
        }
        self.features = setup.features;
        self.install_memory(Arc::clone(&setup.memory));
        if let Some(slot) = self.queues.get_mut(usize::from(index)) {
            *slot = Some(queue);
        }
        Ok(())
    }

    /// Makes `memory` current; returns the table it replaces.
    fn install_memory(&mut self, memory: Arc<GuestMemoryTable>) -> Option<Arc<GuestMemoryTable>> {
        let io: IoMemory = memory.clone();
        self.io_memory = Some(io);
        self.memory.replace(memory)
    }

    fn set_memory(&mut self, memory: Arc<GuestMemoryTable>) {
        if let Some(old) = self.install_memory(memory) {
            if self.in_flight() > 0 {
                self.retired.push(old);
                self.settle_pending = true;
            }
        }
        let Some(mem) = self.memory.as_deref() else {
            return;
        };
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if let Some(q) = queue {
                q.check_rings(mem, self.id, index);
            }
        }
    }

    /// Sequence number of the oldest command in flight on `target`, and whether `tag` is.
    fn in_flight_on(&self, target: u8, tag: Option<u64>) -> (Option<u64>, bool) {
        let mut oldest: Option<u64> = None;
        let mut found = false;
        for q in self.queues.iter().skip(FIRST_REQUEST_QUEUE).flatten() {
            for s in q.slots.iter().filter(|s| s.active && s.target == target) {
                oldest = Some(oldest.map_or(s.seq, |o| o.min(s.seq)));
                if Some(s.tag) == tag {
                    found = true;
                }
            }
        }
        (oldest, found)
    }

    /// Replies to deferred operations whose condition now holds.
    fn settle(&mut self) {
        if let Some(mem) = self.memory.take() {
            self.settle_tmfs(&mem);
            self.memory = Some(mem);
        }
        vqueue::settle_stopped(&mut self.queues);
        let hotplug = self.hotplug();
        for (t, slot) in self.targets.iter_mut().enumerate() {
            let done = slot
                .as_ref()
                .is_some_and(|t| t.removing.is_some() && t.in_flight == 0);
            if done {
                if let Some(target) = slot.take() {
                    if let Some(reply) = target.removing {
                        let _ = reply.send(());
                    }
                    let target_id = u8::try_from(t).unwrap_or(u8::MAX);
                    if hotplug {
                        self.events.push(transport_reset(
                            target_id,
                            event::VIRTIO_SCSI_EVT_RESET_REMOVED,
                        ));
                    }
                    tracing::info!(device = self.id.0, target = t, "target detached");
                }
            }
        }
        if self.in_flight() == 0 {
            self.retired.clear();
            if let Some(reply) = self.remove_reply.take() {
                self.queues.iter_mut().for_each(|q| *q = None);
                self.targets.iter_mut().for_each(|t| *t = None);
                self.tmfs.clear();
                self.memory = None;
                self.io_memory = None;
                self.removed = true;
                let _ = reply.send(());
            }
        }
        self.settle_pending = !self.tmfs.is_empty()
            || self.remove_reply.is_some()
            || !self.retired.is_empty()
            || self.targets.iter().flatten().any(|t| t.removing.is_some())
            || self.queues.iter().flatten().any(|q| q.stopping.is_some());
    }

    fn settle_tmfs(&mut self, mem: &GuestMemoryTable) {
        if self.tmfs.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.tmfs.len() {
            let tmf = self.tmfs[i];
            let (oldest, found) = match tmf.wait {
                TmfWait::Task(tag) => self.in_flight_on(tmf.target, Some(tag)),
                TmfWait::OlderThan(_) => self.in_flight_on(tmf.target, None),
            };
            let done = match tmf.wait {
                TmfWait::Task(_) => !found,
                TmfWait::OlderThan(seq) => oldest.is_none_or(|o| o >= seq),
            };
            if !done {
                i += 1;
                continue;
            }
            self.tmfs.swap_remove(i);
            if let Some(Some(target)) = self.targets.get_mut(usize::from(tmf.target)) {
                match tmf.effect {
                    TmfEffect::LunReset => target.lun.reset(),
                    TmfEffect::NexusReset => target
                        .lun
                        .raise_unit_attention(rvhost_core::scsi::lun::UnitAttention::PowerOnReset),
                    TmfEffect::None => {}
                }
            }
            tracing::info!(device = self.id.0, target = tmf.target, ?tmf.effect, "task management function complete");
            if let Some(Some(q)) = self.queues.get_mut(CONTROL_QUEUE) {
                tmf.resp.write(mem, &tmf_resp(Response::FUNCTION_COMPLETE));
                q.push_used(mem, tmf.head, 1, self.id);
                q.in_flight = q.in_flight.saturating_sub(1);
            }
        }
    }

    /// Pops and handles new requests on the running queues among `queues`.
    fn poll_queues(
        &mut self,
        mem: &GuestMemoryTable,
        io_mem: &IoMemory,
        queues: std::ops::Range<usize>,
    ) -> usize {
        let mut work = 0;
        for qi in queues {
            if qi == EVENT_QUEUE && !self.events.has_work() {
                continue;
            }
            let Some(Some(q)) = self.queues.get_mut(qi) else {
                continue;
            };
            if q.stopping.is_some() || q.broken {
                continue;
            }
            let room = q.free.len().min(POP_BATCH);
            let room = if qi == EVENT_QUEUE {
                room.min(self.events.pending.len().max(1))
            } else {
                room
            };
            let popped = match q.vq.pop_heads(mem, &mut q.heads[..room]) {
                Ok(n) => n,
                Err(err) => {
                    tracing::error!(device = self.id.0, queue = qi, %err, "avail ring unusable; queue stopped");
                    q.broken = true;
                    continue;
                }
            };
            if popped == 0 {
                continue;
            }
            if let Err(err) = q.vq.disable_kicks(mem) {
                tracing::error!(device = self.id.0, queue = qi, %err, "used ring unusable; queue stopped");
                q.broken = true;
                continue;
            }
            work += popped;
            for i in 0..popped {
                let head = match self.queues.get(qi).and_then(Option::as_ref) {
                    Some(q) => q.heads[i],
                    None => break,
                };
                match qi {
                    CONTROL_QUEUE => self.control_request(mem, head),
                    EVENT_QUEUE => self.event_buffer(mem, head),
                    _ => self.command(mem, io_mem, qi, head),
                }
                if self
                    .queues
                    .get(qi)
                    .and_then(Option::as_ref)
                    .is_none_or(|q| q.broken)
                {
                    break;
                }
            }
        }
        work
    }

    /// Walks `head`'s chain on queue `qi` into the queue's chain buffer. On a malformed chain the
    /// head is returned unused (or the queue stopped if even the head is bad); `false` then.
    fn walk(&mut self, mem: &GuestMemoryTable, qi: usize, head: u16) -> bool {
        let id = self.id;
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            return false;
        };
        match q.vq.walk_chain(mem, head, &mut *q.chain) {
            Ok(()) => true,
            Err(err) => {
                if err.head_is_valid() {
                    tracing::debug!(device = id.0, queue = qi, %err, "malformed chain returned unused");
                    q.push_used(mem, head, 0, id);
                } else {
                    tracing::error!(device = id.0, queue = qi, %err, "bad head; queue stopped (device needs reset)");
                    q.fail();
                }
                false
            }
        }
    }

    /// Delivers one pending event into the event buffer at `head`.
    fn event_buffer(&mut self, mem: &GuestMemoryTable, head: u16) {
        if !self.walk(mem, EVENT_QUEUE, head) {
            return;
        }
        let id = self.id;
        let Some(Some(q)) = self.queues.get_mut(EVENT_QUEUE) else {
            return;
        };
        let Some(e) = self.events.next() else {
            // Popped only when an event is pending; give the buffer back unused.
            q.push_used(mem, head, 0, id);
            return;
        };
        if q.chain.writable_len() < EVENT_LEN as u32 {
            tracing::debug!(device = id.0, "event buffer too small; returned unused");
            self.events.unpop(e);
            q.push_used(mem, head, 0, id);
            return;
        }
        let bytes = e.to_bytes();
        if scatter(mem, q.chain.writable(), 0, &bytes) != EVENT_LEN {
            self.events.unpop(e);
            q.push_used(mem, head, 0, id);
            return;
        }
        tracing::debug!(
            device = id.0,
            event = e.event,
            reason = e.reason,
            target = e.lun[1],
            missed = e.events_missed,
            "event delivered"
        );
        q.push_used(mem, head, EVENT_LEN as u32, id);
    }

    /// Handles one control-queue request.
    fn control_request(&mut self, mem: &GuestMemoryTable, head: u16) {
        if !self.walk(mem, CONTROL_QUEUE, head) {
            return;
        }
        let id = self.id;
        let Some(Some(q)) = self.queues.get_mut(CONTROL_QUEUE) else {
            return;
        };
        let mut buf = [0u8; TMF_REQ_LEN];
        let n = gather(mem, q.chain.readable(), 0, &mut buf);
        let writable_len = q.chain.writable_len() as usize;
        let request = ControlRequest::parse(&buf[..n]);
        let (reply, len): ([u8; 5], usize) = match request {
            Ok(ControlRequest::An(an)) => {
                // No asynchronous events are supported: answer with none, as QEMU does.
                tracing::debug!(
                    device = id.0,
                    subscribe = an.subscribe,
                    requested = an.event_requested,
                    "asynchronous notification request"
                );
                let resp = AnRespRepr {
                    event_actual: 0,
                    response: Response::Ok,
                };
                (resp.to_bytes(), 5)
            }
            Ok(ControlRequest::Tmf(tmf)) => {
                let Some(resp) = RespTarget::of(q.chain.writable(), 1) else {
                    q.push_used(mem, head, 0, id);
                    return;
                };
                match self.task_management(mem, &tmf, head, resp) {
                    Some(response) => ([response.code(), 0, 0, 0, 0], 1),
                    None => return,
                }
            }
            Err(err) => {
                tracing::debug!(device = id.0, %err, "malformed control request");
                let subtype_bad = matches!(
                    err,
                    rvhost_core::virtio_scsi::VirtioScsiError::UnknownTmfSubtype(_)
                );
                let response = if subtype_bad {
                    Response::FunctionRejected
                } else {
                    Response::Failure
                };
                ([response.code(), 0, 0, 0, 0], 1)
            }
        };
        let Some(Some(q)) = self.queues.get_mut(CONTROL_QUEUE) else {
            return;
        };
        let len = len.min(writable_len);
        let written = scatter(mem, q.chain.writable(), 0, &reply[..len]);
        q.push_used(mem, head, u32::try_from(written).unwrap_or(0), id);
    }

    /// Answers a TMF at once, or queues it until the commands it concerns are gone (`None`).
    fn task_management(
        &mut self,
        mem: &GuestMemoryTable,
        tmf: &TmfReqRepr,
        head: u16,
        resp: RespTarget,
    ) -> Option<Response> {
        let Ok(addr) = LunAddress::parse(&tmf.lun) else {
            return Some(Response::BadTarget);
        };
        let exists = self
            .targets
            .get(usize::from(addr.target))
            .and_then(Option::as_ref)
            .is_some_and(|t| t.removing.is_none());
        if !exists {
            return Some(Response::BadTarget);
        }
        if addr.lun != 0 {
            return Some(Response::IncorrectLun);
        }
        let next_seq = self
            .targets
            .get(usize::from(addr.target))
            .and_then(Option::as_ref)
            .map_or(0, |t| t.next_seq);
        let (oldest, found) = self.in_flight_on(addr.target, Some(tmf.tag));
        tracing::info!(device = self.id.0, target = addr.target, subtype = ?tmf.subtype, tag = tmf.tag, "task management function");
        let (wait, effect) = match tmf.subtype {
            TmfSubtype::QueryTask => {
                return Some(if found {
                    Response::FunctionSucceeded
                } else {
                    Response::FUNCTION_COMPLETE
                })
            }
            TmfSubtype::QueryTaskSet => {
                return Some(if oldest.is_some() {
                    Response::FunctionSucceeded
                } else {
                    Response::FUNCTION_COMPLETE
                })
            }
            TmfSubtype::ClearAca => return Some(Response::FunctionRejected),
            // A command cannot be taken back from the bdev: it is "aborted" once it has finished.
            TmfSubtype::AbortTask => (TmfWait::Task(tmf.tag), TmfEffect::None),
            TmfSubtype::AbortTaskSet | TmfSubtype::ClearTaskSet => {
                (TmfWait::OlderThan(next_seq), TmfEffect::None)
            }
            TmfSubtype::LogicalUnitReset => (TmfWait::OlderThan(next_seq), TmfEffect::LunReset),
            TmfSubtype::ITNexusReset => (TmfWait::OlderThan(next_seq), TmfEffect::NexusReset),
        };
        self.tmfs.push(PendingTmf {
            head,
            resp,
            target: addr.target,
            wait,
            effect,
        });
        if let Some(Some(q)) = self.queues.get_mut(CONTROL_QUEUE) {
            q.in_flight += 1;
        }
        self.settle_pending = true;
        // Answered at once when nothing needs to drain.
        self.settle_tmfs(mem);
        None
    }

    /// Handles one command on request queue `qi`.
    fn command(&mut self, mem: &GuestMemoryTable, io_mem: &IoMemory, qi: usize, head: u16) {
        if !self.walk(mem, qi, head) {
            return;
        }
        let id = self.id;
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            return;
        };
        let readable_len = u64::from(q.chain.readable_len());
        let writable_len = u64::from(q.chain.writable_len());
        let resp = match RespTarget::of(q.chain.writable(), RESP_LEN) {
            Some(r) if readable_len >= REQ_LEN as u64 => r,
            _ => {
                tracing::debug!(
                    device = id.0,
                    queue = qi,
                    "command without room for header or response; returned unused"
                );
                q.push_used(mem, head, 0, id);
                return;
            }
        };
        let sc = &mut self.scratch;
        gather(mem, q.chain.readable(), 0, &mut sc.header);
        // Fields are read from the header in place; copying it into a CmdReqRepr cost a tenth of
        // a command's instructions.
        let Ok(req) = CmdReq::new_checked(&sc.header[..], CDB_SIZE) else {
            q.push_used(mem, head, 0, id);
            return;
        };
        tracing::trace!(
            device = id.0,
            queue = qi,
            head,
            tag = req.tag(),
            target = req.lun()[1],
            opcode = req.cdb().first().copied().unwrap_or(0),
            "command"
        );
        let data_out_len = readable_len - REQ_LEN as u64;
        let data_in_len = writable_len - RESP_LEN as u64;

        let bad_target = |q: &mut ScsiQueue| {
            let header = CmdRespRepr {
                sense_len: 0,
                residual: u32::try_from(data_in_len.max(data_out_len)).unwrap_or(u32::MAX),
                status_qualifier: 0,
                status: 0,
                response: Response::BadTarget,
            };
            resp.write(mem, &header.to_bytes());
            q.push_used(mem, head, RESP_LEN as u32, id);
        };
        let Ok(addr) = LunAddress::parse(&req.lun()) else {
            bad_target(q);
            return;
        };
        let Some(target) = self
            .targets
            .get_mut(usize::from(addr.target))
            .and_then(Option::as_mut)
            .filter(|t| t.removing.is_none())
        else {
            bad_target(q);
            return;
        };
        let Some(si) = q.take_slot() else {
            tracing::error!(
                device = id.0,
                queue = qi,
                "no free request slot; queue stopped"
            );
            q.broken = true;
            return;
        };

        let respond = |q: &mut ScsiQueue, c: &Completion, sense: &[u8]| {
            let header = CmdRespRepr::for_completion(c, SENSE_SIZE);
            tracing::trace!(
                device = id.0,
                head,
                status = header.status,
                "command answered"
            );
            let mut bytes = [0u8; RESP_LEN];
            bytes[..12].copy_from_slice(&header.to_bytes());
            let sl = (header.sense_len as usize).min(sense.len());
            bytes[12..12 + sl].copy_from_slice(&sense[..sl]);
            resp.write(mem, &bytes);
            let len = (RESP_LEN as u64).saturating_add(c.transferred);
            q.push_used(mem, head, u32::try_from(len).unwrap_or(u32::MAX), id);
            q.release_slot(si);
        };

        if addr.lun != 0 {
            let r = Request {
                cdb: req.cdb(),
                data_out: &[],
                data_out_len,
                data_in_len,
                luns: &[0],
            };
            let c = execute_without_lun(&r, &mut sc.data_in, &mut sc.sense);
            let n = usize::try_from(c.transferred)
                .unwrap_or(usize::MAX)
                .min(sc.data_in.len());
            scatter(mem, q.chain.writable(), RESP_LEN as u64, &sc.data_in[..n]);
            respond(q, &c, &sc.sense);
            return;
        }

        let copy = target
            .lun
            .data_out_copy_len(req.cdb())
            .min(usize::try_from(data_out_len).unwrap_or(usize::MAX))
            .min(sc.data_out.len());
        let copied = gather(
            mem,
            q.chain.readable(),
            REQ_LEN as u64,
            &mut sc.data_out[..copy],
        );
        let r = Request {
            cdb: req.cdb(),
            data_out: &sc.data_out[..copied],
            data_out_len,
            data_in_len,
            luns: &[0],
        };
        let plan = match target.lun.execute(&r, &mut sc.data_in, &mut sc.sense) {
            Outcome::Done(c) => {
                let n = usize::try_from(c.transferred)
                    .unwrap_or(usize::MAX)
                    .min(sc.data_in.len());
                scatter(mem, q.chain.writable(), RESP_LEN as u64, &sc.data_in[..n]);
                respond(q, &c, &sc.sense);
                return;
            }
            Outcome::Io(plan) => plan,
        };

        let seq = target.next_seq;
        target.next_seq = target.next_seq.wrapping_add(1);
        if let Some(slot) = q.slots.get_mut(si) {
            *slot = Slot {
                head,
                target: addr.target,
                tag: req.tag(),
                seq,
                active: true,
                resp,
                plan: PlanSummary::of(&plan),
                pending: 0,
                failed: None,
                flush_after: false,
            };
        }
        let io_tag = tag(qi, si);
        let result = Self::submit(
            target,
            q,
            si,
            io_tag,
            &plan,
            (&mut sc.iovs, &mut sc.pattern),
            io_mem,
        );
        match result {
            Ok(0) => {
                // Nothing to do on the bdev (a flush without a cache).
                let c = target.lun.complete_io(&plan, Ok(()), &mut sc.sense);
                respond(q, &c, &sc.sense);
            }
            Ok(n) => {
                if let Some(slot) = q.slots.get_mut(si) {
                    slot.pending = n;
                }
                target.in_flight += 1;
            }
            Err(e) => {
                let c = target.lun.complete_io(&plan, Err(e), &mut sc.sense);
                respond(q, &c, &sc.sense);
            }
        }
    }

    /// Submits `plan`'s bdev I/O; returns how many I/Os are outstanding (0: complete now).
    fn submit(
        target: &mut AttachedTarget,
        q: &mut ScsiQueue,
        si: usize,
        io_tag: u64,
        plan: &IoPlan<'_>,
        (iovs, pattern): (&mut Vec<IoVec>, &mut Vec<IoVec>),
        io_mem: &IoMemory,
    ) -> Result<u32, IoError> {
        let supports_flush = target.supports_flush;
        let wce = target.lun.write_cache_enabled();
        let block_size = u64::from(target.lun.config().block_size);
        let Some(channel) = target.channel.as_mut() else {
            return Err(IoError::NotReady);
        };
        let one = |channel: &mut Box<dyn BdevChannel>,
                   kind: IoKind,
                   offset_blocks: u64,
                   num_blocks: u64,
                   iovs: &[IoVec]|
         -> Result<u32, IoError> {
            let io = BdevIo {
                kind,
                offset_blocks,
                num_blocks,
                iovs,
                tag: io_tag,
                mem: io_mem,
            };
            match channel.submit(&io) {
                Ok(()) => Ok(1),
                Err(err) => {
                    tracing::debug!(%err, "bdev refused I/O");
                    Err(IoError::Medium)
                }
            }
        };
        let chain = &q.chain;
        match plan.op {
            IoOp::Read { lba, blocks, .. } => {
                iovs.clear();
                if !sub_iovs(chain.writable(), RESP_LEN as u64, plan.data_len, iovs) {
                    return Err(IoError::Medium);
                }
                one(channel, IoKind::Read, lba, blocks, iovs)
            }
            IoOp::Write { lba, blocks, fua } => {
                iovs.clear();
                if !sub_iovs(chain.readable(), REQ_LEN as u64, plan.data_len, iovs) {
                    return Err(IoError::Medium);
                }
                let n = one(channel, IoKind::Write, lba, blocks, iovs)?;
                if supports_flush && (fua || !wce) {
                    if let Some(slot) = q.slots.get_mut(si) {
                        slot.flush_after = true;
                    }
                }
                Ok(n)
            }
            IoOp::Flush { .. } => {
                if !supports_flush {
                    // Nothing is cached above a bdev that cannot flush.
                    return Ok(0);
                }
                one(channel, IoKind::Flush, 0, 0, &[])
            }
            IoOp::Unmap(ranges) => {
                let mut submitted = 0u32;
                for range in ranges.iter() {
                    match one(channel, IoKind::Unmap, range.lba, range.blocks, &[]) {
                        Ok(n) => submitted += n,
                        Err(e) if submitted == 0 => return Err(e),
                        Err(_) => {
                            if let Some(slot) = q.slots.get_mut(si) {
                                slot.failed = Some(IoError::Medium);
                            }
                            break;
                        }
                    }
                }
                Ok(submitted)
            }
            IoOp::WriteZeroes { lba, blocks } => {
                if target.supports_write_zeroes {
                    return one(channel, IoKind::WriteZeroes, lba, blocks, &[]);
                }
                Err(IoError::Unsupported)
            }
            IoOp::WriteSame { lba, blocks, block } => {
                if block.iter().all(|&b| b == 0) && target.supports_write_zeroes {
                    return one(channel, IoKind::WriteZeroes, lba, blocks, &[]);
                }
                // The pattern is the first block of the initiator's data-out; the bdev writes it
                // straight from guest memory, repeated in the I/O vector.
                pattern.clear();
                if !sub_iovs(chain.readable(), REQ_LEN as u64, block_size, pattern) {
                    return Err(IoError::Unsupported);
                }
                let mut submitted = 0u32;
                let mut done = 0u64;
                while done < blocks {
                    let n = (blocks - done).min(WRITE_SAME_BLOCKS_PER_IO);
                    iovs.clear();
                    for _ in 0..n {
                        iovs.extend_from_slice(pattern);
                    }
                    let start = lba.saturating_add(done);
                    match one(channel, IoKind::Write, start, n, iovs) {
                        Ok(k) => submitted += k,
                        Err(e) if submitted == 0 => return Err(e),
                        Err(_) => {
                            if let Some(slot) = q.slots.get_mut(si) {
                                slot.failed = Some(IoError::Medium);
                            }
                            break;
                        }
                    }
                    done += n;
                }
                Ok(submitted)
            }
        }
    }

    /// Collects bdev completions of every target.
    fn poll_completions(&mut self, mem: &GuestMemoryTable, io_mem: &IoMemory) -> usize {
        let mut work = 0;
        let id = self.id;
        for target in self.targets.iter_mut().flatten() {
            let AttachedTarget {
                lun,
                channel,
                in_flight,
                ..
            } = target;
            let Some(channel) = channel.as_mut() else {
                continue;
            };
            if channel.in_flight() == 0 {
                continue;
            }
            let queues = &mut self.queues;
            let to_flush = &mut self.to_flush;
            let sense = &mut self.scratch.sense;
            work += channel.poll(&mut |io_tag, status| {
                let (qi, si) = untag(io_tag);
                let Some(Some(q)) = queues.get_mut(qi) else {
                    return;
                };
                let Some(slot) = q.slots.get_mut(si) else {
                    return;
                };
                slot.pending = slot.pending.saturating_sub(1);
                match status {
                    IoStatus::Success => {}
                    IoStatus::Failed => slot.failed = Some(IoError::Medium),
                    IoStatus::Unsupported => slot.failed = Some(IoError::Unsupported),
                }
                if slot.pending > 0 {
                    return;
                }
                if slot.flush_after && slot.failed.is_none() {
                    slot.flush_after = false;
                    to_flush.push((qi, si));
                    return;
                }
                let result = slot.failed.map_or(Ok(()), Err);
                let c = lun.complete_io(&slot.plan.plan(), result, &mut sense[..]);
                let slot = *slot;
                finish(q, mem, si, &slot, &c, &sense[..], id);
                *in_flight = in_flight.saturating_sub(1);
            });
            // Writes that must be durable: flush now, complete when the flush does.
            while let Some((qi, si)) = to_flush.pop() {
                let Some(Some(q)) = queues.get_mut(qi) else {
                    continue;
                };
                let io = BdevIo {
                    kind: IoKind::Flush,
                    offset_blocks: 0,
                    num_blocks: 0,
                    iovs: &[],
                    tag: tag(qi, si),
                    mem: io_mem,
                };
                let submitted = channel.submit(&io);
                let Some(slot) = q.slots.get_mut(si) else {
                    continue;
                };
                match submitted {
                    Ok(()) => slot.pending = 1,
                    Err(err) => {
                        tracing::debug!(%err, "flush after write refused");
                        let c = lun.complete_io(
                            &slot.plan.plan(),
                            Err(IoError::Medium),
                            &mut sense[..],
                        );
                        let slot = *slot;
                        finish(q, mem, si, &slot, &c, &sense[..], id);
                        *in_flight = in_flight.saturating_sub(1);
                    }
                }
            }
        }
        work
    }

    /// Publishes each queue's used elements and signals its call eventfd if the driver wants it.
    fn publish(&mut self, mem: &GuestMemoryTable) {
        for (qi, queue) in self.queues.iter_mut().enumerate() {
            if let Some(q) = queue {
                q.publish(mem, self.id, qi);
            }
        }
    }

    fn drain_target_ops(&mut self) -> usize {
        let mut work = 0;
        // Empty or disconnected (the controller is gone): nothing more to apply.
        while let Ok(op) = self.control.try_recv() {
            work += 1;
            self.target_op(op);
        }
        work
    }
}

/// Writes a command's response, returns its head and frees its slot.
fn finish(
    q: &mut ScsiQueue,
    mem: &GuestMemoryTable,
    si: usize,
    slot: &Slot,
    c: &Completion,
    sense: &[u8],
    device: DeviceId,
) {
    let header = CmdRespRepr::for_completion(c, SENSE_SIZE);
    tracing::trace!(
        device = device.0,
        head = slot.head,
        status = header.status,
        "command completed"
    );
    let mut bytes = [0u8; RESP_LEN];
    bytes[..12].copy_from_slice(&header.to_bytes());
    let sl = (header.sense_len as usize).min(sense.len());
    bytes[12..12 + sl].copy_from_slice(&sense[..sl]);
    if !slot.resp.write(mem, &bytes) {
        tracing::warn!(device = device.0, "response buffer no longer mapped");
    }
    let data_in = if slot.plan.is_read { c.transferred } else { 0 };
    let len = (RESP_LEN as u64).saturating_add(data_in);
    q.push_used(
        mem,
        slot.head,
        u32::try_from(len).unwrap_or(u32::MAX),
        device,
    );
    q.release_slot(si);
}

impl Task for ScsiDevice {
    fn id(&self) -> DeviceId {
        self.id
    }

    fn poll(&mut self) -> usize {
        if self.removed {
            // Still answer target changes so the controller never waits for a dead session.
            return self.drain_target_ops();
        }
        // The tables are moved out for the round and put back, rather than cloned: an Arc clone
        // is a locked instruction, which waits for this round's used-ring stores to drain.
        let mut work = 0;
        if let (Some(mem), Some(io_mem)) = (self.memory.take(), self.io_memory.take()) {
            work += self.poll_queues(&mem, &io_mem, FIRST_REQUEST_QUEUE..self.queues.len());
            work += self.poll_completions(&mem, &io_mem);
            self.rounds_since_mgmt = self.rounds_since_mgmt.saturating_add(1);
            if work == 0 || self.rounds_since_mgmt >= MGMT_INTERVAL {
                self.rounds_since_mgmt = 0;
                work += self.drain_target_ops();
                let mgmt_end = FIRST_REQUEST_QUEUE.min(self.queues.len());
                work += self.poll_queues(&mem, &io_mem, CONTROL_QUEUE..mgmt_end);
            }
            self.memory = Some(mem);
            self.io_memory = Some(io_mem);
        } else {
            work += self.drain_target_ops();
        }
        let deferred = self.settle_pending;
        if deferred {
            self.settle();
        }
        if self.events.has_work() && self.memory.is_some() {
            work += self.poll_events_only();
        }
        if work > 0 || deferred {
            if let Some(mem) = self.memory.take() {
                self.publish(&mem);
                self.memory = Some(mem);
            }
        }
        work
    }

    fn control(&mut self, message: Message) {
        match message.downcast::<DeviceOp>() {
            Ok(op) => self.apply(*op),
            Err(_) => tracing::warn!(device = self.id.0, "unknown control message dropped"),
        }
    }

    fn is_finished(&self) -> bool {
        self.removed
    }
}

impl ScsiDevice {
    /// Applies a control operation.
    pub fn apply(&mut self, op: DeviceOp) {
        match op {
            DeviceOp::SetMemory { memory, reply } => {
                self.set_memory(memory);
                let _ = reply.send(());
            }
            DeviceOp::StartQueue {
                index,
                setup,
                reply,
            } => {
                let _ = reply.send(self.start_queue(index, setup));
            }
            DeviceOp::StopQueue { index, reply } => {
                match self
                    .queues
                    .get_mut(usize::from(index))
                    .and_then(Option::as_mut)
                {
                    Some(q) => {
                        q.stopping = Some(reply);
                        self.settle_pending = true;
                    }
                    None => {
                        let _ = reply.send(None);
                    }
                }
                self.settle();
            }
            DeviceOp::SetCall { index, call, reply } => {
                if let Some(q) = self
                    .queues
                    .get_mut(usize::from(index))
                    .and_then(Option::as_mut)
                {
                    // virtio-scsi never times commands out: a missed signal would hang the driver.
                    q.set_call(call);
                }
                let _ = reply.send(());
            }
            DeviceOp::Remove { reply } => {
                self.remove_reply = Some(reply);
                self.settle_pending = true;
                self.settle();
            }
        }
    }
}

impl ScsiDevice {
    /// Delivers events raised during this round (by a detach that just drained) without waiting
    /// for the next round's queue pass.
    fn poll_events_only(&mut self) -> usize {
        let Some(mem) = self.memory.clone() else {
            return 0;
        };
        let Some(Some(q)) = self.queues.get_mut(EVENT_QUEUE) else {
            return 0;
        };
        if q.stopping.is_some() || q.broken {
            return 0;
        }
        let room = self.events.pending.len().clamp(1, POP_BATCH);
        let popped = match q.vq.pop_heads(mem.as_ref(), &mut q.heads[..room]) {
            Ok(n) => n,
            Err(err) => {
                tracing::error!(device = self.id.0, %err, "event queue avail ring unusable; queue stopped");
                q.broken = true;
                return 0;
            }
        };
        for i in 0..popped {
            let head = match self.queues.get(EVENT_QUEUE).and_then(Option::as_ref) {
                Some(q) => q.heads[i],
                None => break,
            };
            self.event_buffer(&mem, head);
        }
        popped
    }
}

#[cfg(test)]
mod tests {
    //! The session device driven synchronously: a real memory table over a /dev/shm file, RAM
    //! bdevs (or a bdev whose completions the test holds back), and `apply`/`poll`.

    use std::os::fd::OwnedFd;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::sync_channel;

    use rvhost_core::mem::GuestMemory;
    use rvhost_core::virtio::{bit, feature};

    use super::*;
    use crate::bdev::malloc::{MallocBdev, MemoryBudget};
    use crate::bdev::testing::{HeldBdev, HeldIo as Held};
    use crate::bdev::Bdev;
    use crate::scsi::ScsiController;
    use crate::vhost::memory::RegionSpec;
    use crate::vhost::{ApplyDeviceOp, DeviceBackend, EventNotifier};

    const MEM: u64 = 1 << 20;
    const QSIZE: u16 = 16;
    const REQ: u64 = 0x10000;
    const RESP: u64 = 0x11000;
    const DATA: u64 = 0x20000;
    const CTRL_REQ: u64 = 0x12000;
    const CTRL_RESP: u64 = 0x12100;
    const EVENTS: u64 = 0x13000;

    fn ring(q: u16) -> (u64, u64, u64) {
        let base = u64::from(q) * 0x3000;
        (base, base + 0x1000, base + 0x2000)
    }

    fn table() -> Arc<GuestMemoryTable> {
        let path = format!(
            "/dev/shm/rvhost-scsi-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(MEM).unwrap();
        let spec = RegionSpec {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: 0x7000_0000,
            mmap_offset: 0,
        };
        GuestMemoryTable::from_regions([(spec, OwnedFd::from(file))]).unwrap()
    }

    struct Rig {
        mem: Arc<GuestMemoryTable>,
        controller: Arc<ScsiController>,
        device: Box<dyn Task>,
        avail: [u16; 3],
    }

    fn malloc(name: &str, blocks: u64, bs: u32) -> Arc<dyn Bdev> {
        let budget = MemoryBudget::new(1 << 30);
        MallocBdev::new(name, blocks, bs, [7; 16], &budget).unwrap()
    }

    impl Rig {
        fn new(targets: &[(u8, Arc<dyn Bdev>)]) -> Self {
            let controller = Arc::new(ScsiController::new("scsi-test"));
            for (t, bdev) in targets {
                controller.add_target(Some(*t), Arc::clone(bdev)).unwrap();
            }
            let (reactor, _manual) = crate::reactor::manual(0);
            let mut device = controller.new_device(DeviceId(1), &reactor).unwrap();
            let mem = table();
            let (tx, rx) = sync_channel(1);
            device.apply_op(DeviceOp::SetMemory {
                memory: Arc::clone(&mem),
                reply: tx,
            });
            rx.try_recv().unwrap();
            let features =
                bit(feature::VIRTIO_F_VERSION_1) | bit(scsi_feature::VIRTIO_SCSI_F_HOTPLUG);
            for q in 0..3u16 {
                let (desc, avail, used) = ring(q);
                let setup = QueueSetup {
                    size: QSIZE,
                    desc_gpa: desc,
                    avail_gpa: avail,
                    used_gpa: used,
                    last_avail: 0,
                    features: VirtioFeatures(features),
                    call: None,
                    err: None,
                    memory: Arc::clone(&mem),
                };
                let (tx, rx) = sync_channel(1);
                device.apply_op(DeviceOp::StartQueue {
                    index: q,
                    setup,
                    reply: tx,
                });
                rx.try_recv().unwrap().unwrap();
            }
            Rig {
                mem,
                controller,
                device,
                avail: [0; 3],
            }
        }

        /// Posts a chain of (address, length, device-writable) on queue `q`.
        fn post(&mut self, q: u16, chain: &[(u64, u32, bool)]) {
            let (desc, avail, _) = ring(q);
            let n = self.avail[usize::from(q)];
            let first = (n * 4) % QSIZE;
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let index = first + i as u16;
                let last = i + 1 == chain.len();
                let flags = u16::from(!last) | if write { 2 } else { 0 };
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..16].copy_from_slice(&(index + 1).to_le_bytes());
                self.mem.write(desc + 16 * u64::from(index), &b).unwrap();
            }
            let slot = u64::from(n % QSIZE);
            self.mem
                .store_u16(avail + 4 + 2 * slot, first, Ordering::Relaxed)
                .unwrap();
            self.avail[usize::from(q)] = n.wrapping_add(1);
            self.mem
                .store_u16(avail + 2, n.wrapping_add(1), Ordering::Release)
                .unwrap();
        }

        /// Posts a command to `target`/`lun` on request queue 2 with data-out or data-in.
        fn command(&mut self, target: u8, lun: u16, tag: u64, cdb: &[u8], out: &[u8], in_len: u32) {
            let mut req = [0u8; REQ_LEN];
            let addr = LunAddress { target, lun };
            req[0..8].copy_from_slice(&addr.emit());
            req[8..16].copy_from_slice(&tag.to_le_bytes());
            req[19..19 + cdb.len()].copy_from_slice(cdb);
            self.mem.write(REQ, &req).unwrap();
            self.mem.write(RESP, &[0xee; RESP_LEN]).unwrap();
            let mut chain = vec![(REQ, REQ_LEN as u32, false)];
            if !out.is_empty() {
                self.mem.write(DATA, out).unwrap();
                chain.push((DATA, out.len() as u32, false));
            }
            chain.push((RESP, RESP_LEN as u32, true));
            if in_len > 0 {
                chain.push((DATA, in_len, true));
            }
            self.post(2, &chain);
        }

        fn used_idx(&self, q: u16) -> u16 {
            self.mem.load_u16(ring(q).2 + 2, Ordering::Acquire).unwrap()
        }

        /// (head, length) of used element `i` of queue `q`.
        fn used(&self, q: u16, i: u16) -> (u32, u32) {
            let mut e = [0u8; 8];
            self.mem
                .read(ring(q).2 + 4 + 8 * u64::from(i % QSIZE), &mut e)
                .unwrap();
            (
                u32::from_le_bytes(e[0..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..8].try_into().unwrap()),
            )
        }

        /// (response, status, sense key) of the last command.
        fn response(&self) -> (u8, u8, u8) {
            let mut r = [0u8; RESP_LEN];
            self.mem.read(RESP, &mut r).unwrap();
            (r[11], r[10], r[12 + 2] & 0x0f)
        }

        fn data(&self, len: usize) -> Vec<u8> {
            let mut d = vec![0u8; len];
            self.mem.read(DATA, &mut d).unwrap();
            d
        }

        fn tmf(&mut self, subtype: u32, target: u8, tag: u64) {
            let mut req = [0u8; TMF_REQ_LEN];
            req[4..8].copy_from_slice(&subtype.to_le_bytes());
            req[8..16].copy_from_slice(&LunAddress { target, lun: 0 }.emit());
            req[16..24].copy_from_slice(&tag.to_le_bytes());
            self.mem.write(CTRL_REQ, &req).unwrap();
            self.mem.write(CTRL_RESP, &[0xee]).unwrap();
            self.post(
                0,
                &[(CTRL_REQ, TMF_REQ_LEN as u32, false), (CTRL_RESP, 1, true)],
            );
        }

        fn tmf_response(&self) -> u8 {
            let mut b = [0u8; 1];
            self.mem.read(CTRL_RESP, &mut b).unwrap();
            b[0]
        }

        fn event_buffer(&mut self, i: u64) {
            self.mem
                .write(EVENTS + 0x20 * i, &[0xee; EVENT_LEN])
                .unwrap();
            self.post(1, &[(EVENTS + 0x20 * i, EVENT_LEN as u32, true)]);
        }

        fn event(&self, i: u64) -> EventRepr {
            let mut b = [0u8; EVENT_LEN];
            self.mem.read(EVENTS + 0x20 * i, &mut b).unwrap();
            EventRepr::parse(&rvhost_core::virtio_scsi::Event::new_checked(&b[..]).unwrap())
        }

        /// Runs `change` on another thread (it waits for the device) while polling.
        fn while_polling<T: Send + 'static>(
            &mut self,
            change: impl FnOnce(Arc<ScsiController>) -> T + Send + 'static,
        ) -> T {
            let controller = Arc::clone(&self.controller);
            let worker = std::thread::spawn(move || change(controller));
            while !worker.is_finished() {
                self.device.poll();
                std::thread::yield_now();
            }
            worker.join().unwrap()
        }
    }

    #[test]
    fn inquiry_and_read_capacity_describe_the_bdev() {
        let mut rig = Rig::new(&[(0, malloc("M0", 2048, 4096))]);
        rig.command(0, 0, 1, &[0x12, 0, 0, 0, 96, 0], &[], 96);
        rig.device.poll();
        assert_eq!(rig.used_idx(2), 1);
        assert_eq!(rig.response(), (0, 0, 0));
        let d = rig.data(36);
        assert_eq!(&d[8..16], b"RVHOST  ");
        assert_eq!(&d[16..32], b"rvhost Malloc   ");
        assert_eq!(rig.used(2, 0).1, RESP_LEN as u32 + 36);
        // READ CAPACITY(16): last LBA 2047, block size 4096, LBPME set (the bdev can unmap).
        rig.command(
            0,
            0,
            2,
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            &[],
            32,
        );
        rig.device.poll();
        let d = rig.data(32);
        assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 2047);
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 4096);
        assert_ne!(d[14] & 0x80, 0, "LBPME");
        // VPD 0x80: the serial is the UUID in hex.
        rig.command(0, 0, 3, &[0x12, 1, 0x80, 0, 64, 0], &[], 64);
        rig.device.poll();
        let d = rig.data(36);
        assert_eq!(&d[4..36], "07".repeat(16).as_bytes());
    }

    #[test]
    fn a_call_eventfd_handed_over_after_a_completion_is_signalled_at_once() {
        use std::os::fd::AsFd;
        let mut rig = Rig::new(&[(0, malloc("M0", 64, 512))]);
        // Completed while the queue has no call eventfd yet (QEMU sends it on MSI-X unmask).
        rig.command(0, 0, 1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.used_idx(2), 1);
        let efd = rvhost_platform_linux::EventFd::new().unwrap();
        let file = std::fs::File::from(efd.as_fd().try_clone_to_owned().unwrap());
        let call = Arc::new(EventNotifier::from_file(file).unwrap());
        let (tx, rx) = sync_channel(1);
        rig.device.apply_op(DeviceOp::SetCall {
            index: 2,
            call: Some(call),
            reply: tx,
        });
        rx.try_recv().unwrap();
        assert_eq!(
            efd.consume().unwrap(),
            1,
            "the driver is told to look at its ring"
        );
    }

    #[test]
    fn absent_target_is_bad_target_and_absent_lun_is_check_condition() {
        let mut rig = Rig::new(&[(0, malloc("M0", 64, 512))]);
        rig.command(5, 0, 1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.response().0, Response::BadTarget.code());
        // Target numbers past the 8 targets are absent too.
        rig.command(200, 0, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.response().0, Response::BadTarget.code());
        // LUN 1 of an existing target: LOGICAL UNIT NOT SUPPORTED (ILLEGAL REQUEST).
        rig.command(0, 1, 3, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.response(), (0, 2, 5));
        assert_eq!(rig.used_idx(2), 3);
    }

    #[test]
    fn write_read_back_unmap_and_write_same_reach_the_bdev() {
        let mut rig = Rig::new(&[(1, malloc("M1", 256, 512))]);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        // WRITE(10) of 2 blocks at LBA 10.
        rig.command(1, 0, 1, &[0x2a, 0, 0, 0, 0, 10, 0, 0, 2, 0], &pattern, 0);
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.response(), (0, 0, 0));
        rig.mem.write(DATA, &[0u8; 1024]).unwrap();
        rig.command(1, 0, 2, &[0x28, 0, 0, 0, 0, 10, 0, 0, 2, 0], &[], 1024);
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.response(), (0, 0, 0));
        assert_eq!(rig.data(1024), pattern);
        assert_eq!(rig.used(2, 1).1, RESP_LEN as u32 + 1024);
        // UNMAP block 11: it reads back as zeros, block 10 is intact.
        let mut list = [0u8; 24];
        list[0..2].copy_from_slice(&22u16.to_be_bytes());
        list[2..4].copy_from_slice(&16u16.to_be_bytes());
        list[8..16].copy_from_slice(&11u64.to_be_bytes());
        list[16..20].copy_from_slice(&1u32.to_be_bytes());
        rig.command(1, 0, 3, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.response(), (0, 0, 0));
        rig.command(1, 0, 4, &[0x28, 0, 0, 0, 0, 10, 0, 0, 2, 0], &[], 1024);
        rig.device.poll();
        rig.device.poll();
        let d = rig.data(1024);
        assert_eq!(&d[..512], &pattern[..512]);
        assert!(d[512..].iter().all(|&b| b == 0));
        // WRITE SAME(10) of a non-zero block over LBAs 20..120 (two bdev writes).
        let block = [0x5au8; 512];
        rig.command(1, 0, 5, &[0x41, 0, 0, 0, 0, 20, 0, 0, 100, 0], &block, 0);
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.response(), (0, 0, 0));
        rig.command(1, 0, 6, &[0x28, 0, 0, 0, 0, 119, 0, 0, 2, 0], &[], 1024);
        rig.device.poll();
        rig.device.poll();
        let d = rig.data(1024);
        assert!(d[..512].iter().all(|&b| b == 0x5a), "LBA 119 written");
        assert!(d[512..].iter().all(|&b| b == 0), "LBA 120 untouched");
    }

    #[test]
    fn lun_reset_waits_for_in_flight_io_and_query_task_sees_it() {
        let held = Arc::new(Held::default());
        let bdev: Arc<dyn Bdev> = Arc::new(HeldBdev(Arc::clone(&held)));
        let mut rig = Rig::new(&[(0, bdev)]);
        rig.command(0, 0, 77, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);
        rig.device.poll();
        assert_eq!(held.pending.lock().unwrap().len(), 1);
        // QUERY TASK for the in-flight tag: FUNCTION SUCCEEDED; for another: FUNCTION COMPLETE.
        rig.tmf(6, 0, 77);
        rig.device.poll();
        assert_eq!(rig.tmf_response(), Response::FunctionSucceeded.code());
        rig.tmf(6, 0, 78);
        rig.device.poll();
        assert_eq!(rig.tmf_response(), Response::FUNCTION_COMPLETE.code());
        // LOGICAL UNIT RESET is answered only once the read completed.
        rig.tmf(5, 0, 0);
        rig.device.poll();
        assert_eq!(rig.used_idx(0), 2);
        assert_eq!(rig.tmf_response(), 0xee);
        held.release.store(true, Ordering::Relaxed);
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.used_idx(2), 1, "the read completed");
        assert_eq!(rig.used_idx(0), 3);
        assert_eq!(rig.tmf_response(), Response::FUNCTION_COMPLETE.code());
        // The reset left a unit attention for the next command.
        rig.command(0, 0, 79, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.response(), (0, 2, 6));
        // A TMF for an absent target: BAD_TARGET at once.
        rig.tmf(5, 3, 0);
        rig.device.poll();
        assert_eq!(rig.tmf_response(), Response::BadTarget.code());
    }

    #[test]
    fn hot_attach_and_detach_post_events_queued_until_buffers_arrive() {
        let mut rig = Rig::new(&[(0, malloc("M0", 64, 512))]);
        let t = rig.while_polling(|c| c.add_target(None, malloc("M1", 64, 512)).unwrap());
        assert_eq!(t, 1);
        // No event buffer yet: the event waits.
        rig.device.poll();
        assert_eq!(rig.used_idx(1), 0);
        rig.event_buffer(0);
        rig.device.poll();
        assert_eq!(rig.used_idx(1), 1);
        let e = rig.event(0);
        assert_eq!(e.event, event::VIRTIO_SCSI_T_TRANSPORT_RESET);
        assert_eq!(e.reason, event::VIRTIO_SCSI_EVT_RESET_RESCAN);
        assert_eq!(e.lun, [1, 1, 0, 0, 0, 0, 0, 0]);
        assert!(!e.events_missed);
        // The new target answers.
        rig.command(1, 0, 1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.response(), (0, 0, 0));

        rig.event_buffer(1);
        rig.while_polling(|c| c.remove_target(1).unwrap());
        rig.device.poll();
        assert_eq!(rig.used_idx(1), 2);
        let e = rig.event(1);
        assert_eq!(e.reason, event::VIRTIO_SCSI_EVT_RESET_REMOVED);
        assert_eq!(e.lun[1], 1);
        rig.command(1, 0, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
        rig.device.poll();
        assert_eq!(rig.response().0, Response::BadTarget.code());
    }

    #[test]
    fn event_overflow_is_reported_as_events_missed() {
        let mut rig = Rig::new(&[]);
        for _ in 0..(MAX_PENDING_EVENTS / 2 + 1) {
            rig.while_polling(|c| {
                c.add_target(Some(0), malloc("M0", 64, 512)).unwrap();
                c.remove_target(0).unwrap();
            });
        }
        // 2 * 33 events for 64 places: two were dropped, and the next event delivered says so.
        rig.event_buffer(0);
        rig.device.poll();
        let e = rig.event(0);
        assert!(e.events_missed, "{e:?}");
        assert_eq!(e.event, event::VIRTIO_SCSI_T_TRANSPORT_RESET);
        assert_eq!(e.reason, event::VIRTIO_SCSI_EVT_RESET_RESCAN);
        for i in 1..MAX_PENDING_EVENTS as u64 {
            rig.event_buffer(i % 8);
            rig.device.poll();
            let e = rig.event(i % 8);
            assert!(!e.events_missed, "event {i}: {e:?}");
            let reason = if i % 2 == 0 {
                event::VIRTIO_SCSI_EVT_RESET_RESCAN
            } else {
                event::VIRTIO_SCSI_EVT_RESET_REMOVED
            };
            assert_eq!(e.reason, reason, "event {i} in order");
        }
        assert_eq!(usize::from(rig.used_idx(1)), MAX_PENDING_EVENTS);
        // Nothing more to report: a new buffer stays with the device.
        rig.event_buffer(1);
        rig.device.poll();
        assert_eq!(usize::from(rig.used_idx(1)), MAX_PENDING_EVENTS);
    }

    #[test]
    fn missed_events_without_a_pending_one_are_reported_as_no_event() {
        let mut backlog = EventBacklog::default();
        for t in 0..=MAX_PENDING_EVENTS {
            backlog.push(transport_reset(
                t as u8,
                event::VIRTIO_SCSI_EVT_RESET_RESCAN,
            ));
        }
        backlog.pending.clear();
        let e = backlog.next().unwrap();
        assert_eq!(
            (e.event, e.events_missed),
            (event::VIRTIO_SCSI_T_NO_EVENT, true)
        );
        assert!(backlog.next().is_none());
        // An event that could not be written goes back, flag included.
        backlog.push(transport_reset(1, event::VIRTIO_SCSI_EVT_RESET_REMOVED));
        backlog.missed = true;
        let e = backlog.next().unwrap();
        backlog.unpop(e);
        let again = backlog.next().unwrap();
        assert_eq!(again, e);
    }
}
