//! Booting a QEMU guest (TCG) whose virtio devices are served by a vhost-user backend, running a
//! script in it and collecting its `RESULT key=value` lines from a dedicated serial port.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::assets::{build_initramfs, InitramfsSpec, Kernel};
use crate::error::{HarnessError, Result};
use crate::host;

/// The modules a virtio-blk guest needs.
pub const VIRTIO_BLK_MODULES: &[&str] = &[
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];
/// The modules a virtio-scsi guest needs (`sd_mod` gives `/dev/sdX`, `sg` gives raw SCSI access).
pub const VIRTIO_SCSI_MODULES: &[&str] = &[
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_scsi",
    "sd_mod",
    "sg",
];

/// One vhost-user device given to the guest.
#[derive(Debug, Clone)]
pub enum VhostUserDevice {
    Blk {
        socket: PathBuf,
        num_queues: u16,
    },
    Scsi {
        socket: PathBuf,
        num_queues: u16,
    },
    /// vhost-user-blk on a chardev with `reconnect=1`: QEMU reconnects by itself, once a second,
    /// to a backend that was stopped or died (and resumes the guest's I/O through it).
    BlkReconnect {
        socket: PathBuf,
        num_queues: u16,
    },
    /// The same device with packed virtqueues (`packed=on`: QEMU offers VIRTIO_F_RING_PACKED).
    Packed(Box<VhostUserDevice>),
}

impl VhostUserDevice {
    fn qemu_args(&self, index: usize) -> [String; 4] {
        // QEMU 7.2 spells the queue-count property differently for the two devices.
        let (socket, driver, queues, chardev_opts) = match self {
            Self::Packed(device) => {
                let mut args = device.qemu_args(index);
                args[3].push_str(",packed=on");
                return args;
            }
            Self::Blk { socket, num_queues } => (
                socket,
                "vhost-user-blk-pci",
                format!("num-queues={num_queues}"),
                "",
            ),
            Self::BlkReconnect { socket, num_queues } => (
                socket,
                "vhost-user-blk-pci",
                format!("num-queues={num_queues}"),
                ",reconnect=1",
            ),
            Self::Scsi { socket, num_queues } => (
                socket,
                "vhost-user-scsi-pci",
                format!("num_queues={num_queues}"),
                "",
            ),
        };
        [
            "-chardev".into(),
            format!(
                "socket,id=vhost{index},path={}{chardev_opts}",
                socket.display()
            ),
            "-device".into(),
            format!("{driver},chardev=vhost{index},{queues}"),
        ]
    }
}

/// How to boot one guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Names the run (directory under `build/guest-runs/`, messages).
    pub name: String,
    pub cpus: u8,
    pub memory_mib: u32,
    pub devices: Vec<VhostUserDevice>,
    pub initramfs: InitramfsSpec,
    /// How long the whole boot-run-poweroff may take. TCG on a loaded two-core box is slow.
    pub timeout: Duration,
    /// Appended to the kernel command line.
    pub kernel_args: String,
    /// How many times the guest may boot. 1 (the default) runs QEMU with `-no-reboot`, so a
    /// reboot or panic ends the run; more lets `reboot -f` in the script reset the whole machine
    /// (devices included) and boot again, and the run fails if the guest boots more often.
    pub boots: u8,
}

