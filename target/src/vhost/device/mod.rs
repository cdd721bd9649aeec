//! The vhost device shell: everything a vhost device does that does not depend on what its
//! requests mean, written once for every device type (vhost-blk, vhost-scsi, and any later one).
//!
//! [`VhostDevice<H>`] is the reactor [`Task`] of one frontend session. It owns
//!
//! - the queue table (started queues only; capacity for all reserved up front) and each queue's
//!   ring (split or packed: the device is generic over [`ShellRing`], and [`AnyLayoutDevice`]
//!   picks the layout the frontend negotiated), chain buffer, call and error eventfds and request
//!   slots;
//! - the guest memory table, its swap on `SET_MEM_TABLE` and the retirement of replaced tables
//!   (one bounded rule: a table is dropped once no request translated with it, or with an older
//!   one, is in flight, so a frontend swapping tables under constant load cannot make the list
//!   grow without bound);
//! - the dispatch of [`DeviceOp`]s: start, stop (`GET_VRING_BASE`, answered once the queue's
//!   requests completed), call eventfd changes, memory changes, removal (every queue stops,
//!   waiting stoppers are answered, and the device goes once nothing is in flight) and the drain
//!   of a stopping process (no queue takes new requests; answered once those in flight completed
//!   and were published, so the frontend's used index covers everything the device took);
//! - the slot pool and the completion tag (queue and slot, round-tripped through the bdev);
//! - the poll skeleton: pop a batch of heads per queue, walk each chain, hand it to the device
//!   type, poll the device type's completions, then publish each queue's used ring once and write
//!   its call eventfd at most once.
//!
//! A device type supplies only a [`DeviceType`] (control side: features, config space, queue
//! count, a new [`RequestHandler`] per session) and the [`RequestHandler`] (data side: what a
//! request is, how it is submitted to bdev channels and completed, and the device-specific
//! control operations). The handler is a type parameter, not a trait object, so the data path
//! makes no virtual calls into it.
//!
//! # Where per-queue features go
//!
//! Every feature that concerns a queue rather than what its requests mean has one place here:
//! the inflight log for reconnect (slot taken / released: `VirtQueue::take_slot` and
//! `VirtQueue::release_slot`), the packed ring (`VirtQueue::vq` and the pop / push / publish
//! calls of the poll skeleton), the dirty log for migration (`VirtQueue::push_used`, the one
//! place every completion passes: it marks the chain's device-writable buffers and the used
//! element before `used.idx` is published, and `VirtQueue::publish` marks the used ring; while
//! logging is off this costs one test of an `Option`), interrupt coalescing
//! (`coalesce.rs` and `VirtQueue::publish_coalesced`, the one place a call eventfd is written
//! after a completion while it is on; off, a round pays one branch), per-queue statistics
//! (`VirtQueue::completed`, the queue's one completion counter, and `VhostDevice::poll_queue`).

mod coalesce;
mod kick_wait;
mod vqueue;

use std::sync::Arc;

use rvhost_core::virtq::packed::PackedQueue;
use rvhost_core::virtq::{Chain, ChainError, RingHead, SplitQueue};
use rvhost_platform_linux::tsc;

use super::memory::GuestMemoryTable;
use super::{DeviceBackend, DeviceId, DeviceOp, DrainProgress, QueueSetup, VirtioFeatures};
use crate::bdev::IoMemory;
use crate::reactor::{BlockReadiness, Message, ReactorHandle, Reply, Task};
pub use coalesce::{
    CoalescingError, CoalescingSettings, CoalescingTicks, DEFAULT_IOPS_THRESHOLD,
    MAX_DELAY_BASE_US, MIN_IOPS_THRESHOLD, STATS_INTERVAL,
};
use vqueue::VirtQueue;
pub use vqueue::{ShellRing, CHAIN_CAPACITY, MAX_QUEUE_SIZE, POP_BATCH};

/// A descriptor chain as a device type reads it.
pub type DescChain = Chain<CHAIN_CAPACITY>;

/// The control side of a device type: what the vhost-user server offers a frontend, and a new
/// [`RequestHandler`] for each session. Every `DeviceType` is a [`DeviceBackend`].
pub trait DeviceType: Send + Sync + 'static {
    /// The data side of one session.
    type Handler: RequestHandler;
    /// Virtio feature bits offered (without `VHOST_USER_F_PROTOCOL_FEATURES`, added by the
    /// server).
    fn features(&self) -> u64;
    /// Reads `len` bytes of the device's virtio config space at `offset` (`GET_CONFIG`);
    /// [`config_range`] does it for a config space held as bytes.
    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String>;
    /// Most queues a frontend may use (`GET_QUEUE_NUM`).
    fn max_queues(&self) -> u16;
    /// Largest queue size accepted by `SET_VRING_NUM`.
    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }
    /// The request handler of a new frontend session whose device is `id`, polled by `reactor`
    /// (the device type's own operations reach the device through it).
    fn new_handler(
        &self,
        id: DeviceId,
        reactor: &Arc<ReactorHandle>,
    ) -> Result<Self::Handler, String>;
    /// A session received a new memory table (before its device does): lets the bdevs behind
    /// the controller prepare it ([`crate::bdev::Bdev::prepare_memory`]).
    fn prepare_memory(&self, _mem: &IoMemory) {}
}

