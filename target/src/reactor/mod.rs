//! Reactors: one poll-mode thread per core of the target's cpumask.
//!
//! A reactor runs [`Task`]s and knows nothing else about them: each round it drains its one
//! control ring, then polls every task once. A task owns its state outright (for a vhost device:
//! its virtqueues, bdev channels and request slots), so the data path takes no locks and shares
//! no mutable state. Everything else reaches a task as a [`Message`] over its reactor's SPSC
//! control ring ([`Command::Task`]); a message that changes a task carries a reply sender, and the
//! sender (a vhost-user control thread or the RPC thread) blocks on the reply, so a frontend is
//! only answered once the change is in effect on the data path. What the messages mean is the
//! sender's and the task's business (the vhost layer's device operations, for instance): this
//! module imports nothing of the layers above it.
//!
//! Several control threads send to the same reactor, while the ring has one producer: the
//! producer half therefore sits behind a mutex on the *control* side. The reactor side (the
//! consumer) never locks.
//!
//! # Idling
//!
//! Poll mode is the product: a busy reactor never sleeps. But the test machines run a TCG guest,
//! the target and the tests on two shared cores, so with [`IdlePolicy::Adaptive`] (the default) a
//! reactor that found no work for [`SPIN_ROUNDS`] consecutive rounds starts calling
//! `sched_yield`, and after [`YIELD_ROUNDS`] rounds sleeps between rounds: [`IDLE_SLEEP`] at
//! first, doubling every [`SLEEP_STEP_ROUNDS`] sleeping rounds up to [`IDLE_SLEEP_MAX`] (a reactor
//! idle for a couple of seconds wakes about a thousand times a second). Any work resets it to
//! spinning, so only the first request after a quiet spell waits for the sleep to end. [`IdlePolicy::BusyPoll`] (for benchmarks: `RVHOST_BUSY_POLL=1`, or
//! the data plane's options) never yields.
//!
//! Each reactor installs a [`Waker`] (a wake-up eventfd with an "asleep" flag) as its thread's
//! waker (`rvhost_platform_linux::waker`). A bdev whose operations complete on other threads
//! (rbd: librbd's) has them wake it and counts them; this is opt-in per bdev kind, and only such
//! a bdev changes how the reactor idles. While such completions are expected, an adaptive
//! reactor past [`WAKER_SPIN_ROUNDS`] empty rounds announces a sleep, polls everything once more
//! and then blocks on the eventfd (at most [`WAKER_WAIT`]) instead of yielding or sleeping, so it
//! leaves the core to those threads and sees each completion, or a control command, at once.
//! The completing thread writes the eventfd only while the reactor announced a sleep: a busy
//! reactor costs it a fence and a load, not a system call.
//!
//! The trade-off, measured (bench/README.md, "QD1 latency and the idle policy"): while a driver
//! keeps even one request in flight both policies answer alike (QD1 p50 ≈ 0.3–0.9 µs), because
//! the reactor never sees 4096 empty rounds in a row; an idle adaptive reactor uses about 2 % of
//! a core, a busy-polling one all of it. Adaptive stays the default because rvhost shares its
//! cores more often than SPDK's dedicated-core deployments do.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rvhost_platform_linux::waker::{self, Waker};
use rvhost_platform_linux::{spsc, tsc, NumaTopology};

/// Capacity of each reactor's control ring. Control commands are rare and synchronous, so a
/// handful of slots absorbs every burst (several control threads at once).
const CONTROL_RING_SLOTS: usize = 64;

/// Empty poll rounds after which an adaptive reactor starts yielding its core.
pub const SPIN_ROUNDS: u32 = 4096;
/// Empty poll rounds after which an adaptive reactor that waits for completions from other
/// threads announces a sleep on its waker (it blocks after one more empty round): they take
/// hundreds of microseconds (a network round trip), and spinning meanwhile only keeps the
/// threads that complete them off the core. Measured against 256 (bench/README.md, "Ceph RBD"):
/// the reactor's CPU per I/O fell at every point and IOPS did not fall beyond the noise.
pub const WAKER_SPIN_ROUNDS: u32 = 0;
/// The longest an adaptive reactor blocks on its waker while it awaits completions from other
/// threads before polling its devices again. Each completion ends the wait at once, so this only
/// bounds how late a request that arrives on a device meanwhile (a driver that submits without
/// waiting for a completion) is seen, as [`IDLE_SLEEP_MAX`] bounds it on an idle reactor; a
/// short wait instead wakes the reactor dozens of times per completion on a network round trip
/// of a millisecond, and those wake-ups took half a core at QD1 against a loaded Ceph cluster
/// (bench/README.md, "Ceph RBD").
pub const WAKER_WAIT: Duration = Duration::from_millis(1);
/// Empty poll rounds after which an adaptive reactor with nothing in flight, whose work
/// completes on other threads (a [`Waker`] source: rbd), announces a sleep and then, if every
/// task agrees ([`Task::prepare_block`]), blocks on the tasks' descriptors (the guests' kick
/// eventfds) and its waker, instead of spinning and yielding until the driver's next request,
/// as qemu-storage-daemon sleeps in `ppoll`. Reactors without such work (null, malloc, nvme,
/// file bdevs) never do: they keep the spin/yield/sleep policy.
pub const KICK_SPIN_ROUNDS: u32 = 0;
/// Empty poll rounds after which an adaptive reactor starts sleeping between rounds.
pub const YIELD_ROUNDS: u32 = 32 * 1024;
/// How long an idle adaptive reactor sleeps between rounds.
pub const IDLE_SLEEP: Duration = Duration::from_micros(50);
/// The longest sleep of a long-idle adaptive reactor.
pub const IDLE_SLEEP_MAX: Duration = Duration::from_millis(1);
/// Sleeping rounds after which an idle adaptive reactor doubles its sleep.
pub const SLEEP_STEP_ROUNDS: u32 = 1024;

