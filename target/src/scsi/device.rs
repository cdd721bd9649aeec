//! The virtio-scsi transport, as the vhost device shell ([`crate::vhost::device`]) hands it
//! requests.
//!
//! Queue 0 is the control queue (task management, asynchronous notification; [`control`]), queue
//! 1 the event queue (hot-plug events; [`events`]), queues 2.. the request queues. A request's
//! virtio-scsi header is decoded here, the command routed to its target, and the virtio-scsi
//! response written here; what the command does to the target's bdev is
//! [`super::bdev_lun`]'s. The shell owns the queues, slots, memory table and the session's
//! lifecycle; each target's LUN gets one bdev channel per session, so nothing is allocated per
//! request and the data path takes no lock.
//!
//! Target changes (hot-attach, hot-detach) arrive as [`TargetOp`]s over the reactor's control
//! ring, like every other control operation.

use rvhost_core::mem::{GuestMemory, Segment};
use rvhost_core::scsi::ScsiLun;
use rvhost_core::segments::SegmentRange;
use rvhost_core::virtio_scsi::{
    cmd_req_len, cmd_resp_len, CmdReq, CmdRespRepr, LunAddress, Response,
};
use rvhost_core::virtio_scsi::{event, feature as scsi_feature};

mod control;
mod events;

use control::PendingTmf;
use events::{capacity_changed, transport_reset, EventBacklog};

use super::bdev_lun::{
    answer_without_lun, Answer, BdevLun, Command, ExecScratch, LunIo, LunIoSlots, Started,
};
use super::{TargetOp, CDB_SIZE, MAX_QUEUE_SIZE, MAX_TARGETS, SENSE_SIZE};
use crate::bdev::BdevChannel;
use crate::reactor::Reply;
use crate::vhost::device::{
    Disposition, NewRequest, RequestHandler, Requests, ShellRing, VhostDevice, CHAIN_CAPACITY,
};
use crate::vhost::memory::GuestMemoryTable;
use crate::vhost::{DeviceId, VirtioFeatures};

/// Index of the control queue.
pub const CONTROL_QUEUE: usize = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Index of the first request queue.
pub const FIRST_REQUEST_QUEUE: usize = 2;