impl<T: DeviceType> DeviceBackend for T {
    fn features(&self) -> u64 {
        DeviceType::features(self)
    }

    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        DeviceType::read_config(self, offset, len)
    }

    fn max_queues(&self) -> u16 {
        DeviceType::max_queues(self)
    }

    fn max_queue_size(&self) -> u16 {
        DeviceType::max_queue_size(self)
    }

    fn new_device(
        &self,
        id: DeviceId,
        reactor: &Arc<ReactorHandle>,
    ) -> Result<Box<dyn Task>, String> {
        let handler = self.new_handler(id, reactor)?;
        Ok(Box::new(AnyLayoutDevice::new(VhostDevice::new(
            id,
            DeviceType::max_queues(self),
            handler,
        ))))
    }

    fn prepare_memory(&self, mem: &IoMemory) {
        DeviceType::prepare_memory(self, mem);
    }
}

/// Bytes `offset..offset + len` of a config space; an error if they are not all inside it.
pub fn config_range(bytes: &[u8], offset: u32, len: u32) -> Result<Vec<u8>, String> {
    let start = usize::try_from(offset).map_err(|e| e.to_string())?;
    let len = usize::try_from(len).map_err(|e| e.to_string())?;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| format!("config read of {len} bytes at {start} is out of range"))?;
    bytes
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| format!("config read of {len} bytes at {start} is out of range"))
}

/// What becomes of a request the handler was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Submitted: the handler completes it later ([`Requests::update`] with its tag).
    Pending,
    /// Waits for something the handler decides in [`RequestHandler::settle`] (which then runs
    /// at the end of this round and every round after until it says nothing waits).
    Deferred,
    /// Answered now: the head goes on the used ring with this used length.
    Complete(u32),
    /// Neither executable nor answerable (no place for a status): the slot is freed and the
    /// queue stops until the frontend restarts it (the error eventfd tells it so).
    Abandon,
}

/// A request's payload as the per-queue statistics count it (`rvhost_get_queue_stats`), declared
/// by the device type in [`RequestHandler::start`] (0 and 0 unless it says otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataBytes {
    /// Bytes the guest reads from the device (blk `IN`, SCSI data-in).
    pub read: u32,
    /// Bytes the guest writes to the device (blk `OUT`, SCSI data-out).
    pub written: u32,
}

/// A request the shell popped and hands to [`RequestHandler::start`].
pub struct NewRequest<'a, H: RequestHandler + ?Sized> {
    /// The session's device.
    pub device: DeviceId,
    /// Queue index.
    pub queue: u16,
    /// The request's buffer ID (split ring: the chain's head index).
    pub head: u16,
    /// Identifies the request to bdev completions and [`Requests`] (queue and slot).
    pub tag: u64,
    /// The walked chain, or why the driver's chain was refused.
    pub chain: Result<&'a DescChain, ChainError>,
    /// The handler's per-request state (reset to its default).
    pub request: &'a mut H::Request,
    /// Where the handler declares the request's payload, counted when it completes.
    pub data: &'a mut DataBytes,
    /// The handler's state for this queue.
    pub queue_state: &'a H::Queue,
    /// Guest memory.
    pub mem: &'a GuestMemoryTable,
    /// The same table as a bdev I/O wants it.
    pub io_mem: &'a IoMemory,
}

impl<H: RequestHandler + ?Sized> std::fmt::Debug for NewRequest<'_, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRequest")
            .field("device", &self.device)
            .field("queue", &self.queue)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

