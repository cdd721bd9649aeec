//! The part of a running virtqueue's life every vhost device shares (vhost-blk, vhost-scsi):
//! starting it from a [`QueueSetup`], its request slots, the call and error eventfds, stopping
//! it once drained (`GET_VRING_BASE`), checking its rings against a new memory table, and
//! publishing the used ring with at most one call-eventfd write per round. What a request *is*
//! stays with the device; this module knows nothing of virtio-blk or virtio-scsi.

use std::sync::Arc;

use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};

use super::memory::GuestMemoryTable;
use super::{DeviceId, EventNotifier, QueueSetup};
use crate::reactor::Reply;

/// Largest virtqueue accepted by `SET_VRING_NUM`; also the per-queue request-slot count.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Segments one chain may have: a chain can never usefully be longer than the queue.
pub const CHAIN_CAPACITY: usize = MAX_QUEUE_SIZE as usize;
/// Heads popped per queue per round: bounds the time one busy queue keeps the others waiting.
pub const POP_BATCH: usize = 32;

/// One running virtqueue with request slots of type `S` and device-specific state `X`.
pub struct VirtQueue<S, X> {
    /// The split ring.
    pub vq: SplitQueue,
    /// Where completions are signalled (`None`: nowhere yet; QEMU may send it later).
    pub call: Option<Arc<EventNotifier>>,
    /// The frontend's error eventfd, signalled when the driver breaks the queue.
    pub err: Option<Arc<EventNotifier>>,
    /// The chain being decoded (one per queue, reused).
    pub chain: Box<Chain<CHAIN_CAPACITY>>,
    /// Heads popped this round.
    pub heads: [u16; POP_BATCH],
    /// One slot per descriptor a request can start at.
    pub slots: Vec<S>,
    /// Free slot indices (popped from the end: slot 0 first).
    pub free: Vec<u16>,
    /// Requests started and not yet completed.
    pub in_flight: usize,
    /// GET_VRING_BASE / disable in progress: no new requests; reply once drained.
    pub stopping: Option<Reply<Option<u16>>>,
    /// The driver broke the queue (a chain without a place for the answer, rings outside
    /// memory): nothing more is processed until the frontend restarts the queue.
    pub broken: bool,
    /// What the device keeps per queue (blk: the request limits negotiated for it).
    pub extra: X,
}

impl<S, X> std::fmt::Debug for VirtQueue<S, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtQueue")
            .field("in_flight", &self.in_flight)
            .field("stopping", &self.stopping.is_some())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<S: Default + Clone, X> VirtQueue<S, X> {
    /// Starts a queue as `setup` describes it: rings checked against the memory table, the next
    /// avail index and the used index taken over, guest kicks turned off (the reactor polls).
    pub fn new(setup: &QueueSetup, extra: X) -> Result<Self, String> {
        if setup.size > MAX_QUEUE_SIZE {
            return Err(format!("queue size {} over {MAX_QUEUE_SIZE}", setup.size));
        }
        let config = QueueConfig {
            size: setup.size,
            desc_table: setup.desc_gpa,
            avail_ring: setup.avail_gpa,
            used_ring: setup.used_gpa,
        };
        let mut vq = SplitQueue::new(config, setup.features.0).map_err(|e| e.to_string())?;
        let mem = setup.memory.as_ref();
        vq.check_rings(mem).map_err(|e| e.to_string())?;
        vq.set_last_avail_idx(setup.last_avail);
        // The used index the driver has seen is what is in the ring (equal to last_avail after a
        // clean stop; after a backend restart it is the only trustworthy value).
        vq.sync_used_idx_from_ring(mem).map_err(|e| e.to_string())?;
        vq.disable_kicks(mem).map_err(|e| e.to_string())?;
        Ok(VirtQueue {
            vq,
            call: setup.call.clone(),
            err: setup.err.clone(),
            chain: Box::new(Chain::new()),
            heads: [0; POP_BATCH],
            slots: vec![S::default(); usize::from(setup.size)],
            free: (0..setup.size).rev().collect(),
            in_flight: 0,
            stopping: None,
            broken: false,
            extra,
        })
    }
}

