//! A one-host Ceph cluster for the rbd tests: `scripts/ceph-cluster.sh` started in a private
//! directory, stopped (by the PIDs it recorded) and removed when dropped.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster with pool `rbd`.
pub struct Ceph {
    /// Its directory: `ceph.conf`, `ceph.client.admin.keyring`, `mon_host`, `admin.key`, logs.
    pub dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

impl Ceph {
    /// Starts a cluster with `osds` OSDs (1 or 2) in a fresh directory.
    pub fn start(tag: &str, osds: u32) -> Ceph {
        let dir = PathBuf::from(format!("/tmp/rvceph-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .args(["--osds", &osds.to_string()])
            .env_remove("CEPH_ARGS")
            .env_remove("CEPH_KEYRING")
            .output()
            .expect("running scripts/ceph-cluster.sh");
        let ceph = Ceph { dir };
        assert!(
            out.status.success(),
            "the test cluster did not start:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ceph
    }

    /// `DIR/ceph.conf`.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// client.admin's keyring.
    pub fn keyring(&self) -> PathBuf {
        self.dir.join("ceph.client.admin.keyring")
    }

    /// The monitor's `IP:port`.
    pub fn mon_host(&self) -> String {
        std::fs::read_to_string(self.dir.join("mon_host"))
            .expect("mon_host")
            .trim()
            .to_owned()
    }

    /// client.admin's secret.
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_owned()
    }

    /// Runs `rbd -c DIR/ceph.conf ARGS` and returns its stdout, failing the test if it fails.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("timeout")
            .arg("60")
            .arg("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("running rbd");
        assert!(
            out.status.success(),
            "rbd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs the cluster script's `cmd` (`kill-osd ID`, `start-osd ID`).
    pub fn script(&self, cmd: &str, args: &[&str]) {
        let out = Command::new("bash")
            .arg(script())
            .arg(cmd)
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("running scripts/ceph-cluster.sh");
        assert!(
            out.status.success(),
            "ceph-cluster.sh {cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("ceph logs kept in {}", self.dir.display());
        }
    }
}