/// The data side of a device type, one per session, polled on the reactor by its
/// [`VhostDevice`].
pub trait RequestHandler: Send + 'static {
    /// What a request keeps between submission and completion (in a slot the shell owns).
    type Request: Default + Copy + Send;
    /// What the handler keeps per running queue.
    type Queue: Send;
    /// The device type's own control operations (sent as reactor messages, like [`DeviceOp`]).
    type Op: Send + 'static;

    /// Queue `index` starts with the negotiated `features`: its per-queue state.
    fn start_queue(&mut self, index: u16, features: VirtioFeatures) -> Result<Self::Queue, String>;

    /// Each round the queues are polled from this index to the last, then the ones before it
    /// (virtio-scsi: request queues first, control and event queues after them).
    #[inline]
    fn first_polled_queue(&self) -> usize {
        0
    }

    /// How many heads to pop from queue `index` this round, at most `room` (0: leave it);
    /// `work` is how many requests the round has popped so far.
    #[inline]
    fn pop_budget(&mut self, _index: u16, room: usize, _work: usize) -> usize {
        room
    }

    /// Decodes and submits (or answers at once) one popped request.
    fn start(&mut self, request: NewRequest<'_, Self>) -> Disposition;

    /// Collects the completions of submitted requests; returns how many.
    fn poll_completions<V: ShellRing>(&mut self, requests: &mut Requests<'_, Self, V>) -> usize;

    /// Called once per poll round after the queues and completions, with the round's work.
    #[inline]
    fn end_round(&mut self, _work: usize) {}

    /// Applies a device-specific control operation. Returns whether something now waits for
    /// [`RequestHandler::settle`].
    fn control<V: ShellRing>(&mut self, op: Self::Op, requests: &mut Requests<'_, Self, V>)
        -> bool;

    /// Replies to deferred operations whose condition now holds; returns whether something still
    /// waits. Called after a control operation asked for it, and every round until it says no.
    fn settle<V: ShellRing>(&mut self, _requests: &mut Requests<'_, Self, V>) -> bool {
        false
    }

    /// The session is removed and nothing is in flight: release bdev channels and the like.
    fn remove(&mut self) {}
}

/// Encodes a completion tag: queue index in the high half, slot in the low half.
#[inline]
fn tag(queue: usize, slot: usize) -> u64 {
    ((queue as u64) << 32) | (slot as u64 & 0xffff_ffff)
}

#[inline]
fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

type Queue<H, V> = VirtQueue<V, <H as RequestHandler>::Request, <H as RequestHandler>::Queue>;

/// The requests in flight, as a handler sees them while completing them (on rings of layout
/// `V`).
pub struct Requests<'a, H: RequestHandler + ?Sized, V: ShellRing = SplitQueue> {
    device: DeviceId,
    queues: &'a mut [Option<Queue<H, V>>],
    mem: Option<&'a GuestMemoryTable>,
    io_mem: Option<&'a IoMemory>,
    /// The tick completions are stamped with: read at the first completion, shared by the
    /// others of the same poll (0 until then).
    now: u64,
}

impl<H: RequestHandler + ?Sized, V: ShellRing> std::fmt::Debug for Requests<'_, H, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl<'a, H: RequestHandler + ?Sized, V: ShellRing> Requests<'a, H, V> {
    fn new(
        device: DeviceId,
        queues: &'a mut [Option<Queue<H, V>>],
        mem: Option<&'a GuestMemoryTable>,
        io_mem: Option<&'a IoMemory>,
    ) -> Self {
        Requests {
            device,
            queues,
            mem,
            io_mem,
            now: 0,
        }
    }

    /// The completion tick (see [`Requests::now`]).
    #[inline]
    fn tick(now: &mut u64) -> u64 {
        if *now == 0 {
            *now = tsc::ticks();
        }
        *now
    }

    /// The session's device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Guest memory (`None` before the frontend sent a table; no request is in flight then).
    #[inline]
    pub fn mem(&self) -> Option<&'a GuestMemoryTable> {
        self.mem
    }

    /// Guest memory as a bdev I/O wants it.
    #[inline]
    pub fn io_mem(&self) -> Option<&'a IoMemory> {
        self.io_mem
    }

    /// Runs `f` on the request in flight with `tag`; if it returns a used length the request
    /// is complete: its head goes on the used ring (published at the end of the round) and its
    /// slot is freed. One lookup for both, on the completion path.
    #[inline]
    pub fn update(
        &mut self,
        tag: u64,
        f: impl FnOnce(&mut H::Request, &'a GuestMemoryTable) -> Option<u32>,
    ) {
        let (qi, si) = untag(tag);
        let Some(mem) = self.mem else {
            return;
        };
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            return;
        };
        let Some(slot) = q.slots.get_mut(si) else {
            return;
        };
        if !slot.busy {
            return;
        }
        if let Some(used_len) = f(&mut slot.request, mem) {
            let now = Self::tick(&mut self.now);
            q.complete(mem, si, used_len, self.device, now);
        }
    }

    /// The state of the request in flight with `tag`.
    #[inline]
    pub fn get_mut(&mut self, tag: u64) -> Option<&mut H::Request> {
        let (qi, si) = untag(tag);
        let slot = self.queues.get_mut(qi)?.as_mut()?.slots.get_mut(si)?;
        slot.busy.then_some(&mut slot.request)
    }

    /// Completes the request with `tag`: its head goes on the used ring with `used_len`
    /// (published at the end of the round) and its slot is freed.
    #[inline]
    pub fn complete(&mut self, tag: u64, used_len: u32) {
        let (qi, si) = untag(tag);
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            return;
        };
        match self.mem {
            Some(mem) => {
                let now = Self::tick(&mut self.now);
                q.complete(mem, si, used_len, self.device, now);
            }
            None => q.release_slot(si),
        }
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.queues.iter().flatten().map(|q| q.in_flight()).sum()
    }

    /// Every request in flight on the queues from `first_queue` on, with its tag.
    pub fn in_flight_requests(
        &self,
        first_queue: usize,
    ) -> impl Iterator<Item = (u64, &H::Request)> + '_ {
        self.queues
            .iter()
            .enumerate()
            .skip(first_queue)
            .filter_map(|(qi, q)| q.as_ref().map(|q| (qi, q)))
            .flat_map(|(qi, q)| {
                q.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.busy)
                    .map(move |(si, s)| (tag(qi, si), &s.request))
            })
    }
}

