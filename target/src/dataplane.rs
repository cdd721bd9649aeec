//! The data plane as the control plane sees it: the reactor set and the vhost controllers served
//! on it, behind [`ControllerOps`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rvhost_platform_linux::{NumaTopology, SocketAccess};

use crate::bdev::Bdev;
use crate::blk::device::BlkOp;
use crate::blk::BlkController;
use crate::ops::{
    BlkControllerSpec, ControllerInfo, ControllerOps, ControllerTransport, DrainReport, OpsError,
    ScsiControllerSpec,
};
use crate::reactor::{self, IdlePolicy, ReactorHandle};
use crate::scsi::{ScsiController, ScsiError};
use crate::vhost::device::CoalescingSettings;
use crate::vhost::{vvu, DeviceBackend, DeviceId, DeviceOp, DrainProgress, VhostServer};

/// Longest Unix socket path (`sun_path` is 108 bytes including the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How the data plane runs.
#[derive(Debug, Clone, Copy)]
pub struct DataplaneOptions {
    /// What reactors do when idle (see [`crate::reactor`]).
    pub idle: IdlePolicy,
    /// Group and mode of every controller socket, set before it accepts.
    pub socket_access: SocketAccess,
}

/// Setting this environment variable to `1` makes [`DataplaneOptions::default`] busy-poll, so a
/// benchmark of the `rvhost` binary can turn idling off without a command-line option.
pub const BUSY_POLL_ENV: &str = "RVHOST_BUSY_POLL";

impl Default for DataplaneOptions {
    fn default() -> Self {
        let busy = std::env::var(BUSY_POLL_ENV).is_ok_and(|v| v == "1");
        DataplaneOptions {
            idle: if busy {
                IdlePolicy::BusyPoll
            } else {
                IdlePolicy::Adaptive
            },
            socket_access: SocketAccess::default(),
        }
    }
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The cpumask selects no core.
    #[error("cpumask {0:#x} selects no core")]
    EmptyCpumask(u64),
    /// The socket directory is unusable.
    #[error("socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A reactor thread could not be started (or pinned: the core is offline or not ours).
    #[error("starting reactor on core {core}: {source}")]
    Reactor {
        /// Its core.
        core: u32,
        /// Why.
        source: reactor::SpawnError,
    },
}

/// The device-specific half of a controller.
#[derive(Debug)]
enum ControllerKind {
    Blk(Arc<BlkController>),
    Scsi(Arc<ScsiController>),
}

impl ControllerKind {
    fn uses_bdev(&self, bdev_name: &str) -> bool {
        match self {
            ControllerKind::Blk(blk) => blk.bdev_name().as_deref() == Some(bdev_name),
            ControllerKind::Scsi(scsi) => scsi.uses_bdev(bdev_name),
        }
    }
}

fn scsi_error(err: ScsiError) -> OpsError {
    match err {
        ScsiError::TargetInUse(_) => OpsError::Busy(err.to_string()),
        ScsiError::NoSuchTarget(_) => OpsError::NotFound(err.to_string()),
        ScsiError::Channel { .. } => OpsError::Internal(err.to_string()),
        _ => OpsError::InvalidParams(err.to_string()),
    }
}

/// How long `rvhost_get_queue_stats` waits for the reactors' answers (a reactor answers at its
/// next round; only a stuck bdev keeps it longer).
const QUEUE_STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// One controller as the data plane keeps it.
#[derive(Debug)]
struct Controller {
    cpumask: u64,
    kind: ControllerKind,
    server: VhostServer,
    /// Where its frontends reach it.
    transport: ControllerTransport,
    /// Distinguishes controllers in `framework_get_reactors`' thread list.
    id: u64,
}

