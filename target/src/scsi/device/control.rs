//! The control queue of a vhost-scsi session: task management functions (answered at once, or
//! once the commands they concern have left the bdev) and asynchronous notification queries.

use rvhost_core::virtio_scsi::{
    tmf_resp, AnRespRepr, ControlRequest, LunAddress, Response, TmfReqRepr, TmfSubtype, TMF_REQ_LEN,
};

use super::{RespTarget, ScsiDevice, CONTROL_QUEUE};
use crate::scsi::segments::{gather, scatter};
use crate::vhost::memory::GuestMemoryTable;

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
pub(super) struct PendingTmf {
    head: u16,
    resp: RespTarget,
    target: u8,
    wait: TmfWait,
    effect: TmfEffect,
}

impl ScsiDevice {
    pub(super) fn settle_tmfs(&mut self, mem: &GuestMemoryTable) {
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
                    TmfEffect::NexusReset => target.lun.nexus_reset(),
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

    /// Handles one control-queue request.
    pub(super) fn control_request(&mut self, mem: &GuestMemoryTable, head: u16) {
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
    pub(super) fn task_management(
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
}
