//! Live migration of a test guest between QEMU processes on this host (loopback only).
//!
//! [`MigrationRig::boot`] starts the first QEMU as [`crate::run_guest`] would (same kernel,
//! initramfs and command line) plus a QMP socket. [`MigrationRig::migrate`] starts another QEMU
//! with `-incoming tcp:127.0.0.1:PORT`, whose vhost-user devices may be served by another
//! backend process, and moves the guest there over QMP (`migrate`, `query-migrate` until
//! `completed`); the source then quits. [`MigrationRig::cancelled_migration`] starts one and
//! cancels it midway (`migrate_cancel`): the source must keep running.
//!
//! Each QEMU has its own results port (file): the guest's `RESULT` lines continue in the file of
//! the QEMU it runs on, and [`MigrationRig::poll_results`] follows them all in order.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::assets::{build_initramfs, Kernel};
use crate::error::{HarnessError, Result};
use crate::guest::{parse_results, qemu_command, GuestConfig, GuestOutput, VhostUserDevice};
use crate::host::{self, FileLock};

/// The downtime QEMU may plan for.
const DOWNTIME_MS: u64 = 1000;
/// The bandwidth of a migration: low enough that the first pass over RAM takes seconds, during
/// which the guest (and its backends) write pages already sent, which must then be sent again.
const BANDWIDTH: u64 = 16 << 20;

/// Environment knob for investigations, off by default (CI keeps the timing above): set to a
/// number of milliseconds, a migration starts with a 1 ms downtime limit, so it cannot converge,
/// keeps iterating (log syncs every round) for that long after its first pass over RAM, and only
/// then gets [`DOWNTIME_MS`] to finish.
pub const HOLD_ENV: &str = "RVHOST_MIGRATE_HOLD_MS";

/// The hold [`HOLD_ENV`] asks for, if any.
fn hold() -> Option<Duration> {
    std::env::var(HOLD_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// How long one migration (or a QMP answer) may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects (waiting for QEMU to create the socket) and leaves capabilities negotiation.
    pub fn connect(path: &Path, child: &mut Child) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(err) => {
                    if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                        return Err(HarnessError::io("connect QMP", path, err));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(MIGRATION_TIMEOUT))
            .map_err(|e| HarnessError::io("QMP timeout", path, e))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| HarnessError::io("dup QMP", path, e))?,
        );
        let mut qmp = Qmp {
            writer: stream,
            reader,
        };
        qmp.read_message()?; // greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| HarnessError::io("read QMP", "qmp", e))?;
        if n == 0 {
            return Err(qmp_error("QMP connection closed"));
        }
        serde_json::from_str(&line).map_err(|e| qmp_error(format!("bad QMP message {line}: {e}")))
    }

    /// Runs a command; its `return` value, or its `error` as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut text = json!({"execute": command, "arguments": arguments}).to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| HarnessError::io("write QMP", "qmp", e))?;
        loop {
            let message = self.read_message()?;
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = message.get("error") {
                return Err(qmp_error(format!("{command}: {err}")));
            }
            // An event: skip it.
        }
    }
}

fn qmp_error(detail: impl Into<String>) -> HarnessError {
    HarnessError::Rpc {
        method: "qmp".into(),
        detail: detail.into(),
    }
}

/// One QEMU process of the rig.
#[derive(Debug)]
struct Instance {
    child: Child,
    qmp: Qmp,
    results: PathBuf,
    console: PathBuf,
    log: PathBuf,
    /// Bytes of `results` already handed out.
    consumed: usize,
}

impl Instance {
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// How a migration ended.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// `query-migrate` at the end (status, total time, RAM transferred).
    pub info: Value,
}

/// A guest that moves between QEMU processes.
#[derive(Debug)]
pub struct MigrationRig {
    config: GuestConfig,
    kernel: Kernel,
    initrd: PathBuf,
    run_dir: PathBuf,
    /// Every QEMU started, in order; the guest runs on `current`.
    instances: Vec<Instance>,
    current: usize,
    _slot: FileLock,
}