/// The reactors and controllers of one target process.
#[derive(Debug)]
pub struct Dataplane {
    cpumask: u64,
    socket_dir: PathBuf,
    socket_access: SocketAccess,
    reactors: Vec<Arc<ReactorHandle>>,
    controllers: Mutex<BTreeMap<String, Controller>>,
    next_controller_id: Mutex<u64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere cannot leave it half-updated in a harmful way.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A core's user, system and interrupt (hard and soft) time, in the kernel's clock ticks.
type CpuTimes = (u64, u64, u64);

/// Core `core`'s [`CpuTimes`] from `/proc/stat`, as SPDK's `framework_get_reactors` reports them.
fn cpu_times(core: u32) -> Option<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let label = format!("cpu{core}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq ...
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some((field(0), field(2), field(5).saturating_add(field(6))))
}

/// The cores' times when the data plane started, which SPDK subtracts.
static START_CPU_TIMES: std::sync::OnceLock<Vec<(u32, CpuTimes)>> = std::sync::OnceLock::new();

/// [`cpu_times`] since the data plane started.
fn cpu_times_since_start(core: u32) -> Option<CpuTimes> {
    let (usr, sys, irq) = cpu_times(core)?;
    let (usr0, sys0, irq0) = START_CPU_TIMES
        .get()
        .and_then(|all| all.iter().find(|(c, _)| *c == core))
        .map(|(_, times)| *times)
        .unwrap_or_default();
    Some((
        usr.saturating_sub(usr0),
        sys.saturating_sub(sys0),
        irq.saturating_sub(irq0),
    ))
}

impl Dataplane {
    /// Starts one reactor per core in `cpumask`; controllers' sockets go to `socket_dir`.
    pub fn start(cpumask: u64, socket_dir: PathBuf) -> Result<Arc<Self>, DataplaneError> {
        Self::start_with(cpumask, socket_dir, DataplaneOptions::default())
    }

    /// [`Dataplane::start`] with explicit options.
    pub fn start_with(
        cpumask: u64,
        socket_dir: PathBuf,
        options: DataplaneOptions,
    ) -> Result<Arc<Self>, DataplaneError> {
        if cpumask == 0 {
            return Err(DataplaneError::EmptyCpumask(cpumask));
        }
        std::fs::create_dir_all(&socket_dir).map_err(|source| DataplaneError::SocketDir {
            path: socket_dir.clone(),
            source,
        })?;
        let topology = Arc::new(NumaTopology::detect());
        START_CPU_TIMES.get_or_init(|| {
            (0..64u32)
                .filter(|c| cpumask & (1u64 << c) != 0)
                .filter_map(|c| Some((c, cpu_times(c)?)))
                .collect()
        });
        let mut reactors = Vec::new();
        for core in (0..64u32).filter(|c| cpumask & (1u64 << c) != 0) {
            match reactor::spawn(core, options.idle, Arc::clone(&topology)) {
                Ok(handle) => reactors.push(handle),
                Err(source) => {
                    for started in &reactors {
                        started.shutdown();
                    }
                    return Err(DataplaneError::Reactor { core, source });
                }
            }
        }
        tracing::info!(cpumask = format_args!("{cpumask:#x}"), reactors = reactors.len(), socket_dir = %socket_dir.display(), "data plane started");
        Ok(Arc::new(Dataplane {
            cpumask,
            socket_dir,
            socket_access: options.socket_access,
            reactors,
            controllers: Mutex::new(BTreeMap::new()),
            next_controller_id: Mutex::new(1),
        }))
    }

    /// The reactors, in core order.
    pub fn reactors(&self) -> &[Arc<ReactorHandle>] {
        &self.reactors
    }

    /// Deletes every controller and stops the reactors. Idempotent.
    pub fn shutdown(&self) {
        let controllers = std::mem::take(&mut *lock(&self.controllers));
        for (_, mut controller) in controllers {
            controller.server.stop();
            controller.server.reactor().adjust_load(false);
        }
        for reactor in &self.reactors {
            reactor.shutdown();
        }
    }

    /// The least-loaded reactor among those `mask` selects (ties: lowest core), as SPDK places a
    /// new controller.
    fn place(&self, mask: u64) -> Option<Arc<ReactorHandle>> {
        self.reactors
            .iter()
            .filter(|r| r.core() < 64 && mask & (1u64 << r.core()) != 0)
            .min_by_key(|r| (r.load(), r.core()))
            .cloned()
    }

