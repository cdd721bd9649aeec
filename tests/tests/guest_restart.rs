//! rvhost killed with SIGKILL under a real guest's I/O and restarted from its `save_config`
//! output, ten times in one boot, with QEMU's `vhost-user-blk-pci` on a `reconnect=1` chardev
//! (the operator's flow). The disk is an AIO file bdev under a delay bdev that makes 1 % of
//! requests 60 ms slower, so completions come out of order and a kill finds requests in flight
//! behind completed ones. Eight verifying writers in the guest (`blkcheck writers`) must see no
//! error, every acknowledged write must read back, and no single I/O may wait more than a few
//! seconds across the restarts.
//!
//! In the same boot, ten graceful restarts (SIGTERM: rvhost drains what is in flight, exits 0 and
//! says how many requests it drained) under the same writers, and the negative control: the same restarts with inflight tracking withheld
//! (`RVHOST_TEST_NO_INFLIGHT=1`) must make the writers detect a loss (a request that never
//! completes, or data that is not what was acknowledged).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use rvhost_tests::files::{scratch_dir, sparse_file};
use rvhost_tests::host::which;
use rvhost_tests::{
    init_test_logging, run_guest_with, rvhost_binary, GuestConfig, VhostUserDevice,
};

const SCRIPT: &str = include_str!("../guest/blk_restart.sh");
const RESTARTS: u32 = 10;
/// Writers' run time per phase (covers the ten restarts).
const RUN_SECONDS: u64 = 45;
/// A single I/O waiting this long is lost.
const HANG_SECONDS: u64 = 20;
/// "I/O resumes within a few seconds": the longest a guest I/O may wait across a restart.
const MAX_STALL_MS: u64 = 8000;