/// A vhost device: one frontend session's queues and memory on its reactor, with a device
/// type's request handler, on rings of layout `V` ([`AnyLayoutDevice`] switches between them).
pub struct VhostDevice<H: RequestHandler, V: ShellRing = SplitQueue> {
    id: DeviceId,
    handler: H,
    max_queues: u16,
    memory: Option<Arc<GuestMemoryTable>>,
    /// The same table as [`crate::bdev::BdevIo::mem`] wants it; made once per table.
    io_memory: Option<IoMemory>,
    /// Counts memory-table swaps; requests remember the one they were translated with.
    generation: u64,
    /// Tables replaced while requests were in flight, with their generation: bdevs may still
    /// access those requests' buffers. Each is dropped once no request of its generation or an
    /// older one is in flight.
    retired: Vec<(u64, Arc<GuestMemoryTable>)>,
    /// The migration's dirty log while logging is on (every queue holds it too).
    log: Option<Arc<rvhost_platform_linux::DirtyLog>>,
    /// Started queues; grows to the highest queue started (capacity for all reserved up front),
    /// so a round scans only queues a frontend can use.
    queues: Vec<Option<Queue<H, V>>>,
    /// Something waits for [`VhostDevice::settle`]: a stopping queue, a retired table, the
    /// removal, or the handler.
    settle_pending: bool,
    /// The handler has something waiting for its `settle`.
    handler_pending: bool,
    remove_reply: Option<Reply<()>>,
    removed: bool,
    /// The process is stopping: no queue, not even one started later, takes new requests.
    draining: bool,
    /// Told [`DrainProgress::Drained`] once nothing is in flight.
    drain_reply: Option<Reply<DrainProgress>>,
    /// Interrupt coalescing for every queue (`None`: off, and the round publishes as if there
    /// were no such feature: this is the one test it costs).
    coalescing: Option<CoalescingTicks>,
    /// Some queue holds a call back (coalescing): the rounds check it even when idle.
    calls_held: bool,
}

impl<H: RequestHandler, V: ShellRing> std::fmt::Debug for VhostDevice<H, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostDevice")
            .field("id", &self.id)
            .field("queues", &self.queues)
            .field("retired", &self.retired.len())
            .finish_non_exhaustive()
    }
}

impl<H: RequestHandler, V: ShellRing> VhostDevice<H, V> {
    /// A device with at most `max_queues` queues whose requests `handler` serves.
    pub fn new(id: DeviceId, max_queues: u16, handler: H) -> Self {
        VhostDevice {
            id,
            handler,
            max_queues,
            memory: None,
            io_memory: None,
            generation: 0,
            retired: Vec::new(),
            log: None,
            queues: Vec::with_capacity(usize::from(max_queues)),
            settle_pending: false,
            handler_pending: false,
            remove_reply: None,
            removed: false,
            draining: false,
            drain_reply: None,
            coalescing: None,
            calls_held: false,
        }
    }

    /// The request handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Memory tables kept alive for requests in flight.
    pub fn retired_tables(&self) -> usize {
        self.retired.len()
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.queues.iter().flatten().map(|q| q.in_flight()).sum()
    }

    /// Requests completed on queue `index` since it started (published on its used ring);
    /// `None` if the queue is not running. Read on the device's reactor.
    pub fn completed(&self, index: u16) -> Option<u64> {
        let queue = self.queues.get(usize::from(index))?.as_ref()?;
        Some(queue.completed())
    }

    /// Whether a queue (running, stopping or draining) is left.
    fn has_queues(&self) -> bool {
        self.queues.iter().any(Option::is_some)
    }

    /// The same device on rings of layout `W`; call only when it has no queue left.
    fn into_layout<W: ShellRing>(self) -> VhostDevice<H, W> {
        debug_assert!(!self.has_queues());
        VhostDevice {
            id: self.id,
            handler: self.handler,
            max_queues: self.max_queues,
            memory: self.memory,
            io_memory: self.io_memory,
            generation: self.generation,
            retired: self.retired,
            log: self.log,
            queues: Vec::with_capacity(usize::from(self.max_queues)),
            settle_pending: self.settle_pending,
            handler_pending: self.handler_pending,
            remove_reply: self.remove_reply,
            removed: self.removed,
            draining: self.draining,
            drain_reply: self.drain_reply,
            coalescing: self.coalescing,
            calls_held: false,
        }
    }

