//! Host-side plumbing: where things live, running commands, installing missing tools, and the
//! cross-process locks that keep concurrent test binaries from racing each other.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use rustix::fs::{flock, FlockOperation};

use crate::error::{HarnessError, Result};

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// Where downloaded and built guest assets are cached between runs (`RVHOST_GUEST_ASSETS`
/// overrides it).
pub fn assets_dir() -> PathBuf {
    std::env::var_os("RVHOST_GUEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build").join("guest-assets"))
}

/// Where each guest run keeps its initramfs, console log and results.
pub fn runs_dir() -> PathBuf {
    workspace_root().join("build").join("guest-runs")
}

pub(crate) fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| HarnessError::io("create directory", path, e))
}

/// Runs a command to completion, failing with its combined output when it does not succeed.
pub(crate) fn run(command: &mut Command) -> Result<Output> {
    let shown = format!("{command:?}");
    tracing::debug!(command = %shown, "running");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::Command {
            command: shown.clone(),
            status: "could not start".into(),
            output: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(HarnessError::Command {
            command: shown,
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(output)
}

pub(crate) fn run_stdout(command: &mut Command) -> Result<String> {
    run(command).map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds an executable in `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The Debian packages that provide each host tool the harness needs.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-storage-daemon", "qemu-system-common"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
    ("gzip", "gzip"),
    ("dpkg", "dpkg"),
    ("apt-get", "apt"),
    ("ldd", "libc-bin"),
];

/// Makes sure QEMU, a static busybox and the packaging tools are present, installing the missing
/// ones with apt when running as root (what `scripts/setup.sh` does for a whole checkout).
pub fn ensure_host_tools() -> Result<()> {
    static CHECKED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| check_and_install_tools().map_err(|e| e.to_string()))
        .clone()
        .map_err(|detail| HarnessError::MissingTool {
            tool: "(host tools)".into(),
            detail,
        })
}

fn busybox_is_static() -> bool {
    // `ldd` says "not a dynamic executable" (and fails) for a static binary.
    Command::new("ldd")
        .arg("/bin/busybox")
        .stdin(Stdio::null())
        .output()
        .map(|out| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.contains("not a dynamic executable") || text.contains("statically linked")
        })
        .unwrap_or(false)
}

fn check_and_install_tools() -> Result<()> {
    let mut missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|&(_, package)| package)
        .collect();
    if which("busybox").is_some() && !busybox_is_static() {
        missing.push("busybox-static");
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        return Err(HarnessError::MissingTool {
            tool: missing.join(" "),
            detail: "not root; run scripts/setup.sh as root".into(),
        });
    }
    tracing::info!(packages = ?missing, "installing missing host packages");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// An exclusive `flock` on a file, held until dropped; it also serialises threads of this
/// process because each holder opens its own file description.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| HarnessError::io("open lock file", path, e))?;
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| HarnessError::io("lock", path, e.into()))?;
        Ok(Self { _file: file })
    }
}

/// Serialises QEMU guests across every test binary and thread: the machine has two cores, and two
/// TCG guests at once only make both slower and their timeouts flakier.
pub fn qemu_slot() -> Result<FileLock> {
    FileLock::acquire(&assets_dir().join("qemu.lock"))
}