impl MigrationRig {
    /// Boots the guest described by `config` (its devices on the first backend).
    pub fn boot(config: &GuestConfig) -> Result<Self> {
        let kernel = Kernel::get()?;
        let run_dir = host::runs_dir().join(format!("{}-{}", config.name, std::process::id()));
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .map_err(|e| HarnessError::io("clean", &run_dir, e))?;
        }
        host::create_dir_all(&run_dir)?;
        let initrd = run_dir.join("initramfs.cpio.gz");
        build_initramfs(&kernel, &config.initramfs, &initrd)?;
        let slot = host::qemu_slot()?;
        let mut rig = MigrationRig {
            config: config.clone(),
            kernel,
            initrd,
            run_dir,
            instances: Vec::new(),
            current: 0,
            _slot: slot,
        };
        let devices = config.devices.clone();
        rig.current = rig.spawn(&devices, None)?;
        Ok(rig)
    }

    fn spawn(&mut self, devices: &[VhostUserDevice], incoming: Option<u16>) -> Result<usize> {
        let n = self.instances.len();
        let path = |what: &str| self.run_dir.join(format!("{what}-{n}"));
        let (console, results, log, qmp_path) = (
            path("console"),
            path("results"),
            path("qemu.log"),
            path("qmp"),
        );
        let mut config = self.config.clone();
        config.devices = devices.to_vec();
        let mut command = qemu_command(&config, &self.kernel, &self.initrd, &console, &results);
        command
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(port) = incoming {
            command.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
        }
        let log_file = std::fs::File::create(&log)
            .map_err(|e| HarnessError::io("create qemu log", &log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| HarnessError::io("dup qemu log", &log, e))?;
        command
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        let mut child = command
            .spawn()
            .map_err(|e| HarnessError::io("start qemu", &log, e))?;
        let qmp = match Qmp::connect(&qmp_path, &mut child) {
            Ok(qmp) => qmp,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.failed(format!("QEMU {n} did not come up: {err}")));
            }
        };
        self.instances.push(Instance {
            child,
            qmp,
            results,
            console,
            log,
            consumed: 0,
        });
        Ok(n)
    }

    fn failed(&self, reason: String) -> HarnessError {
        HarnessError::GuestFailed {
            name: self.config.name.clone(),
            reason,
            diagnostics: self.diagnostics(),
        }
    }

    /// The tails of every QEMU's log, results and console.
    pub fn diagnostics(&self) -> String {
        let read = |p: &Path| {
            std::fs::read(p)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let tail = |text: String, lines: usize| {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let mut text = format!("run dir: {}\n", self.run_dir.display());
        for (i, instance) in self.instances.iter().enumerate() {
            text.push_str(&format!(
                "---- QEMU {i} log ----\n{}\n---- QEMU {i} results ----\n{}\n---- QEMU {i} console (tail) ----\n{}\n",
                tail(read(&instance.log), 20),
                read(&instance.results),
                tail(read(&instance.console), 40)
            ));
        }
        text
    }

    /// New `RESULT` lines of every QEMU (in the order the QEMUs started).
    pub fn poll_results(&mut self) -> Vec<(String, String)> {
        let mut lines = Vec::new();
        for instance in &mut self.instances {
            let Ok(bytes) = std::fs::read(&instance.results) else {
                continue;
            };
            let Some(fresh) = bytes.get(instance.consumed..) else {
                continue;
            };
            let Some(end) = fresh.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            instance.consumed += end + 1;
            let (found, _) = parse_results(&String::from_utf8_lossy(&fresh[..=end]));
            lines.extend(found);
        }
        lines
    }

    /// QMP of the QEMU the guest runs on.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.instances[self.current].qmp
    }

    fn free_port(&self) -> Result<u16> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| HarnessError::io("find a free port", "127.0.0.1:0", e))?;
        listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| HarnessError::io("find a free port", "127.0.0.1:0", e))
    }

    fn start_migration(
        &mut self,
        devices: &[VhostUserDevice],
        bandwidth: u64,
        pause_before_switchover: bool,
    ) -> Result<usize> {
        let port = self.free_port()?;
        let dest = self.spawn(devices, Some(port))?;
        let source = self.current;
        let qmp = &mut self.instances[source].qmp;
        qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "pause-before-switchover", "state": pause_before_switchover}
            ]}),
        )?;
        let downtime = if hold().is_some() { 1 } else { DOWNTIME_MS };
        qmp.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": bandwidth, "downtime-limit": downtime}),
        )?;
        qmp.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
        Ok(dest)
    }

    fn query_migrate(&mut self, source: usize) -> Result<Value> {
        self.instances[source]
            .qmp
            .execute("query-migrate", json!({}))
    }

    /// Moves the guest to a new QEMU whose devices are `devices` (served by the destination's
    /// backends). `at_switchover` runs once the source VM has stopped (its devices drained)
    /// and before the destination starts (QEMU's `pause-before-switchover`): what it changes on
    /// shared storage is the first thing the guest sees on the destination. The source quits
    /// once the destination runs.
    pub fn migrate(
        &mut self,
        devices: &[VhostUserDevice],
        at_switchover: impl FnOnce(),
    ) -> Result<Migrated> {
        let mut at_switchover = Some(at_switchover);
        let dest = self.start_migration(devices, BANDWIDTH, true)?;
        let source = self.current;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        // With a hold: when the first pass ended (the second dirty sync), and whether the
        // downtime limit was raised again.
        let mut hold = hold().map(|h| (h, None::<Instant>));
        let info = loop {
            let info = self.query_migrate(source)?;
            if let Some((length, first_pass)) = &mut hold {
                let syncs = info
                    .pointer("/ram/dirty-sync-count")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if first_pass.is_none() && syncs >= 2 {
                    *first_pass = Some(Instant::now());
                }
                if first_pass.is_some_and(|t| t.elapsed() >= *length) {
                    eprintln!("hold over after {syncs} dirty syncs");
                    self.instances[source].qmp.execute(
                        "migrate-set-parameters",
                        json!({"downtime-limit": DOWNTIME_MS}),
                    )?;
                    hold = None;
                }
            }
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => break info,
                Some("pre-switchover") => {
                    if let Some(hook) = at_switchover.take() {
                        hook();
                    }
                    self.instances[source]
                        .qmp
                        .execute("migrate-continue", json!({"state": "pre-switchover"}))?;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some("failed" | "cancelled") => {
                    return Err(self.failed(format!("migration ended: {info}")))
                }
                _ if Instant::now() > deadline => {
                    return Err(self.failed(format!("migration did not complete: {info}")))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        // The destination resumes by itself once the stream is in (no -S).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.instances[dest]
                .qmp
                .execute("query-status", json!({}))?;
            if status.get("status").and_then(Value::as_str) == Some("running") {
                break;
            }
            if Instant::now() > deadline {
                return Err(self.failed(format!("destination not running: {status}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.instances[source].qmp.execute("quit", json!({}));
        self.instances[source].stop();
        self.current = dest;
        Ok(Migrated { info })
    }

    /// Starts a migration to a new QEMU at a low bandwidth, cancels it once `after` has passed
    /// and it is still active, and checks the source runs on (the destination QEMU is stopped).
    pub fn cancelled_migration(
        &mut self,
        devices: &[VhostUserDevice],
        after: Duration,
    ) -> Result<Value> {
        let dest = self.start_migration(devices, 4 << 20, false)?;
        let source = self.current;
        std::thread::sleep(after);
        let info = self.query_migrate(source)?;
        if info.get("status").and_then(Value::as_str) != Some("active") {
            return Err(self.failed(format!(
                "migration to cancel is not active after {after:?}: {info}"
            )));
        }
        self.instances[source]
            .qmp
            .execute("migrate_cancel", json!({}))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = self.query_migrate(source)?;
            match info.get("status").and_then(Value::as_str) {
                Some("cancelled") => break,
                _ if Instant::now() > deadline => {
                    return Err(self.failed(format!("migration not cancelled: {info}")))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let status = self.instances[source]
            .qmp
            .execute("query-status", json!({}))?;
        if status.get("status").and_then(Value::as_str) != Some("running") {
            return Err(self.failed(format!("source not running after cancel: {status}")));
        }
        self.instances[dest].stop();
        Ok(info)
    }

    /// Waits for the guest to power off (its script done), following results meanwhile with
    /// `on_result`; returns every result of every QEMU.
    pub fn finish(
        mut self,
        timeout: Duration,
        mut on_result: impl FnMut(&mut Self, &str, &str) -> Result<()>,
        mut all: Vec<(String, String)>,
    ) -> Result<GuestOutput> {
        let started = Instant::now();
        loop {
            for (key, value) in self.poll_results() {
                on_result(&mut self, &key, &value)?;
                all.push((key, value));
            }
            let current = self.current;
            if let Ok(Some(status)) = self.instances[current].child.try_wait() {
                for line in self.poll_results() {
                    all.push(line);
                }
                let done = self.instances.iter().any(|i| {
                    std::fs::read_to_string(&i.results)
                        .map(|t| parse_results(&t).1)
                        .unwrap_or(false)
                });
                if !status.success() || !done {
                    return Err(self.failed(format!(
                        "the guest ended without DONE (QEMU exited with {status})"
                    )));
                }
                break;
            }
            if started.elapsed() > timeout {
                return Err(HarnessError::GuestTimeout {
                    name: self.config.name.clone(),
                    seconds: timeout.as_secs(),
                    diagnostics: self.diagnostics(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let console = self
            .instances
            .iter()
            .map(|i| std::fs::read_to_string(&i.console).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---- next QEMU ----\n");
        let output = GuestOutput {
            name: self.config.name.clone(),
            results: all.iter().cloned().collect(),
            lines: all,
            console,
            elapsed: started.elapsed(),
        };
        for instance in &mut self.instances {
            instance.stop();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        Ok(output)
    }
}

impl Drop for MigrationRig {
    fn drop(&mut self) {
        for instance in &mut self.instances {
            instance.stop();
        }
    }
}