impl<S, X> VirtQueue<S, X> {
    /// Replaces the call eventfd and signals the new one once: QEMU may hand it over only after
    /// the queue started (when the guest unmasks the queue's MSI-X vector), and a completion
    /// published before then was signalled to nobody. A spurious interrupt only makes the
    /// driver look at its ring; a missed one can leave it waiting forever.
    pub fn set_call(&mut self, call: Option<Arc<EventNotifier>>) {
        if let Some(call) = &call {
            call.notify();
        }
        self.call = call;
    }

    /// Marks the queue broken by the driver and tells the frontend through the error eventfd.
    pub fn fail(&mut self) {
        self.broken = true;
        if let Some(err) = &self.err {
            err.notify();
        }
    }

    /// Checks the rings against a new memory table; a queue whose rings left guest memory stops.
    pub fn check_rings(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) {
        if let Err(err) = self.vq.check_rings(mem) {
            tracing::error!(device = device.0, queue, %err, "rings left guest memory; queue stopped");
            self.broken = true;
        }
    }

    /// Pushes a used element (published by [`VirtQueue::publish`]); a ring that cannot be
    /// written stops the queue.
    #[inline]
    pub fn push_used(&mut self, mem: &GuestMemoryTable, head: u16, len: u32, device: DeviceId) {
        if let Err(err) = self.vq.push_used(mem, head, len) {
            tracing::error!(device = device.0, %err, "used ring write failed; queue stopped");
            self.broken = true;
        }
    }

    /// Publishes the used elements pushed since the last call (one `used.idx` store) and writes
    /// the call eventfd if the driver asked to be notified of them.
    pub fn publish(&mut self, mem: &GuestMemoryTable, device: DeviceId, queue: usize) {
        if let Err(err) = self.vq.publish_used(mem) {
            tracing::error!(device = device.0, queue, %err, "publishing used ring failed; queue stopped");
            self.broken = true;
            return;
        }
        match self.vq.needs_notification(mem) {
            Ok(true) => {
                if let Some(call) = &self.call {
                    call.notify();
                }
            }
            Ok(false) => {}
            Err(err) => {
                tracing::error!(device = device.0, queue, %err, "reading notification suppression failed");
                self.broken = true;
            }
        }
    }

    /// Whether the queue is stopping and has drained, so its stop can be answered.
    pub fn drained(&self) -> bool {
        self.stopping.is_some() && self.in_flight == 0
    }

    /// Answers a drained queue's stop with the next avail index to process.
    pub fn finish_stop(self) {
        if let Some(reply) = self.stopping {
            let _ = reply.send(Some(self.vq.last_avail_idx()));
        }
    }
}

/// Answers the stop of every drained queue in `queues` and removes it.
pub fn settle_stopped<S, X>(queues: &mut [Option<VirtQueue<S, X>>]) {
    for queue in queues.iter_mut() {
        if queue.as_ref().is_some_and(VirtQueue::drained) {
            if let Some(q) = queue.take() {
                q.finish_stop();
            }
        }
    }
}

/// Makes room for queue `index` in a table that grows to the highest started queue (capacity
/// for all is reserved up front, so a round scans only queues a frontend can use) and returns
/// its slot, unless the index is out of range or the queue there still has requests in flight.
pub fn queue_slot<S, X>(
    queues: &mut Vec<Option<VirtQueue<S, X>>>,
    index: u16,
    max_queues: u16,
) -> Result<&mut Option<VirtQueue<S, X>>, String> {
    if index >= max_queues {
        return Err(format!("queue {index} out of range"));
    }
    let i = usize::from(index);
    if queues.len() <= i {
        queues.resize_with(i + 1, || None);
    }
    let slot = queues
        .get_mut(i)
        .ok_or_else(|| format!("queue {index} out of range"))?;
    if slot.as_ref().is_some_and(|q| q.in_flight > 0) {
        return Err(format!("queue {index} still has requests in flight"));
    }
    Ok(slot)
}