/// How long a control thread waits for a reactor to apply a command before giving up. Only a
/// stuck bdev (an I/O that never completes) can make a reactor this slow.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting control thread checks that the reactor is still alive.
const REPLY_POLL: Duration = Duration::from_millis(100);

/// What a reactor does when it finds no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin, then yield, then sleep briefly (see the module documentation).
    Adaptive,
    /// Spin forever: lowest latency, one full core per reactor.
    BusyPoll,
}

/// Identifies a task on its reactor (for the vhost layer: one vhost-user session's device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskId(pub u64);

/// The sending half of a command's reply.
pub type Reply<T> = SyncSender<T>;

/// A control message for one task. The reactor only routes it; what it means is between the
/// sender and the task (which downcasts it to the message types it understands). Control
/// messages are rare, so the box costs nothing on the data path.
pub type Message = Box<dyn Any + Send>;

/// Something a reactor polls: a vhost session's device, for instance. The reactor knows nothing
/// else about it.
pub trait Task: Send {
    /// The task's identity, for routing [`Command::Task`] messages.
    fn id(&self) -> TaskId;
    /// One poll round. Returns how much work was done (0 when idle).
    fn poll(&mut self) -> usize;
    /// Handles a control message (it carries its own reply sender, if any).
    fn control(&mut self, message: Message);
    /// Whether the task is done; the reactor then drops it.
    fn is_finished(&self) -> bool;

    /// The reactor found no work and would block until one of its descriptors becomes readable
    /// (see [`KICK_SPIN_ROUNDS`]). A task that can be woken that way turns on the notifications
    /// it needs (a vhost device: the driver's kicks), appends their descriptors to `fds`, then
    /// looks for work that arrived before they were on, and says what it found. The default,
    /// [`BlockReadiness::Refused`], keeps the reactor polling.
    fn prepare_block(&mut self, _fds: &mut Vec<libc::pollfd>) -> BlockReadiness {
        BlockReadiness::Refused
    }

    /// Ends what [`Task::prepare_block`] began, whatever it returned and whether or not the
    /// reactor blocked: notifications off again. `fds` are the descriptors it appended, with
    /// what the wait found on them.
    fn end_block(&mut self, _fds: &[libc::pollfd]) {}
}

/// What a task answers when its reactor would block ([`Task::prepare_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReadiness {
    /// It must be polled (work in flight that nothing wakes, a timer, no descriptor to wait on).
    Refused,
    /// Work arrived while the notifications were turned on: poll again.
    Work,
    /// Its descriptors are in the list: the reactor may block on them.
    Ready,
}

/// A message to a reactor.
pub enum Command {
    /// Takes ownership of a new task.
    AddTask {
        /// The task.
        task: Box<dyn Task>,
        /// Acknowledged once the task is polled.
        reply: Reply<()>,
    },
    /// A control message for one task. If the task does not exist the message (and the reply
    /// sender in it) is dropped, which the waiting side sees as an error.
    Task(TaskId, Message),
    /// Ends the reactor thread (tasks are dropped without draining: the process is exiting).
    Shutdown,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::AddTask { task, .. } => write!(f, "AddTask({:?})", task.id()),
            Command::Task(id, _) => write!(f, "Task({id:?})"),
            Command::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// The reactor thread has exited.
    #[error("reactor {0} is not running")]
    Gone(u32),
    /// The reactor did not answer in time.
    #[error("reactor {0} did not answer within {1:?}")]
    Timeout(u32, Duration),
    /// The command named a task the reactor does not have (or the task dropped the reply).
    #[error("reactor {0} dropped the command (unknown task)")]
    Dropped(u32),
}

/// Counters a reactor publishes for `framework_get_reactors`. Only the reactor writes them, and
/// only every [`STATS_ROUNDS`] rounds (plain stores of its own running totals): the data path
/// touches no atomic shared with another reactor, and a reader is at most that many rounds
/// behind.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Ticks ([`tsc::ticks`], [`tsc::ticks_per_second`]) spent in rounds that found work (each
    /// round timed on its own, as SPDK counts busy ticks).
    pub busy_ticks: AtomicU64,
    /// Ticks spent in rounds that found none, including their yields and sleeps.
    pub idle_ticks: AtomicU64,
    /// Times an adaptive reactor slept because it had been idle (0 for a busy-polling one).
    pub idle_sleeps: AtomicU64,
    /// The reactor thread's Linux thread id (0 until it runs).
    pub tid: AtomicU64,
    /// The counters of the tasks the reactor polls, registered when a task is added and
    /// dropped when it finishes (the control path; the reactor never takes this lock in a round
    /// that only polls).
    tasks: Mutex<Vec<(TaskId, Arc<TaskStats>)>>,
}

