//! One frontend connection's vhost-user state, as the control thread keeps it.
//!
//! The `vhost` crate frames and validates messages and passes file descriptors; this handler
//! decides what they mean. It never touches a virtqueue: a vring becomes live on the reactor when
//! it is *started* (kick fd received), *enabled* (or protocol features were not negotiated), has a
//! size and addresses, and guest memory is mapped; then its whole setup is sent to the reactor in
//! one [`DeviceOp::StartQueue`]. Stopping it (`GET_VRING_BASE`, `SET_VRING_ENABLE 0`, reset,
//! disconnect) waits until the reactor has completed its in-flight requests.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use std::os::fd::OwnedFd;

use rvhost_platform_linux::{DirtyLog, MAX_MEM_SLOTS};

use super::inflight::{InflightLayout, InflightRegion};
use super::memory::{GuestMemoryTable, RegionSpec};
use super::{DeviceBackend, EventNotifier, QueueSetup, VirtioFeatures};
use super::{DeviceId, DeviceOp};
use crate::bdev::IoMemory;
use crate::reactor::ReactorHandle;

/// The protocol features rvhost offers. REPLY_ACK is added by the `vhost` crate itself.
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::RESET_DEVICE)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::BACKEND_REQ);

/// `VHOST_F_LOG_ALL`: the virtio feature bit with which the frontend turns dirty logging on and
/// off (live migration).
pub const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// Environment switch for tests only: set to `1`, the target logs its used rings but not the
/// buffers it writes (read data, status, responses), so a migration under guest reads leaves
/// stale data on the destination while the rings stay consistent and the guest runs on (the
/// negative control of the migration test).
pub const NO_DIRTY_MARKING_ENV: &str = "RVHOST_TEST_NO_DIRTY_MARKING";

/// Environment switch for tests only: set to `1`, the target does not offer `INFLIGHT_SHMFD`, so
/// a restart under out-of-order I/O loses requests (the negative control of the restart tests).
pub const NO_INFLIGHT_ENV: &str = "RVHOST_TEST_NO_INFLIGHT";

/// The protocol features offered to a new session ([`PROTOCOL_FEATURES`], less inflight
/// tracking when [`NO_INFLIGHT_ENV`] is set).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    if std::env::var_os(NO_INFLIGHT_ENV).is_some_and(|v| v == "1") {
        PROTOCOL_FEATURES.difference(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    } else {
        PROTOCOL_FEATURES
    }
}

/// The control thread's record of one vring.
#[derive(Debug, Default)]
struct VringState {
    /// Queue size from `SET_VRING_NUM` (0: not set).
    size: u16,
    /// Next avail index to process, from `SET_VRING_BASE` or a stop.
    base: u16,
    /// Guest physical addresses of descriptor table, avail ring, used ring.
    addrs: Option<(u64, u64, u64)>,
    /// `SET_VRING_KICK` received (the ring is "started" in the spec's words). We poll, so the fd is
    /// read only by a reactor that blocks between requests (`reactor::KICK_SPIN_ROUNDS`).
    kick: Option<Option<Arc<EventNotifier>>>,
    call: Option<Arc<EventNotifier>>,
    err: Option<Arc<EventNotifier>>,
    /// `log_guest_addr` of the last `SET_VRING_ADDR` with `VHOST_VRING_F_LOG`: where the used
    /// ring is logged.
    log_gpa: Option<u64>,
    enabled: bool,
    /// Live on the reactor.
    running: bool,
}

/// A frontend connection's device state; driven by `vhost`'s `BackendReqHandler`.
pub struct Session {
    backend: Arc<dyn DeviceBackend>,
    reactor: Arc<ReactorHandle>,
    id: DeviceId,
    offered_features: u64,
    acked_features: u64,
    offered_protocol_features: VhostUserProtocolFeatures,
    acked_protocol_features: u64,
    vrings: Vec<VringState>,
    memory: Option<Arc<GuestMemoryTable>>,
    /// The inflight region (`GET_INFLIGHT_FD` made it or `SET_INFLIGHT_FD` handed it over).
    inflight: Option<Arc<InflightRegion>>,
    /// The migration's dirty log (`SET_LOG_BASE`); marked while `LOG_ALL` is negotiated.
    log: Option<Arc<DirtyLog>>,
    /// Set by a handler method that refused a request: `Some(true)` means the connection must be
    /// dropped (its device state can no longer be trusted), `Some(false)` that a negative
    /// acknowledgement was enough.
    refused: Option<bool>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field(
                "acked_protocol_features",
                &format_args!("{:#x}", self.acked_protocol_features),
            )
            .field("vrings", &self.vrings)
            .finish_non_exhaustive()
    }
}

