//! The vhost-user server: one listening socket per controller, one control thread per connected
//! frontend.
//!
//! A control thread lets `vhost`'s `BackendReqHandler` frame and validate a frontend's (QEMU's)
//! messages, and answers them through a [`session::Session`]. The device's queues live on a
//! reactor; the session sends them there and waits for each change to be applied before the
//! frontend gets its reply. When the frontend disconnects (or a message is so broken that the
//! connection cannot be trusted any more) the session's device is drained and removed from the
//! reactor; the socket keeps accepting, and other controllers never notice.
//!
//! What a frontend is offered:
//!
//! - virtio features: the device's (see [`DeviceBackend::features`]) plus
//!   `VHOST_USER_F_PROTOCOL_FEATURES`;
//! - protocol features: `MQ`, `CONFIG` (read-only config space), `REPLY_ACK`,
//!   `CONFIGURE_MEM_SLOTS` (up to [`rvhost_platform_linux::MAX_MEM_SLOTS`] regions),
//!   `RESET_DEVICE` and `INFLIGHT_SHMFD` (the inflight log of [`inflight`]: `GET_INFLIGHT_FD`
//!   allocates a sealed memfd, `SET_INFLIGHT_FD` maps the one a frontend kept across a restart;
//!   each queue then resubmits what the previous backend left unfinished) and `LOG_SHMFD` with
//!   the virtio feature `VHOST_F_LOG_ALL` (live migration: `SET_LOG_BASE` maps the frontend's
//!   dirty log, `SET_FEATURES` turns marking on and off under running queues, `SET_VRING_ADDR`
//!   with `VHOST_VRING_F_LOG` names where a used ring is logged; the device shell marks every
//!   page it writes, see [`device`]); no device-state transfer (the vring base is all the state
//!   a stopped queue has); `BACKEND_REQ` (the backend channel of [`backend_channel`], on which
//!   a config change is announced);
//! - refusals: a request that is merely unacceptable (a vring size over the device's limit, ring
//!   addresses outside the memory table, a config write) gets a negative `REPLY_ACK` and the
//!   session goes on; a memory table that cannot be mapped as described (overlaps, regions past
//!   the end of their file, unaligned offsets) or a message the `vhost` crate cannot parse closes
//!   the connection.

pub mod backend_channel;
pub mod device;
pub mod inflight;
pub mod memory;
pub mod session;
pub mod vvu;

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rvhost_platform_linux::{ControlListener, DirtyLog, ListenError, ListenerHandle, SocketAccess};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::bdev::IoMemory;
use crate::reactor::{Command, Message, ReactorHandle, Reply, Task, TaskStats};
use backend_channel::BackendChannel;
use memory::GuestMemoryTable;
use session::Session;

/// Identifies a session's device on its reactor (the reactor's task id). Unique over the
/// process's lifetime.
pub use crate::reactor::TaskId as DeviceId;