fn spawn(dir: &Path, extra: &[&str], no_inflight: bool, run: u32) -> Child {
    let rpc = dir.join("rpc.sock");
    let _ = std::fs::remove_file(&rpc);
    let log = std::fs::File::create(dir.join(format!("rvhost-{run}.log"))).expect("log");
    let mut cmd = Command::new(rvhost_binary().expect("rvhost binary"));
    cmd.arg("-S")
        .arg(dir)
        .arg("-r")
        .arg(&rpc)
        .args(["-m", "0x1", "--no-default", "-L", "info"])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if no_inflight {
        cmd.env("RVHOST_TEST_NO_INFLIGHT", "1");
    } else {
        cmd.env_remove("RVHOST_TEST_NO_INFLIGHT");
    }
    let mut child = cmd.spawn().expect("spawn rvhost");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&rpc).is_err() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "rvhost exited at start"
        );
        assert!(Instant::now() < deadline, "rvhost did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn spdk_rpc(dir: &Path, args: &[&str]) -> String {
    let client = which("spdk-rpc").expect("spdk-rpc (scripts/setup.sh installs it)");
    let out = Command::new(client)
        .arg("-s")
        .arg(dir.join("rpc.sock"))
        .args(args)
        .output()
        .expect("spdk-rpc");
    assert!(
        out.status.success(),
        "spdk-rpc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops rvhost with SIGTERM and returns what went wrong, if anything: it must exit 0 within
/// its shutdown timeout and log the drain.
fn terminate(child: &mut Child, dir: &Path, run: u32) -> Option<String> {
    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
    if pid.is_none_or(|pid| kill_process(pid, Signal::TERM).is_err()) {
        kill9(child);
        return Some(format!("run {run}: kill -TERM failed"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                kill9(child);
                return Some(format!(
                    "run {run}: rvhost did not exit within 30 s of SIGTERM"
                ));
            }
        }
    };
    let log = std::fs::read_to_string(dir.join(format!("rvhost-{run}.log"))).unwrap_or_default();
    if !status.success() {
        return Some(format!(
            "run {run}: rvhost exited with {status} after SIGTERM"
        ));
    }
    if !log.contains("drained") {
        return Some(format!(
            "run {run}: no drain line in rvhost's log after SIGTERM"
        ));
    }
    None
}

#[test]
fn guest_io_survives_ten_sigkill_and_ten_sigterm_restarts_and_the_control_loses_it() {
    init_test_logging();
    let dir = scratch_dir("restart");
    let image = dir.join("disk.img");
    sparse_file(&image, 64 << 20);
    let mut target = spawn(&dir, &[], false, 0);
    let image_s = image.to_str().expect("utf-8");
    spdk_rpc(&dir, &["bdev_aio_create", image_s, "Aio0", "512"]);
    spdk_rpc(
        &dir,
        &[
            "bdev_delay_create",
            "-b",
            "Aio0",
            "-d",
            "Delay0",
            "-r",
            "300",
            "-t",
            "60000",
            "-w",
            "300",
            "-n",
            "60000",
        ],
    );
    spdk_rpc(&dir, &["vhost_create_blk_controller", "vhost.0", "Delay0"]);
    let config = dir.join("rvhost.json");
    std::fs::write(&config, spdk_rpc(&dir, &["save_config"])).expect("config");
    let config = config.to_str().expect("utf-8").to_string();

    let guest = GuestConfig::new("blk-restart", SCRIPT)
        .device(VhostUserDevice::BlkReconnect {
            socket: dir.join("vhost.0"),
            num_queues: 1,
        })
        .binary(env!("CARGO_BIN_EXE_blkcheck"))
        .env("PHASES", "inflight graceful control")
        .env("RUN_SECONDS", RUN_SECONDS)
        .env("HANG_SECONDS", HANG_SECONDS)
        .timeout(Duration::from_secs(600));
    let mut runs = 0u32;
    let mut stop_failures = Vec::new();
    let mut seed = 0x9e37_79b9u64;
    let mut pause = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Duration::from_millis(1500 + (seed >> 33) % 1500)
    };
    let output = run_guest_with(&guest, |key, value| {
        if key != "phase" {
            return;
        }
        let no_inflight = value == "control";
        if no_inflight {
            // The control's backends do not offer inflight tracking from the first one on.
            kill9(&mut target);
            runs += 1;
            target = spawn(&dir, &["-c", &config], true, runs);
        }
        let graceful = value == "graceful";
        for _ in 0..RESTARTS {
            std::thread::sleep(pause());
            if graceful {
                stop_failures.extend(terminate(&mut target, &dir, runs));
            } else {
                kill9(&mut target);
            }
            runs += 1;
            target = spawn(&dir, &["-c", &config], no_inflight, runs);
        }
    });
    kill9(&mut target);
    let output = output.unwrap_or_else(|e| panic!("guest run failed: {e}"));
    let inflight = output
        .get("inflight_writers")
        .unwrap_or("missing")
        .to_string();
    let graceful = output
        .get("graceful_writers")
        .unwrap_or("missing")
        .to_string();
    let control = output
        .get("control_writers")
        .unwrap_or("missing")
        .to_string();
    eprintln!("inflight phase: {inflight}; graceful phase: {graceful}; control phase: {control}");
    assert!(
        inflight.starts_with("ok:"),
        "writers across {RESTARTS} SIGKILL restarts: {inflight}\n{}",
        output.diagnostics()
    );
    let max_ms: u64 = inflight
        .rsplit("max_ms=")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("max_ms");
    assert!(
        max_ms < MAX_STALL_MS,
        "a guest I/O waited {max_ms} ms across a restart"
    );
    assert!(
        graceful.starts_with("ok:"),
        "writers across {RESTARTS} SIGTERM restarts: {graceful}\n{}",
        output.diagnostics()
    );
    let graceful_max_ms: u64 = graceful
        .rsplit("max_ms=")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("max_ms");
    assert!(
        graceful_max_ms < MAX_STALL_MS,
        "a guest I/O waited {graceful_max_ms} ms across a graceful restart"
    );
    assert!(
        stop_failures.is_empty(),
        "graceful stops: {stop_failures:?}"
    );
    assert!(
        !control.starts_with("ok:") && control != "missing",
        "negative control: the same restarts without inflight tracking went unnoticed: {control}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
