//! Shared by the `rpc_*` integration tests: runs the real `rvhost` binary in a private directory
//! and talks to it over its RPC socket, raw or through SPDK's own client (`spdk-rpc`).

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long the target may take to start (a debug build zero-fills RAM bdevs slowly).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `rvhost` with its own socket directory and RPC socket.
pub struct Target {
    child: Option<Child>,
    /// Private directory: controller sockets, the RPC socket, the log.
    pub dir: PathBuf,
    /// The RPC socket.
    pub rpc: PathBuf,
}

fn unique_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Short: Unix socket paths are limited to 107 bytes.
    let dir = PathBuf::from(format!("/tmp/rvr-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the test directory");
    dir
}

impl Target {
    /// Starts `rvhost -S <dir> -r <dir>/rpc.sock -m 0x1 <extra>` and waits for its RPC socket.
    pub fn start(tag: &str, extra: &[&str]) -> Target {
        let dir = unique_dir(tag);
        let rpc = dir.join("rpc.sock");
        let log = std::fs::File::create(dir.join("rvhost.log")).expect("creating the log");
        let child = Command::new(env!("CARGO_BIN_EXE_rvhost"))
            .arg("-S")
            .arg(&dir)
            .arg("-r")
            .arg(&rpc)
            .args(["-m", "0x1"])
            .args(if extra.contains(&"-L") {
                &[][..]
            } else {
                &["-L", "info"][..]
            })
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning rvhost");
        let mut target = Target {
            child: Some(child),
            dir,
            rpc,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&target.rpc).is_err() {
            if let Some(status) = target.try_wait() {
                panic!(
                    "rvhost exited during start-up ({status}):\n{}",
                    target.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "rvhost did not start:\n{}",
                target.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        target
    }

    /// The target's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("rvhost.log")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "rvhost did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw connection to the RPC socket.
    pub fn connect(&self) -> Conn {
        let stream = UnixStream::connect(&self.rpc).expect("connecting to the RPC socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Conn {
            reader: BufReader::new(stream),
        }
    }

    /// Sends one request on a fresh connection and returns the whole reply object.
    pub fn call(&self, method: &str, params: Value) -> Value {
        let mut conn = self.connect();
        conn.request(&json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}))
    }

    /// The `result` of a call that must succeed.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        let reply = self.call(method, params.clone());
        match reply.get("result") {
            Some(result) => result.clone(),
            None => panic!("{method} {params} failed: {reply}\n{}", self.log()),
        }
    }

    /// The error `code` of a call that must fail.
    pub fn err_code(&self, method: &str, params: Value) -> i64 {
        let reply = self.call(method, params.clone());
        reply["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("{method} {params} should have failed: {reply}"))
    }

    /// Runs SPDK's client against this target.
    pub fn spdk_rpc(&self, args: &[&str]) -> Output {
        Command::new(spdk_rpc())
            .arg("-s")
            .arg(&self.rpc)
            .args(args)
            .output()
            .expect("running spdk-rpc")
    }

    /// Runs SPDK's client and returns its stdout, failing the test if it failed.
    pub fn spdk_ok(&self, args: &[&str]) -> String {
        let out = self.spdk_rpc(args);
        assert!(
            out.status.success(),
            "spdk-rpc {args:?} failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs SPDK's client and parses its JSON output.
    pub fn spdk_json(&self, args: &[&str]) -> Value {
        let text = self.spdk_ok(args);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("spdk-rpc {args:?} printed non-JSON ({e}): {text}"))
    }

    /// Runs SPDK's client for a call that must fail; returns what it printed.
    pub fn spdk_err(&self, args: &[&str]) -> String {
        let out = self.spdk_rpc(args);
        assert!(
            !out.status.success(),
            "spdk-rpc {args:?} should have failed"
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("rvhost log ({}):\n{}", self.dir.display(), self.log());
        }
    }
}

/// A raw RPC connection.
pub struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// Reads one reply line; `None` at end of stream.
    pub fn read_reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}")),
            ),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    /// Sends a request and reads its reply.
    pub fn request(&mut self, request: &Value) -> Value {
        self.send_raw(request.to_string().as_bytes())
            .expect("sending a request");
        self.read_reply()
            .expect("the server closed the connection instead of replying")
    }

    /// Reads until the server closes the connection; returns what was left unread.
    pub fn read_to_end(&mut self) -> String {
        let mut rest = String::new();
        let _ = self.reader.read_to_string(&mut rest);
        rest
    }
}

/// Path of SPDK's `spdk-rpc`, installing `spdk==26.9` from PyPI if it is missing.
pub fn spdk_rpc() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(found) = find_spdk_rpc() {
            return found;
        }
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "spdk==26.9"])
            .status()
            .expect("running pip to install SPDK's client");
        assert!(status.success(), "pip install spdk==26.9 failed");
        find_spdk_rpc().expect("spdk-rpc not found after pip install spdk==26.9")
    })
    .clone()
}

/// `spdk-rpc` on PATH, or in the scripts directory of `python3` (where pip puts it, even when a
/// version manager's shims have not been refreshed yet).
fn find_spdk_rpc() -> Option<PathBuf> {
    find_in_path("spdk-rpc").or_else(|| {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
            .ok()?;
        let dir = String::from_utf8(out.stdout).ok()?;
        let candidate = Path::new(dir.trim()).join("spdk-rpc");
        is_executable(&candidate).then_some(candidate)
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Waits (bounded) until `path` exists (`present`) or not.
pub fn wait_for_path(path: &Path, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() != present {
        assert!(
            Instant::now() < deadline,
            "{} {} in time",
            path.display(),
            if present {
                "did not appear"
            } else {
                "was not removed"
            }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
