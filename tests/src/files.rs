//! Host-side helpers for guest tests whose disks are files: scratch directories on a real
//! filesystem, sparse backing files, a tiny tmpfs to run out of space on, and checks of what the
//! guest left in a file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{seek, SeekFrom};

use crate::host::workspace_root;

/// A fresh directory under `build/guest-file/` (the build disk: a real filesystem, so `O_DIRECT`
/// and holes behave as on a user's disk), unique to this process.
///
/// # Panics
/// When the directory cannot be created: these are test helpers.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = workspace_root()
        .join("build")
        .join("guest-file")
        .join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Creates (or truncates) `path` as a sparse file of `len` bytes.
///
/// # Panics
/// When the file cannot be created.
pub fn sparse_file(path: &Path, len: u64) {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// A tmpfs of a given size mounted at a directory, unmounted (and the directory removed) on drop.
/// Needs root.
#[derive(Debug)]
pub struct TinyTmpfs {
    dir: PathBuf,
}

impl TinyTmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `1M`) at `dir`, creating it.
    ///
    /// # Panics
    /// When the mount fails (this needs root).
    pub fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap_or_else(|e| panic!("running mount: {e}"));
        assert!(
            mounted.success(),
            "mounting a {size} tmpfs failed (needs root)"
        );
        TinyTmpfs { dir }
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs `blkcheck verify FILE OFFSET LEN SEED` on the host: the pattern the guest's
/// `blkcheck write` with the same seed left at that range of the backing file.
pub fn host_verify(
    blkcheck: &Path,
    file: &Path,
    offset: u64,
    len: u64,
    seed: u64,
) -> Result<(), String> {
    let out = Command::new(blkcheck)
        .arg("verify")
        .arg(file)
        .args([offset.to_string(), len.to_string(), seed.to_string()])
        .output()
        .map_err(|e| format!("cannot run blkcheck: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The first hole at or after `offset` in `file` (`SEEK_HOLE`; the end of the file if none).
///
/// # Panics
/// When the file cannot be opened or sought.
pub fn next_hole(file: &Path, offset: u64) -> u64 {
    let f = File::open(file).unwrap_or_else(|e| panic!("opening {}: {e}", file.display()));
    seek(&f, SeekFrom::Hole(offset)).unwrap_or_else(|e| panic!("SEEK_HOLE: {e}"))
}