    /// Applies a vhost device operation.
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
                        q.stop(reply);
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
                    q.set_call(call);
                }
                let _ = reply.send(());
            }
            DeviceOp::SetLog {
                log,
                used_log,
                reply,
            } => {
                for (index, gpa) in used_log {
                    if let Some(q) = self
                        .queues
                        .get_mut(usize::from(index))
                        .and_then(Option::as_mut)
                    {
                        q.set_logging(log.as_ref(), Some(gpa));
                    }
                }
                for q in self.queues.iter_mut().flatten() {
                    q.set_logging(log.as_ref(), None);
                }
                tracing::debug!(device = self.id.0, on = log.is_some(), "dirty logging");
                self.log = log;
                let _ = reply.send(());
            }
            DeviceOp::SetCoalescing { coalescing, reply } => {
                self.set_coalescing(coalescing);
                let _ = reply.send(());
            }
            DeviceOp::Remove { reply } => {
                for q in self.queues.iter_mut().flatten() {
                    q.remove();
                }
                // A second Remove replaces the first; the first waiter hears "dropped".
                self.remove_reply = Some(reply);
                self.settle_pending = true;
                self.settle();
            }
            DeviceOp::QueueStats { reply } => {
                let reports = self
                    .queues
                    .iter()
                    .enumerate()
                    .filter_map(|(index, q)| Some(q.as_ref()?.report(index as u16)))
                    .collect();
                let _ = reply.send(reports);
            }
            DeviceOp::Drain { reply } => {
                self.draining = true;
                for q in self.queues.iter_mut().flatten() {
                    q.close();
                }
                let in_flight = self.in_flight();
                let _ = reply.send(DrainProgress::Closed { in_flight });
                // A second Drain replaces the first; the first waiter hears "dropped".
                self.drain_reply = Some(reply);
                self.settle_pending = true;
                self.settle();
            }
        }
    }

    /// Applies one of the handler's own operations.
    pub fn apply_handler_op(&mut self, op: H::Op) {
        let mut requests = Requests::new(
            self.id,
            &mut self.queues,
            self.memory.as_deref(),
            self.io_memory.as_ref(),
        );
        if self.handler.control(op, &mut requests) {
            self.handler_pending = true;
            self.settle_pending = true;
        }
        self.settle();
    }

    fn start_queue(&mut self, index: u16, setup: QueueSetup) -> Result<(), String> {
        if index >= self.max_queues {
            return Err(format!("queue {index} out of range"));
        }
        let i = usize::from(index);
        if self
            .queues
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|q| q.in_flight() > 0)
        {
            return Err(format!("queue {index} still has requests in flight"));
        }
        // Everything that can fail first, so a refused start changes nothing.
        let state = self.handler.start_queue(index, setup.features)?;
        let mut queue = Queue::<H, V>::new(&setup, state)?;
        if self.log.is_some() {
            queue.set_logging(self.log.as_ref(), None);
        }
        if self.coalescing.is_some() {
            queue.set_coalescing(self.coalescing, tsc::ticks(), None, self.id, i);
        }
        if self.draining {
            queue.close();
        }
        if self.queues.len() <= i {
            self.queues.resize_with(i + 1, || None);
        }
        if let Some(slot) = self.queues.get_mut(i) {
            *slot = Some(queue);
        }
        let is_current = self
            .memory
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, &setup.memory));
        if !is_current {
            // The session always sends its newest table; adopt it.
            self.swap_memory(setup.memory);
        }
        Ok(())
    }

    /// Turns interrupt coalescing on or off for every queue (and those started later); calls
    /// held back are sent when it turns off.
    fn set_coalescing(&mut self, coalescing: Option<CoalescingTicks>) {
        let now = tsc::ticks();
        let mem = self.memory.as_deref();
        for (qi, queue) in self.queues.iter_mut().enumerate() {
            if let Some(q) = queue {
                q.set_coalescing(coalescing, now, mem, self.id, qi);
            }
        }
        if coalescing.is_none() {
            self.calls_held = false;
        }
        self.coalescing = coalescing;
        tracing::debug!(
            device = self.id.0,
            on = coalescing.is_some(),
            "interrupt coalescing"
        );
    }

    /// Makes `memory` current, retiring the old table if requests still use it.
    fn swap_memory(&mut self, memory: Arc<GuestMemoryTable>) {
        let io: IoMemory = memory.clone();
        self.io_memory = Some(io);
        if let Some(old) = self.memory.replace(memory) {
            if self.in_flight() > 0 {
                self.retired.push((self.generation, old));
                self.settle_pending = true;
            }
        }
        self.generation = self.generation.wrapping_add(1);
    }

    fn set_memory(&mut self, memory: Arc<GuestMemoryTable>) {
        self.swap_memory(memory);
        let Some(mem) = self.memory.as_deref() else {
            return;
        };
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if let Some(q) = queue {
                q.check_rings(mem, self.id, index);
            }
        }
    }

    /// Replies to deferred operations whose condition now holds and drops what is no longer
    /// used; publishes what the handler completed meanwhile.
    fn settle(&mut self) {
        if !self.settle_pending {
            return;
        }
        if self.handler_pending {
            let mut requests = Requests::new(
                self.id,
                &mut self.queues,
                self.memory.as_deref(),
                self.io_memory.as_ref(),
            );
            self.handler_pending = self.handler.settle(&mut requests);
        }
        if !self.retired.is_empty() {
            let oldest_in_use = self
                .queues
                .iter()
                .flatten()
                .flat_map(|q| q.slots.iter())
                .filter(|slot| slot.busy)
                .map(|slot| slot.generation)
                .min();
            match oldest_in_use {
                Some(oldest) => self.retired.retain(|(generation, _)| *generation >= oldest),
                None => self.retired.clear(),
            }
        }
        if let Some(mem) = self.memory.as_deref() {
            if self.coalescing.is_some() {
                // A queue that stops, drains or goes gets its held call here.
                self.calls_held = publish_coalesced(&mut self.queues, mem, self.id);
            } else {
                for (qi, queue) in self.queues.iter_mut().enumerate() {
                    if let Some(q) = queue {
                        q.publish(mem, self.id, qi);
                    }
                }
            }
        }
        // Only now answer the stops of drained queues: what the handler completed while settling
        // (a TMF that waited for the I/O it covers) is on the used ring and published above, so
        // the next avail index handed to the frontend never runs ahead of a published used index.
        for queue in self.queues.iter_mut() {
            if queue.as_ref().is_some_and(VirtQueue::drained) {
                if let Some(q) = queue.take() {
                    q.finish_stop();
                }
            }
        }
        if self.drain_reply.is_some() && self.in_flight() == 0 {
            // Everything completed has been published (above, or in the poll round that
            // completed it, which publishes before it settles).
            if let Some(reply) = self.drain_reply.take() {
                let _ = reply.send(DrainProgress::Drained);
            }
        }
        if self.remove_reply.is_some() && self.in_flight() == 0 {
            self.handler.remove();
            self.queues.iter_mut().for_each(|q| *q = None);
            self.memory = None;
            self.io_memory = None;
            self.retired.clear();
            self.removed = true;
            if let Some(reply) = self.remove_reply.take() {
                let _ = reply.send(());
            }
        }
        self.settle_pending = self.handler_pending
            || self.remove_reply.is_some()
            || self.drain_reply.is_some()
            || !self.retired.is_empty()
            || self.queues.iter().flatten().any(VirtQueue::is_stopping);
    }

    /// How many heads queue `qi` may pop this round (0: leave it). Decided before
    /// [`VhostDevice::poll_queue`] is called, so a queue left alone costs no call.
    #[inline]
    fn pop_budget(&mut self, qi: usize, work: usize) -> usize {
        let Some(Some(q)) = self.queues.get(qi) else {
            return 0;
        };
        if !q.accepts_requests() {
            return 0;
        }
        let room = q.free_slots().min(POP_BATCH);
        self.handler.pop_budget(qi as u16, room, work).min(room)
    }

    /// Pops (at most `room`) and starts new requests on queue `qi`. One call site: inlined into
    /// the poll loop (out of line it cost blk 30 instructions per request at batch 32).
    #[inline]
    fn poll_queue(
        &mut self,
        qi: usize,
        room: usize,
        mem: &GuestMemoryTable,
        io_mem: &IoMemory,
    ) -> usize {
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            return 0;
        };
        // Heads an earlier backend left inflight go first, before any new avail entry.
        let resubmitted = q.has_resubmit();
        let popped = if resubmitted {
            q.take_resubmit(room)
        } else {
            match q.vq.pop_heads_pipelined(mem, &mut q.heads[..room]) {
                Ok(n) => n,
                Err(err) => {
                    tracing::error!(device = self.id.0, queue = qi, %err, "avail ring unusable; queue stopped");
                    q.stop_broken();
                    return 0;
                }
            }
        };
        if popped == 0 {
            return 0;
        }
        // With EVENT_IDX, avail_event must trail last_avail_idx so the driver never kicks.
        if let Err(err) = q.vq.disable_kicks(mem) {
            tracing::error!(device = self.id.0, queue = qi, %err, "used ring unusable; queue stopped");
            q.stop_broken();
            return 0;
        }
        // Every header is a line the driver just wrote: fetch them all before decoding any.
        q.vq.prefetch_chains(mem, &q.heads[..popped]);
        let index = qi as u16;
        // One tick for the batch: the requests' start, and the completion of those answered now.
        let now = tsc::ticks();
        for i in 0..popped {
            let head = q.heads[i];
            let Some(si) = q.take_slot(head, self.generation, now, mem) else {
                // `room` is at most the free slot count.
                tracing::error!(
                    device = self.id.0,
                    queue = qi,
                    "no free request slot; queue stopped"
                );
                q.stop_broken();
                break;
            };
            let walked = if V::RESUBMIT_FROM_LOG && resubmitted {
                q.walk_resubmitted(mem, head)
            } else {
                q.vq.walk_popped(mem, head, &mut *q.chain)
            };
            let chain = match walked {
                Ok(()) => Ok(&*q.chain),
                Err(err) => Err(err),
            };
            let Some(slot) = q.slots.get_mut(si) else {
                break;
            };
            let request = NewRequest {
                device: self.id,
                queue: index,
                head: head.id(),
                tag: tag(qi, si),
                chain,
                request: &mut slot.request,
                data: &mut slot.data,
                queue_state: &q.state,
                mem,
                io_mem,
            };
            match self.handler.start(request) {
                Disposition::Pending => {}
                Disposition::Deferred => {
                    self.handler_pending = true;
                    self.settle_pending = true;
                }
                Disposition::Complete(len) => q.complete(mem, si, len, self.id, now),
                Disposition::Abandon => {
                    q.release_slot(si);
                    q.fail();
                    break;
                }
            }
        }
        popped
    }
}