/// A change to one device's queues or memory, applied on its reactor. Sent as a reactor
/// [`Message`]; the device downcasts it.
pub enum DeviceOp {
    /// Swaps in a new guest memory table. The device keeps the old one alive while requests that
    /// use it are in flight.
    SetMemory {
        /// The new table.
        memory: Arc<GuestMemoryTable>,
        /// Acknowledged once swapped in.
        reply: Reply<()>,
    },
    /// Starts polling a virtqueue.
    StartQueue {
        /// Queue index.
        index: u16,
        /// Everything the queue needs.
        setup: QueueSetup,
        /// The outcome (a ring that does not lie in guest memory is refused).
        reply: Reply<Result<(), String>>,
    },
    /// Stops a virtqueue after its in-flight requests completed; replies with the next avail
    /// index to process (vhost-user `GET_VRING_BASE`).
    StopQueue {
        /// Queue index.
        index: u16,
        /// The queue's `last_avail_idx` once drained, or `None` if it was not running.
        reply: Reply<Option<u16>>,
    },
    /// Replaces a running queue's call eventfd (`None`: stop signalling).
    SetCall {
        /// Queue index.
        index: u16,
        /// The new eventfd.
        call: Option<Arc<EventNotifier>>,
        /// Acknowledged once in effect.
        reply: Reply<()>,
    },
    /// Turns dirty logging on (`log` is the frontend's migration log) or off (`None`) for every
    /// queue, and sets where each listed queue logs its used ring (`SET_VRING_ADDR`'s
    /// `log_guest_addr` when `VHOST_VRING_F_LOG` is set, else `None`). Requests already in flight
    /// are marked when they complete, so logging turns on and off without stopping I/O.
    SetLog {
        /// The log, or `None` to stop marking.
        log: Option<Arc<DirtyLog>>,
        /// Per queue index: where its used ring is logged.
        used_log: Vec<(u16, Option<u64>)>,
        /// Acknowledged once in effect (the frontend may then read or replace the log).
        reply: Reply<()>,
    },
    /// Turns interrupt coalescing on (the controller's settings in the reactor's clock) or off
    /// (`None`, sending any call held back) for every queue and those started later.
    SetCoalescing {
        /// The settings, or `None`.
        coalescing: Option<device::CoalescingTicks>,
        /// Acknowledged once in effect.
        reply: Reply<()>,
    },
    /// Stops every queue (answering waiting stops) and removes the device once its in-flight
    /// requests completed.
    Remove {
        /// Acknowledged once drained; the reactor drops the device after replying.
        reply: Reply<()>,
    },
    /// Reports each running queue's counters (`rvhost_get_queue_stats`): requests, bytes,
    /// in flight and a copy of its latency histogram.
    QueueStats {
        /// The running queues' reports, in queue order.
        reply: Reply<Vec<crate::ops::QueueReport>>,
    },
    /// The process is stopping: every queue (and any queue started later) stops taking new
    /// requests; the requests in flight complete as usual, their used entries are published and
    /// the driver is notified. The device stays (the connection is closed later), so the
    /// frontend's used index then matches everything the device took, and a restarted target
    /// has nothing to resubmit.
    Drain {
        /// Told [`DrainProgress::Closed`] at once, then [`DrainProgress::Drained`] once nothing
        /// is in flight and the used rings are published. Needs room for both (a channel of
        /// capacity 2), so the reactor never blocks on it.
        reply: Reply<DrainProgress>,
    },
}

/// What a device tells the sender of a [`DeviceOp::Drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainProgress {
    /// No queue takes new requests any more; this many were in flight.
    Closed {
        /// Requests in flight when the drain began.
        in_flight: usize,
    },
    /// They all completed and were published.
    Drained,
}

impl std::fmt::Debug for DeviceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DeviceOp::SetMemory { .. } => "SetMemory",
            DeviceOp::StartQueue { .. } => "StartQueue",
            DeviceOp::StopQueue { .. } => "StopQueue",
            DeviceOp::SetCall { .. } => "SetCall",
            DeviceOp::SetLog { .. } => "SetLog",
            DeviceOp::SetCoalescing { .. } => "SetCoalescing",
            DeviceOp::Remove { .. } => "Remove",
            DeviceOp::QueueStats { .. } => "QueueStats",
            DeviceOp::Drain { .. } => "Drain",
        };
        f.write_str(name)
    }
}

/// Applying a [`DeviceOp`] to a device held as a reactor task, as the reactor would deliver it
/// (for tests and benchmarks that drive a device without a reactor thread).
pub trait ApplyDeviceOp {
    /// Delivers `op` as a control message.
    fn apply_op(&mut self, op: DeviceOp);
}

impl<T: Task + ?Sized> ApplyDeviceOp for T {
    fn apply_op(&mut self, op: DeviceOp) {
        self.control(Box::new(op) as Message);
    }
}

/// Virtio feature bits as negotiated with the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioFeatures(pub u64);

impl VirtioFeatures {
    /// Whether feature bit `bit` was negotiated.
    pub fn has(self, bit: u32) -> bool {
        bit < 64 && self.0 & (1u64 << bit) != 0
    }
}

/// An eventfd the frontend gave us to signal (a vring's call fd).
#[derive(Debug)]
pub struct EventNotifier(rvhost_platform_linux::EventFd);

