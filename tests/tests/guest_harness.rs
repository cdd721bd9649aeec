//! Tests of the guest harness itself: a failing script is reported as such, a hung guest is
//! killed at its deadline and leaves no process behind, and the virtio-scsi module set loads.

use std::time::{Duration, Instant};

use std::os::unix::fs::FileExt;

use rvhost_tests::{
    init_test_logging, run_guest, run_guest_with, GuestConfig, HarnessError, Qsd, QsdOptions,
    VhostUserDevice, VIRTIO_BLK_MODULES, VIRTIO_SCSI_MODULES,
};

/// QEMU processes still running for the guest run named `name` (its run directory, and so its
/// command line, contains the name). Other tests of this binary boot guests concurrently, so
/// "any QEMU child" would be the wrong question.
fn qemu_left_for(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let run_dir = format!("/{name}-{}-", std::process::id());
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let cmdline = String::from_utf8_lossy(&raw);
                cmdline.starts_with("qemu-system") && cmdline.contains(&run_dir)
            })
        })
        .collect()
}

#[test]
fn script_results_and_exit_status_come_back() {
    init_test_logging();
    let script = ". /lib/guest.sh\nresult answer 42\nresult spaced 'a b=c'\ncheck truth true\n\
                  run lie false\nexit 3\n";
    let out = match run_guest(&GuestConfig::new("harness-exit", script)) {
        Ok(out) => out,
        Err(err) => panic!("{err}"),
    };
    out.assert_eq("answer", "42");
    out.assert_eq("spaced", "a b=c");
    out.assert_eq("truth", "");
    out.assert_eq("lie", "failed(rc=1)");
    out.assert_eq("script_exit", "3");
    out.assert_eq("cpus", "1");
    assert!(
        out.console.contains("init: /test.sh exited with 3"),
        "{}",
        out.diagnostics()
    );
    // The results port carries only RESULT lines: kernel messages stay on the console.
    assert!(
        out.lines.iter().all(|(k, _)| !k.contains('[')),
        "{}",
        out.diagnostics()
    );
}

#[test]
fn hung_guest_is_killed_at_the_deadline() {
    init_test_logging();
    let config = GuestConfig::new("harness-hang", "echo 'RESULT started=yes'\nsleep 100000\n")
        .timeout(Duration::from_secs(40));
    let started = Instant::now();
    match run_guest(&config) {
        Err(HarnessError::GuestTimeout {
            seconds,
            diagnostics,
            ..
        }) => {
            assert_eq!(seconds, 40);
            assert!(diagnostics.contains("---- console"), "{diagnostics}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(40));
    let left = qemu_left_for(config.name.as_str());
    assert!(left.is_empty(), "QEMU processes left behind: {left:?}");
}

#[test]
fn virtio_scsi_modules_load() {
    init_test_logging();
    let mut modules: Vec<&str> = VIRTIO_BLK_MODULES.to_vec();
    modules.extend(VIRTIO_SCSI_MODULES);
    let script = ". /lib/guest.sh\nfor m in virtio_scsi sd_mod sg scsi_mod virtio_blk; do\n\
                  [ -d /sys/module/$m ] && result module_$m ok || result module_$m missing\ndone\n";
    let out = match run_guest(&GuestConfig::new("harness-scsi-modules", script).modules(&modules)) {
        Ok(out) => out,
        Err(err) => panic!("{err}"),
    };
    out.assert_all_ok("module_");
}

/// `run_guest_with` hands out results while the guest runs: the guest announces it is waiting, the
/// host changes the disk behind qemu-storage-daemon, and the guest sees the change.
#[test]
fn host_acts_on_results_while_the_guest_runs() {
    init_test_logging();
    let qsd = match Qsd::start(QsdOptions::default()) {
        Ok(qsd) => qsd,
        Err(err) => panic!("{err}"),
    };
    let image = qsd.image().expect("file-backed export");
    let script = r#". /lib/guest.sh
wait_for /dev/vda 120
result phase waiting
for i in $(seq 600); do
    if [ "$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 6)" = MARKER ]; then
        result marker_seen yes
        exit 0
    fi
    usleep 200000
done
result marker_seen no
"#;
    let config = GuestConfig::new("harness-live", script).device(VhostUserDevice::Blk {
        socket: qsd.socket().to_path_buf(),
        num_queues: 1,
    });
    let mut seen = Vec::new();
    let out = run_guest_with(&config, |key, value| {
        seen.push(format!("{key}={value}"));
        if key == "phase" && value == "waiting" {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .expect("image");
            file.write_all_at(b"MARKER", 0).expect("write marker");
        }
    });
    let out = match out {
        Ok(out) => out,
        Err(err) => panic!("{err}"),
    };
    out.assert_eq("marker_seen", "yes");
    let phase = seen.iter().position(|l| l == "phase=waiting");
    let marker = seen.iter().position(|l| l == "marker_seen=yes");
    assert!(
        phase.is_some() && phase < marker,
        "callback order: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        out.lines.len(),
        "every line exactly once: {seen:?}"
    );
}

/// A guest that keeps rebooting is stopped once it exceeds the boots it was allowed.
#[test]
fn reboot_loop_is_stopped() {
    init_test_logging();
    let config = GuestConfig::new("harness-reboot-loop", "reboot -f\nsleep 600\n").boots(2);
    match run_guest(&config) {
        Err(HarnessError::GuestFailed { reason, .. }) => {
            assert!(reason.contains("booted more than 2"), "{reason}");
        }
        other => panic!("expected the reboot loop to be stopped, got {other:?}"),
    }
    let left = qemu_left_for(config.name.as_str());
    assert!(left.is_empty(), "QEMU processes left behind: {left:?}");
}