impl<H: RequestHandler, V: ShellRing> Task for VhostDevice<H, V> {
    fn id(&self) -> DeviceId {
        self.id
    }

    fn poll(&mut self) -> usize {
        if self.removed {
            return 0;
        }
        let mut work = 0;
        // The tables are moved out for the round and put back, rather than cloned: an Arc clone
        // is a locked instruction, which waits for this round's used-ring stores to drain.
        if let (Some(mem), Some(io_mem)) = (self.memory.take(), self.io_memory.take()) {
            let first = self.handler.first_polled_queue();
            for qi in (first..self.queues.len()).chain(0..first.min(self.queues.len())) {
                let room = self.pop_budget(qi, work);
                if room > 0 {
                    work += self.poll_queue(qi, room, &mem, &io_mem);
                }
            }
            let mut requests = Requests::new(self.id, &mut self.queues, Some(&mem), Some(&io_mem));
            work += self.handler.poll_completions(&mut requests);
            self.handler.end_round(work);
            if self.coalescing.is_some() {
                if work > 0 || self.calls_held {
                    self.calls_held = publish_coalesced(&mut self.queues, &mem, self.id);
                }
            } else if work > 0 {
                for (qi, queue) in self.queues.iter_mut().enumerate() {
                    if let Some(q) = queue {
                        q.publish(&mem, self.id, qi);
                    }
                }
            }
            if work == 0 {
                for (qi, queue) in self.queues.iter_mut().enumerate() {
                    if let Some(q) = queue {
                        q.check_late_notification(&mem, self.id, qi);
                    }
                }
            }
            self.memory = Some(mem);
            self.io_memory = Some(io_mem);
        }
        if self.settle_pending {
            self.settle();
        }
        work
    }

