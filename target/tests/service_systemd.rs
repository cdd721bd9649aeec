//! rvhost as a systemd service: `contrib/systemd/rvhost.service` passes `systemd-analyze
//! verify`, and the real binary started with `NOTIFY_SOCKET` (as systemd starts a `Type=notify`
//! unit) sends `READY=1` only once its RPC socket and every configured controller socket accept
//! connections, and `STOPPING=1` when SIGTERM stops it. And the unit itself, enabled with
//! `systemctl enable`, starts rvhost under a real systemd (PID 1 of a `systemd-nspawn` container)
//! and stops it cleanly when that systemd powers off.

mod rpc_common;
mod vhost_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_support::{pattern, Driver, S_OK, VIRTIO_F_VERSION_1};

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

/// What an operator adds with `systemctl edit rvhost` (README, "Running as a service"): options
/// on ExecStart. Controller sockets for group `users` (QEMU's user would be in it), the RPC socket
/// for root alone.
const DROP_IN: &str = "[Service]
ExecStart=
ExecStart=/usr/local/bin/rvhost -c /etc/rvhost/rvhost.json --socket-group users --socket-mode 0660 --rpc-socket-mode 0600
";

/// Ordered after rvhost.service, so it runs once systemd took rvhost's READY=1: records the
/// resource limits rvhost and the container's systemd run with and the unit's state, then has PID 1 log at debug level so that the notifications rvhost sends on the
/// way down show in the journal.
const PROBE_UNIT: &str = "[Unit]
Description=rvhost test: records rvhost.service's state once it started
After=rvhost.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cat /proc/$$(systemctl show -p MainPID --value rvhost.service)/limits > /var/tmp/rvhost.limits; cat /proc/1/limits > /var/tmp/init.limits; systemctl show rvhost.service -p ActiveState -p SubState -p Result -p StatusText -p LimitMEMLOCK -p LimitNOFILE > /var/tmp/state.tmp && mv /var/tmp/state.tmp /var/tmp/state.running'
ExecStartPost=/usr/bin/systemd-analyze log-level debug
[Install]
WantedBy=multi-user.target
";

/// Ordered before rvhost.service, so at power-off systemd stops it only once rvhost.service is
/// down: records the unit's final state, PID 1's messages about it and rvhost's own log.
const WATCH_UNIT: &str = "[Unit]
Description=rvhost test: records rvhost.service's state once it stopped
Before=rvhost.service
RequiresMountsFor=/var/tmp
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c 'journalctl -o cat -u rvhost.service > /var/tmp/rvhost.journal; systemctl show rvhost.service -p ActiveState -p SubState -p Result -p ExecMainCode -p ExecMainStatus -p NRestarts > /var/tmp/state.tmp && mv /var/tmp/state.tmp /var/tmp/state.stopped'
[Install]
WantedBy=multi-user.target
";

/// A `systemd-nspawn` container, powered off (SIGTERM to nspawn: SIGRTMIN+3 to its systemd) and
/// then killed if a check fails before the test stops it.
struct Container {
    child: Option<Child>,
    name: String,
}

impl Container {
    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the container to end; its exit status if it did.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("wait for systemd-nspawn") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-TERM");
            if self.wait(Duration::from_secs(30)).is_none() {
                self.signal("-KILL");
                let _ = self.wait(Duration::from_secs(10));
            }
        }
        // nspawn leaves its (empty) mount propagation directory behind when /run is no tmpfs.
        let _ = std::fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.name));
    }
}

/// Whether this process's capability bounding set has CAP_SYS_RESOURCE (bit 24), without which
/// a container's systemd cannot raise a hard resource limit either.
fn may_raise_resource_limits() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << 24) != 0)
}

/// `KEY=VALUE` lines of `systemctl show`, as a lookup.
fn show_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn group_id(name: &str) -> u32 {
    let groups = std::fs::read_to_string("/etc/group").expect("reading /etc/group");
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no group {name} in /etc/group"))
}

