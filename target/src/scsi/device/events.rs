//! The event queue of a vhost-scsi session: hot-plug events held until the driver posts a buffer
//! for them, and reported as missed when too many pile up.

use std::collections::VecDeque;

use rvhost_core::virtio_scsi::{event, EventRepr, EVENT_LEN};

use super::{ScsiDevice, EVENT_QUEUE, MAX_PENDING_EVENTS};
use crate::scsi::segments::scatter;
use crate::vhost::memory::GuestMemoryTable;
use crate::vhost::vqueue::POP_BATCH;

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

pub(super) fn transport_reset(target: u8, reason: u32) -> EventRepr {
    EventRepr {
        event: event::VIRTIO_SCSI_T_TRANSPORT_RESET,
        events_missed: false,
        lun: event_lun(target),
        reason,
    }
}

impl ScsiDevice {
    /// Delivers one pending event into the event buffer at `head`.
    pub(super) fn event_buffer(&mut self, mem: &GuestMemoryTable, head: u16) {
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

    /// Delivers events raised during this round (by a detach that just drained) without waiting
    /// for the next round's queue pass.
    pub(super) fn poll_events_only(&mut self) -> usize {
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
