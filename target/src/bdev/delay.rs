//! The delay bdev (SPDK's `delay` vbdev module): a bdev stacked on another ("base") bdev that
//! holds each read and write completion for an added latency, in microseconds, before reporting
//! it. An operator tool (what does the guest do when storage is slow?) and the way tests get
//! out-of-order completions on demand.
//!
//! As in SPDK's `vbdev_delay`:
//! - each read or write picks, at submission, the p99 latency with probability 1/100 and the
//!   average latency otherwise; flush, unmap and write-zeroes are passed through undelayed;
//! - the latency counts from the moment the base bdev completed the I/O (it is added to the
//!   base's own latency), and the base's status (success or failure) is reported unchanged;
//! - completions wait in four FIFO queues (average and p99, read and write); a queue reports its
//!   oldest entries once they are due. After a latency is lowered at run time, new I/O waits
//!   behind older, longer-delayed I/O of the same queue until those drain, which SPDK keeps on
//!   purpose (it lets a test trigger an initiator's timeout predictably);
//! - `bdev_delay_update_latency` changes a latency at run time without checking it against the
//!   others (only `bdev_delay_create` refuses a p99 below its average).
//!
//! The base bdev is claimed ([`BdevContext::claim`]) while the delay bdev exists: no other
//! delay bdev may stack on it and no controller may export it (EPERM, as in SPDK); deleting the
//! delay bdev releases it.
//!
//! Where rvhost differs: `bdev_delay_create` on a base bdev that does not exist fails with
//! ENODEV, whereas SPDK answers success and creates the delay bdev when the base appears; a UUID
//! not given is random, whereas SPDK derives it from the base bdev's. When the base bdev is
//! deleted, the delay bdev is deleted with it at the module's next tick (SPDK does it at once);
//! I/O to it fails in between.
//!
//! The data path: each reactor's channel wraps a channel of the base bdev. The base sees a slot
//! index as its tag; the slot keeps the caller's tag and the latency class until the base
//! completes. Slots, free list and queues are allocated when the channel opens (and grow only if
//! a reactor ever has more I/O in flight than a virtqueue holds), so no I/O allocates. The
//! latencies are atomics read at base completion, so `bdev_delay_update_latency` takes no lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::module::{decode, parse_uuid, BdevContext, BdevModule, ByName, ModuleEnv, RpcMethod};
use super::registry::uuid_string;
use super::{Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoMemory, IoStatus};
use crate::rpc::errno::EINVAL;
use crate::rpc::RpcError;

/// I/Os a channel tracks before its tables have to grow (a virtqueue holds at most 1024).
const CHANNEL_CAPACITY: usize = 1024;

/// One of the four latencies of a delay bdev, as `bdev_delay_update_latency` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyType {
    /// Added to 99 % of reads.
    AvgRead,
    /// Added to 1 % of reads.
    P99Read,
    /// Added to 99 % of writes.
    AvgWrite,
    /// Added to 1 % of writes.
    P99Write,
}

impl LatencyType {
    /// The latency named as SPDK names it (`avg_read`, `p99_read`, `avg_write`, `p99_write`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "avg_read" => Some(LatencyType::AvgRead),
            "p99_read" => Some(LatencyType::P99Read),
            "avg_write" => Some(LatencyType::AvgWrite),
            "p99_write" => Some(LatencyType::P99Write),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The four latencies of a delay bdev, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    /// Added to 99 % of reads.
    pub avg_read_us: u64,
    /// Added to 1 % of reads.
    pub p99_read_us: u64,
    /// Added to 99 % of writes.
    pub avg_write_us: u64,
    /// Added to 1 % of writes.
    pub p99_write_us: u64,
}

/// A delay bdev.
#[derive(Debug)]
pub struct DelayBdev {
    name: String,
    uuid: [u8; 16],
    base: Arc<dyn Bdev>,
    /// Microseconds, indexed by [`LatencyType::index`].
    latency_us: [AtomicU64; 4],
    removed: AtomicBool,
}

impl DelayBdev {
    /// A delay bdev `name` over `base`, of the same size and block size.
    pub fn new(name: &str, uuid: [u8; 16], base: Arc<dyn Bdev>, latencies: Latencies) -> Arc<Self> {
        Arc::new(DelayBdev {
            name: name.to_owned(),
            uuid,
            base,
            latency_us: [
                AtomicU64::new(latencies.avg_read_us),
                AtomicU64::new(latencies.p99_read_us),
                AtomicU64::new(latencies.avg_write_us),
                AtomicU64::new(latencies.p99_write_us),
            ],
            removed: AtomicBool::new(false),
        })
    }