/// The unit as shipped, enabled with `systemctl enable`, under a real systemd as PID 1: a
/// `systemd-nspawn` container whose system is this machine's `/usr` on an empty, volatile root,
/// with the unit and a drop-in in `/etc/systemd/system`, a configuration in
/// `/etc/rvhost/rvhost.json`, the binary just built as `/usr/local/bin/rvhost` and the
/// container's `/var/tmp` (where the sockets go) a directory of the test. Once systemd has
/// rvhost.service active, the RPC socket answers SPDK's client and the controller socket has the
/// drop-in's group and mode; a power-off of the container stops rvhost cleanly (STOPPING=1,
/// exit status 0, the unit inactive, not failed).
#[test]
fn the_unit_runs_rvhost_under_systemd_in_a_container() {
    let dir = temp_dir("nspawn");
    let system = dir.join("root/etc/systemd/system");
    std::fs::create_dir_all(system.join("rvhost.service.d")).expect("unit directory");
    std::fs::copy(UNIT, system.join("rvhost.service")).expect("copying the unit");
    std::fs::write(system.join("rvhost.service.d/options.conf"), DROP_IN).expect("drop-in");
    std::fs::write(system.join("rvhost-probe.service"), PROBE_UNIT).expect("probe unit");
    std::fs::write(system.join("rvhost-watch.service"), WATCH_UNIT).expect("watch unit");
    let etc_rvhost = dir.join("root/etc/rvhost");
    std::fs::create_dir_all(&etc_rvhost).expect("configuration directory");
    // A RAM bdev (hugepages when the machine has free ones) and an io_uring bdev on a file in
    // /var/tmp, each behind a vhost-blk controller.
    let config = serde_json::json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 8192, "block_size": 512}},
            {"method": "bdev_uring_create",
             "params": {"filename": "/var/tmp/disk.img", "name": "Uring0", "block_size": 512}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "blk.0", "dev_name": "Malloc0"}},
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "blk.1", "dev_name": "Uring0"}}]}]});
    std::fs::write(etc_rvhost.join("rvhost.json"), config.to_string()).expect("configuration");
    // `systemctl enable`, offline: the [Install] section links the units into
    // multi-user.target.wants.
    let enable = Command::new("systemctl")
        .arg(format!("--root={}", dir.join("root").display()))
        .args(["enable", "rvhost.service", "rvhost-probe.service"])
        .args(["rvhost-watch.service"])
        .output()
        .expect("running systemctl enable");
    assert!(enable.status.success(), "systemctl enable: {enable:?}");
    assert!(system
        .join("multi-user.target.wants/rvhost.service")
        .is_symlink());
    let local_bin = dir.join("usr-local/bin");
    std::fs::create_dir_all(&local_bin).expect("bin directory");
    std::fs::copy(env!("CARGO_BIN_EXE_rvhost"), local_bin.join("rvhost")).expect("binary");
    let var_tmp = dir.join("var-tmp");
    std::fs::create_dir_all(&var_tmp).expect("socket directory");
    std::fs::set_permissions(&var_tmp, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let disk = var_tmp.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 20))
        .expect("the uring bdev's file");
    let free_hugepages = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);

    let name = format!("rvhost-test-{}", std::process::id());
    let console = dir.join("console.log");
    let bind = |host: &Path, inside: &str| format!("{}:{inside}", host.display());
    let child = Command::new("systemd-nspawn")
        .args([
            "--quiet",
            "--directory=/",
            "--volatile=yes",
            "--register=no",
            "--keep-unit",
        ])
        .arg(format!("--machine={name}"))
        // As on a host: rvhost may lock memory (CAP_IPC_LOCK is not among nspawn's defaults).
        .arg("--capability=CAP_IPC_LOCK")
        .arg("--console=read-only")
        .arg("--bind-ro=/etc/passwd")
        .arg("--bind-ro=/etc/group")
        .arg(format!(
            "--bind-ro={}",
            bind(&system, "/etc/systemd/system")
        ))
        .arg(format!("--bind-ro={}", bind(&etc_rvhost, "/etc/rvhost")))
        .arg(format!(
            "--bind-ro={}",
            bind(&dir.join("usr-local"), "/usr/local")
        ))
        .arg(format!("--bind={}", bind(&var_tmp, "/var/tmp")))
        .args([
            "--boot",
            "systemd.unit=multi-user.target",
            "systemd.firstboot=no",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).expect("console log"))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&console)
                .expect("console log"),
        ))
        .spawn()
        .expect("running systemd-nspawn (scripts/setup.sh installs systemd-container)");
    let mut container = Container {
        child: Some(child),
        name,
    };
    let tail = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    let diagnostics = || {
        format!(
            "---- container console ({}) ----\n{}\n---- rvhost.service journal ----\n{}",
            console.display(),
            tail(&console),
            tail(&var_tmp.join("rvhost.journal"))
        )
    };

    // Booting takes seconds; much longer on a loaded machine.
    let running = var_tmp.join("state.running");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !running.exists() {
        if let Some(status) = container.wait(Duration::ZERO) {
            panic!(
                "the container ended ({status}) before rvhost.service started\n{}",
                diagnostics()
            );
        }
        assert!(
            Instant::now() < deadline,
            "rvhost.service did not start\n{}",
            diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = std::fs::read_to_string(&running).expect("state");
    assert_eq!(
        show_value(&state, "ActiveState"),
        Some("active"),
        "{state}\n{}",
        diagnostics()
    );
    assert_eq!(show_value(&state, "SubState"), Some("running"), "{state}");
    assert_eq!(
        show_value(&state, "StatusText"),
        Some("serving 2 controllers; RPC on /var/tmp/spdk.sock"),
        "{state}"
    );

    // The unit's resource limits. systemd raises a limit as far as it may: to the unit's value
    // with CAP_SYS_RESOURCE, else to the hard limit it has itself (systemd's defaults are 8 MiB
    // of locked memory and 1024 descriptors, so on a machine that may raise limits these lines
    // tell the unit's settings from none).
    assert_eq!(
        show_value(&state, "LimitMEMLOCK"),
        Some("infinity"),
        "{state}"
    );
    assert_eq!(show_value(&state, "LimitNOFILE"), Some("65536"), "{state}");
    let read_limits = |file: &str| std::fs::read_to_string(var_tmp.join(file)).unwrap_or_default();
    let (limits, init_limits) = (read_limits("rvhost.limits"), read_limits("init.limits"));
    let limit = |text: &str, name: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().take(2).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    if may_raise_resource_limits() {
        assert_eq!(
            limit(&limits, "Max locked memory"),
            ["unlimited", "unlimited"],
            "LimitMEMLOCK=infinity\n{limits}"
        );
        assert_eq!(
            limit(&limits, "Max open files"),
            ["65536", "65536"],
            "LimitNOFILE=65536\n{limits}"
        );
    } else {
        // Not even root may raise a hard limit here: rvhost must have the container's whole
        // hard limit, soft and hard.
        for name in ["Max locked memory", "Max open files"] {
            let hard = limit(&init_limits, name)
                .get(1)
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                limit(&limits, name),
                [hard.clone(), hard],
                "{name}: rvhost\n{limits}\nthe container's systemd\n{init_limits}"
            );
        }
        eprintln!(
            "LimitMEMLOCK=infinity and LimitNOFILE=65536 not verified: this machine withholds \
             CAP_SYS_RESOURCE, so rvhost got the hard limits systemd has (checked)"
        );
    }

    // The RPC socket, through SPDK's own client.
    let rpc = var_tmp.join("spdk.sock");
    let out = Command::new(rpc_common::spdk_rpc())
        .arg("-s")
        .arg(&rpc)
        .arg("vhost_get_controllers")
        .output()
        .expect("running spdk-rpc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "spdk-rpc: {out:?}\n{}", diagnostics());
    let controllers: serde_json::Value = serde_json::from_str(&stdout).expect("JSON from spdk-rpc");
    assert_eq!(controllers[0]["ctrlr"], "blk.0", "{controllers}");
    assert_eq!(controllers[1]["ctrlr"], "blk.1", "{controllers}");

    // The drop-in's ownership: group users, mode 0660 for the controller; 0600 for RPC.
    let blk = std::fs::metadata(var_tmp.join("blk.0")).expect("the controller socket");
    assert_eq!(
        (blk.uid(), blk.gid(), blk.mode() & 0o7777),
        (0, group_id("users"), 0o660),
        "controller socket owner, group and mode"
    );
    let rpc_meta = std::fs::metadata(&rpc).expect("the RPC socket");
    assert_eq!(rpc_meta.mode() & 0o7777, 0o600, "RPC socket mode");

    // I/O under the unit's hardening, as a guest's would arrive: a vhost-user driver writes and
    // reads back through each controller (shared memory, eventfds, the reactor pinned to its
    // core); the io_uring bdev's data must land in its file.
    for (controller, seed) in [("blk.0", 0x31u8), ("blk.1", 0x52)] {
        let mut driver = Driver::ready(&var_tmp.join(controller), VIRTIO_F_VERSION_1);
        let data = pattern(seed, 8192);
        assert_eq!(
            driver.write_blocks(0, 16, &data),
            S_OK,
            "{controller} write"
        );
        let (status, back) = driver.read_blocks(0, 16, data.len());
        assert_eq!(status, S_OK, "{controller} read");
        assert!(
            back == data,
            "{controller}: read back other data than written"
        );
    }
    let on_disk = std::fs::read(&disk).expect("reading the uring bdev's file");
    assert!(
        on_disk[16 * 512..16 * 512 + 8192] == pattern(0x52, 8192)[..],
        "the write through blk.1 is not in {}",
        disk.display()
    );

    // Power-off: systemd stops rvhost.service (SIGTERM), then the watch unit records how.
    container.signal("-TERM");
    let status = container.wait(Duration::from_secs(180));
    let stopped = std::fs::read_to_string(var_tmp.join("state.stopped")).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "container power-off: {status:?}\n{stopped}\n{}",
        diagnostics()
    );
    for (key, want) in [
        ("ActiveState", "inactive"),
        ("Result", "success"),
        // CLD_EXITED with status 0: rvhost exited by itself, not killed by a signal.
        ("ExecMainCode", "1"),
        ("ExecMainStatus", "0"),
        ("NRestarts", "0"),
    ] {
        assert_eq!(
            show_value(&stopped, key),
            Some(want),
            "{key}\n{stopped}\n{}",
            diagnostics()
        );
    }
    let journal = std::fs::read_to_string(var_tmp.join("rvhost.journal")).unwrap_or_default();
    assert!(
        journal
            .lines()
            .any(|l| l.contains("Got notification message") && l.contains("STOPPING=1")),
        "systemd never got STOPPING=1 from rvhost\n{}",
        diagnostics()
    );
    // The reactor pinned itself to its core under the hardening (a failure to pin is fatal, so
    // this line says it ran; its memory binding is best effort and shown for the record).
    let pinned = journal
        .lines()
        .find(|l| l.contains("reactor thread pinned"))
        .unwrap_or_else(|| panic!("no reactor was pinned\n{}", diagnostics()));
    eprintln!("under the unit: {pinned}");
    // The RAM bdev's memory came from hugepages (rvhost says so when it falls back to 4 KiB
    // pages), when the machine had free ones for it.
    if free_hugepages >= 4 {
        assert!(
            !journal.contains("4 KiB pages"),
            "rvhost fell back to 4 KiB pages under the unit ({free_hugepages} hugepages were \
             free)\n{}",
            diagnostics()
        );
    } else {
        eprintln!("hugepages under the unit not checked: {free_hugepages} free on this machine");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