impl ReactorStats {
    /// The counters of task `id`, while the reactor polls it.
    pub fn task(&self, id: TaskId) -> Option<Arc<TaskStats>> {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks
            .iter()
            .find(|(task, _)| *task == id)
            .map(|(_, stats)| Arc::clone(stats))
    }

    fn add_task(&self, id: TaskId, stats: Arc<TaskStats>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.push((id, stats));
    }

    fn remove_task(&self, id: TaskId) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|(task, _)| *task != id);
    }
}

/// What one task's polls cost, as SPDK counts a poller's runs and a thread's busy and idle time
/// (`thread_get_stats`, `thread_get_pollers`). Published by the reactor with its own counters.
#[derive(Debug, Default)]
pub struct TaskStats {
    /// Polls.
    pub runs: AtomicU64,
    /// Polls that found work.
    pub busy_runs: AtomicU64,
    /// Ticks spent in polls that found work.
    pub busy_ticks: AtomicU64,
    /// Ticks spent in polls that found none.
    pub idle_ticks: AtomicU64,
}

thread_local! {
    /// The task this reactor thread is polling (its id; 0 outside a task's poll).
    static CURRENT_TASK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The task the calling reactor thread is polling, when called from inside its poll (so that
/// what a task's poll reaches, a bdev channel say, can tell whose it is).
pub fn current_task() -> Option<TaskId> {
    match CURRENT_TASK.with(std::cell::Cell::get) {
        0 => None,
        id => Some(TaskId(id)),
    }
}

/// A task with its counters, kept by the reactor thread alone and published with its own.
struct Polled {
    task: Box<dyn Task>,
    /// The task's id (asked once: `id` is a virtual call).
    id: u64,
    runs: u64,
    busy_runs: u64,
    busy_ticks: u64,
    idle_ticks: u64,
    shared: Arc<TaskStats>,
    /// Its descriptors in the kick wait's list (start, end).
    block_fds: (usize, usize),
}

impl Polled {
    #[inline]
    fn record(&mut self, busy: bool, ticks: u64) {
        self.runs = self.runs.wrapping_add(1);
        if busy {
            self.busy_runs = self.busy_runs.wrapping_add(1);
            self.busy_ticks = self.busy_ticks.wrapping_add(ticks);
        } else {
            self.idle_ticks = self.idle_ticks.wrapping_add(ticks);
        }
    }

    fn publish(&self) {
        self.shared.runs.store(self.runs, Ordering::Relaxed);
        self.shared
            .busy_runs
            .store(self.busy_runs, Ordering::Relaxed);
        self.shared
            .busy_ticks
            .store(self.busy_ticks, Ordering::Relaxed);
        self.shared
            .idle_ticks
            .store(self.idle_ticks, Ordering::Relaxed);
    }
}

/// The control side's view of a reactor.
#[derive(Debug)]
pub struct ReactorHandle {
    core: u32,
    commands: Mutex<spsc::Producer<Command>>,
    /// Controllers placed here, for least-loaded placement.
    load: AtomicUsize,
    stats: Arc<ReactorStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set for a reactor driven by its caller ([`manual`]) while its [`ManualReactor`] lives.
    manual: Option<Arc<AtomicBool>>,
    /// The reactor's waker: a command sent while it sleeps on it wakes it.
    waker: Option<Arc<Waker>>,
}

impl ReactorHandle {
    /// The core this reactor is pinned to.
    pub fn core(&self) -> u32 {
        self.core
    }

    /// Number of controllers placed on this reactor.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Records one more (`true`) or one fewer controller placed here.
    pub fn adjust_load(&self, add: bool) {
        if add {
            self.load.fetch_add(1, Ordering::Relaxed);
        } else {
            // A failed update means it was already 0; nothing to undo.
            let _ = self
                .load
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// The reactor's busy/idle counters.
    pub fn stats(&self) -> &ReactorStats {
        &self.stats
    }

    /// Queues `command` on the control ring. The ring is tiny and the reactor drains it every
    /// round, so a full ring only means a burst: retry briefly.
    fn send(&self, mut command: Command) -> Result<(), ReactorError> {
        if self.is_finished() {
            return Err(ReactorError::Gone(self.core));
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            {
                let mut producer = self
                    .commands
                    .lock()
                    .map_err(|_| ReactorError::Gone(self.core))?;
                match producer.try_push(command) {
                    Ok(()) => {
                        if let Some(waker) = &self.waker {
                            waker.wake();
                        }
                        return Ok(());
                    }
                    Err(back) => command = back,
                }
            }
            if self.is_finished() {
                return Err(ReactorError::Gone(self.core));
            }
            if Instant::now() > deadline {
                return Err(ReactorError::Timeout(self.core, REPLY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn is_finished(&self) -> bool {
        if let Some(alive) = &self.manual {
            return !alive.load(Ordering::Acquire);
        }
        match self.thread.lock() {
            Ok(guard) => guard.as_ref().is_none_or(|t| t.is_finished()),
            Err(_) => true,
        }
    }

    /// Sends the command built by `make` and waits for its reply.
    pub fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ReactorError> {
        let (tx, rx): (SyncSender<T>, Receiver<T>) = mpsc::sync_channel(1);
        self.send(make(tx))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match rx.recv_timeout(REPLY_POLL) {
                Ok(value) => return Ok(value),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ReactorError::Dropped(self.core))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // A command left in the ring of a reactor that exited keeps its reply sender
                    // alive, so "disconnected" never comes: watch the thread instead.
                    if self.is_finished() {
                        return Err(ReactorError::Gone(self.core));
                    }
                    if Instant::now() > deadline {
                        return Err(ReactorError::Timeout(self.core, REPLY_TIMEOUT));
                    }
                }
            }
        }
    }

    /// Queues `message` for task `id` without waiting; the message carries its own reply sender
    /// if the sender wants one (several tasks can then be asked at once and waited for after).
    pub fn post(&self, id: TaskId, message: Message) -> Result<(), ReactorError> {
        self.send(Command::Task(id, message))
    }

    /// Sends the message `make` builds to task `id` and waits for its reply.
    pub fn task_call<T, M: Send + 'static>(
        &self,
        id: TaskId,
        make: impl FnOnce(Reply<T>) -> M,
    ) -> Result<T, ReactorError> {
        self.call(|reply| Command::Task(id, Box::new(make(reply))))
    }

    /// Asks the thread to exit and joins it. Calling it again (or after the thread ended) is a
    /// no-op.
    pub fn shutdown(&self) {
        match self.send(Command::Shutdown) {
            Ok(()) | Err(ReactorError::Gone(_)) => {}
            Err(err) => tracing::warn!(
                core = self.core,
                %err,
                "reactor did not take the shutdown command"
            ),
        }
        let handle = match self.thread.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!(core = self.core, "reactor thread panicked");
            }
        }
    }
}

/// Why a reactor could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The thread could not be created.
    #[error("creating reactor thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The thread could not be pinned to its core (offline, or outside the process's cpuset).
    #[error(transparent)]
    Pin(#[from] rvhost_platform_linux::CpuError),
    /// The thread exited before reporting.
    #[error("reactor thread died during start-up")]
    Died,
}

/// Starts a reactor thread pinned to `core` (memory bound to the core's NUMA node where the
/// system allows), and returns once it runs there.
pub fn spawn(
    core: u32,
    idle: IdlePolicy,
    topology: Arc<NumaTopology>,
) -> Result<Arc<ReactorHandle>, SpawnError> {
    let (producer, consumer) = spsc::channel(CONTROL_RING_SLOTS);
    let stats = Arc::new(ReactorStats::default());
    let waker = match Waker::new() {
        Ok(waker) => Some(Arc::new(waker)),
        Err(err) => {
            tracing::warn!(core, %err, "no wake-up eventfd: the reactor polls for librbd's completions");
            None
        }
    };
    let reactor = Reactor {
        core,
        commands: consumer,
        tasks: Vec::new(),
        idle,
        stats: Arc::clone(&stats),
        waker: waker.clone(),
    };
    let (pinned_tx, pinned_rx) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(format!("reactor_{core}"))
        .spawn(move || {
            let pinned = rvhost_platform_linux::pin_reactor(core as usize, &topology);
            let ok = pinned.is_ok();
            let _ = pinned_tx.send(pinned);
            if ok {
                reactor.run();
            }
        })?;
    match pinned_rx.recv() {
        Ok(Ok(_placement)) => {}
        Ok(Err(err)) => {
            let _ = thread.join();
            return Err(SpawnError::Pin(err));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(SpawnError::Died);
        }
    }
    Ok(Arc::new(ReactorHandle {
        core,
        commands: Mutex::new(producer),
        load: AtomicUsize::new(0),
        stats,
        thread: Mutex::new(Some(thread)),
        manual: None,
        waker,
    }))
}

/// A reactor without a thread: the caller delivers its control messages to a task it polls
/// itself ([`ManualReactor::deliver`]). For tests and benchmarks that drive a task synchronously
/// while other threads talk to it through an ordinary [`ReactorHandle`].
pub fn manual(core: u32) -> (Arc<ReactorHandle>, ManualReactor) {
    let (producer, consumer) = spsc::channel(CONTROL_RING_SLOTS);
    let alive = Arc::new(AtomicBool::new(true));
    let handle = Arc::new(ReactorHandle {
        core,
        commands: Mutex::new(producer),
        load: AtomicUsize::new(0),
        stats: Arc::new(ReactorStats::default()),
        thread: Mutex::new(None),
        manual: Some(Arc::clone(&alive)),
        waker: None,
    });
    (
        handle,
        ManualReactor {
            commands: consumer,
            alive,
        },
    )
}

/// The consuming side of a [`manual`] reactor's control ring.
pub struct ManualReactor {
    commands: spsc::Consumer<Command>,
    alive: Arc<AtomicBool>,
}

impl std::fmt::Debug for ManualReactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManualReactor").finish_non_exhaustive()
    }
}

impl ManualReactor {
    /// Delivers every queued message for `task` to it; messages for other tasks (and
    /// `AddTask`) are dropped with their reply senders. Returns how many were delivered.
    pub fn deliver(&mut self, task: &mut dyn Task) -> usize {
        let mut delivered = 0;
        while let Some(command) = self.commands.try_pop() {
            if let Command::Task(id, message) = command {
                if id == task.id() {
                    task.control(message);
                    delivered += 1;
                }
            }
        }
        delivered
    }
}

impl Drop for ManualReactor {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
    }
}

