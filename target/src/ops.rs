//! The contract between the control plane (JSON-RPC, start-up config) and the data plane
//! (vhost-user controllers and reactors). The RPC layer knows controllers only through
//! [`ControllerOps`]; the data plane knows bdevs only through [`crate::bdev::Bdev`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::bdev::Bdev;

/// Parameters of `vhost_create_blk_controller`.
#[derive(Debug, Clone)]
pub struct BlkControllerSpec {
    /// Controller name; the socket is `<socket dir>/<name>`.
    pub name: String,
    /// The bdev it exports.
    pub bdev: Arc<dyn Bdev>,
    /// Reactors it may run on (bit i = core i); `None` means every reactor.
    pub cpumask: Option<u64>,
    /// Export read-only (`VIRTIO_BLK_F_RO`; writes fail with IOERR).
    pub readonly: bool,
}

/// Parameters of `vhost_create_scsi_controller`.
#[derive(Debug, Clone)]
pub struct ScsiControllerSpec {
    /// Controller name; the socket is `<socket dir>/<name>`.
    pub name: String,
    /// Reactors it may run on (bit i = core i); `None` means every reactor.
    pub cpumask: Option<u64>,
}

/// Where a controller's frontends reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ControllerTransport {
    /// vhost-user on the Unix socket `<socket dir>/<name>` (SPDK's, and the default).
    #[default]
    Socket,
    /// virtio-vhost-user (`docs/virtio-vhost-user.md`): the vhost-user protocol tunnelled through
    /// a virtio-vhost-user PCI function of the VM rvhost runs in, bound to `vfio-pci`.
    Vvu {
        /// The function's PCI address (`DDDD:BB:DD.F`), SPDK's `traddr`.
        traddr: String,
    },
    /// virtio-vhost-user through rvhost's emulated device (test support, `rvhost-vvu-emu`),
    /// whose vhost-user socket is `<socket dir>/<name>`: a frontend connects there as it would
    /// to the backend VM's QEMU.
    VvuEmu,
}

impl ControllerTransport {
    /// The name the RPC methods take (`transport`); `None` for the socket transport.
    pub fn rpc_name(&self) -> Option<&'static str> {
        match self {
            ControllerTransport::Socket => None,
            ControllerTransport::Vvu { .. } => Some(VVU_TRANSPORT),
            ControllerTransport::VvuEmu => Some(VVU_EMU_TRANSPORT),
        }
    }
}

/// `transport` of a controller on a virtio-vhost-user PCI function.
pub const VVU_TRANSPORT: &str = "vvu";
/// `transport` of a controller on the emulated virtio-vhost-user device.
pub const VVU_EMU_TRANSPORT: &str = "vvu_emu";

/// Errors the data plane reports to the control plane; the RPC layer maps them to JSON-RPC errors.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A controller with that name exists.
    #[error("controller {0} already exists")]
    Exists(String),
    /// No controller with that name.
    #[error("no controller named {0}")]
    NotFound(String),
    /// The parameters cannot be served (cpumask selects no reactor, name not a valid socket name).
    #[error("{0}")]
    InvalidParams(String),
    /// The controller is in use in a way that forbids the operation.
    #[error("{0}")]
    Busy(String),
    /// Anything else (socket creation failed, reactor unreachable).
    #[error("{0}")]
    Internal(String),
}

/// What `vhost_get_controllers` reports for one controller, in SPDK's shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerInfo {
    /// Controller name.
    pub ctrlr: String,
    /// Cpumask as SPDK prints it (`0x1`).
    pub cpumask: String,
    /// Interrupt coalescing: the base delay in microseconds (0: off).
    pub delay_base_us: u64,
    /// Interrupt coalescing: completions per second per queue above which calls are delayed.
    pub iops_threshold: u64,
    /// The Unix socket path.
    pub socket: PathBuf,
    /// Number of connected frontends.
    pub sessions: u32,
    /// `{"block": {"readonly": .., "bdev": ..}}` or `{"scsi": [...]}`.
    pub backend_specific: serde_json::Value,
}