impl GuestConfig {
    /// A guest with the virtio-blk modules and `script`; add devices and binaries to taste.
    pub fn new(name: &str, script: &str) -> Self {
        Self {
            name: name.to_owned(),
            cpus: 1,
            memory_mib: 512,
            devices: Vec::new(),
            initramfs: InitramfsSpec {
                modules: VIRTIO_BLK_MODULES.iter().map(|m| (*m).to_owned()).collect(),
                binaries: Vec::new(),
                script: script.to_owned(),
                env: Vec::new(),
            },
            timeout: default_timeout(),
            kernel_args: String::new(),
            boots: 1,
        }
    }

    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn device(mut self, device: VhostUserDevice) -> Self {
        self.devices.push(device);
        self
    }

    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.initramfs.binaries.push(path.into());
        self
    }

    pub fn modules(mut self, modules: &[&str]) -> Self {
        self.initramfs.modules = modules.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.initramfs.env.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn boots(mut self, boots: u8) -> Self {
        self.boots = boots;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// `RVHOST_GUEST_TIMEOUT` (seconds) or 600 s.
fn default_timeout() -> Duration {
    let secs = std::env::var("RVHOST_GUEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok());
    Duration::from_secs(secs.unwrap_or(600))
}

/// What a finished guest reported.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub name: String,
    /// Every `RESULT` line in order (keys may repeat).
    pub lines: Vec<(String, String)>,
    /// The last value of each key.
    pub results: BTreeMap<String, String>,
    pub console: String,
    pub elapsed: Duration,
}

impl GuestOutput {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// Asserts `key` reported `expected`, failing the test with the guest's results and console.
    #[track_caller]
    pub fn assert_eq(&self, key: &str, expected: &str) {
        let found = self.get(key);
        if found != Some(expected) {
            panic!(
                "guest `{}`: {key} = {found:?}, expected {expected:?}\n{}",
                self.name,
                self.diagnostics()
            );
        }
    }

    /// Asserts every key starting with `prefix` reported `ok` (and that there is at least one).
    #[track_caller]
    pub fn assert_all_ok(&self, prefix: &str) {
        let mut checked = 0usize;
        let mut failed = Vec::new();
        for (key, value) in &self.lines {
            if key.starts_with(prefix) {
                checked += 1;
                if value != "ok" {
                    failed.push(format!("{key}={value}"));
                }
            }
        }
        if checked == 0 || !failed.is_empty() {
            panic!(
                "guest `{}`: {checked} checks named {prefix}*, failed: {failed:?}\n{}",
                self.name,
                self.diagnostics()
            );
        }
    }

    /// The value of `key` parsed as a number, failing the test otherwise.
    #[track_caller]
    pub fn number(&self, key: &str) -> u64 {
        match self.get(key).and_then(|v| v.trim().parse().ok()) {
            Some(n) => n,
            None => panic!(
                "guest `{}`: {key} = {:?} is not a number\n{}",
                self.name,
                self.get(key),
                self.diagnostics()
            ),
        }
    }

    /// All results and the tail of the console, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut text = String::from("---- guest results ----\n");
        for (key, value) in &self.lines {
            let _ = writeln!(text, "{key}={value}");
        }
        text.push_str("---- guest console (tail) ----\n");
        text.push_str(tail(&self.console, 120));
        text
    }
}

/// Parses the results port: `RESULT key=value` lines and the final `DONE`.
pub fn parse_results(text: &str) -> (Vec<(String, String)>, bool) {
    let mut lines = Vec::new();
    let mut done = false;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r').trim();
        if line == "DONE" {
            done = true;
        } else if let Some(rest) = line.strip_prefix("RESULT ") {
            if let Some((key, value)) = rest.split_once('=') {
                lines.push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
    }
    (lines, done)
}

fn tail(text: &str, max_lines: usize) -> &str {
    let mut start = text.len();
    for _ in 0..max_lines {
        match text[..start].rfind('\n') {
            Some(pos) => start = pos,
            None => return text,
        }
    }
    &text[start..]
}

/// Kills and reaps QEMU however the run ends, so no guest outlives its test.
struct QemuProcess {
    child: Child,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Boots the guest, waits for it to power off, and returns what its script reported. Fails if QEMU
/// fails, the guest times out, or the script did not reach `DONE`.
pub fn run_guest(config: &GuestConfig) -> Result<GuestOutput> {
    run_guest_with(config, |_, _| {})
}

/// Like [`run_guest`], but calls `on_result(key, value)` for each `RESULT` line as soon as the guest
/// prints it, on the calling thread, so a test can act on the host while the guest runs (e.g. the
/// script prints `RESULT phase=attach` and then waits for a hot-plugged disk; the callback issues
/// the RPC).
pub fn run_guest_with(
    config: &GuestConfig,
    mut on_result: impl FnMut(&str, &str),
) -> Result<GuestOutput> {
    let kernel = Kernel::get()?;
    let run_dir = host::runs_dir().join(format!(
        "{}-{}-{}",
        config.name,
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|e| HarnessError::io("clean", &run_dir, e))?;
    }
    host::create_dir_all(&run_dir)?;
    let initrd = run_dir.join("initramfs.cpio.gz");
    build_initramfs(&kernel, &config.initramfs, &initrd)?;

    let console = run_dir.join("console.log");
    let results = run_dir.join("results.txt");
    let qemu_log = run_dir.join("qemu.log");
    let mut command = qemu_command(config, &kernel, &initrd, &console, &results);
    let log_file = std::fs::File::create(&qemu_log)
        .map_err(|e| HarnessError::io("create qemu log", &qemu_log, e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| HarnessError::io("dup qemu log", &qemu_log, e))?;
    command
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);

    let _slot = host::qemu_slot()?;
    tracing::info!(name = %config.name, dir = %run_dir.display(), "booting guest");
    let started = Instant::now();
    let mut qemu = QemuProcess {
        child: command
            .spawn()
            .map_err(|e| HarnessError::io("start qemu", &run_dir, e))?,
    };
    let mut live = LiveResults::default();
    let mut boots = 0u32;
    let status = wait_with_timeout(&mut qemu.child, config.timeout, || {
        live.poll(&results, &mut |key: &str, value: &str| {
            // /init reports `modules` once per boot, before the script runs.
            if key == "modules" {
                boots += 1;
            }
            on_result(key, value);
        });
        boots <= u32::from(config.boots.max(1))
    })
    .map_err(|e| HarnessError::io("wait for qemu", &run_dir, e))?;
    let elapsed = started.elapsed();
    drop(qemu);

    let read = |path: &Path| std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
    let console_text = read(&console).unwrap_or_default();
    let results_text = read(&results).unwrap_or_default();
    let qemu_text = read(&qemu_log).unwrap_or_default();
    let (lines, done) = parse_results(&results_text);
    let diagnostics = || {
        format!(
            "run dir: {}\n---- qemu ----\n{}\n---- results port ----\n{}\n---- console (tail) ----\n{}",
            run_dir.display(),
            tail(&qemu_text, 40),
            results_text,
            tail(&console_text, 120)
        )
    };
    let status = match status {
        Waited::Exited(status) => status,
        Waited::TimedOut => {
            return Err(HarnessError::GuestTimeout {
                name: config.name.clone(),
                seconds: config.timeout.as_secs(),
                diagnostics: diagnostics(),
            })
        }
        Waited::Stopped => {
            return Err(HarnessError::GuestFailed {
                name: config.name.clone(),
                reason: format!("the guest booted more than {} time(s)", config.boots.max(1)),
                diagnostics: diagnostics(),
            })
        }
    };
    if !status.success() || !done {
        let reason = if done {
            format!("QEMU exited with {status}")
        } else {
            format!("the guest script never reported DONE (QEMU exited with {status})")
        };
        return Err(HarnessError::GuestFailed {
            name: config.name.clone(),
            reason,
            diagnostics: diagnostics(),
        });
    }
    let output = GuestOutput {
        name: config.name.clone(),
        results: lines.iter().cloned().collect(),
        lines,
        console: console_text.clone(),
        elapsed,
    };
    if output.get("modules") != Some("ok") {
        return Err(HarnessError::GuestFailed {
            name: config.name.clone(),
            reason: format!("kernel modules did not load: {:?}", output.get("modules")),
            diagnostics: diagnostics(),
        });
    }
    tracing::info!(name = %config.name, seconds = elapsed.as_secs_f64(), "guest finished");
    // Keep the run directory only when something went wrong; this one went fine.
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(output)
}

/// Follows the results file while the guest runs, handing out each complete new line once.
#[derive(Debug, Default)]
struct LiveResults {
    consumed: usize,
}

impl LiveResults {
    fn poll(&mut self, path: &Path, on_result: &mut impl FnMut(&str, &str)) {
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        let Some(fresh) = bytes.get(self.consumed..) else {
            return;
        };
        let Some(end) = fresh.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete = &fresh[..=end];
        self.consumed += complete.len();
        let (lines, _) = parse_results(&String::from_utf8_lossy(complete));
        for (key, value) in &lines {
            on_result(key, value);
        }
    }
}

/// How waiting for QEMU ended.
enum Waited {
    Exited(ExitStatus),
    TimedOut,
    /// `poll` asked to stop the guest.
    Stopped,
}

/// Waits for the child, calling `poll` every 100 ms (and once more after exit); `poll` returning
/// false stops the wait early. The caller kills the child on anything but `Exited`.
fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
    mut poll: impl FnMut() -> bool,
) -> std::io::Result<Waited> {
    let deadline = Instant::now() + timeout;
    loop {
        if !poll() {
            return Ok(Waited::Stopped);
        }
        if let Some(status) = child.try_wait()? {
            return Ok(if poll() {
                Waited::Exited(status)
            } else {
                Waited::Stopped
            });
        }
        if Instant::now() >= deadline {
            return Ok(Waited::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn qemu_command(
    config: &GuestConfig,
    kernel: &Kernel,
    initrd: &Path,
    console: &Path,
    results: &Path,
) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    let memory = format!("{}M", config.memory_mib);
    command
        .args([
            "-accel",
            "tcg",
            "-M",
            "q35",
            "-m",
            &memory,
            "-smp",
            &config.cpus.to_string(),
        ])
        .args(["-nodefaults", "-display", "none", "-no-user-config"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {}", config.kernel_args).trim_end())
        // vhost-user backends map guest RAM, so it must be a shareable fd.
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
        ])
        .args(["-numa", "node,memdev=mem"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()));
    if config.boots <= 1 {
        command.arg("-no-reboot");
    }
    for (index, device) in config.devices.iter().enumerate() {
        command.args(device.qemu_args(index));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse_with_crlf_noise_and_done() {
        let text = "junk\r\nRESULT a=1\r\nRESULT b = x=y \nRESULT a=2\nRESULT broken\nDONE\r\n";
        let (lines, done) = parse_results(text);
        assert!(done);
        assert_eq!(
            lines,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x=y".into()),
                ("a".into(), "2".into())
            ]
        );
        let (_, done) = parse_results("RESULT a=1\nDONE-ish\n");
        assert!(!done);
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc", 1), "\nc");
        assert_eq!(tail("a\nb\nc", 5), "a\nb\nc");
    }
}