/// The reactor thread's state; owned by that thread alone.
struct Reactor {
    core: u32,
    commands: spsc::Consumer<Command>,
    tasks: Vec<Polled>,
    idle: IdlePolicy,
    stats: Arc<ReactorStats>,
    /// Its wake-up eventfd (`None` if none could be made: it then polls for completions).
    waker: Option<Arc<Waker>>,
}

/// The calling thread's Linux thread id, as `/proc/thread-self` names it (0 if it cannot be read).
fn current_tid() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// How long an adaptive reactor sleeps after `sleeping_rounds` rounds of sleep without work.
fn idle_sleep(sleeping_rounds: u32) -> Duration {
    let doublings = sleeping_rounds / SLEEP_STEP_ROUNDS;
    let factor = 1u32.checked_shl(doublings.min(16)).unwrap_or(u32::MAX);
    IDLE_SLEEP.saturating_mul(factor).min(IDLE_SLEEP_MAX)
}

/// Rounds between two updates of the published busy/idle counters.
pub const STATS_ROUNDS: u32 = 1024;

/// Busy and idle time of one reactor, kept by the reactor thread alone. Each round is timed on
/// its own (one time-stamp counter read per round, about 20 ns) and counted as busy if it found
/// work: a round that submitted and completed a batch of requests is
/// long, an empty one short, so splitting a window's time by the number of rounds would
/// misreport a reactor that is busy most of the time in a few long rounds as mostly idle.
#[derive(Debug)]
struct TimeAccount {
    round_start: u64,
    busy_ticks: u64,
    idle_ticks: u64,
}