/// One controller as an SPDK thread: SPDK's vhost runs each controller on a thread of its own,
/// which its reactor polls; rvhost's reactors poll the controllers' sessions directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    /// The controller's name.
    pub name: String,
    /// Its id (as `framework_get_reactors` lists it under `lw_threads`).
    pub id: u64,
    /// The cores it may run on.
    pub cpumask: u64,
    /// One poller per connected session.
    pub pollers: Vec<PollerInfo>,
    /// Ticks the polls of sessions that ended spent finding work (kept: a thread's busy time
    /// does not drop when a session ends).
    pub ended_busy_ticks: u64,
    /// Ticks the polls of sessions that ended spent finding none.
    pub ended_idle_ticks: u64,
}

/// One session's device, polled by its reactor every round (SPDK's `vdev_worker` poller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollerInfo {
    /// The session's device id.
    pub id: u64,
    /// Polls.
    pub runs: u64,
    /// Polls that found work.
    pub busy_runs: u64,
    /// Ticks spent in polls that found work.
    pub busy_ticks: u64,
    /// Ticks spent in polls that found none.
    pub idle_ticks: u64,
}

/// One running queue of a session, as `rvhost_get_queue_stats` reports it. Counted by the
/// reactor polling the queue (plain fields, nothing shared) since the queue started, and copied
/// on request.
#[derive(Debug, Clone)]
pub struct QueueReport {
    /// Queue index.
    pub queue: u16,
    /// Requests completed.
    pub requests: u64,
    /// Requests started and not yet completed.
    pub in_flight: u64,
    /// Payload bytes the guest read (blk `IN`, SCSI data-in) in completed requests.
    pub bytes_read: u64,
    /// Payload bytes the guest wrote (blk `OUT`, SCSI data-out) in completed requests.
    pub bytes_written: u64,
    /// Sum of the completed requests' latencies, in time-stamp counter ticks.
    pub latency_ticks: u64,
    /// Their latencies in ticks: from the poll that popped the request to the poll that
    /// returned it on the used ring.
    pub latency: hdrhistogram::Histogram<u64>,
    /// Used-buffer notifications sent late: the driver re-armed behind what was published
    /// without being notified (a frontend whose memory barriers failed; 0 on a sound one).
    pub late_notifications: u64,
}

/// One connected session's queues.
#[derive(Debug, Clone)]
pub struct SessionQueues {
    /// The session's device id (the poller id of `thread_get_pollers`).
    pub session: u64,
    /// Its running queues.
    pub queues: Vec<QueueReport>,
}

/// One controller's sessions and their queues.
#[derive(Debug, Clone)]
pub struct ControllerQueues {
    /// Controller name.
    pub ctrlr: String,
    /// Its connected sessions.
    pub sessions: Vec<SessionQueues>,
}

/// What the drain of a stopping process found ([`ControllerOps::drain`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Frontend sessions drained.
    pub sessions: usize,
    /// Requests that were in flight when the drain began, all completed and published.
    pub requests: usize,
    /// Sessions whose requests had not all completed when the time was up.
    pub timed_out: usize,
}

