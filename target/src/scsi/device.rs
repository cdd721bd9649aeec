//! A vhost-scsi session: the virtio-scsi transport, owned by one reactor.
//!
//! Queue 0 is the control queue (task management, asynchronous notification; [`control`]), queue
//! 1 the event queue (hot-plug events; [`events`]), queues 2.. the request queues. A request's
//! virtio-scsi header is decoded here, the command routed to its target, and the virtio-scsi
//! response written here; what the command does to the target's bdev is
//! [`super::bdev_lun`]'s. Every request queue slot is allocated with the queue, and each target's
//! LUN gets one bdev channel per session, so nothing is allocated per request and the data path
//! takes no lock.
//!
//! Target changes (hot-attach, hot-detach) arrive from the controller on [`TargetOp`]s, drained at
//! the start of every poll round.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use rvhost_core::mem::{GuestMemory, Segment};
use rvhost_core::scsi::ScsiLun;
use rvhost_core::virtio_scsi::{
    cmd_req_len, cmd_resp_len, CmdReq, CmdResp, CmdRespRepr, LunAddress, Response,
};
use rvhost_core::virtio_scsi::{event, feature as scsi_feature};

mod control;
mod events;

use control::PendingTmf;
use events::{transport_reset, EventBacklog};

use super::bdev_lun::{
    answer_without_lun, Answer, BdevLun, Command, DataBuffers, ExecScratch, LunIo, LunIoSlots,
    Started,
};
use super::segments::gather;
use super::{TargetOp, CDB_SIZE, MAX_QUEUE_SIZE, MAX_TARGETS, SENSE_SIZE};
use crate::bdev::{BdevChannel, IoMemory};
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

/// One attached target: its LUN 0 on the bdev channel that serves it in this session.
pub struct AttachedTarget {
    lun: BdevLun,
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
            lun: BdevLun::new(lun, channel, supports_flush, supports_write_zeroes),
            removing: None,
            next_seq: 0,
        }
    }
}

impl std::fmt::Debug for AttachedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedTarget")
            .field("lun", &self.lun)
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
    /// The command's state on its LUN's bdev.
    io: LunIo,
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

fn tag(queue: usize, slot: usize) -> u64 {
    ((queue as u64) << 32) | (slot as u64 & 0xffff_ffff)
}

fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