    fn control(&mut self, message: Message) {
        let message = match message.downcast::<DeviceOp>() {
            Ok(op) => return self.apply(*op),
            Err(other) => other,
        };
        match message.downcast::<H::Op>() {
            Ok(op) => self.apply_handler_op(*op),
            Err(_) => tracing::warn!(device = self.id.0, "unknown control message dropped"),
        }
    }

    fn is_finished(&self) -> bool {
        self.removed
    }

    fn prepare_block(&mut self, fds: &mut Vec<libc::pollfd>) -> BlockReadiness {
        if self.removed {
            return BlockReadiness::Ready;
        }
        // In flight (only the waker's completions end those waits), a deferred operation or a
        // held call (timers) need polling.
        if self.settle_pending || self.calls_held || self.in_flight() > 0 {
            return BlockReadiness::Refused;
        }
        let Some(mem) = self.memory.as_deref() else {
            return if self.has_queues() {
                BlockReadiness::Refused
            } else {
                BlockReadiness::Ready
            };
        };
        kick_wait::prepare(&mut self.queues, mem, fds)
    }

    fn end_block(&mut self, fds: &[libc::pollfd]) {
        let Some(mem) = self.memory.as_deref() else {
            return;
        };
        kick_wait::end(&mut self.queues, mem, fds);
    }
}

/// Publishes every queue with coalescing on (one clock read for the round); returns whether a
/// queue still holds a call back.
#[cold]
#[inline(never)]
fn publish_coalesced<V: ShellRing, R, Q>(
    queues: &mut [Option<VirtQueue<V, R, Q>>],
    mem: &GuestMemoryTable,
    device: DeviceId,
) -> bool {
    let now = tsc::ticks();
    let mut held = false;
    for (qi, queue) in queues.iter_mut().enumerate() {
        if let Some(q) = queue {
            held |= q.publish_coalesced(mem, device, qi, now);
        }
    }
    held
}

