//! The event queue of a vhost-scsi session: hot-plug events held until the driver posts a buffer
//! for them, and reported as missed when too many pile up.

use std::collections::VecDeque;

use rvhost_core::virtio_scsi::{event, EventRepr, EVENT_LEN};

use super::{malformed, ScsiTransport, MAX_PENDING_EVENTS};
use crate::vhost::device::{Disposition, NewRequest};

/// Hot-plug events waiting for an event-queue buffer.
#[derive(Debug, Default)]
pub(super) struct EventBacklog {
    pub(super) pending: VecDeque<EventRepr>,
    pub(super) missed: bool,
}

impl EventBacklog {
    pub(super) fn push(&mut self, e: EventRepr) {
        if self.pending.len() >= MAX_PENDING_EVENTS {
            self.missed = true;
        } else {
            self.pending.push_back(e);
        }
    }

    pub(super) fn has_work(&self) -> bool {
        self.missed || !self.pending.is_empty()
    }

    /// The next event to deliver, carrying the EVENTS_MISSED flag if events were dropped.
    pub(super) fn next(&mut self) -> Option<EventRepr> {
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

    pub(super) fn unpop(&mut self, e: EventRepr) {
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

/// A PARAM_CHANGE event for `target`'s LUN 0 carrying CAPACITY DATA HAS CHANGED (ASC 2Ah,
/// ASCQ 09h): Linux rescans the device and picks up its new size.
pub(super) fn capacity_changed(target: u8) -> EventRepr {
    EventRepr {
        event: event::VIRTIO_SCSI_T_PARAM_CHANGE,
        events_missed: false,
        lun: event_lun(target),
        reason: 0x2a | (0x09 << 8),
    }
}

pub(super) fn transport_reset(target: u8, reason: u32) -> EventRepr {
    EventRepr {
        event: event::VIRTIO_SCSI_T_TRANSPORT_RESET,
        events_missed: false,
        lun: event_lun(target),
        reason,
    }
}

impl ScsiTransport {
    /// Delivers one pending event into the event buffer the driver posted (popped only while an
    /// event is pending).
    pub(super) fn event_buffer(&mut self, r: NewRequest<'_, Self>) -> Disposition {
        let id = r.device;
        let chain = match r.chain {
            Ok(chain) => chain,
            Err(err) => return malformed(id, r.queue, &err),
        };
        let Some(e) = self.events.next() else {
            // Give the buffer back unused.
            return Disposition::Complete(0);
        };
        if chain.writable_len() < EVENT_LEN as u32 {
            tracing::debug!(device = id.0, "event buffer too small; returned unused");
            self.events.unpop(e);
            return Disposition::Complete(0);
        }
        let bytes = e.to_bytes();
        if chain
            .writable_range()
            .writer()
            .write_all(r.mem, &bytes)
            .is_err()
        {
            self.events.unpop(e);
            return Disposition::Complete(0);
        }
        tracing::debug!(
            device = id.0,
            event = e.event,
            reason = e.reason,
            target = e.lun[1],
            missed = e.events_missed,
            "event delivered"
        );
        Disposition::Complete(EVENT_LEN as u32)
    }
}