impl EventNotifier {
    /// Takes ownership of an eventfd received over vhost-user.
    pub fn from_file(file: File) -> Result<Self, rvhost_platform_linux::EventFdError> {
        rvhost_platform_linux::EventFd::from_owned_fd(file.into()).map(EventNotifier)
    }

    /// Signals the frontend. A full counter (the guest has not consumed earlier signals) still
    /// means "signalled"; other failures are logged, because a lost interrupt stalls the guest.
    pub fn notify(&self) {
        if let Err(err) = self.0.signal() {
            tracing::warn!(%err, "writing call eventfd failed");
        }
    }

    /// The eventfd (a kick fd the reactor waits on).
    pub(crate) fn event_fd(&self) -> &rvhost_platform_linux::EventFd {
        &self.0
    }
}

/// Everything a reactor needs to start polling one vring.
#[derive(Debug)]
pub struct QueueSetup {
    /// Queue size (a power of two).
    pub size: u16,
    /// Guest physical address of the descriptor table.
    pub desc_gpa: u64,
    /// Guest physical address of the avail ring.
    pub avail_gpa: u64,
    /// Guest physical address of the used ring.
    pub used_gpa: u64,
    /// The next avail index to process (`SET_VRING_BASE`).
    pub last_avail: u16,
    /// Negotiated virtio features.
    pub features: VirtioFeatures,
    /// Where to signal completions.
    pub call: Option<Arc<EventNotifier>>,
    /// The driver's kick eventfd (`None`: none, or not an eventfd): only a reactor that blocks
    /// between requests reads it (see `reactor::KICK_SPIN_ROUNDS`); otherwise it polls.
    pub kick: Option<Arc<EventNotifier>>,
    /// Where to report a queue the driver broke (`SET_VRING_ERR`).
    pub err: Option<Arc<EventNotifier>>,
    /// Where the used ring is logged while a migration logs (`SET_VRING_ADDR` with
    /// `VHOST_VRING_F_LOG`: its `log_guest_addr`).
    pub used_log_gpa: Option<u64>,
    /// The memory table in force when the queue starts.
    pub memory: Arc<GuestMemoryTable>,
    /// The queue's part of the inflight region (`INFLIGHT_SHMFD` negotiated and a region set):
    /// the queue resubmits what it lists and logs every request in it.
    pub inflight: Option<inflight::InflightQueue>,
}

/// The device-specific side of a vhost-user controller (vhost-blk, vhost-scsi).
pub trait DeviceBackend: Send + Sync {
    /// Virtio feature bits offered (without `VHOST_USER_F_PROTOCOL_FEATURES`, added by the
    /// server).
    fn features(&self) -> u64;
    /// Reads `len` bytes of the device's virtio config space at `offset` (`GET_CONFIG`).
    fn read_config(&self, offset: u32, len: u32) -> Result<Vec<u8>, String>;
    /// Most queues a frontend may use (`GET_QUEUE_NUM`).
    fn max_queues(&self) -> u16;
    /// Largest queue size accepted by `SET_VRING_NUM`.
    fn max_queue_size(&self) -> u16;
    /// Builds the reactor-side device for a new frontend session, which `reactor` will poll
    /// (control messages for the device go through it).
    fn new_device(
        &self,
        id: DeviceId,
        reactor: &Arc<ReactorHandle>,
    ) -> Result<Box<dyn Task>, String>;
    /// A session received a new memory table (before its device does): lets the bdevs behind
    /// the controller prepare it ([`crate::bdev::Bdev::prepare_memory`]).
    fn prepare_memory(&self, _mem: &IoMemory) {}
}

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path exists and is not a socket (we only replace stale sockets).
    #[error("{0} exists and is not a socket")]
    PathInUse(PathBuf),
    /// Another process accepts connections on the socket path.
    #[error("{0} is in use: another process serves a controller on it")]
    SocketInUse(PathBuf),
    /// Creating, binding or spawning failed.
    #[error("{path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

/// Device ids are unique over the process's lifetime, so a stale command can never reach a new
/// session's device.
static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// Most frontends one controller serves at once. Each costs a thread and a device on the reactor,
/// so a local process opening connections in a loop must not be able to exhaust the target;
/// connections beyond this are closed at once.
pub const MAX_SESSIONS: usize = 32;