/// Scratch buffers of the command being started (allocated once per session).
struct Scratch {
    header: [u8; REQ_LEN],
    exec: ExecScratch,
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
                exec: ExecScratch::new(CHAIN_CAPACITY, usize::from(MAX_QUEUE_SIZE)),
            },
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
                    if slot.as_ref().is_some_and(|old| old.lun.in_flight() > 0) {
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
                .is_some_and(|t| t.removing.is_some() && t.lun.in_flight() == 0);
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

        let Some((addr, target)) = LunAddress::parse(&req.lun()).ok().and_then(|addr| {
            let target = self
                .targets
                .get_mut(usize::from(addr.target))
                .and_then(Option::as_mut)
                .filter(|t| t.removing.is_none())?;
            Some((addr, target))
        }) else {
            let header = CmdRespRepr {
                sense_len: 0,
                residual: u32::try_from(data_in_len.max(data_out_len)).unwrap_or(u32::MAX),
                status_qualifier: 0,
                status: 0,
                response: Response::BadTarget,
            };
            write_response(mem, &resp, &header, &[]);
            q.push_used(mem, head, RESP_LEN as u32, id);
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

        let cmd = Command {
            cdb: req.cdb(),
            data_out: DataBuffers {
                segs: q.chain.readable(),
                skip: REQ_LEN as u64,
                len: data_out_len,
            },
            data_in: DataBuffers {
                segs: q.chain.writable(),
                skip: RESP_LEN as u64,
                len: data_in_len,
            },
        };
        let answer = if addr.lun != 0 {
            answer_without_lun(&cmd, mem, &mut sc.exec)
        } else {
            let Some(slot) = q.slots.get_mut(si) else {
                return;
            };
            match target
                .lun
                .start(&cmd, mem, io_mem, tag(qi, si), &mut slot.io, &mut sc.exec)
            {
                Started::Submitted => {
                    slot.head = head;
                    slot.target = addr.target;
                    slot.tag = req.tag();
                    slot.seq = target.next_seq;
                    slot.active = true;
                    slot.resp = resp;
                    target.next_seq = target.next_seq.wrapping_add(1);
                    return;
                }
                Started::Done(answer) => answer,
            }
        };
        let header = CmdRespRepr::for_completion(&answer.completion, SENSE_SIZE);
        tracing::trace!(
            device = id.0,
            head,
            status = header.status,
            "command answered"
        );
        write_response(mem, &resp, &header, sc.exec.sense());
        let len = (RESP_LEN as u64).saturating_add(answer.data_in);
        q.push_used(mem, head, u32::try_from(len).unwrap_or(u32::MAX), id);
        q.release_slot(si);
    }

    /// Collects bdev completions of every target.
    fn poll_completions(&mut self, mem: &GuestMemoryTable, io_mem: &IoMemory) -> usize {
        let mut work = 0;
        let mut slots = RequestSlots {
            queues: &mut self.queues,
            mem,
            device: self.id,
        };
        for target in self.targets.iter_mut().flatten() {
            work += target.lun.poll(io_mem, &mut self.scratch.exec, &mut slots);
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

/// The request slots of a session's queues, as its LUNs find commands by tag.
struct RequestSlots<'a> {
    queues: &'a mut Vec<Option<ScsiQueue>>,
    mem: &'a GuestMemoryTable,
    device: DeviceId,
}

impl LunIoSlots for RequestSlots<'_> {
    fn io(&mut self, io_tag: u64) -> Option<&mut LunIo> {
        let (qi, si) = untag(io_tag);
        let slot = self.queues.get_mut(qi)?.as_mut()?.slots.get_mut(si)?;
        Some(&mut slot.io)
    }

    /// Writes a command's response, returns its head and frees its slot.
    fn complete(&mut self, io_tag: u64, answer: &Answer, sense: &[u8]) {
        let (qi, si) = untag(io_tag);
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            return;
        };
        let Some(slot) = q.slots.get(si).copied() else {
            return;
        };
        let header = CmdRespRepr::for_completion(&answer.completion, SENSE_SIZE);
        tracing::trace!(
            device = self.device.0,
            head = slot.head,
            status = header.status,
            "command completed"
        );
        if !write_response(self.mem, &slot.resp, &header, sense) {
            tracing::warn!(device = self.device.0, "response buffer no longer mapped");
        }
        let len = (RESP_LEN as u64).saturating_add(answer.data_in);
        q.push_used(
            self.mem,
            slot.head,
            u32::try_from(len).unwrap_or(u32::MAX),
            self.device,
        );
        q.release_slot(si);
    }
}

/// Writes a command response (`header`, then `header.sense_len` bytes of `sense`, the rest of the
/// sense area zero) through core's view; false if guest memory refused it.
fn write_response(
    mem: &GuestMemoryTable,
    resp: &RespTarget,
    header: &CmdRespRepr,
    sense: &[u8],
) -> bool {
    let mut bytes = [0u8; RESP_LEN];
    let Ok(mut view) = CmdResp::new_checked(&mut bytes[..]) else {
        return false;
    };
    header.emit(&mut view);
    let sense_len = usize::try_from(header.sense_len).unwrap_or(usize::MAX);
    let sense = sense.get(..sense_len).unwrap_or(sense);
    if let Some(area) = view.sense_mut().get_mut(..sense.len()) {
        area.copy_from_slice(sense);
    }
    resp.write(mem, &bytes)
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

#[cfg(test)]
mod tests;