    /// The bdev it is stacked on.
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }

    /// One latency, in microseconds.
    pub fn latency_us(&self, which: LatencyType) -> u64 {
        self.latency_us[which.index()].load(Ordering::Relaxed)
    }

    /// Changes one latency; I/O the base completes from now on waits the new one.
    pub fn set_latency_us(&self, which: LatencyType, us: u64) {
        self.latency_us[which.index()].store(us, Ordering::Relaxed);
    }

    /// The four latencies.
    pub fn latencies(&self) -> Latencies {
        Latencies {
            avg_read_us: self.latency_us(LatencyType::AvgRead),
            p99_read_us: self.latency_us(LatencyType::P99Read),
            avg_write_us: self.latency_us(LatencyType::AvgWrite),
            p99_write_us: self.latency_us(LatencyType::P99Write),
        }
    }

    /// Refuses new I/O and channels from now on (the bdev is being deleted).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The parameters of `bdev_delay_create` that recreate it, which are also its
    /// `driver_specific.delay` in `bdev_get_bdevs` (as SPDK writes both).
    fn params(&self) -> Value {
        let l = self.latencies();
        json!({
            "name": self.name,
            "base_bdev_name": self.base.name(),
            "uuid": uuid_string(self.uuid),
            "avg_read_latency": l.avg_read_us,
            "p99_read_latency": l.p99_read_us,
            "avg_write_latency": l.avg_write_us,
            "p99_write_latency": l.p99_write_us,
        })
    }
}

impl Bdev for DelayBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &str {
        "delay"
    }
    fn module_name(&self) -> &'static str {
        DelayModule::NAME
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.base.num_blocks()
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.base.supports(kind)
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        if self.is_removed() {
            return Err(BdevError::Removed(self.name.clone()));
        }
        let base = Arc::clone(&self.base).open_channel()?;
        Ok(Box::new(DelayChannel::new(self, base)))
    }
    fn prepare_memory(&self, mem: &IoMemory) {
        self.base.prepare_memory(mem);
    }
    fn driver_specific(&self) -> Value {
        json!({ "delay": self.params() })
    }
}

/// Which latency an I/O waits after its base completion: `None` for flush, unmap and
/// write-zeroes, which SPDK does not delay.
type Class = Option<LatencyType>;

/// An I/O the base bdev has, by the slot index it was given as tag.
#[derive(Debug, Clone, Copy)]
struct Slot {
    tag: u64,
    class: Class,
}

/// A completion held until it is due.
#[derive(Debug, Clone, Copy)]
struct Held {
    tag: u64,
    status: IoStatus,
    /// `None`: a latency so large that the clock cannot represent its end; never due.
    due: Option<Instant>,
}

/// What a channel holds apart from the base channel (so the base's completion callback can
/// borrow it while the base channel is borrowed for the poll).
struct Pending {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Indexed by [`LatencyType::index`]; each in base-completion order.
    held: [VecDeque<Held>; 4],
    /// Completions of I/O that is not delayed, reported at the next poll.
    undelayed: VecDeque<(u64, IoStatus)>,
    /// Slots in use (I/O at the base).
    at_base: usize,
    /// xorshift64 state choosing p99 latencies (quality hardly matters; speed and no lock do).
    rng: u64,
}

impl Pending {
    fn new(seed: u64) -> Self {
        Pending {
            slots: Vec::with_capacity(CHANNEL_CAPACITY),
            free: Vec::with_capacity(CHANNEL_CAPACITY),
            held: std::array::from_fn(|_| VecDeque::with_capacity(CHANNEL_CAPACITY)),
            undelayed: VecDeque::with_capacity(CHANNEL_CAPACITY),
            at_base: 0,
            // xorshift must not start at 0.
            rng: seed | 1,
        }
    }

    /// True with probability 1/100, as SPDK's `rand_r() % 100 == 0`.
    fn one_in_hundred(&mut self) -> bool {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x % 100 == 0
    }