/// The data plane as the control plane sees it. Every method is called from the control thread
/// and returns once the change is in effect on the reactors.
pub trait ControllerOps: Send + Sync {
    /// Creates a vhost-user-blk controller and starts listening on its socket.
    fn create_blk_controller(&self, spec: BlkControllerSpec) -> Result<(), OpsError>;
    /// Creates a vhost-user-blk controller served over `transport`.
    fn create_blk_controller_on(
        &self,
        spec: BlkControllerSpec,
        transport: ControllerTransport,
    ) -> Result<(), OpsError> {
        match transport {
            ControllerTransport::Socket => self.create_blk_controller(spec),
            other => Err(unsupported_transport(&spec.name, &other)),
        }
    }
    /// Creates a vhost-user-scsi controller without targets served over `transport`.
    fn create_scsi_controller_on(
        &self,
        spec: ScsiControllerSpec,
        transport: ControllerTransport,
    ) -> Result<(), OpsError> {
        match transport {
            ControllerTransport::Socket => self.create_scsi_controller(spec),
            other => Err(unsupported_transport(&spec.name, &other)),
        }
    }
    /// Stops and removes a controller (any type), closing its connection and socket.
    fn delete_controller(&self, name: &str) -> Result<(), OpsError>;
    /// Lists one controller or all.
    fn controllers(&self, name: Option<&str>) -> Result<Vec<ControllerInfo>, OpsError>;
    /// Sets a controller's interrupt coalescing (`vhost_controller_set_coalescing`): per queue,
    /// above `iops_threshold` completions per second a guest interrupt is followed by a quiet
    /// period of `delay_base_us × (IOPS − threshold) / threshold`; `delay_base_us` 0 turns it
    /// off. Parameters SPDK refuses are [`OpsError::InvalidParams`].
    fn set_coalescing(
        &self,
        name: &str,
        delay_base_us: u32,
        iops_threshold: u32,
    ) -> Result<(), OpsError> {
        let _ = (delay_base_us, iops_threshold);
        Err(OpsError::NotFound(name.to_string()))
    }
    /// Whether any controller uses the bdev (bdev deletion then hot-detaches it).
    fn bdev_in_use(&self, bdev_name: &str) -> bool;
    /// Hot-detaches a bdev from every controller using it: later I/O to it fails (blk: IOERR)
    /// and nothing crashes. Returns after in-flight I/O to it completed.
    fn detach_bdev(&self, bdev_name: &str);
    /// Bdev `bdev_name` now has `num_blocks` blocks: every controller using it checks I/O
    /// against the new size and tells its frontends (blk: config-change notification over the
    /// backend channel; scsi: capacity-changed unit attention and PARAM_CHANGE event).
    fn bdev_resized(&self, bdev_name: &str, num_blocks: u64) {
        let _ = (bdev_name, num_blocks);
    }
    /// `framework_get_reactors`' result.
    fn reactors_info(&self) -> serde_json::Value;
    /// The controllers as SPDK's threads, with their sessions' polls as pollers
    /// (`thread_get_stats`, `thread_get_pollers`).
    fn threads_info(&self) -> Vec<ThreadInfo> {
        Vec::new()
    }
    /// Every connected session's running queues, of controller `name` or of all
    /// (`rvhost_get_queue_stats`).
    fn queue_stats(&self, name: Option<&str>) -> Result<Vec<ControllerQueues>, OpsError> {
        match name {
            Some(name) => Err(OpsError::NotFound(name.to_string())),
            None => Ok(Vec::new()),
        }
    }
    /// The process is stopping: every controller stops starting sessions and every session stops
    /// taking new requests; returns once the requests in flight completed and their used entries
    /// were published to the frontends, or once `timeout` passed. Connections stay open (the
    /// caller deletes the controllers afterwards).
    fn drain(&self, timeout: std::time::Duration) -> DrainReport {
        let _ = timeout;
        DrainReport::default()
    }
    /// Creates a vhost-user-scsi controller without targets and starts listening on its socket.
    fn create_scsi_controller(&self, spec: ScsiControllerSpec) -> Result<(), OpsError> {
        Err(OpsError::InvalidParams(format!(
            "this data plane cannot serve vhost-scsi controller {}",
            spec.name
        )))
    }
    /// Attaches `bdev` as LUN 0 of SCSI target `target` (`None`: the first free one) of
    /// controller `ctrlr`, hot-plugging it into connected guests; returns the target number.
    fn scsi_add_target(
        &self,
        ctrlr: &str,
        target: Option<u8>,
        bdev: Arc<dyn Bdev>,
    ) -> Result<u8, OpsError> {
        let _ = (target, bdev);
        Err(OpsError::NotFound(ctrlr.to_string()))
    }
    /// Hot-detaches SCSI target `target` of `ctrlr`; returns once its in-flight I/O completed.
    fn scsi_remove_target(&self, ctrlr: &str, target: u8) -> Result<(), OpsError> {
        let _ = target;
        Err(OpsError::NotFound(ctrlr.to_string()))
    }
}

fn unsupported_transport(name: &str, transport: &ControllerTransport) -> OpsError {
    OpsError::InvalidParams(format!(
        "this data plane cannot serve controller {name} over {transport:?}"
    ))
}