/// Maps an internal refusal to the `vhost` crate's error, recording whether it is fatal.
fn refuse<T>(session: &mut Session, fatal: bool, why: impl std::fmt::Display) -> VuResult<T> {
    tracing::warn!(
        device = session.id.0,
        fatal,
        "vhost-user request refused: {why}"
    );
    session.refused = Some(session.refused.unwrap_or(false) || fatal);
    Err(VuError::InvalidParam)
}

impl Session {
    /// A fresh session for device `id` (already added to `reactor`).
    pub fn new(backend: Arc<dyn DeviceBackend>, reactor: Arc<ReactorHandle>, id: DeviceId) -> Self {
        let offered_features =
            backend.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | LOG_ALL;
        let vrings = (0..backend.max_queues())
            .map(|_| VringState::default())
            .collect();
        Session {
            backend,
            reactor,
            id,
            offered_features,
            acked_features: 0,
            offered_protocol_features: offered_protocol_features(),
            acked_protocol_features: 0,
            vrings,
            memory: None,
            inflight: None,
            log: None,
            refused: None,
        }
    }

    /// The device this session drives.
    pub fn device_id(&self) -> DeviceId {
        self.id
    }

    /// Takes the refusal recorded by the last failed request: `Some(true)` if the connection must
    /// be dropped, `Some(false)` if the negative acknowledgement was enough, `None` if the
    /// failure was not a refusal of ours (a framing or socket error).
    pub fn take_refusal(&mut self) -> Option<bool> {
        self.refused.take()
    }

    fn vring_index(&mut self, index: u32) -> VuResult<usize> {
        let idx = usize::try_from(index).unwrap_or(usize::MAX);
        if idx < self.vrings.len() {
            Ok(idx)
        } else {
            refuse(self, false, format_args!("vring {index} out of range"))
        }
    }