    fn socket_path(&self, name: &str) -> Result<PathBuf, OpsError> {
        let valid = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\0');
        if !valid {
            return Err(OpsError::InvalidParams(format!(
                "invalid controller name {name:?}"
            )));
        }
        let path = self.socket_dir.join(name);
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(OpsError::InvalidParams(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                path.display()
            )));
        }
        Ok(path)
    }

    fn info(name: &str, controller: &Controller) -> ControllerInfo {
        let mut backend_specific = match &controller.kind {
            ControllerKind::Blk(blk) => serde_json::json!({
                "block": { "readonly": blk.readonly(), "bdev": blk.bdev_name() }
            }),
            ControllerKind::Scsi(scsi) => serde_json::json!({ "scsi": scsi.targets() }),
        };
        // Only a virtio-vhost-user controller says how it is reached (SPDK's output unchanged).
        if let (Some(transport), serde_json::Value::Object(map)) =
            (controller.transport.rpc_name(), &mut backend_specific)
        {
            map.insert("transport".into(), transport.into());
            if let ControllerTransport::Vvu { traddr } = &controller.transport {
                map.insert("traddr".into(), traddr.as_str().into());
            }
        }
        let coalescing = controller.server.coalescing();
        ControllerInfo {
            ctrlr: name.to_string(),
            cpumask: format!("{:#x}", controller.cpumask),
            delay_base_us: u64::from(coalescing.delay_base_us()),
            iops_threshold: u64::from(coalescing.iops_threshold()),
            socket: controller.server.socket().to_path_buf(),
            sessions: controller.server.sessions(),
            backend_specific,
        }
    }

    /// Starts serving `backend` on a new controller `name` placed in `cpumask`, reached over
    /// `transport`.
    fn create_controller(
        &self,
        name: String,
        cpumask: Option<u64>,
        kind: ControllerKind,
        transport: ControllerTransport,
    ) -> Result<(), OpsError> {
        let socket = self.socket_path(&name)?;
        let requested = cpumask.unwrap_or(self.cpumask);
        let mask = requested & self.cpumask;
        let Some(reactor) = self.place(mask) else {
            return Err(OpsError::InvalidParams(format!(
                "cpumask {requested:#x} selects none of the target's cores {:#x}",
                self.cpumask
            )));
        };
        let mut controllers = lock(&self.controllers);
        if controllers.contains_key(&name) {
            return Err(OpsError::Exists(name));
        }
        let backend: Arc<dyn DeviceBackend> = match &kind {
            ControllerKind::Blk(blk) => blk.clone(),
            ControllerKind::Scsi(scsi) => scsi.clone(),
        };
        let server = match &transport {
            ControllerTransport::Socket => VhostServer::start_with_access(
                &name,
                &socket,
                backend,
                Arc::clone(&reactor),
                &self.socket_access,
            )
            .map_err(|err| OpsError::Internal(err.to_string()))?,
            ControllerTransport::Vvu { traddr } => {
                if let Some((other, _)) = controllers.iter().find(|(_, c)| c.transport == transport)
                {
                    return Err(OpsError::Busy(format!(
                        "controller {other} is served on the virtio-vhost-user device {traddr}"
                    )));
                }
                let device = vvu::open_pci(traddr).map_err(OpsError::InvalidParams)?;
                VhostServer::start_vvu(&name, device, backend, Arc::clone(&reactor))
                    .map_err(|err| OpsError::Internal(err.to_string()))?
            }
            ControllerTransport::VvuEmu => {
                vvu::start_emulated(&name, &socket, backend, Arc::clone(&reactor))
                    .map_err(OpsError::Internal)?
            }
        };
        reactor.adjust_load(true);
        let id = {
            let mut next = lock(&self.next_controller_id);
            let id = *next;
            *next = next.saturating_add(1);
            id
        };
        controllers.insert(
            name,
            Controller {
                cpumask: mask,
                kind,
                server,
                transport,
                id,
            },
        );
        Ok(())
    }

    fn scsi_controller(&self, name: &str) -> Result<Arc<ScsiController>, OpsError> {
        match lock(&self.controllers).get(name).map(|c| &c.kind) {
            Some(ControllerKind::Scsi(scsi)) => Ok(Arc::clone(scsi)),
            Some(ControllerKind::Blk(_)) => Err(OpsError::InvalidParams(format!(
                "controller {name} is not a vhost-scsi controller"
            ))),
            None => Err(OpsError::NotFound(name.to_string())),
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl ControllerOps for Dataplane {
    fn create_blk_controller(&self, spec: BlkControllerSpec) -> Result<(), OpsError> {
        self.create_blk_controller_on(spec, ControllerTransport::Socket)
    }

    fn create_scsi_controller(&self, spec: ScsiControllerSpec) -> Result<(), OpsError> {
        self.create_scsi_controller_on(spec, ControllerTransport::Socket)
    }

    fn create_blk_controller_on(
        &self,
        spec: BlkControllerSpec,
        transport: ControllerTransport,
    ) -> Result<(), OpsError> {
        let blk = Arc::new(BlkController::new(&spec.name, spec.bdev, spec.readonly));
        self.create_controller(spec.name, spec.cpumask, ControllerKind::Blk(blk), transport)
    }

    fn create_scsi_controller_on(
        &self,
        spec: ScsiControllerSpec,
        transport: ControllerTransport,
    ) -> Result<(), OpsError> {
        let scsi = Arc::new(ScsiController::new(&spec.name));
        self.create_controller(
            spec.name,
            spec.cpumask,
            ControllerKind::Scsi(scsi),
            transport,
        )
    }

    fn scsi_add_target(
        &self,
        ctrlr: &str,
        target: Option<u8>,
        bdev: Arc<dyn Bdev>,
    ) -> Result<u8, OpsError> {
        // Not under the controllers lock: attaching waits for every session to apply it.
        self.scsi_controller(ctrlr)?
            .add_target(target, bdev)
            .map_err(scsi_error)
    }

    fn scsi_remove_target(&self, ctrlr: &str, target: u8) -> Result<(), OpsError> {
        self.scsi_controller(ctrlr)?
            .remove_target(target)
            .map_err(scsi_error)
    }

    fn set_coalescing(
        &self,
        name: &str,
        delay_base_us: u32,
        iops_threshold: u32,
    ) -> Result<(), OpsError> {
        let settings = CoalescingSettings::new(delay_base_us, iops_threshold)
            .map_err(|err| OpsError::InvalidParams(err.to_string()))?;
        let controllers = lock(&self.controllers);
        let controller = controllers
            .get(name)
            .ok_or_else(|| OpsError::NotFound(name.to_string()))?;
        controller.server.set_coalescing(settings);
        tracing::info!(
            controller = name,
            delay_base_us,
            iops_threshold,
            "interrupt coalescing set"
        );
        Ok(())
    }

    fn delete_controller(&self, name: &str) -> Result<(), OpsError> {
        let controller = lock(&self.controllers).remove(name);
        let Some(mut controller) = controller else {
            return Err(OpsError::NotFound(name.to_string()));
        };
        controller.server.stop();
        controller.server.reactor().adjust_load(false);
        tracing::info!(controller = name, "controller deleted");
        Ok(())
    }

    fn controllers(&self, name: Option<&str>) -> Result<Vec<ControllerInfo>, OpsError> {
        let controllers = lock(&self.controllers);
        match name {
            Some(name) => controllers
                .get(name)
                .map(|c| vec![Self::info(name, c)])
                .ok_or_else(|| OpsError::NotFound(name.to_string())),
            None => Ok(controllers.iter().map(|(n, c)| Self::info(n, c)).collect()),
        }
    }

    fn bdev_in_use(&self, bdev_name: &str) -> bool {
        lock(&self.controllers)
            .values()
            .any(|c| c.kind.uses_bdev(bdev_name))
    }

    fn detach_bdev(&self, bdev_name: &str) {
        let controllers = lock(&self.controllers);
        for (name, controller) in controllers.iter() {
            let blk = match &controller.kind {
                ControllerKind::Blk(blk) if blk.bdev_name().as_deref() == Some(bdev_name) => blk,
                ControllerKind::Blk(_) => continue,
                ControllerKind::Scsi(scsi) => {
                    let targets = scsi.detach_bdev(bdev_name);
                    if targets > 0 {
                        tracing::info!(controller = %name, bdev = bdev_name, targets, "bdev hot-detached from vhost-scsi targets");
                    }
                    continue;
                }
            };
            controller.server.with_devices(|devices| {
                // New sessions get no bdev from now on...
                blk.detach();
                // ...and connected ones stop using it once their in-flight I/O completed.
                for &id in devices {
                    let reactor = controller.server.reactor();
                    if let Err(err) = reactor.task_call(id, |reply| BlkOp::DetachBdev { reply }) {
                        tracing::error!(controller = %name, %err, "hot-detach did not complete");
                    }
                }
            });
            tracing::info!(controller = %name, bdev = bdev_name, "bdev hot-detached");
        }
    }

    fn bdev_resized(&self, bdev_name: &str, num_blocks: u64) {
        let controllers = lock(&self.controllers);
        for (name, controller) in controllers.iter() {
            let blk = match &controller.kind {
                ControllerKind::Blk(blk) if blk.bdev_name().as_deref() == Some(bdev_name) => blk,
                ControllerKind::Blk(_) => continue,
                ControllerKind::Scsi(scsi) => {
                    scsi.resize_bdev(bdev_name, num_blocks);
                    continue;
                }
            };
            // The config space first (a frontend re-reads it when told), then the sessions'
            // range checks, then the frontends.
            blk.resize(num_blocks);
            controller.server.with_devices(|devices| {
                for &id in devices {
                    let reactor = controller.server.reactor();
                    if let Err(err) =
                        reactor.task_call(id, |reply| BlkOp::Resize { num_blocks, reply })
                    {
                        tracing::error!(controller = %name, %err, "resize did not reach a session");
                    }
                }
            });
            let told = controller.server.notify_config_change();
            tracing::info!(controller = %name, bdev = bdev_name, num_blocks, frontends = told, "blk controller resized");
        }
    }

    fn drain(&self, timeout: Duration) -> DrainReport {
        let deadline = Instant::now() + timeout;
        // Every device is asked first and waited for after, so they drain in parallel.
        let mut waiting = Vec::new();
        for (name, controller) in lock(&self.controllers).iter() {
            let reactor = controller.server.reactor();
            for id in controller.server.refuse_new_sessions() {
                // Room for both answers: the reactor never waits for this thread.
                let (reply, answer) = mpsc::sync_channel(2);
                match reactor.post(id, Box::new(DeviceOp::Drain { reply })) {
                    Ok(()) => waiting.push((name.clone(), id, answer)),
                    Err(err) => {
                        tracing::warn!(controller = %name, device = id.0, %err, "cannot drain");
                    }
                }
            }
        }
        let mut report = DrainReport::default();
        let mut late = |name: &str, id: DeviceId| {
            report.timed_out += 1;
            tracing::warn!(controller = %name, device = id.0, "requests still in flight when the shutdown timeout passed");
        };
        let mut closed = Vec::new();
        let mut requests = 0;
        for (name, id, answer) in waiting {
            match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(DrainProgress::Closed { in_flight }) => {
                    requests += in_flight;
                    closed.push((name, id, answer));
                }
                Ok(DrainProgress::Drained) => closed.push((name, id, answer)),
                // The frontend disconnected meanwhile; its device's removal drained it.
                Err(RecvTimeoutError::Disconnected) => {}
                Err(RecvTimeoutError::Timeout) => late(&name, id),
            }
        }
        tracing::info!(
            "{} sessions take no new requests; waiting for the {requests} in flight",
            closed.len()
        );
        for (name, id, answer) in closed {
            match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(_) | Err(RecvTimeoutError::Disconnected) => report.sessions += 1,
                Err(RecvTimeoutError::Timeout) => late(&name, id),
            }
        }
        report.requests = requests;
        report
    }

    fn reactors_info(&self) -> serde_json::Value {
        let controllers = lock(&self.controllers);
        let reactors: Vec<serde_json::Value> = self
            .reactors
            .iter()
            .map(|r| {
                let threads: Vec<serde_json::Value> = controllers
                    .iter()
                    .filter(|(_, c)| c.server.reactor().core() == r.core())
                    .map(|(name, c)| {
                        serde_json::json!({
                            "name": name,
                            "id": c.id,
                            "cpumask": format!("{:x}", c.cpumask),
                            "elapsed": 0,
                        })
                    })
                    .collect();
                let stats = r.stats();
                let (usr, sys, irq) = cpu_times_since_start(r.core()).unwrap_or_default();
                serde_json::json!({
                    "lcore": r.core(),
                    "tid": stats.tid.load(std::sync::atomic::Ordering::Relaxed),
                    "busy": stats.busy_ticks.load(std::sync::atomic::Ordering::Relaxed),
                    "idle": stats.idle_ticks.load(std::sync::atomic::Ordering::Relaxed),
                    "in_interrupt": false,
                    "irq": irq,
                    "sys": sys,
                    "usr": usr,
                    "lw_threads": threads,
                })
            })
            .collect();
        // Busy and idle are time-stamp counter ticks, as in SPDK.
        let tick_rate = rvhost_platform_linux::tsc::ticks_per_second();
        serde_json::json!({ "tick_rate": tick_rate, "pid": std::process::id(), "reactors": reactors })
    }

    fn queue_stats(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<crate::ops::ControllerQueues>, OpsError> {
        // Every session is asked at once, and the answers awaited without the controllers' lock
        // (each reactor answers at its next round).
        let mut asked = Vec::new();
        {
            let controllers = lock(&self.controllers);
            if let Some(name) = name {
                if !controllers.contains_key(name) {
                    return Err(OpsError::NotFound(name.to_string()));
                }
            }
            for (ctrlr, c) in controllers.iter() {
                if name.is_some_and(|n| n != ctrlr) {
                    continue;
                }
                let reactor = c.server.reactor();
                let sessions = c.server.with_devices(|ids| {
                    ids.iter()
                        .filter_map(|&id| {
                            let (reply, answer) = mpsc::sync_channel(1);
                            let op = Box::new(DeviceOp::QueueStats { reply });
                            // A session that ended meanwhile is left out.
                            reactor.post(id, op).ok().map(|()| (id, answer))
                        })
                        .collect::<Vec<_>>()
                });
                asked.push((ctrlr.clone(), sessions));
            }
        }
        let deadline = Instant::now() + QUEUE_STATS_TIMEOUT;
        Ok(asked
            .into_iter()
            .map(|(ctrlr, sessions)| crate::ops::ControllerQueues {
                ctrlr,
                sessions: sessions
                    .into_iter()
                    .filter_map(|(id, answer)| {
                        let wait = deadline.saturating_duration_since(Instant::now());
                        let queues = answer.recv_timeout(wait).ok()?;
                        Some(crate::ops::SessionQueues {
                            session: id.0,
                            queues,
                        })
                    })
                    .collect(),
            })
            .collect())
    }

    fn threads_info(&self) -> Vec<crate::ops::ThreadInfo> {
        use std::sync::atomic::Ordering::Relaxed;
        let controllers = lock(&self.controllers);
        controllers
            .iter()
            .map(|(name, c)| {
                let reactor = c.server.reactor();
                let pollers = c.server.with_devices(|ids| {
                    ids.iter()
                        .filter_map(|&id| {
                            let stats = reactor.stats().task(id)?;
                            Some(crate::ops::PollerInfo {
                                id: id.0,
                                runs: stats.runs.load(Relaxed),
                                busy_runs: stats.busy_runs.load(Relaxed),
                                busy_ticks: stats.busy_ticks.load(Relaxed),
                                idle_ticks: stats.idle_ticks.load(Relaxed),
                            })
                        })
                        .collect()
                });
                let (ended_busy_ticks, ended_idle_ticks) = c.server.ended_session_ticks();
                crate::ops::ThreadInfo {
                    name: name.clone(),
                    id: c.id,
                    cpumask: c.cpumask,
                    pollers,
                    ended_busy_ticks,
                    ended_idle_ticks,
                }
            })
            .collect()
    }
}