    fn take_slot(&mut self, slot: Slot) -> u32 {
        self.at_base += 1;
        if let Some(index) = self.free.pop() {
            if let Some(entry) = self.slots.get_mut(index as usize) {
                *entry = Some(slot);
                return index;
            }
        }
        // Only beyond the capacity reserved at open; at most one slot per I/O in flight.
        let index = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Some(slot));
        index
    }

    fn release_slot(&mut self, index: u64) -> Option<Slot> {
        let i = usize::try_from(index).ok()?;
        let slot = self.slots.get_mut(i)?.take()?;
        self.at_base = self.at_base.saturating_sub(1);
        // `i` came from a u32 in `take_slot`.
        self.free.push(i as u32);
        Some(slot)
    }
}

/// One reactor's view of a [`DelayBdev`].
struct DelayChannel {
    bdev: Arc<DelayBdev>,
    base: Box<dyn BdevChannel>,
    pending: Pending,
}

impl DelayChannel {
    fn new(bdev: Arc<DelayBdev>, base: Box<dyn BdevChannel>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (Arc::as_ptr(&bdev) as u64).rotate_left(32);
        DelayChannel {
            bdev,
            base,
            pending: Pending::new(seed),
        }
    }
}

impl BdevChannel for DelayChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        if self.bdev.is_removed() {
            return Err(BdevError::Removed(self.bdev.name.clone()));
        }
        let p99 = self.pending.one_in_hundred();
        let class = match (io.kind, p99) {
            (IoKind::Read, false) => Some(LatencyType::AvgRead),
            (IoKind::Read, true) => Some(LatencyType::P99Read),
            (IoKind::Write, false) => Some(LatencyType::AvgWrite),
            (IoKind::Write, true) => Some(LatencyType::P99Write),
            (IoKind::Flush | IoKind::Unmap | IoKind::WriteZeroes, _) => None,
        };
        let index = self.pending.take_slot(Slot { tag: io.tag, class });
        let base_io = BdevIo {
            tag: u64::from(index),
            ..*io
        };
        if let Err(err) = self.base.submit(&base_io) {
            self.pending.release_slot(u64::from(index));
            return Err(err);
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        let now = Instant::now();
        let bdev = &*self.bdev;
        let pending = &mut self.pending;
        if pending.at_base > 0 {
            self.base.poll(&mut |index, status| {
                let Some(slot) = pending.release_slot(index) else {
                    tracing::error!(bdev = %bdev.name, index, "base bdev completed an I/O the delay bdev does not have");
                    return;
                };
                match slot.class {
                    None => pending.undelayed.push_back((slot.tag, status)),
                    Some(which) => {
                        let due =
                            now.checked_add(Duration::from_micros(bdev.latency_us(which)));
                        pending.held[which.index()].push_back(Held {
                            tag: slot.tag,
                            status,
                            due,
                        });
                    }
                }
            });
        }
        let mut reported = 0;
        for (tag, status) in pending.undelayed.drain(..) {
            done(tag, status);
            reported += 1;
        }
        for queue in &mut pending.held {
            while let Some(held) = queue.front() {
                if held.due.is_none_or(|due| due > now) {
                    break;
                }
                done(held.tag, held.status);
                queue.pop_front();
                reported += 1;
            }
        }
        reported
    }

    fn in_flight(&self) -> usize {
        let p = &self.pending;
        p.at_base + p.undelayed.len() + p.held.iter().map(VecDeque::len).sum::<usize>()
    }
}

/// The `delay` module: delay bdevs created, changed and deleted over JSON-RPC.
#[derive(Debug, Default)]
pub struct DelayModule {
    /// Every delay bdev, in creation order (removed ones are dropped at the next call or tick).
    bdevs: Vec<Arc<DelayBdev>>,
}

/// `bdev_delay_create` (SPDK's `rpc_bdev_delay_create`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayCreate {
    base_bdev_name: String,
    name: String,
    uuid: Option<String>,
    avg_read_latency: u64,
    p99_read_latency: u64,
    avg_write_latency: u64,
    p99_write_latency: u64,
}

/// `bdev_delay_update_latency` (SPDK's `rpc_bdev_delay_update_latency`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateLatency {
    delay_bdev_name: String,
    latency_type: String,
    latency_us: u64,
}

impl DelayModule {
    fn forget_removed(&mut self) {
        self.bdevs.retain(|b| !b.is_removed());
    }