/// The ring layout a session's device runs on.
enum Layout<H: RequestHandler> {
    Split(VhostDevice<H, SplitQueue>),
    Packed(VhostDevice<H, PackedQueue>),
}

/// A [`VhostDevice`] on whichever ring layout the frontend negotiated: split until a queue starts
/// with `VIRTIO_F_RING_PACKED`, packed from then on (and back, should a reset renegotiate). The
/// layout belongs to the session, not to a request: a poll round costs one branch for it, and
/// each layout's round is compiled on its own.
pub struct AnyLayoutDevice<H: RequestHandler> {
    /// `None` only while switching.
    device: Option<Layout<H>>,
}

impl<H: RequestHandler> std::fmt::Debug for AnyLayoutDevice<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.device {
            Some(Layout::Split(d)) => f.debug_tuple("Split").field(d).finish(),
            Some(Layout::Packed(d)) => f.debug_tuple("Packed").field(d).finish(),
            None => f.write_str("Switching"),
        }
    }
}

impl<H: RequestHandler> AnyLayoutDevice<H> {
    /// `device`, on split rings until a queue starts with a packed one.
    pub fn new(device: VhostDevice<H>) -> Self {
        AnyLayoutDevice {
            device: Some(Layout::Split(device)),
        }
    }

    /// Requests completed on queue `index` since it started ([`VhostDevice::completed`]).
    pub fn completed(&self, index: u16) -> Option<u64> {
        match &self.device {
            Some(Layout::Split(d)) => d.completed(index),
            Some(Layout::Packed(d)) => d.completed(index),
            None => None,
        }
    }

    /// Whether the device runs on packed rings now.
    pub fn is_packed(&self) -> bool {
        matches!(self.device, Some(Layout::Packed(_)))
    }

    /// Moves the device to the layout `features` negotiated; `Err` if queues of the other layout
    /// are still there (the frontend started one without stopping the others first).
    fn switch_layout(&mut self, features: u64) -> Result<(), String> {
        let packed = PackedQueue::negotiated(features);
        if packed == self.is_packed() {
            return Ok(());
        }
        let has_queues = match &self.device {
            Some(Layout::Split(d)) => d.has_queues(),
            Some(Layout::Packed(d)) => d.has_queues(),
            None => return Err("device lost while switching ring layouts".to_string()),
        };
        if has_queues {
            return Err("queues of the other ring layout are still running".to_string());
        }
        self.device = match self.device.take() {
            Some(Layout::Split(d)) => Some(Layout::Packed(d.into_layout())),
            Some(Layout::Packed(d)) => Some(Layout::Split(d.into_layout())),
            None => None,
        };
        tracing::debug!(id = ?self.id(), packed, "ring layout switched");
        Ok(())
    }

    fn apply(&mut self, op: DeviceOp) {
        if let DeviceOp::StartQueue { setup, .. } = &op {
            if let Err(why) = self.switch_layout(setup.features.0) {
                if let DeviceOp::StartQueue { reply, .. } = op {
                    let _ = reply.send(Err(why));
                }
                return;
            }
        }
        match &mut self.device {
            Some(Layout::Split(d)) => d.apply(op),
            Some(Layout::Packed(d)) => d.apply(op),
            None => {}
        }
    }
}

impl<H: RequestHandler> Task for AnyLayoutDevice<H> {
    fn id(&self) -> DeviceId {
        match &self.device {
            Some(Layout::Split(d)) => d.id,
            Some(Layout::Packed(d)) => d.id,
            None => DeviceId(0),
        }
    }

    #[inline]
    fn poll(&mut self) -> usize {
        match &mut self.device {
            Some(Layout::Split(d)) => d.poll(),
            Some(Layout::Packed(d)) => d.poll(),
            None => 0,
        }
    }

    fn control(&mut self, message: Message) {
        match message.downcast::<DeviceOp>() {
            Ok(op) => self.apply(*op),
            Err(other) => match &mut self.device {
                Some(Layout::Split(d)) => d.control(other),
                Some(Layout::Packed(d)) => d.control(other),
                None => {}
            },
        }
    }

    fn is_finished(&self) -> bool {
        match &self.device {
            Some(Layout::Split(d)) => d.is_finished(),
            Some(Layout::Packed(d)) => d.is_finished(),
            None => true,
        }
    }

    fn prepare_block(&mut self, fds: &mut Vec<libc::pollfd>) -> BlockReadiness {
        match &mut self.device {
            Some(Layout::Split(d)) => d.prepare_block(fds),
            Some(Layout::Packed(d)) => d.prepare_block(fds),
            None => BlockReadiness::Refused,
        }
    }

    fn end_block(&mut self, fds: &[libc::pollfd]) {
        match &mut self.device {
            Some(Layout::Split(d)) => d.end_block(fds),
            Some(Layout::Packed(d)) => d.end_block(fds),
            None => {}
        }
    }
}
