//! The control queue of a vhost-scsi session: task management functions (answered once the
//! commands they concern have left the bdev, or at once when they concern none) and asynchronous
//! notification queries.

use rvhost_core::virtio_scsi::{
    tmf_resp, AnRespRepr, ControlRequest, LunAddress, Response, TmfReqRepr, TmfSubtype, TMF_REQ_LEN,
};

use super::{malformed, RespTarget, ScsiTransport, FIRST_REQUEST_QUEUE};
use crate::vhost::device::{Disposition, NewRequest, Requests, ShellRing};

/// What a pending task management function waits for.
#[derive(Debug, Clone, Copy)]
enum TmfWait {
    /// QUERY TASK: answered at once, with whether the command with this tag is in flight.
    QueryTask(u64),
    /// QUERY TASK SET: answered at once, with whether any command is in flight.
    QueryTaskSet,
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

/// A TMF waiting in its control-queue slot (the shell's tag) for the commands it concerns.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingTmf {
    tag: u64,
    resp: RespTarget,
    target: u8,
    wait: TmfWait,
    effect: TmfEffect,
}

/// Sequence number of the oldest command in flight on `target`, and whether `tag` is.
fn in_flight_on<V: ShellRing>(
    requests: &Requests<'_, ScsiTransport, V>,
    target: u8,
    tag: Option<u64>,
) -> (Option<u64>, bool) {
    let mut oldest: Option<u64> = None;
    let mut found = false;
    for (_, s) in requests
        .in_flight_requests(FIRST_REQUEST_QUEUE)
        .filter(|(_, s)| s.target == target)
    {
        oldest = Some(oldest.map_or(s.seq, |o| o.min(s.seq)));
        if Some(s.tag) == tag {
            found = true;
        }
    }
    (oldest, found)
}

impl ScsiTransport {
    /// Answers the TMFs whose wait is over; returns whether any still waits.
    pub(super) fn settle_tmfs<V: ShellRing>(
        &mut self,
        requests: &mut Requests<'_, Self, V>,
    ) -> bool {
        let mut i = 0;
        while i < self.tmfs.len() {
            let tmf = self.tmfs[i];
            let (oldest, found) = match tmf.wait {
                TmfWait::Task(tag) | TmfWait::QueryTask(tag) => {
                    in_flight_on(requests, tmf.target, Some(tag))
                }
                TmfWait::OlderThan(_) | TmfWait::QueryTaskSet => {
                    in_flight_on(requests, tmf.target, None)
                }
            };
            let response = match tmf.wait {
                TmfWait::QueryTask(_) if found => Response::FunctionSucceeded,
                TmfWait::QueryTaskSet if oldest.is_some() => Response::FunctionSucceeded,
                TmfWait::QueryTask(_) | TmfWait::QueryTaskSet => Response::FUNCTION_COMPLETE,
                TmfWait::Task(_) if !found => Response::FUNCTION_COMPLETE,
                TmfWait::OlderThan(seq) if oldest.is_none_or(|o| o >= seq) => {
                    Response::FUNCTION_COMPLETE
                }
                TmfWait::Task(_) | TmfWait::OlderThan(_) => {
                    i += 1;
                    continue;
                }
            };
            self.tmfs.swap_remove(i);
            if let Some(Some(target)) = self.targets.get_mut(usize::from(tmf.target)) {
                match tmf.effect {
                    TmfEffect::LunReset => target.lun.reset(),
                    TmfEffect::NexusReset => target.lun.nexus_reset(),
                    TmfEffect::None => {}
                }
            }
            tracing::info!(device = self.id.0, target = tmf.target, ?tmf.effect, "task management function complete");
            requests.update(tmf.tag, |_, mem| {
                tmf.resp.write(mem, &tmf_resp(response));
                Some(1)
            });
        }
        !self.tmfs.is_empty()
    }

    /// Handles one control-queue request.
    pub(super) fn control_request(&mut self, r: NewRequest<'_, Self>) -> Disposition {
        let id = r.device;
        let mem = r.mem;
        let chain = match r.chain {
            Ok(chain) => chain,
            Err(err) => return malformed(id, r.queue, &err),
        };
        let mut buf = [0u8; TMF_REQ_LEN];
        // An unreadable request parses as a truncated one.
        let n = chain
            .readable_range()
            .reader()
            .read(mem, &mut buf)
            .unwrap_or(0);
        let writable_len = chain.writable_len() as usize;
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
                let Some(resp) = RespTarget::of(chain.writable(), 1) else {
                    return Disposition::Complete(0);
                };
                match self.task_management(&tmf, r.tag, resp) {
                    Some(response) => ([response.code(), 0, 0, 0, 0], 1),
                    None => return Disposition::Deferred,
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
        let len = len.min(writable_len);
        let written = chain
            .writable_range()
            .writer()
            .write(mem, &reply[..len])
            .unwrap_or(0);
        Disposition::Complete(u32::try_from(written).unwrap_or(0))
    }

    /// Answers a TMF at once, or queues it to be answered by [`ScsiTransport::settle_tmfs`]
    /// (`None`), which sees the commands in flight.
    fn task_management(
        &mut self,
        tmf: &TmfReqRepr,
        tag: u64,
        resp: RespTarget,
    ) -> Option<Response> {
        let Ok(addr) = LunAddress::parse(&tmf.lun) else {
            return Some(Response::BadTarget);
        };
        let Some(target) = self
            .targets
            .get(usize::from(addr.target))
            .and_then(Option::as_ref)
            .filter(|t| t.removing.is_none())
        else {
            return Some(Response::BadTarget);
        };
        if addr.lun != 0 {
            return Some(Response::IncorrectLun);
        }
        let next_seq = target.next_seq;
        tracing::info!(device = self.id.0, target = addr.target, subtype = ?tmf.subtype, tag = tmf.tag, "task management function");
        let (wait, effect) = match tmf.subtype {
            TmfSubtype::QueryTask => (TmfWait::QueryTask(tmf.tag), TmfEffect::None),
            TmfSubtype::QueryTaskSet => (TmfWait::QueryTaskSet, TmfEffect::None),
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
            tag,
            resp,
            target: addr.target,
            wait,
            effect,
        });
        None
    }
}
