//! The vhost-user backends a test guest talks to: `qemu-storage-daemon` (the reference peer that
//! keeps the harness honest) and the `rvhost` binary under test, with a raw JSON-RPC client for it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde_json::{json, Value};

use crate::error::{HarnessError, Result};
use crate::host;

static PEER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A peer's scratch directory, removed when dropped (also when the peer fails to start; its log
/// is in the error by then).
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh scratch directory for one peer. Unix socket paths are limited to 108 bytes, so these
/// live under `/tmp` rather than deep inside the checkout.
fn scratch_dir(kind: &str) -> Result<ScratchDir> {
    let dir = std::env::temp_dir().join(format!(
        "rvhost-{kind}-{}-{}",
        std::process::id(),
        PEER_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| HarnessError::io("clean", &dir, e))?;
    }
    host::create_dir_all(&dir)?;
    Ok(ScratchDir(dir))
}

/// A child process that is stopped (SIGTERM, then SIGKILL) and reaped when dropped.
#[derive(Debug)]
struct ManagedChild {
    child: Child,
    log: PathBuf,
}

impl ManagedChild {
    fn spawn(mut command: Command, log: PathBuf) -> Result<Self> {
        let out =
            std::fs::File::create(&log).map_err(|e| HarnessError::io("create log", &log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io("dup log", &log, e))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| HarnessError::io("spawn", &log, e))?;
        Ok(Self { child, log })
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `path` exists, failing early if the process dies.
    fn wait_for_path(&mut self, peer: &'static str, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if path.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(HarnessError::PeerStart {
                    peer,
                    detail: format!(
                        "exited with {status} before creating {}:\n{}",
                        path.display(),
                        self.log_text()
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::PeerStart {
                    peer,
                    detail: format!(
                        "{} did not appear within {timeout:?}:\n{}",
                        path.display(),
                        self.log_text()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops and reaps the process: SIGTERM first when `graceful` (so it shuts down the way an
    /// operator would stop it), SIGKILL after 10 s or right away otherwise.
    fn stop(&mut self, graceful: bool) {
        if self.is_running() && graceful {
            if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process(pid, Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Which qemu-storage-daemon block driver backs the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QsdBacking {
    /// A RAM-backed file of the given size (in `/dev/shm` when available).
    File { size_bytes: u64 },
    /// `null-co`: reads return zeros, writes vanish.
    Null { size_bytes: u64 },
}

/// Options for a qemu-storage-daemon vhost-user-blk export.
#[derive(Debug, Clone)]
pub struct QsdOptions {
    pub backing: QsdBacking,
    pub logical_block_size: u32,
    pub num_queues: u16,
    pub writable: bool,
}

impl Default for QsdOptions {
    fn default() -> Self {
        Self {
            backing: QsdBacking::File {
                size_bytes: 64 << 20,
            },
            logical_block_size: 512,
            num_queues: 1,
            writable: true,
        }
    }
}

/// A running `qemu-storage-daemon` exporting one vhost-user-blk device.
#[derive(Debug)]
pub struct Qsd {
    // Dropped in this order: the process goes before its directory.
    process: ManagedChild,
    dir: ScratchDir,
    socket: PathBuf,
    pub options: QsdOptions,
}

impl Qsd {
    pub fn start(options: QsdOptions) -> Result<Self> {
        host::ensure_host_tools()?;
        let dir = scratch_dir("qsd")?;
        let socket = dir.join("blk.sock");
        let blockdev = match options.backing {
            QsdBacking::File { size_bytes } => {
                let image = dir.join("disk.img");
                let file = std::fs::File::create(&image)
                    .map_err(|e| HarnessError::io("create image", &image, e))?;
                file.set_len(size_bytes)
                    .map_err(|e| HarnessError::io("size image", &image, e))?;
                // discard=unmap passes the guest's discards down to the image file.
                format!(
                    "driver=file,node-name=disk,filename={},discard=unmap",
                    image.display()
                )
            }
            QsdBacking::Null { size_bytes } => {
                format!("driver=null-co,node-name=disk,size={size_bytes},read-zeroes=on")
            }
        };
        let export = format!(
            "type=vhost-user-blk,id=export0,node-name=disk,addr.type=unix,addr.path={},\
             writable={},num-queues={},logical-block-size={}",
            socket.display(),
            if options.writable { "on" } else { "off" },
            options.num_queues,
            options.logical_block_size
        );
        let mut command = Command::new("qemu-storage-daemon");
        command.args(["--blockdev", &blockdev, "--export", &export]);
        let mut process = ManagedChild::spawn(command, dir.join("qsd.log"))?;
        process.wait_for_path("qemu-storage-daemon", &socket, Duration::from_secs(30))?;
        Ok(Self {
            process,
            dir,
            socket,
            options,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The image file behind a `File` backing (the host may read or change it under the guest).
    pub fn image(&self) -> Option<PathBuf> {
        matches!(self.options.backing, QsdBacking::File { .. }).then(|| self.dir.join("disk.img"))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // qemu-storage-daemon has nothing to flush for us: kill it rather than wait.
        self.process.stop(false);
    }
}

/// Finds or builds the `rvhost` binary: `RVHOST_BIN` if set, else `cargo build --release -p
/// rvhost-target` into `build/guest-rvhost` (a separate target dir, because the `cargo test` that
/// runs us holds the lock on its own).
pub fn rvhost_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            build_workspace_binary("rvhost-target", "rvhost", "RVHOST_BIN", "guest-rvhost")
        })
        .clone()
        .map_err(HarnessError::RvhostUnavailable)
}

/// Finds or builds `blkcheck` (the in-guest checker) for test packages other than this one, which
/// cannot use `CARGO_BIN_EXE_blkcheck`. `RVHOST_BLKCHECK` overrides.
pub fn blkcheck_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            build_workspace_binary("rvhost-tests", "blkcheck", "RVHOST_BLKCHECK", "guest-tools")
        })
        .clone()
        .map_err(|detail| HarnessError::MissingTool {
            tool: "blkcheck".into(),
            detail,
        })
}

fn build_workspace_binary(
    package: &str,
    binary: &str,
    override_var: &str,
    target_dir: &str,
) -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(override_var) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{override_var}={} is not a file", path.display()))
        };
    }
    let root = host::workspace_root();
    let target = root.join("build").join(target_dir);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    tracing::info!(package, "building {binary} for guest tests");
    let output = Command::new(cargo)
        .args(["build", "--release", "-p", package, "--bin", binary])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo build --release -p {package} --bin {binary}` failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let path = target.join("release").join(binary);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("cargo succeeded but {} is missing", path.display()))
    }
}

/// A running `rvhost` target (`rvhost -S SOCKDIR -m 0x1 -r RPCSOCK`). Without a config it serves
/// `Malloc0` (256 MiB, 512 B blocks) as the vhost-user-blk controller `vhost.0`.
#[derive(Debug)]
pub struct Rvhost {
    process: ManagedChild,
    /// Held for its `Drop`: removes sockets and log after the process is gone.
    _dir: ScratchDir,
    socket_dir: PathBuf,
    rpc_socket: PathBuf,
    next_id: u64,
}

impl Rvhost {
    /// Starts rvhost with its default configuration and waits for `vhost.0` and the RPC socket.
    pub fn start() -> Result<Self> {
        Self::start_with_args(&[])
    }

    /// Starts rvhost with extra command-line arguments.
    pub fn start_with_args(extra: &[&str]) -> Result<Self> {
        Self::start_with_env(extra, &[])
    }

    /// Starts rvhost with extra command-line arguments and environment variables (test switches
    /// such as `RVHOST_TEST_NO_DIRTY_MARKING`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let binary = rvhost_binary()?;
        let dir = scratch_dir("rvhost")?;
        let socket_dir = dir.join("sockets");
        host::create_dir_all(&socket_dir)?;
        let rpc_socket = dir.join("rpc.sock");
        let mut command = Command::new(&binary);
        command
            .arg("-S")
            .arg(&socket_dir)
            .args(["-m", "0x1"])
            .arg("-r")
            .arg(&rpc_socket)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied());
        let mut process = ManagedChild::spawn(command, dir.join("rvhost.log"))?;
        let timeout = Duration::from_secs(60);
        process.wait_for_path("rvhost", &rpc_socket, timeout)?;
        let mut rvhost = Self {
            process,
            _dir: dir,
            socket_dir,
            rpc_socket,
            next_id: 1,
        };
        let default_controller = rvhost.controller_socket("vhost.0");
        rvhost
            .process
            .wait_for_path("rvhost", &default_controller, timeout)?;
        Ok(rvhost)
    }

    /// The vhost-user socket of a controller.
    pub fn controller_socket(&self, controller: &str) -> PathBuf {
        self.socket_dir.join(controller)
    }

    /// The vhost-user socket of a controller, once it exists (controllers created by RPC start
    /// listening on their reactor, shortly after the reply).
    ///
    /// # Panics
    /// When the socket does not appear within 30 s or rvhost exits first; the message carries
    /// rvhost's log.
    pub fn wait_controller_socket(&mut self, controller: &str) -> PathBuf {
        let socket = self.controller_socket(controller);
        if let Err(err) = self
            .process
            .wait_for_path("rvhost", &socket, Duration::from_secs(30))
        {
            panic!("{err}");
        }
        socket
    }

    /// Runs a guest against this rvhost and returns its results; panics with rvhost's log when
    /// the guest fails or rvhost is no longer running afterwards.
    pub fn run_guest(&mut self, config: &crate::guest::GuestConfig) -> crate::guest::GuestOutput {
        let out = match crate::guest::run_guest(config) {
            Ok(out) => out,
            Err(err) => panic!("{err}\n---- rvhost log ----\n{}", self.log()),
        };
        assert!(
            self.is_running(),
            "rvhost exited\n---- rvhost log ----\n{}",
            self.log()
        );
        out
    }

    pub fn rpc_socket(&self) -> &Path {
        &self.rpc_socket
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// [`Rvhost::rpc`] for tests: the result, or a panic that shows the call, the error and
    /// rvhost's log.
    ///
    /// # Panics
    /// When the call fails.
    pub fn rpc_ok(&mut self, method: &str, params: Value) -> Value {
        match self.rpc(method, params.clone()) {
            Ok(v) => v,
            Err(err) => panic!(
                "{method} {params}: {err}\n---- rvhost log ----\n{}",
                self.log()
            ),
        }
    }

    /// One raw JSON-RPC 2.0 call; returns `result`, or the error object as an `Rpc` error.
    pub fn rpc(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let rpc_err = |detail: String| HarnessError::Rpc {
            method: method.to_owned(),
            detail,
        };
        let mut stream =
            UnixStream::connect(&self.rpc_socket).map_err(|e| rpc_err(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| rpc_err(format!("timeout: {e}")))?;
        let mut text = request.to_string();
        text.push('\n');
        stream
            .write_all(text.as_bytes())
            .map_err(|e| rpc_err(format!("send: {e}")))?;
        let response: Value = serde_json::Deserializer::from_reader(&stream)
            .into_iter::<Value>()
            .next()
            .ok_or_else(|| rpc_err("connection closed without a response".into()))?
            .map_err(|e| rpc_err(format!("bad response: {e}")))?;
        if response.get("id") != Some(&json!(id)) {
            return Err(rpc_err(format!("response id mismatch: {response}")));
        }
        if let Some(error) = response.get("error") {
            return Err(rpc_err(format!("error response: {error}")));
        }
        response
            .get("result")
            .cloned()
            .ok_or_else(|| rpc_err(format!("no result in {response}")))
    }

    /// Creates a malloc bdev and a vhost-blk controller on it; returns the controller's socket.
    pub fn create_malloc_blk(
        &mut self,
        bdev: &str,
        num_blocks: u64,
        block_size: u32,
        controller: &str,
        readonly: bool,
    ) -> Result<PathBuf> {
        self.rpc(
            "bdev_malloc_create",
            json!({"name": bdev, "num_blocks": num_blocks, "block_size": block_size}),
        )?;
        self.rpc(
            "vhost_create_blk_controller",
            json!({"ctrlr": controller, "dev_name": bdev, "readonly": readonly}),
        )?;
        let socket = self.controller_socket(controller);
        self.process
            .wait_for_path("rvhost", &socket, Duration::from_secs(30))?;
        Ok(socket)
    }
}

impl Drop for Rvhost {
    fn drop(&mut self) {
        self.process.stop(true);
    }
}