/// One connected frontend, as the listener and the RPC thread see it.
#[derive(Debug)]
struct SessionEntry {
    device: DeviceId,
    /// A clone of the connection, so `stop` can unblock the session's thread (`None` on the
    /// virtio-vhost-user transport, whose control thread checks the stop flag itself).
    connection: Option<UnixStream>,
    /// Where config changes are announced to the frontend.
    backend_channel: Arc<BackendChannel>,
    /// The counters of its device's polls (`None` if the reactor did not list it).
    polls: Option<Arc<TaskStats>>,
}

/// What the polls of the sessions that ended cost, kept so that a controller's busy and idle
/// time (`thread_get_stats`) does not drop when a session ends.
#[derive(Debug, Default)]
struct EndedSessions {
    /// Ticks of the sessions whose device the reactor has dropped (final counts).
    busy_ticks: u64,
    idle_ticks: u64,
    /// Ended sessions whose device the reactor may still hold (it publishes their last counts
    /// when it drops them); folded into the sums once it has.
    pending: Vec<Arc<TaskStats>>,
}

/// State shared between a server's threads and the RPC thread.
#[derive(Debug, Default)]
struct ServerShared {
    stop: AtomicBool,
    /// The process is stopping: connections are still served, but no new session starts (its
    /// device would take requests a drain does not wait for).
    refuse_sessions: AtomicBool,
    /// Connected sessions. Held while a session's device is created or removed, so a hot-detach
    /// cannot slip between the two.
    sessions: Mutex<Vec<SessionEntry>>,
    /// What ended sessions' polls cost.
    ended: Mutex<EndedSessions>,
    /// The controller's interrupt coalescing. Changed and read under `sessions` (taken first),
    /// so every session's device gets the settings in force.
    coalescing: Mutex<device::CoalescingSettings>,
}

impl ServerShared {
    /// Registers a new session's device on the reactor (with the controller's coalescing) and
    /// lists it; `None` if the server is stopping, refuses sessions, or the device cannot be
    /// created. Every transport opens its sessions here.
    fn open_session(
        &self,
        name: &str,
        backend: &Arc<dyn DeviceBackend>,
        reactor: &Arc<ReactorHandle>,
        id: DeviceId,
        connection: Option<UnixStream>,
        backend_channel: &Arc<BackendChannel>,
    ) -> Option<Session> {
        let mut sessions = lock(&self.sessions);
        // Checked under the lock `stop` takes after setting the flag: either `stop` sees this
        // session and shuts its socket down, or this sees the flag.
        if self.stop.load(Ordering::SeqCst) || self.refuse_sessions.load(Ordering::SeqCst) {
            return None;
        }
        let device = match backend.new_device(id, reactor) {
            Ok(device) => device,
            Err(why) => {
                tracing::error!(controller = %name, "cannot create device: {why}");
                return None;
            }
        };
        if let Err(err) = reactor.call(|reply| Command::AddTask {
            task: device,
            reply,
        }) {
            tracing::error!(controller = %name, %err, "cannot place device on reactor");
            return None;
        }
        let coalescing = *lock(&self.coalescing);
        if let Some(ticks) = coalescing.in_ticks(rvhost_platform_linux::tsc::ticks_per_second()) {
            let sent = reactor.task_call(id, |reply| DeviceOp::SetCoalescing {
                coalescing: Some(ticks),
                reply,
            });
            if let Err(err) = sent {
                tracing::warn!(controller = %name, device = id.0, %err, "coalescing not applied to a new session");
            }
        }
        sessions.push(SessionEntry {
            device: id,
            connection,
            backend_channel: Arc::clone(backend_channel),
            polls: reactor.stats().task(id),
        });
        Some(Session::new(Arc::clone(backend), Arc::clone(reactor), id))
    }