/// Events held while the driver has no event buffer posted; more are reported as missed.
pub const MAX_PENDING_EVENTS: usize = 64;
/// Busy rounds between two looks at the control queue. It is rare, so a round that served
/// commands skips it (saving a ring-index load per round); a round without command work always
/// looks. A task management function waits at most this many busy rounds, a few microseconds.
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

    fn write<const N: usize>(&self, mem: &GuestMemoryTable, bytes: &[u8; N]) -> bool {
        // One segment holds the whole response whenever the driver gives it its own descriptor
        // (Linux, QEMU, rvhost-perf): one fixed-size copy, no loop and no `memcpy` call.
        let [(addr, len), ..] = self.segs;
        if self.count == 1 && len as usize >= N {
            return mem.write_array(addr, bytes).is_ok();
        }
        let mut bytes = &bytes[..];
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

/// One command between submission and completion (the shell keeps its head and slot).
#[derive(Debug, Clone, Copy, Default)]
pub struct ScsiSlot {
    target: u8,
    /// The driver's tag, for ABORT TASK / QUERY TASK.
    tag: u64,
    seq: u64,
    resp: RespTarget,
    /// The command's state on its LUN's bdev.
    io: LunIo,
}

/// Scratch buffers of the command being started (allocated once per session).
struct Scratch {
    header: [u8; REQ_LEN],
    exec: ExecScratch,
}

/// A vhost-scsi session on its reactor: the shell with the virtio-scsi transport.
pub type ScsiDevice = VhostDevice<ScsiTransport>;

/// What a vhost-scsi session adds to the shell: its targets, task management, hot-plug events.
pub struct ScsiTransport {
    id: DeviceId,
    targets: Vec<Option<AttachedTarget>>,
    features: VirtioFeatures,
    /// Busy rounds since the control queue was last looked at.
    rounds_since_mgmt: u32,
    events: EventBacklog,
    tmfs: Vec<PendingTmf>,
    scratch: Scratch,
}

impl std::fmt::Debug for ScsiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiTransport")
            .field("id", &self.id)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl ScsiTransport {
    /// A session's transport with the targets attached when it was created.
    pub fn new(id: DeviceId, targets: Vec<Option<AttachedTarget>>) -> Self {
        let mut targets = targets;
        targets.resize_with(MAX_TARGETS, || None);
        ScsiTransport {
            id,
            targets,
            features: VirtioFeatures(0),
            rounds_since_mgmt: 0,
            events: EventBacklog::default(),
            tmfs: Vec::new(),
            scratch: Scratch {
                header: [0; REQ_LEN],
                exec: ExecScratch::new(CHAIN_CAPACITY, usize::from(MAX_QUEUE_SIZE)),
            },
        }
    }

    fn hotplug(&self) -> bool {
        self.features.has(scsi_feature::VIRTIO_SCSI_F_HOTPLUG)
    }

    /// Handles one command on a request queue.
    fn command(&mut self, r: NewRequest<'_, Self>) -> Disposition {
        let NewRequest {
            device: id,
            queue: qi,
            head,
            tag: io_tag,
            chain,
            request: slot,
            data,
            mem,
            io_mem,
            ..
        } = r;
        let chain = match chain {
            Ok(chain) => chain,
            Err(err) => return malformed(id, qi, &err),
        };
        let readable_len = u64::from(chain.readable_len());
        let writable_len = u64::from(chain.writable_len());
        let resp = match RespTarget::of(chain.writable(), RESP_LEN) {
            Some(r) if readable_len >= REQ_LEN as u64 => r,
            _ => {
                tracing::debug!(
                    device = id.0,
                    queue = qi,
                    "command without room for header or response; returned unused"
                );
                return Disposition::Complete(0);
            }
        };
        let sc = &mut self.scratch;
        // The header in one piece (its own descriptor, as drivers send it) is one fixed-size copy.
        let header_read = match chain.readable().first() {
            Some(seg) if seg.len as usize >= REQ_LEN => mem
                .read_array::<REQ_LEN>(seg.guest_addr)
                .map(|header| sc.header = header)
                .is_ok(),
            _ => chain
                .readable_range()
                .reader()
                .read_exact(mem, &mut sc.header)
                .is_ok(),
        };
        if !header_read {
            tracing::debug!(
                device = id.0,
                queue = qi,
                "command header unreadable; returned unused"
            );
            return Disposition::Complete(0);
        }
        // Fields are read from the header in place; copying it into a CmdReqRepr cost a tenth of
        // a command's instructions.
        let Ok(req) = CmdReq::new_checked(&sc.header[..], CDB_SIZE) else {
            return Disposition::Complete(0);
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
            return Disposition::Complete(RESP_LEN as u32);
        };

        // The command's data buffers (a command for a target that exists), as the per-queue statistics count them.
        data.read = u32::try_from(data_in_len).unwrap_or(u32::MAX);
        data.written = u32::try_from(data_out_len).unwrap_or(u32::MAX);
        let cmd = Command {
            cdb: req.cdb(),
            // Both tails exist: the lengths were checked against REQ_LEN and RESP_LEN above.
            data_out: chain
                .readable_range()
                .tail(REQ_LEN as u64)
                .unwrap_or(SegmentRange::EMPTY),
            data_in: chain
                .writable_range()
                .tail(RESP_LEN as u64)
                .unwrap_or(SegmentRange::EMPTY),
        };
        let answer = if addr.lun != 0 {
            answer_without_lun(&cmd, mem, &mut sc.exec)
        } else {
            match target
                .lun
                .start(&cmd, mem, io_mem, io_tag, &mut slot.io, &mut sc.exec)
            {
                Started::Submitted => {
                    slot.target = addr.target;
                    slot.tag = req.tag();
                    slot.seq = target.next_seq;
                    slot.resp = resp;
                    target.next_seq = target.next_seq.wrapping_add(1);
                    return Disposition::Pending;
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
        Disposition::Complete(u32::try_from(len).unwrap_or(u32::MAX))
    }

    fn target_op(&mut self, op: TargetOp) -> bool {
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
                false
            }
            TargetOp::Resize {
                target,
                num_blocks,
                reply,
            } => {
                if let Some(t) = self
                    .targets
                    .get_mut(usize::from(target))
                    .and_then(Option::as_mut)
                {
                    match t.lun.resize(num_blocks) {
                        Ok(()) => {
                            // QEMU's vhost-user-scsi hands the backend only the features on
                            // its own list, which has HOTPLUG but not CHANGE, although the
                            // driver negotiates CHANGE (`param_change` defaults to on): a driver
                            // with either one reads the event queue and takes the event.
                            if self.features.has(scsi_feature::VIRTIO_SCSI_F_CHANGE)
                                || self.hotplug()
                            {
                                self.events.push(capacity_changed(target));
                            }
                            tracing::info!(
                                device = self.id.0,
                                target,
                                num_blocks,
                                "target resized"
                            );
                        }
                        Err(err) => {
                            tracing::error!(device = self.id.0, target, num_blocks, %err, "target not resized")
                        }
                    }
                }
                let _ = reply.send(());
                false
            }
            TargetOp::Detach { target, reply } => {
                match self
                    .targets
                    .get_mut(usize::from(target))
                    .and_then(Option::as_mut)
                {
                    Some(t) => {
                        t.removing = Some(reply);
                        true
                    }
                    None => {
                        let _ = reply.send(());
                        false
                    }
                }
            }
        }
    }

    /// Finishes detaches whose target drained; returns whether one still waits.
    fn settle_detaches(&mut self) -> bool {
        let hotplug = self.hotplug();
        let mut waiting = false;
        for (t, slot) in self.targets.iter_mut().enumerate() {
            let Some(target) = slot.as_ref() else {
                continue;
            };
            if target.removing.is_none() {
                continue;
            }
            if target.lun.in_flight() > 0 {
                waiting = true;
                continue;
            }
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
        waiting
    }
}

/// A chain the driver broke: returned unused if its head is valid, else the queue stops.
fn malformed(id: DeviceId, queue: u16, err: &rvhost_core::virtq::ChainError) -> Disposition {
    if err.head_is_valid() {
        tracing::debug!(device = id.0, queue, %err, "malformed chain returned unused");
        Disposition::Complete(0)
    } else {
        tracing::error!(device = id.0, queue, %err, "bad head; queue stopped (device needs reset)");
        Disposition::Abandon
    }
}

impl RequestHandler for ScsiTransport {
    type Request = ScsiSlot;
    type Queue = ();
    type Op = TargetOp;

    fn start_queue(&mut self, _index: u16, features: VirtioFeatures) -> Result<(), String> {
        self.features = features;
        Ok(())
    }

    #[inline]
    fn first_polled_queue(&self) -> usize {
        FIRST_REQUEST_QUEUE
    }

    #[inline]
    fn pop_budget(&mut self, index: u16, room: usize, work: usize) -> usize {
        match usize::from(index) {
            CONTROL_QUEUE => {
                // Polled after the request queues: `work` is this round's command work.
                self.rounds_since_mgmt = self.rounds_since_mgmt.saturating_add(1);
                if work == 0 || self.rounds_since_mgmt >= MGMT_INTERVAL {
                    self.rounds_since_mgmt = 0;
                    room
                } else {
                    0
                }
            }
            EVENT_QUEUE if self.events.has_work() => room.min(self.events.pending.len().max(1)),
            EVENT_QUEUE => 0,
            _ => room,
        }
    }

    #[inline]
    fn start(&mut self, request: NewRequest<'_, Self>) -> Disposition {
        match usize::from(request.queue) {
            CONTROL_QUEUE => self.control_request(request),
            EVENT_QUEUE => self.event_buffer(request),
            _ => self.command(request),
        }
    }

    fn poll_completions<V: ShellRing>(&mut self, requests: &mut Requests<'_, Self, V>) -> usize {
        let mut work = 0;
        let Some(io_mem) = requests.io_mem() else {
            return 0;
        };
        let mut slots = RequestSlots { requests };
        for target in self.targets.iter_mut().flatten() {
            work += target.lun.poll(io_mem, &mut self.scratch.exec, &mut slots);
        }
        work
    }

    fn control<V: ShellRing>(
        &mut self,
        op: TargetOp,
        _requests: &mut Requests<'_, Self, V>,
    ) -> bool {
        self.target_op(op)
    }

    fn settle<V: ShellRing>(&mut self, requests: &mut Requests<'_, Self, V>) -> bool {
        let tmfs_waiting = self.settle_tmfs(requests);
        let detaches_waiting = self.settle_detaches();
        tmfs_waiting || detaches_waiting
    }

    fn remove(&mut self) {
        self.targets.iter_mut().for_each(|t| *t = None);
        self.tmfs.clear();
    }
}

/// The shell's request slots as the LUNs find commands by tag.
struct RequestSlots<'r, 'a, V: ShellRing> {
    requests: &'r mut Requests<'a, ScsiTransport, V>,
}

impl<V: ShellRing> LunIoSlots for RequestSlots<'_, '_, V> {
    fn io(&mut self, io_tag: u64) -> Option<&mut LunIo> {
        self.requests.get_mut(io_tag).map(|slot| &mut slot.io)
    }

    /// Writes a command's response; the shell returns its head and frees its slot.
    fn complete(&mut self, io_tag: u64, answer: &Answer, sense: &[u8]) {
        let device = self.requests.device();
        self.requests.update(io_tag, |slot, mem| {
            let header = CmdRespRepr::for_completion(&answer.completion, SENSE_SIZE);
            tracing::trace!(
                device = device.0,
                tag = slot.tag,
                status = header.status,
                "command completed"
            );
            if !write_response(mem, &slot.resp, &header, sense) {
                tracing::warn!(device = device.0, "response buffer no longer mapped");
            }
            let len = (RESP_LEN as u64).saturating_add(answer.data_in);
            Some(u32::try_from(len).unwrap_or(u32::MAX))
        });
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
    // Most responses carry no sense: built from a constant empty slice, the sense copy (a
    // `memcpy` call of zero bytes) disappears.
    let bytes: [u8; RESP_LEN] = if header.sense_len == 0 {
        header.to_response_bytes(&[])
    } else {
        header.to_response_bytes(sense)
    };
    resp.write(mem, &bytes)
}

#[cfg(test)]
mod tests;