    /// Whether the frontend negotiated packed rings (`VIRTIO_F_RING_PACKED`).
    fn packed_negotiated(&self) -> bool {
        self.acked_features & (1 << rvhost_core::virtio::feature::VIRTIO_F_RING_PACKED) != 0
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Stops vring `idx` on the reactor if it runs, recording the avail index it stopped at.
    fn stop_vring(&mut self, idx: usize) -> VuResult<()> {
        let Some(vring) = self.vrings.get(idx) else {
            return Ok(());
        };
        if !vring.running {
            return Ok(());
        }
        let index = u16::try_from(idx).unwrap_or(u16::MAX);
        let stopped = self
            .reactor
            .task_call(self.id, |reply| DeviceOp::StopQueue { index, reply });
        let vring = &mut self.vrings[idx];
        vring.running = false;
        match stopped {
            Ok(Some(last_avail)) => {
                vring.base = last_avail;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(err) => refuse(self, true, format_args!("stopping vring {idx}: {err}")),
        }
    }

    /// Starts vring `idx` on the reactor once everything it needs is there.
    fn maybe_start_vring(&mut self, idx: usize) -> VuResult<()> {
        let Some(vring) = self.vrings.get(idx) else {
            return Ok(());
        };
        if vring.running || vring.kick.is_none() || !vring.enabled || vring.size == 0 {
            return Ok(());
        }
        let (Some((desc, avail, used)), Some(memory)) = (vring.addrs, self.memory.clone()) else {
            return Ok(());
        };
        let index = u16::try_from(idx).unwrap_or(u16::MAX);
        let inflight_negotiated =
            self.acked_protocol_features & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0;
        let inflight = match &self.inflight {
            Some(region) if inflight_negotiated => match region.queue(index) {
                Some(part) => Some(part),
                None => {
                    return refuse(
                        self,
                        false,
                        format_args!("vring {idx} has no part in the inflight region"),
                    )
                }
            },
            _ => None,
        };
        let setup = QueueSetup {
            size: vring.size,
            desc_gpa: desc,
            avail_gpa: avail,
            used_gpa: used,
            last_avail: vring.base,
            features: VirtioFeatures(self.acked_features),
            call: vring.call.clone(),
            kick: vring.kick.clone().flatten(),
            err: vring.err.clone(),
            used_log_gpa: vring.log_gpa,
            memory,
            inflight,
        };
        let started = self
            .reactor
            .task_call(self.id, |reply| DeviceOp::StartQueue {
                index,
                setup,
                reply,
            });
        match started {
            Ok(Ok(())) => {
                self.vrings[idx].running = true;
                tracing::debug!(device = self.id.0, queue = idx, "vring started");
                Ok(())
            }
            Ok(Err(why)) => refuse(self, false, format_args!("vring {idx} not started: {why}")),
            Err(err) => refuse(self, true, format_args!("vring {idx}: {err}")),
        }
    }

    /// The log the queues mark: the frontend's, while `LOG_ALL` is negotiated.
    fn active_log(&self) -> Option<Arc<DirtyLog>> {
        if self.acked_features & LOG_ALL != 0 {
            self.log.clone()
        } else {
            None
        }
    }

    /// Sends the running queues the current logging state (log on or off, where each logs its
    /// used ring) and waits until it is in effect, so the frontend's next read of the log sees
    /// every write made before its request was answered.
    fn sync_log(&mut self) -> VuResult<()> {
        // Sent even with no queue running: the device applies it to the queues it starts later.
        let log = self.active_log();
        let used_log = self
            .vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.running)
            .map(|(i, v)| (u16::try_from(i).unwrap_or(u16::MAX), v.log_gpa))
            .collect();
        let on = log.is_some();
        if let Err(err) = self.reactor.task_call(self.id, |reply| DeviceOp::SetLog {
            log,
            used_log,
            reply,
        }) {
            return refuse(self, true, format_args!("dirty logging: {err}"));
        }
        tracing::info!(device = self.id.0, on, "dirty logging");
        Ok(())
    }

    /// Checks the queue count and size a frontend asks an inflight region for.
    fn check_inflight_shape(&self, num_queues: u16, queue_size: u16) -> Result<(), String> {
        let max_queues = self.backend.max_queues();
        let max_size = self.backend.max_queue_size();
        if num_queues == 0 || num_queues > max_queues {
            return Err(format!("{num_queues} queues (1..={max_queues})"));
        }
        if queue_size == 0 || queue_size > max_size || !queue_size.is_power_of_two() {
            return Err(format!("queue size {queue_size} (max {max_size})"));
        }
        Ok(())
    }

    fn stop_all(&mut self) -> VuResult<()> {
        let mut result = Ok(());
        for idx in 0..self.vrings.len() {
            if let Err(err) = self.stop_vring(idx) {
                result = Err(err);
            }
        }
        result
    }

    /// Returns every vring to its initial state (device reset).
    fn reset_vrings(&mut self) -> VuResult<()> {
        let result = self.stop_all();
        for vring in &mut self.vrings {
            *vring = VringState::default();
        }
        let logging = self.acked_features & LOG_ALL != 0;
        self.acked_features = 0;
        if logging {
            self.sync_log()?;
        }
        result
    }

    fn install_memory(&mut self, table: Arc<GuestMemoryTable>) -> VuResult<()> {
        let io_memory: IoMemory = table.clone();
        self.backend.prepare_memory(&io_memory);
        let memory = Arc::clone(&table);
        if let Err(err) = self
            .reactor
            .task_call(self.id, |reply| DeviceOp::SetMemory { memory, reply })
        {
            return refuse(self, true, format_args!("installing memory table: {err}"));
        }
        tracing::debug!(
            device = self.id.0,
            regions = table.len(),
            "memory table installed"
        );
        self.memory = Some(table);
        // Rings configured before the first table can start now.
        for idx in 0..self.vrings.len() {
            self.maybe_start_vring(idx)?;
        }
        Ok(())
    }

    /// Called when the connection closes: stops all queues (waiting for in-flight I/O) and
    /// removes the device from its reactor.
    pub fn close(&mut self) {
        for vring in &mut self.vrings {
            vring.running = false;
        }
        if let Err(err) = self
            .reactor
            .task_call(self.id, |reply| DeviceOp::Remove { reply })
        {
            tracing::error!(device = self.id.0, %err, "removing device from reactor");
        }
        self.memory = None;
    }
}

fn region_spec(region: &VhostUserMemoryRegion) -> RegionSpec {
    RegionSpec {
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.user_addr,
        mmap_offset: region.mmap_offset,
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_vrings()
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_vrings()
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered_features != 0 {
            return refuse(
                self,
                false,
                format_args!(
                    "features {:#x} not offered",
                    features & !self.offered_features
                ),
            );
        }
        let changed = features ^ self.acked_features;
        let running = self.vrings.iter().any(|v| v.running);
        if running && changed & !LOG_ALL != 0 {
            // Only a device reset may change features under running queues (dirty logging
            // aside); keep the old ones.
            return refuse(self, false, "SET_FEATURES while vrings are running");
        }
        self.acked_features = features;
        if changed & LOG_ALL != 0 {
            // Migration starts or ends: the queues mark (or stop marking) from their next
            // completion on, without stopping.
            self.sync_log()?;
        }
        tracing::debug!(
            device = self.id.0,
            features = format_args!("{features:#x}"),
            "features set"
        );
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let regions = ctx
            .iter()
            .map(region_spec)
            .zip(files.into_iter().map(OwnedFd::from));
        match GuestMemoryTable::from_regions(regions) {
            Ok(table) => self.install_memory(table).map(|()| None),
            Err(err) => refuse(self, true, format_args!("memory table: {err}")),
        }
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let idx = self.vring_index(index)?;
        let max = u32::from(self.backend.max_queue_size());
        if num == 0 || num > max || !num.is_power_of_two() {
            return refuse(
                self,
                false,
                format_args!("vring {index} size {num} (max {max})"),
            );
        }
        if self.vrings[idx].running {
            return refuse(
                self,
                false,
                format_args!("SET_VRING_NUM on running vring {index}"),
            );
        }
        self.vrings[idx].size = u16::try_from(num).unwrap_or(0);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let idx = self.vring_index(index)?;
        let Some(memory) = self.memory.clone() else {
            return refuse(self, false, "SET_VRING_ADDR before a memory table");
        };
        let log_gpa = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        let translate = |va: u64| memory.frontend_va_to_gpa(va);
        match (translate(descriptor), translate(available), translate(used)) {
            (Ok(desc), Ok(avail), Ok(used)) if self.vrings[idx].running => {
                // A migration starting or ending turns used-ring logging on or off under a
                // running ring (QEMU does so after `SET_FEATURES`); moving the ring is refused.
                if self.vrings[idx].addrs != Some((desc, avail, used)) {
                    return refuse(
                        self,
                        false,
                        format_args!("SET_VRING_ADDR moving running vring {index}"),
                    );
                }
                if self.vrings[idx].log_gpa != log_gpa {
                    self.vrings[idx].log_gpa = log_gpa;
                    self.sync_log()?;
                }
                Ok(())
            }
            (Ok(desc), Ok(avail), Ok(used)) => {
                self.vrings[idx].addrs = Some((desc, avail, used));
                self.vrings[idx].log_gpa = log_gpa;
                self.maybe_start_vring(idx)
            }
            _ => refuse(
                self,
                false,
                format_args!(
                    "vring {index} addresses {descriptor:#x}/{available:#x}/{used:#x} are not in \
                     the memory table"
                ),
            ),
        }
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let idx = self.vring_index(index)?;
        if self.vrings[idx].running {
            return refuse(
                self,
                false,
                format_args!("SET_VRING_BASE on running vring {index}"),
            );
        }
        let base = if self.packed_negotiated() {
            // Packed ring (vhost-user.rst, "Vring base"): next position to pop in bits 0..15,
            // the driver's wrap counter in bit 15; QEMU adds the used position and the device's
            // wrap counter in bits 16..32. They differ only if a backend stopped with requests in
            // flight; those are resubmitted from the inflight log (whose positions win over the
            // base when the queue starts), not from here: the used position follows the avail
            // one, as after a clean stop.
            let avail = (base & 0xffff) as u16;
            let used = (base >> 16) as u16;
            if used != avail && used != 0 {
                tracing::warn!(
                    device = self.id.0,
                    vring = index,
                    avail = format_args!("{avail:#x}"),
                    used = format_args!("{used:#x}"),
                    "packed vring base with requests in flight (resubmitted only from an inflight log)"
                );
            }
            avail
        } else {
            match u16::try_from(base) {
                Ok(base) => base,
                Err(_) => {
                    return refuse(
                        self,
                        false,
                        format_args!("vring {index} base {base} over 16 bits"),
                    )
                }
            }
        };
        self.vrings[idx].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let idx = self.vring_index(index)?;
        self.stop_vring(idx)?;
        let packed = self.packed_negotiated();
        let vring = &mut self.vrings[idx];
        // GET_VRING_BASE stops the ring: it restarts only on a new SET_VRING_KICK.
        vring.kick = None;
        let base = u32::from(vring.base);
        // Packed: a drained queue's used position and wrap counter equal the avail ones; QEMU
        // reads them from bits 16..32.
        let base = if packed { base | base << 16 } else { base };
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let idx = self.vring_index(u32::from(index))?;
        if !self.protocol_features_acked() {
            // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts.
            self.vrings[idx].enabled = true;
        }
        // A descriptor that is not an eventfd is kept out of the reactor's waits (it polls).
        let kick = fd.and_then(|fd| match EventNotifier::from_file(fd) {
            Ok(kick) => Some(Arc::new(kick)),
            Err(err) => {
                tracing::debug!(vring = idx, %err, "kick fd not waited on");
                None
            }
        });
        self.vrings[idx].kick = Some(kick);
        self.maybe_start_vring(idx)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let idx = self.vring_index(u32::from(index))?;
        let call = match fd.map(EventNotifier::from_file).transpose() {
            Ok(call) => call.map(Arc::new),
            Err(err) => return refuse(self, false, format_args!("call fd: {err}")),
        };
        self.vrings[idx].call = call.clone();
        if self.vrings[idx].running {
            let index = u16::from(index);
            if let Err(err) =
                self.reactor
                    .task_call(self.id, |reply| DeviceOp::SetCall { index, call, reply })
            {
                return refuse(self, true, format_args!("call fd: {err}"));
            }
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let idx = self.vring_index(u32::from(index))?;
        match fd.map(EventNotifier::from_file).transpose() {
            Ok(err) => {
                // Takes effect the next time the queue starts; it is only used for reporting.
                self.vrings[idx].err = err.map(Arc::new);
                Ok(())
            }
            Err(err) => refuse(self, false, format_args!("error fd: {err}")),
        }
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol_features)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.offered_protocol_features.bits();
        if features & !offered != 0 {
            return refuse(
                self,
                false,
                format_args!("protocol features {:#x} not offered", features & !offered),
            );
        }
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.backend.max_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let idx = self.vring_index(index)?;
        self.vrings[idx].enabled = enable;
        if enable {
            self.maybe_start_vring(idx)
        } else {
            self.stop_vring(idx)
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        match self.backend.read_config(offset, size) {
            Ok(bytes) => Ok(bytes),
            Err(why) => refuse(
                self,
                false,
                format_args!("GET_CONFIG {offset}+{size}: {why}"),
            ),
        }
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        refuse(
            self,
            false,
            format_args!(
                "config space is read-only ({} bytes at {offset})",
                buf.len()
            ),
        )
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        refuse(self, false, "not a GPU device")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        refuse(self, false, "shared objects not supported")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if let Err(why) = self.check_inflight_shape(num_queues, queue_size) {
            return refuse(self, false, format_args!("GET_INFLIGHT_FD: {why}"));
        }
        let layout = InflightLayout::for_ring(self.packed_negotiated());
        let region = match InflightRegion::create(num_queues, queue_size, layout) {
            Ok(region) => Arc::new(region),
            Err(why) => return refuse(self, false, format_args!("GET_INFLIGHT_FD: {why}")),
        };
        let file = match region.file().try_clone_to_owned() {
            Ok(fd) => File::from(fd),
            Err(err) => return refuse(self, false, format_args!("GET_INFLIGHT_FD: {err}")),
        };
        let reply = VhostUserInflight {
            mmap_size: u64::try_from(region.len()).unwrap_or(u64::MAX),
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        tracing::debug!(
            device = self.id.0,
            num_queues,
            queue_size,
            bytes = region.len(),
            "inflight region allocated"
        );
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if let Err(why) = self.check_inflight_shape(num_queues, queue_size) {
            return refuse(self, true, format_args!("SET_INFLIGHT_FD: {why}"));
        }
        if self.vrings.iter().any(|v| v.running) {
            return refuse(self, true, "SET_INFLIGHT_FD while vrings are running");
        }
        match InflightRegion::map(
            OwnedFd::from(file),
            inflight.mmap_offset,
            inflight.mmap_size,
            num_queues,
            queue_size,
            InflightLayout::for_ring(self.packed_negotiated()),
        ) {
            Ok(region) => {
                tracing::debug!(
                    device = self.id.0,
                    num_queues,
                    queue_size,
                    "inflight region mapped"
                );
                self.inflight = Some(Arc::new(region));
                Ok(())
            }
            // The device cannot keep its promise to the frontend without the region: the
            // connection goes (the frontend reconnects), the process and other devices stay.
            Err(why) => refuse(self, true, format_args!("SET_INFLIGHT_FD: {why}")),
        }
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(u64::try_from(MAX_MEM_SLOTS).unwrap_or(u64::MAX))
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let spec = region_spec(region);
        let table = match &self.memory {
            Some(current) => current.with_region_added(spec, OwnedFd::from(fd)),
            None => GuestMemoryTable::from_regions([(spec, OwnedFd::from(fd))]),
        };
        match table {
            Ok(table) => self.install_memory(table).map(|()| None),
            Err(err) => refuse(self, true, format_args!("ADD_MEM_REG: {err}")),
        }
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let spec = region_spec(region);
        let Some(current) = self.memory.clone() else {
            return refuse(self, false, "REM_MEM_REG without a memory table");
        };
        match current.with_region_removed(&spec) {
            Ok(table) => self.install_memory(table),
            Err(err) => refuse(self, false, format_args!("REM_MEM_REG: {err}")),
        }
    }

    fn set_device_state_fd(
        &mut self,
        _direction: vhost::vhost_user::message::VhostTransferStateDirection,
        _phase: vhost::vhost_user::message::VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        refuse(self, false, "device state transfer not supported")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        refuse(self, false, "device state transfer not supported")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        refuse(self, false, "no shared memory regions")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        // The frontend waits for the reply (it has no REPLY_ACK to fall back on), so a refused
        // log closes the connection rather than leave it waiting.
        let (offset, size) = (log.mmap_offset, log.mmap_size);
        let mapped = match DirtyLog::map(OwnedFd::from(file), offset, size) {
            Ok(mapped) => mapped,
            Err(err) => return refuse(self, true, format_args!("SET_LOG_BASE: {err}")),
        };
        if let Some(memory) = &self.memory {
            if let Err(err) = mapped.check_covers(memory.gpa_end()) {
                return refuse(self, true, format_args!("SET_LOG_BASE: {err}"));
            }
        }
        tracing::debug!(device = self.id.0, offset, size, "dirty log mapped");
        // The old log (if any) is unmapped once the reactor let go of it: after the reply, so
        // nothing is marked in it after the frontend was told the new one is in use.
        self.log = Some(Arc::new(mapped));
        if self.acked_features & LOG_ALL != 0 {
            self.sync_log()?;
        }
        Ok(())
    }
}