impl TimeAccount {
    fn new() -> Self {
        TimeAccount {
            round_start: tsc::ticks(),
            busy_ticks: 0,
            idle_ticks: 0,
        }
    }

    /// Ends the round that started at the end of the previous one.
    #[inline]
    fn end_round(&mut self, busy: bool) {
        let now = tsc::ticks();
        // A counter behind the last read (not expected: reactors are pinned and the counter is
        // invariant) counts nothing rather than a wrapped-around age.
        let spent = now.saturating_sub(self.round_start);
        self.round_start = now;
        let total = if busy {
            &mut self.busy_ticks
        } else {
            &mut self.idle_ticks
        };
        *total = total.wrapping_add(spent);
    }

    fn publish(&self, stats: &ReactorStats) {
        stats.busy_ticks.store(self.busy_ticks, Ordering::Relaxed);
        stats.idle_ticks.store(self.idle_ticks, Ordering::Relaxed);
    }
}

impl Reactor {
    fn run(mut self) {
        tracing::info!(core = self.core, "reactor started");
        self.stats.tid.store(current_tid(), Ordering::Relaxed);
        // Completions from other threads (librbd's) wake it; see the idle branch below.
        if let Some(wake) = &self.waker {
            waker::install(Arc::clone(wake));
        }
        let wake = self.waker.clone();
        // The descriptors a sleep waits on (the waker's first).
        let mut sleep_fds: Vec<libc::pollfd> = Vec::new();
        // The waker announced a sleep: this round is the last look for work before blocking.
        let mut armed = false;
        let mut empty_rounds: u32 = 0;
        let mut rounds: u32 = 0;
        let mut time = TimeAccount::new();
        // Benchmark knob (bench/rbd-compare.sh): empty rounds before blocking on the waker.
        let waker_spin_rounds = std::env::var("RVHOST_WAKER_SPIN_ROUNDS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(WAKER_SPIN_ROUNDS);
        // Benchmark knob (bench/rbd-compare.sh): the waker wait's bound in microseconds.
        let waker_wait = std::env::var("RVHOST_WAKER_WAIT_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(WAKER_WAIT, Duration::from_micros);
        // Benchmark knob (bench/rbd-compare.sh): empty rounds before the kick wait; "off"
        // turns it off (the spin/yield/sleep policy of reactors without wake-up sources).
        let kick_spin_rounds = match std::env::var("RVHOST_KICK_SPIN_ROUNDS").ok().as_deref() {
            Some("off") => None,
            Some(v) => Some(v.parse::<u32>().unwrap_or(KICK_SPIN_ROUNDS)),
            None => Some(KICK_SPIN_ROUNDS),
        };
        // A task refused the kick wait: not tried again until a round finds work.
        let mut kick_refused = false;
        loop {
            let mut work = 0usize;
            while let Some(command) = self.commands.try_pop() {
                work = work.saturating_add(1);
                if !self.apply(command) {
                    tracing::info!(core = self.core, "reactor stopped");
                    return;
                }
            }
            // One `is_finished` call per task and round (it is virtual): a task that finished in
            // the previous round's poll is dropped one round later. Each poll is timed from the
            // end of the one before (the first from the round's start): one counter read per
            // task and round.
            let mut finished = false;
            let mut mark = time.round_start;
            for polled in self.tasks.iter_mut() {
                if polled.task.is_finished() {
                    finished = true;
                    continue;
                }
                CURRENT_TASK.with(|current| current.set(polled.id));
                let done = polled.task.poll();
                let now = tsc::ticks();
                polled.record(done > 0, now.saturating_sub(mark));
                mark = now;
                work = work.saturating_add(done);
            }
            CURRENT_TASK.with(|current| current.set(0));
            if finished {
                let stats = &self.stats;
                self.tasks.retain(|p| {
                    let keep = !p.task.is_finished();
                    if !keep {
                        // Its last counts, for whoever keeps its totals past its end (a
                        // controller's thread_get_stats).
                        p.publish();
                        stats.remove_task(p.task.id());
                    }
                    keep
                });
            }

            rounds = rounds.wrapping_add(1);
            if work > 0 {
                empty_rounds = 0;
                kick_refused = false;
                if armed {
                    if let Some(wake) = wake.as_ref() {
                        wake.cancel_sleep();
                    }
                    armed = false;
                }
            } else {
                empty_rounds = empty_rounds.saturating_add(1);
                if self.idle == IdlePolicy::Adaptive {
                    let expected = waker::expected() > 0;
                    let waiting_for_others = expected && empty_rounds > waker_spin_rounds;
                    let waiting_for_kicks = !expected
                        && !kick_refused
                        && kick_spin_rounds.is_some_and(|spin| empty_rounds > spin)
                        && wake.as_ref().is_some_and(|w| w.has_sources());
                    match (waiting_for_others || waiting_for_kicks, wake.as_ref()) {
                        (true, Some(wake)) if armed && waiting_for_kicks => {
                            // Nothing in flight, and what does complete here wakes the
                            // reactor: block until a driver kicks, a command arrives or
                            // WAKER_WAIT passed, if every task can be woken so.
                            armed = false;
                            if !self.block_on_kicks(wake, &mut sleep_fds, waker_wait) {
                                kick_refused = true;
                            }
                        }
                        (true, Some(wake)) if armed => {
                            // Operations in flight on other threads will wake the waker: block
                            // on it, leaving the core to them, and wake at the first completion
                            // or control command (yielding instead lets a loaded machine's
                            // other work run for whole time slices before the reactor sees
                            // it). At most WAKER_WAIT, so the other devices of this reactor
                            // are polled at least as often as when it sleeps.
                            armed = false;
                            // The waker alone (not the kick wait's descriptors).
                            sleep_fds.clear();
                            if let Err(err) = wake.sleep(&mut sleep_fds, waker_wait) {
                                tracing::debug!(%err, "waiting on the wake-up eventfd");
                            }
                        }
                        (true, Some(wake)) => {
                            // Announce the sleep, then poll everything once more: what arrived
                            // before the announcement is found by that round, what arrives
                            // after it writes the eventfd.
                            wake.prepare_sleep();
                            armed = true;
                        }
                        _ => {
                            if armed {
                                if let Some(wake) = wake.as_ref() {
                                    wake.cancel_sleep();
                                }
                                armed = false;
                            }
                            if empty_rounds > YIELD_ROUNDS {
                                self.stats.idle_sleeps.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(idle_sleep(empty_rounds - YIELD_ROUNDS));
                            } else if empty_rounds > SPIN_ROUNDS {
                                std::thread::yield_now();
                            }
                        }
                    }
                }
            }
            // Sleeping rounds are long, so they publish more often (every 64th).
            let publish_every = if empty_rounds > YIELD_ROUNDS {
                64
            } else {
                STATS_ROUNDS
            };
            time.end_round(work > 0);
            if rounds % publish_every == 0 {
                time.publish(&self.stats);
                for polled in &self.tasks {
                    polled.publish();
                }
                rounds = 0;
            }
        }
    }

    /// The kick wait (see [`KICK_SPIN_ROUNDS`]), after the waker announced the sleep and a
    /// round found nothing: every task turns its notifications on and re-checks for work; if
    /// all are ready, blocks on their descriptors and the waker for at most `timeout`. Every
    /// task then turns them off again. Returns `false` if a task refused.
    fn block_on_kicks(
        &mut self,
        wake: &Waker,
        fds: &mut Vec<libc::pollfd>,
        timeout: Duration,
    ) -> bool {
        fds.clear();
        // The waker's entry; `Waker::sleep` fills it in.
        fds.push(waker::readable(-1));
        let mut readiness = BlockReadiness::Ready;
        let mut prepared = 0;
        for polled in self.tasks.iter_mut() {
            let start = fds.len();
            let answer = polled.task.prepare_block(fds);
            polled.block_fds = (start, fds.len());
            prepared += 1;
            if answer != BlockReadiness::Ready {
                readiness = answer;
                break;
            }
        }
        if readiness == BlockReadiness::Ready {
            if let Err(err) = wake.sleep(fds, timeout) {
                tracing::debug!(%err, "waiting on the kick and wake-up eventfds");
            }
        } else {
            wake.cancel_sleep();
        }
        for polled in self.tasks.iter_mut().take(prepared) {
            let (start, end) = polled.block_fds;
            polled.task.end_block(fds.get(start..end).unwrap_or(&[]));
        }
        readiness != BlockReadiness::Refused
    }

    /// Applies one command; `false` means shut down.
    fn apply(&mut self, command: Command) -> bool {
        match command {
            Command::AddTask { task, reply } => {
                let shared = Arc::new(TaskStats::default());
                self.stats.add_task(task.id(), Arc::clone(&shared));
                self.tasks.push(Polled {
                    id: task.id().0,
                    task,
                    runs: 0,
                    busy_runs: 0,
                    busy_ticks: 0,
                    idle_ticks: 0,
                    shared,
                    block_fds: (0, 0),
                });
                // The control side may have given up waiting; the task is added regardless.
                let _ = reply.send(());
            }
            Command::Task(id, message) => match self.tasks.iter_mut().find(|p| p.task.id() == id) {
                Some(polled) => polled.task.control(message),
                None => tracing::warn!(core = self.core, ?id, "message for unknown task"),
            },
            Command::Shutdown => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one control message the test task understands.
    struct Remove(Reply<()>);

    /// Counts its polls; finishes when removed.
    struct Counting {
        id: TaskId,
        polls: Arc<AtomicU64>,
        removed: bool,
        work: Arc<AtomicBool>,
    }

    impl Task for Counting {
        fn id(&self) -> TaskId {
            self.id
        }
        fn poll(&mut self) -> usize {
            self.polls.fetch_add(1, Ordering::Relaxed);
            usize::from(self.work.load(Ordering::Relaxed))
        }
        fn control(&mut self, message: Message) {
            if let Ok(remove) = message.downcast::<Remove>() {
                self.removed = true;
                let _ = remove.0.send(());
            }
        }
        fn is_finished(&self) -> bool {
            self.removed
        }
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn reactor_polls_tasks_routes_commands_and_stops() {
        let reactor = spawn(0, IdlePolicy::Adaptive, Arc::new(NumaTopology::unknown())).unwrap();
        assert_eq!(reactor.core(), 0);
        let polls = Arc::new(AtomicU64::new(0));
        let work = Arc::new(AtomicBool::new(true));
        let task = Box::new(Counting {
            id: TaskId(7),
            polls: Arc::clone(&polls),
            removed: false,
            work: Arc::clone(&work),
        });
        reactor
            .call(|reply| Command::AddTask { task, reply })
            .unwrap();
        wait_until("polls", || polls.load(Ordering::Relaxed) > 1000);
        wait_until("busy time", || {
            reactor.stats().busy_ticks.load(Ordering::Relaxed) > 0
        });

        // A command for a task the reactor does not have is dropped, and the caller hears so.
        let unknown = reactor.task_call(TaskId(8), Remove);
        assert!(matches!(unknown, Err(ReactorError::Dropped(0))));
        // A message the task does not understand is dropped with its reply sender, too.
        let unknown = reactor.task_call(TaskId(7), |reply: Reply<()>| (reply, 0u8));
        assert!(matches!(unknown, Err(ReactorError::Dropped(0))));

        // A reactor that finds work in every round never sleeps (it may have slept before the
        // task arrived) ...
        let sleeps = || reactor.stats().idle_sleeps.load(Ordering::Relaxed);
        let busy_sleeps = sleeps();
        let seen = polls.load(Ordering::Relaxed);
        wait_until("more polls", || polls.load(Ordering::Relaxed) > seen + 1000);
        assert_eq!(sleeps(), busy_sleeps, "a busy reactor slept");
        // ... and an idle one backs off to sleeping. (State, not a rate: rates flake under load.)
        work.store(false, Ordering::Relaxed);
        wait_until("idle sleeps", || sleeps() > busy_sleeps);

        reactor.task_call(TaskId(7), Remove).unwrap();
        let after_remove = polls.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            polls.load(Ordering::Relaxed),
            after_remove,
            "a finished task is dropped"
        );

        reactor.shutdown();
        assert!(reactor.is_finished());
        assert!(reactor
            .call(|reply| Command::AddTask {
                task: Box::new(Counting {
                    id: TaskId(9),
                    polls: Arc::new(AtomicU64::new(0)),
                    removed: false,
                    work: Arc::new(AtomicBool::new(false)),
                }),
                reply,
            })
            .is_err());
    }

    #[test]
    fn a_manual_reactor_delivers_messages_to_the_task_its_caller_polls() {
        let (handle, mut manual) = manual(3);
        let mut task = Counting {
            id: TaskId(1),
            polls: Arc::new(AtomicU64::new(0)),
            removed: false,
            work: Arc::new(AtomicBool::new(false)),
        };
        let caller = {
            let handle = Arc::clone(&handle);
            std::thread::spawn(move || handle.task_call(TaskId(1), Remove))
        };
        while !caller.is_finished() {
            manual.deliver(&mut task);
            std::thread::yield_now();
        }
        caller.join().unwrap().unwrap();
        assert!(task.is_finished());
        // A message for another task is dropped, and its sender hears so.
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        handle.post(TaskId(2), Box::new(Remove(tx))).unwrap();
        assert_eq!(manual.deliver(&mut task), 0);
        assert!(rx.recv().is_err());
        drop(manual);
        assert!(matches!(
            handle.task_call(TaskId(1), Remove),
            Err(ReactorError::Gone(3))
        ));
    }

    /// Every tenth poll works for 2 ms; the others find nothing. The reactor is then busy
    /// almost all the time although only a tenth of its rounds are (counting rounds instead of
    /// time would report it 90 % idle).
    struct Bursty {
        polls: u64,
        working: Arc<AtomicBool>,
    }

    impl Task for Bursty {
        fn id(&self) -> TaskId {
            TaskId(1)
        }
        fn poll(&mut self) -> usize {
            self.polls += 1;
            if self.working.load(Ordering::Relaxed) && self.polls % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
                1
            } else {
                0
            }
        }
        fn control(&mut self, _message: Message) {}
        fn is_finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn busy_and_idle_time_follow_the_time_rounds_take_not_their_number() {
        let reactor = spawn(0, IdlePolicy::Adaptive, Arc::new(NumaTopology::unknown())).unwrap();
        let working = Arc::new(AtomicBool::new(true));
        let task = Box::new(Bursty {
            polls: 0,
            working: Arc::clone(&working),
        });
        reactor
            .call(|reply| Command::AddTask { task, reply })
            .unwrap();
        // In nanoseconds.
        let rate = u128::from(tsc::ticks_per_second());
        let times = || {
            let stats = reactor.stats();
            let ns = |ticks: u64| (u128::from(ticks) * 1_000_000_000 / rate) as u64;
            (
                ns(stats.busy_ticks.load(Ordering::Relaxed)),
                ns(stats.idle_ticks.load(Ordering::Relaxed)),
            )
        };
        // Past the reactor's idle start-up, then a window of the bursty load.
        std::thread::sleep(Duration::from_millis(100));
        let (busy0, idle0) = times();
        wait_until("a busy window", || times().0 > busy0 + 400_000_000);
        let (busy1, idle1) = times();
        let (busy, idle) = (busy1 - busy0, idle1 - idle0);
        assert!(
            busy > 4 * idle,
            "busy {busy} ns, idle {idle} ns over a window of 2 ms working rounds"
        );
        // Idle: only idle time grows.
        working.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        let (busy2, idle2) = times();
        wait_until("an idle window", || times().1 > idle2 + 200_000_000);
        let (busy3, _) = times();
        assert!(
            busy3 - busy2 < 50_000_000,
            "busy grew by {} ns while idle",
            busy3 - busy2
        );
        reactor.shutdown();
    }

    /// Waits on an eventfd between requests: `poll` reports work once per signal it saw.
    struct Kickable {
        kick: rvhost_platform_linux::EventFd,
        polls: Arc<AtomicU64>,
        prepared: Arc<AtomicU64>,
        kicked: Arc<AtomicU64>,
        pending: bool,
    }

    impl Task for Kickable {
        fn id(&self) -> TaskId {
            TaskId(5)
        }
        fn poll(&mut self) -> usize {
            self.polls.fetch_add(1, Ordering::Relaxed);
            usize::from(std::mem::take(&mut self.pending))
        }
        fn control(&mut self, _message: Message) {}
        fn is_finished(&self) -> bool {
            false
        }
        fn prepare_block(&mut self, fds: &mut Vec<libc::pollfd>) -> BlockReadiness {
            use std::os::fd::AsRawFd;
            self.prepared.fetch_add(1, Ordering::Relaxed);
            fds.push(waker::readable(self.kick.as_raw_fd()));
            BlockReadiness::Ready
        }
        fn end_block(&mut self, fds: &[libc::pollfd]) {
            if fds.first().is_some_and(|fd| fd.revents != 0) {
                self.kick.consume().unwrap();
                self.kicked.fetch_add(1, Ordering::Relaxed);
                self.pending = true;
            }
        }
    }

    #[test]
    fn a_reactor_with_a_wake_source_blocks_on_its_tasks_descriptors() {
        let reactor = spawn(0, IdlePolicy::Adaptive, Arc::new(NumaTopology::unknown())).unwrap();
        let (polls, prepared, kicked) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let kick = rvhost_platform_linux::EventFd::new().unwrap();
        let signal = kick.try_clone().unwrap();
        let task = Box::new(Kickable {
            kick,
            polls: Arc::clone(&polls),
            prepared: Arc::clone(&prepared),
            kicked: Arc::clone(&kicked),
            pending: false,
        });
        reactor
            .call(|reply| Command::AddTask { task, reply })
            .unwrap();
        // Negative control: without a wake-up source the reactor spins, yields and sleeps, and
        // never asks its tasks to block.
        wait_until("polls", || polls.load(Ordering::Relaxed) > 10_000);
        assert_eq!(prepared.load(Ordering::Relaxed), 0);

        let waker = reactor.waker.clone().expect("a reactor waker");
        waker.add_source();
        wait_until("a kick wait", || prepared.load(Ordering::Relaxed) > 0);
        // Blocked, it polls about twice per WAKER_WAIT (1 ms); spinning, thousands of times.
        let before = polls.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        let during = polls.load(Ordering::Relaxed) - before;
        assert!(during < 1000, "{during} polls in 50 ms of a kick wait");
        // A signal on the task's descriptor ends the wait, and the task is told so.
        signal.signal().unwrap();
        wait_until("the kick", || kicked.load(Ordering::Relaxed) > 0);

        // Back to polling once the source is gone.
        waker.remove_source();
        assert!(!waker.has_sources());
        reactor.shutdown();
    }

    #[test]
    fn idle_sleep_grows_to_its_cap() {
        assert_eq!(idle_sleep(0), IDLE_SLEEP);
        assert_eq!(idle_sleep(SLEEP_STEP_ROUNDS), IDLE_SLEEP * 2);
        assert_eq!(idle_sleep(SLEEP_STEP_ROUNDS * 3), IDLE_SLEEP * 8);
        assert_eq!(idle_sleep(u32::MAX), IDLE_SLEEP_MAX);
    }

    #[test]
    fn pinning_to_an_offline_core_fails_at_spawn() {
        let err = spawn(63, IdlePolicy::Adaptive, Arc::new(NumaTopology::unknown()));
        assert!(matches!(err, Err(SpawnError::Pin(_))));
    }
}
