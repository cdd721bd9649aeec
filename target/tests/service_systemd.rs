//! rvhost as a systemd service: `contrib/systemd/rvhost.service` passes `systemd-analyze
//! verify`, and the real binary started with `NOTIFY_SOCKET` (as systemd starts a `Type=notify`
//! unit) sends `READY=1` only once its RPC socket and every configured controller socket accept
//! connections, and `STOPPING=1` when SIGTERM stops it.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../contrib/systemd/rvhost.service"
);

fn temp_dir(tag: &str) -> PathBuf {
    // Short: Unix socket paths are limited to 107 bytes.
    let dir = PathBuf::from(format!("/tmp/rvsd-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    dir
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(UNIT).expect("reading the unit");
    assert!(unit.contains("\nType=notify\n"), "{unit}");
    let exec = "ExecStart=/usr/local/bin/rvhost -c /etc/rvhost/rvhost.json\n";
    assert!(unit.contains(exec), "{unit}");
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = temp_dir("verify");
    let copy = dir.join("rvhost.service");
    let built = format!(
        "ExecStart={} -c /etc/rvhost/rvhost.json\n",
        env!("CARGO_BIN_EXE_rvhost")
    );
    std::fs::write(&copy, unit.replace(exec, &built)).expect("writing the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("running systemd-analyze (scripts/setup.sh installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and bad values are only warnings: any about this unit fails the test.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("rvhost.service"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads the next notification (newline-separated `KEY=VALUE` lines).
fn next_notification(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification from rvhost in time");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn listens(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

#[test]
fn ready_is_sent_once_every_socket_listens_and_stopping_on_sigterm() {
    let dir = temp_dir("notify");
    let notify = UnixDatagram::bind(dir.join("notify")).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    // A RAM bdev large enough that start-up takes a while before the controllers exist, a
    // vhost-blk and a vhost-scsi controller.
    let config = dir.join("rvhost.json");
    let text = serde_json::json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 262144, "block_size": 512}},
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc1", "num_blocks": 2048, "block_size": 512}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "blk.0", "dev_name": "Malloc0"}}]},
        {"subsystem": "vhost_scsi", "config": [
            {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "scsi.0"}},
            {"method": "vhost_scsi_controller_add_target",
             "params": {"ctrlr": "scsi.0", "scsi_target_num": 0, "bdev_name": "Malloc1"}}]}]});
    std::fs::write(&config, text.to_string()).expect("writing the configuration");
    let rpc = dir.join("rpc.sock");
    let log = std::fs::File::create(dir.join("rvhost.log")).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rvhost"))
        .arg("-S")
        .arg(&dir)
        .arg("-r")
        .arg(&rpc)
        .args(["-m", "0x1", "-L", "info", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", dir.join("notify"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning rvhost");
    let read_log = || std::fs::read_to_string(dir.join("rvhost.log")).unwrap_or_default();

    let first = next_notification(&notify);
    // Checked as soon as READY arrives: each socket must accept a connection already.
    let listening = [
        ("RPC", listens(&rpc)),
        ("blk.0", listens(&dir.join("blk.0"))),
        ("scsi.0", listens(&dir.join("scsi.0"))),
    ];
    assert!(
        first.iter().any(|l| l == "READY=1"),
        "first notification {first:?}\n{}",
        read_log()
    );
    for (what, ok) in listening {
        assert!(ok, "READY=1 sent before the {what} socket listened");
    }
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("STATUS=serving 2 controllers")),
        "{first:?}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let stopping = next_notification(&notify);
    assert!(
        stopping.iter().any(|l| l == "STOPPING=1"),
        "{stopping:?}\n{}",
        read_log()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "rvhost did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}\n{}", read_log());
    let _ = std::fs::remove_dir_all(&dir);
}