    fn create(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: DelayCreate = decode(params)?;
        if p.p99_read_latency < p.avg_read_latency || p.p99_write_latency < p.avg_write_latency {
            return Err(RpcError::errno(
                EINVAL,
                "Unable to create a delay bdev where p99 latency is less than average latency",
            ));
        }
        self.forget_removed();
        let uuid = parse_uuid(p.uuid.as_deref())?;
        cx.check_new_name(&p.name, uuid)?;
        // Claimed until the delay bdev is deleted: no second delay bdev on it, no controller
        // exporting it (SPDK: EPERM).
        let base = cx.claim(&p.base_bdev_name, &p.name)?;
        let latencies = Latencies {
            avg_read_us: p.avg_read_latency,
            p99_read_us: p.p99_read_latency,
            avg_write_us: p.avg_write_latency,
            p99_write_us: p.p99_write_latency,
        };
        let bdev = DelayBdev::new(&p.name, uuid, base, latencies);
        let removed = Arc::clone(&bdev);
        if let Err(err) = cx.register(
            Arc::clone(&bdev) as Arc<dyn Bdev>,
            Box::new(move || removed.mark_removed()),
        ) {
            cx.release(&p.base_bdev_name);
            return Err(err);
        }
        tracing::info!(bdev = %p.name, base = %p.base_bdev_name, ?latencies, "created delay bdev");
        self.bdevs.push(bdev);
        Ok(Value::String(p.name))
    }

    fn delete(
        &mut self,
        cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: ByName = decode(params)?;
        cx.delete(&p.name)?;
        self.forget_removed();
        Ok(Value::Bool(true))
    }

    fn update_latency(
        &mut self,
        _cx: &mut BdevContext<'_>,
        params: Option<Value>,
    ) -> Result<Value, RpcError> {
        let p: UpdateLatency = decode(params)?;
        let Some(which) = LatencyType::parse(&p.latency_type) else {
            return Err(RpcError::invalid_params(
                "Please specify a valid latency type.",
            ));
        };
        self.forget_removed();
        let Some(bdev) = self.bdevs.iter().find(|b| b.name == p.delay_bdev_name) else {
            return Err(RpcError::invalid_params(
                "The requested bdev does not exist.",
            ));
        };
        bdev.set_latency_us(which, p.latency_us);
        tracing::info!(bdev = %bdev.name, latency_type = %p.latency_type, latency_us = p.latency_us, "delay bdev latency changed");
        Ok(Value::Bool(true))
    }
}

impl BdevModule for DelayModule {
    const NAME: &'static str = "delay";
    const METHODS: &'static [RpcMethod<Self>] = &[
        RpcMethod {
            name: "bdev_delay_create",
            old_name: None,
            handler: Self::create,
        },
        RpcMethod {
            name: "bdev_delay_delete",
            old_name: None,
            handler: Self::delete,
        },
        RpcMethod {
            name: "bdev_delay_update_latency",
            old_name: None,
            handler: Self::update_latency,
        },
    ];

    fn new(_env: &ModuleEnv) -> Self {
        DelayModule::default()
    }

    /// Delay bdevs are saved by [`BdevModule::module_config`], after every other module's
    /// bdevs, so that a base bdev recreated by a module's own calls (an NVMe controller's
    /// namespaces) exists before the delay bdev on it is created.
    fn bdev_config(&self, _bdev: &dyn Bdev) -> Option<Value> {
        None
    }

    fn module_config(&self) -> Vec<Value> {
        self.bdevs
            .iter()
            .filter(|b| !b.is_removed())
            .map(|b| json!({"method": "bdev_delay_create", "params": b.params()}))
            .collect()
    }

    /// Deletes every delay bdev whose base bdev was deleted (SPDK's hot-remove of the base).
    fn tick(&mut self, cx: &mut BdevContext<'_>) {
        self.forget_removed();
        let orphans: Vec<String> = self
            .bdevs
            .iter()
            .filter(|d| {
                !cx.bdevs()
                    .get(d.base.name())
                    .is_some_and(|b| std::ptr::addr_eq(Arc::as_ptr(&b), Arc::as_ptr(&d.base)))
            })
            .map(|d| d.name.clone())
            .collect();
        for name in orphans {
            tracing::info!(bdev = %name, "base bdev was deleted; deleting the delay bdev on it");
            if let Err(err) = cx.delete(&name) {
                tracing::warn!(bdev = %name, "cannot delete delay bdev: {}", err.message);
            }
        }
        self.forget_removed();
    }
}

#[cfg(test)]
mod tests;