    /// Ends session `id`: `close` drains and removes its device while no session can start or
    /// end, then the session leaves the list and its polls' cost is kept.
    fn end_session(&self, id: DeviceId, close: impl FnOnce()) {
        let mut sessions = lock(&self.sessions);
        close();
        let ended = sessions
            .iter()
            .position(|s| s.device == id)
            .map(|i| sessions.swap_remove(i));
        if let Some(polls) = ended.and_then(|s| s.polls) {
            lock(&self.ended).pending.push(polls);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data inconsistent (they hold plain
    // values), so a poisoned lock is used as is.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What stopping a server also ends (the emulated virtio-vhost-user device of a `vvu_emu`
/// controller).
pub(crate) struct StopHook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for StopHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopHook")
    }
}

/// One controller's vhost-user endpoint and its sessions. On the socket transport: a listener
/// thread, and one control thread per connected frontend (SPDK, too, lets several frontends
/// share a controller). On the virtio-vhost-user transport ([`vvu`]): one control thread that
/// serves the device's frontend.
#[derive(Debug)]
pub struct VhostServer {
    /// The socket frontends connect to (empty for a virtio-vhost-user PCI function).
    socket: PathBuf,
    /// The socket transport's listener.
    listener: Option<ListenerHandle>,
    shared: Arc<ServerShared>,
    reactor: Arc<ReactorHandle>,
    thread: Option<JoinHandle<()>>,
    /// Run once the threads have ended.
    on_stop: Option<StopHook>,
}

impl VhostServer {
    /// Binds `socket` and starts serving `backend`'s device with its queues on `reactor`.
    pub fn start(
        name: &str,
        socket: &Path,
        backend: Arc<dyn DeviceBackend>,
        reactor: Arc<ReactorHandle>,
    ) -> Result<Self, ServerError> {
        Self::start_with_access(name, socket, backend, reactor, &SocketAccess::default())
    }

    /// [`VhostServer::start`], with the socket file's group and mode set before it accepts.
    pub fn start_with_access(
        name: &str,
        socket: &Path,
        backend: Arc<dyn DeviceBackend>,
        reactor: Arc<ReactorHandle>,
        access: &SocketAccess,
    ) -> Result<Self, ServerError> {
        let io_err = |source| ServerError::Io {
            path: socket.to_path_buf(),
            source,
        };
        // A stale socket from an earlier run is replaced (SPDK does too); a live one is not.
        let listener = ControlListener::bind_with(socket, access).map_err(|e| match e {
            ListenError::InUse(p) => ServerError::SocketInUse(p),
            ListenError::NotASocket(p) => ServerError::PathInUse(p),
            ListenError::Io { path, source } => ServerError::Io { path, source },
        })?;
        let handle = listener.handle();
        let shared = Arc::new(ServerShared::default());
        let control = Listener {
            name: name.to_string(),
            listener,
            backend,
            reactor: Arc::clone(&reactor),
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || control.run())
            .map_err(|source| {
                handle.remove_socket();
                io_err(source)
            })?;
        tracing::info!(controller = name, socket = %socket.display(), core = reactor.core(), "vhost-user controller listening");
        Ok(VhostServer {
            socket: socket.to_path_buf(),
            listener: Some(handle),
            shared,
            reactor,
            thread: Some(thread),
            on_stop: None,
        })
    }

    /// The socket path (empty for a virtio-vhost-user PCI function).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The reactor serving this controller's queues.
    pub fn reactor(&self) -> &Arc<ReactorHandle> {
        &self.reactor
    }

    /// Connected frontends.
    pub fn sessions(&self) -> u32 {
        u32::try_from(lock(&self.shared.sessions).len()).unwrap_or(u32::MAX)
    }

    /// Busy and idle ticks of the polls of the sessions that ended (the connected ones are the
    /// reactor's tasks).
    pub fn ended_session_ticks(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut ended = lock(&self.shared.ended);
        let EndedSessions {
            busy_ticks,
            idle_ticks,
            pending,
        } = &mut *ended;
        pending.retain(|polls| {
            // Still held by the reactor: its last counts may not be published yet.
            if Arc::strong_count(polls) > 1 {
                return true;
            }
            *busy_ticks = busy_ticks.wrapping_add(polls.busy_ticks.load(Relaxed));
            *idle_ticks = idle_ticks.wrapping_add(polls.idle_ticks.load(Relaxed));
            false
        });
        pending
            .iter()
            .fold((*busy_ticks, *idle_ticks), |(busy, idle), polls| {
                (
                    busy.wrapping_add(polls.busy_ticks.load(Relaxed)),
                    idle.wrapping_add(polls.idle_ticks.load(Relaxed)),
                )
            })
    }

    /// Runs `f` with the connected sessions' device ids while no session can start or end.
    pub fn with_devices<R>(&self, f: impl FnOnce(&[DeviceId]) -> R) -> R {
        let sessions = lock(&self.shared.sessions);
        let ids: Vec<DeviceId> = sessions.iter().map(|s| s.device).collect();
        f(&ids)
    }

    /// Starts no session for new connections from now on (they are closed at once); connected
    /// sessions go on. Returns the devices of the sessions connected now, which are all the
    /// server will ever have.
    pub fn refuse_new_sessions(&self) -> Vec<DeviceId> {
        let sessions = lock(&self.shared.sessions);
        // Set under the lock `open` checks it under: a session either is listed here or sees
        // the flag.
        self.shared.refuse_sessions.store(true, Ordering::SeqCst);
        sessions.iter().map(|s| s.device).collect()
    }

    /// The controller's interrupt coalescing settings.
    pub fn coalescing(&self) -> device::CoalescingSettings {
        let _sessions = lock(&self.shared.sessions);
        *lock(&self.shared.coalescing)
    }

    /// Sets the controller's interrupt coalescing: every connected session's device applies it
    /// before this returns, and sessions that start later get it too.
    pub fn set_coalescing(&self, settings: device::CoalescingSettings) {
        let sessions = lock(&self.shared.sessions);
        *lock(&self.shared.coalescing) = settings;
        let ticks = settings.in_ticks(rvhost_platform_linux::tsc::ticks_per_second());
        for session in sessions.iter() {
            let id = session.device;
            let sent = self.reactor.task_call(id, |reply| DeviceOp::SetCoalescing {
                coalescing: ticks,
                reply,
            });
            if let Err(err) = sent {
                tracing::warn!(socket = %self.socket.display(), device = id.0, %err, "coalescing not applied to a session");
            }
        }
    }

    /// Tells every connected frontend that the device's config space changed (a bdev changed
    /// size) over its backend channel; returns how many were told.
    pub fn notify_config_change(&self) -> usize {
        let channels: Vec<(DeviceId, Arc<BackendChannel>)> = lock(&self.shared.sessions)
            .iter()
            .map(|s| (s.device, Arc::clone(&s.backend_channel)))
            .collect();
        let mut told = 0;
        for (device, channel) in channels {
            match channel.config_changed() {
                Ok(true) => told += 1,
                Ok(false) => tracing::warn!(socket = %self.socket.display(), device = device.0,
                    "the frontend gave no backend channel: its guest is not told of the config change"),
                Err(err) => {
                    tracing::warn!(socket = %self.socket.display(), device = device.0, %err,
                    "config change not sent")
                }
            }
        }
        told
    }

    /// Closes every connection (draining its device), stops the threads and removes the socket.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for session in lock(&self.shared.sessions).iter() {
            // Unblocks the session thread's read; it then tears the session down itself.
            if let Some(connection) = &session.connection {
                let _ = connection.shutdown(std::net::Shutdown::Both);
            }
        }
        // Wakes the listener's accept; it joins its sessions and exits.
        if let Some(listener) = &self.listener {
            listener.stop();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(socket = %self.socket.display(), "vhost listener thread panicked");
            }
        }
        if let Some(listener) = &self.listener {
            listener.remove_socket();
        }
        if let Some(StopHook(hook)) = self.on_stop.take() {
            hook();
        }
    }
}

impl Drop for VhostServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// The listener thread of one controller.
struct Listener {
    name: String,
    listener: ControlListener,
    backend: Arc<dyn DeviceBackend>,
    reactor: Arc<ReactorHandle>,
    shared: Arc<ServerShared>,
}

impl Listener {
    fn run(self) {
        let mut sessions: Vec<JoinHandle<()>> = Vec::new();
        loop {
            let accepted = match self.listener.accept() {
                Ok(None) => break,
                Ok(Some(stream)) => Ok(stream),
                Err(err) => Err(err),
            };
            if self.shared.stop.load(Ordering::SeqCst) {
                break;
            }
            // Reap sessions that ended.
            let (done, running): (Vec<_>, Vec<_>) =
                sessions.into_iter().partition(|t| t.is_finished());
            sessions = running;
            for thread in done {
                if thread.join().is_err() {
                    tracing::error!(controller = %self.name, "vhost session thread panicked");
                }
            }
            match accepted {
                Ok(stream) if sessions.len() >= MAX_SESSIONS => {
                    tracing::warn!(controller = %self.name, limit = MAX_SESSIONS, "too many frontends; connection refused");
                    drop(stream);
                }
                Ok(stream) => {
                    let session = SessionThread {
                        name: self.name.clone(),
                        backend: Arc::clone(&self.backend),
                        reactor: Arc::clone(&self.reactor),
                        shared: Arc::clone(&self.shared),
                    };
                    let id = DeviceId(NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed));
                    match std::thread::Builder::new()
                        .name(format!("vhost-{}-{}", self.name, id.0))
                        .spawn(move || session.serve(stream, id))
                    {
                        Ok(thread) => sessions.push(thread),
                        Err(err) => {
                            tracing::error!(controller = %self.name, %err, "cannot start a session thread")
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(controller = %self.name, %err, "accept failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        for thread in sessions {
            if thread.join().is_err() {
                tracing::error!(controller = %self.name, "vhost session thread panicked");
            }
        }
        tracing::debug!(controller = %self.name, "vhost listener exits");
    }
}

/// The control thread of one frontend connection.
struct SessionThread {
    name: String,
    backend: Arc<dyn DeviceBackend>,
    reactor: Arc<ReactorHandle>,
    shared: Arc<ServerShared>,
}

impl SessionThread {
    /// Registers the session's device on the reactor; `None` if the server is stopping or the
    /// device cannot be created.
    fn open(
        &self,
        stream: &UnixStream,
        id: DeviceId,
        backend_channel: &Arc<BackendChannel>,
    ) -> Option<Arc<Mutex<Session>>> {
        let connection = match stream.try_clone() {
            Ok(clone) => clone,
            Err(err) => {
                tracing::error!(controller = %self.name, %err, "cannot clone connection");
                return None;
            }
        };
        let session = self.shared.open_session(
            &self.name,
            &self.backend,
            &self.reactor,
            id,
            Some(connection),
            backend_channel,
        )?;
        Some(Arc::new(Mutex::new(session)))
    }

    /// Serves one frontend until it disconnects or breaks the protocol.
    fn serve(self, stream: UnixStream, id: DeviceId) {
        let backend_channel = Arc::new(BackendChannel::default());
        let peek = match stream.try_clone() {
            Ok(peek) => peek,
            Err(err) => {
                tracing::error!(controller = %self.name, %err, "cannot clone connection");
                return;
            }
        };
        let Some(session) = self.open(&stream, id, &backend_channel) else {
            return;
        };
        tracing::info!(controller = %self.name, device = id.0, "frontend connected");

        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&session));
        while !self.shared.stop.load(Ordering::SeqCst) {
            backend_channel.peek(&peek);
            let Err(err) = handler.handle_request() else {
                continue;
            };
            match lock(&session).take_refusal() {
                // The handler refused a request and the frontend was told (or, without
                // REPLY_ACK, could not be): the session stays usable.
                Some(false) => continue,
                Some(true) => {
                    tracing::warn!(controller = %self.name, device = id.0, %err, "dropping connection after a fatal request");
                }
                None => match err {
                    VuError::Disconnected | VuError::PartialMessage => {
                        tracing::info!(controller = %self.name, device = id.0, "frontend disconnected");
                    }
                    VuError::SocketBroken(_) | VuError::SocketError(_) => {
                        tracing::info!(controller = %self.name, device = id.0, %err, "connection closed");
                    }
                    other => {
                        tracing::warn!(controller = %self.name, device = id.0, err = %other, "malformed vhost-user message; dropping connection");
                    }
                },
            }
            break;
        }
        drop(handler);
        self.shared.end_session(id, || lock(&session).close());
    }
}
