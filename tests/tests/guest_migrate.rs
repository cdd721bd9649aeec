//! Live migration of a VM whose disk rvhost serves, under guest I/O, in one guest's life.
//!
//! Three rvhost processes stand for three hosts, each exporting an AIO bdev (O_DIRECT) on the
//! same shared file: A and B, and N, started with `RVHOST_TEST_NO_DIRTY_MARKING=1` (it logs its
//! used rings but not the buffers it writes). The guest boots on A; each phase runs verifying
//! writers and a reader that keeps filling a large buffer from known data with O_DIRECT (pages
//! only the device writes, which QEMU re-sends only if the dirty log says so), while the host:
//!
//! 1. `cancel`: starts a migration A → B and cancels it midway: the source runs on, rvhost A's
//!    logging is off again, no I/O error, no stale byte;
//! 2. `ab`, `ba`, `an`: migrates A → B → A (there and back) → N: no I/O error, every acknowledged
//!    write on disk, every buffer slot holding what was last read into it;
//! 3. `control`: migrates N → B: the reader must find stale slots (proof the check can fail).
//!
//! vhost-scsi runs the same phases but the cancel (the shell's, checked once with blk). QEMU
//! 7.2's `vhost-user-scsi-pci` is migratable (`hw/scsi/vhost-user-scsi.c` registers a vmstate
//! with `VMSTATE_VIRTIO_DEVICE`, not `.unmigratable`).
//!
//! QEMU 7.2, `-accel tcg`, loopback TCP; a host-written marker block, written while the VM is
//! stopped between source and destination (`pause-before-switchover`), tells the guest's reader
//! that the VM has moved. `RVHOST_MIGRATE_LOGS=DIR` keeps the three targets' logs in DIR;
//! `RVHOST_MIGRATE_HOLD_MS=N` makes each migration iterate N ms past its first pass (1 ms
//! downtime limit until then: 8-10 dirty-log syncs instead of 3-4), for investigations.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use rvhost_tests::files::{scratch_dir, sparse_file};
use rvhost_tests::migration::MigrationRig;
use rvhost_tests::{
    blkcheck_binary, init_test_logging, GuestConfig, GuestOutput, Rvhost, VhostUserDevice,
    VIRTIO_SCSI_MODULES,
};

const SCRIPT: &str = include_str!("../guest/migrate.sh");
const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 128 * MIB;
/// Known data: `REGIONS` regions of `SLOT_MIB` at `KNOWN_MIB`; the reader's buffer has `SLOTS`
/// slots (one fewer, so each slot gets another region every time).
const KNOWN_MIB: u64 = 64;
const SLOT_MIB: u64 = 1;
const SLOTS: u64 = 4;
const REGIONS: u64 = SLOTS + 1;
const SEED: u64 = 0x5eed;
/// Where the host writes the number of the phase whose migration is over.
const MARKER_MIB: u64 = 100;
/// Writers' run time per phase (covers a migration).
const RUN_SECONDS: u64 = 20;
const HANG_SECONDS: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blk,
    Scsi,
}

/// One "host": an rvhost process serving the shared file as controller `mig.0`.
struct Host {
    target: Rvhost,
    socket: PathBuf,
}

impl Host {
    fn start(image: &Path, kind: Kind, no_marking: bool) -> Host {
        let env: &[(&str, &str)] = if no_marking {
            &[("RVHOST_TEST_NO_DIRTY_MARKING", "1")]
        } else {
            &[]
        };
        let mut target = Rvhost::start_with_env(&[], env).unwrap_or_else(|e| panic!("{e}"));
        target.rpc_ok(
            "bdev_aio_create",
            json!({"name": "Shared0", "filename": image, "block_size": 512}),
        );
        match kind {
            Kind::Blk => {
                target.rpc_ok(
                    "vhost_create_blk_controller",
                    json!({"ctrlr": "mig.0", "dev_name": "Shared0"}),
                );
            }
            Kind::Scsi => {
                target.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "mig.0"}));
                target.rpc_ok(
                    "vhost_scsi_controller_add_target",
                    json!({"ctrlr": "mig.0", "scsi_target_num": 0, "bdev_name": "Shared0"}),
                );
            }
        }
        let socket = target.wait_controller_socket("mig.0");
        Host { target, socket }
    }

    fn device(&self, kind: Kind) -> VhostUserDevice {
        let socket = self.socket.clone();
        match kind {
            Kind::Blk => VhostUserDevice::Blk {
                socket,
                num_queues: 1,
            },
            Kind::Scsi => VhostUserDevice::Scsi {
                socket,
                num_queues: 1,
            },
        }
    }

    /// Whether the last dirty-logging change the target logged turned it off.
    fn logging_off(&self) -> bool {
        let log = self.target.log();
        log.lines()
            .rev()
            .find(|l| l.contains("dirty logging"))
            .is_some_and(|l| l.contains("on=false"))
    }
}

/// Tells the guest's reader that phase `n` has moved (or stayed, for a cancel).
fn write_marker(image: &Path, n: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open image");
    file.write_all_at(&n.to_le_bytes(), MARKER_MIB * MIB)
        .expect("write marker");
    file.sync_data().expect("sync marker");
}

/// What the host did in each phase, for the assertions.
#[derive(Debug, Default)]
struct Record {
    /// Per phase: what happened (`migrated ...`, `cancelled ...`) or the failure.
    actions: Vec<String>,
    /// rvhost A's logging after the cancelled migration.
    logging_off_after_cancel: Option<bool>,
}

fn run(kind: Kind, name: &str, phases: &[&str]) -> (GuestOutput, Record) {
    init_test_logging();
    let dir = scratch_dir(name);
    let image = dir.join("shared.img");
    sparse_file(&image, DISK_BYTES);
    let a = Host::start(&image, kind, false);
    let b = Host::start(&image, kind, false);
    let n = Host::start(&image, kind, true);

    let (modules, disk): (&[&str], &str) = match kind {
        Kind::Blk => (rvhost_tests::VIRTIO_BLK_MODULES, "vda"),
        Kind::Scsi => (VIRTIO_SCSI_MODULES, "sda"),
    };
    let mut config = GuestConfig::new(name, SCRIPT)
        .modules(modules)
        .device(a.device(kind))
        .binary(blkcheck_binary().expect("blkcheck"))
        .env("DISK", disk)
        .env("PHASES", phases.join(" "))
        .env("RUN_SECONDS", RUN_SECONDS)
        .env("HANG_SECONDS", HANG_SECONDS)
        .env("KNOWN_MIB", KNOWN_MIB)
        .env("SLOT_MIB", SLOT_MIB)
        .env("SLOTS", SLOTS)
        .env("REGIONS", REGIONS)
        .env("SEED", SEED)
        .env("MARKER_MIB", MARKER_MIB);
    // Small guest RAM: each migration copies all of it.
    config.memory_mib = 256;

    let logs = |what: &str| {
        format!(
            "{what}\n---- rvhost A ----\n{}\n---- rvhost B ----\n{}\n---- rvhost N ----\n{}",
            a.target.log(),
            b.target.log(),
            n.target.log()
        )
    };
    let rig = MigrationRig::boot(&config).unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    let mut record = Record::default();
    let mut phase_no = 0u64;
    let output = rig.finish(
        Duration::from_secs(900),
        |rig, key, value| {
            if key != "phase" {
                return Ok(());
            }
            phase_no += 1;
            // The reader stops at the marker: written while the VM is stopped between source
            // and destination, so what the destination holds is what the source's device wrote,
            // not a later read's.
            let marker = || write_marker(&image, phase_no);
            let to = match value {
                "cancel" => {
                    let info =
                        rig.cancelled_migration(&[b.device(kind)], Duration::from_secs(3))?;
                    record.logging_off_after_cancel = Some(a.logging_off());
                    marker();
                    record.actions.push(format!("cancel: {info}"));
                    return Ok(());
                }
                "ab" | "control" => &b,
                "ba" => &a,
                "an" => &n,
                other => panic!("unknown phase {other}"),
            };
            let info = rig.migrate(&[to.device(kind)], marker)?.info;
            eprintln!("phase {value}: {info}");
            record.actions.push(format!("{value}: {info}"));
            Ok(())
        },
        Vec::new(),
    );
    if let Some(dump) = std::env::var_os("RVHOST_MIGRATE_LOGS") {
        let dump = PathBuf::from(dump);
        let _ = std::fs::create_dir_all(&dump);
        for (host, name) in [(&a, "a"), (&b, "b"), (&n, "n")] {
            let _ = std::fs::write(dump.join(format!("{name}.log")), host.target.log());
        }
    }
    let output = output.unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    let _ = std::fs::remove_dir_all(&dir);
    (output, record)
}

fn assert_phase_ok(output: &GuestOutput, phase: &str) {
    for what in ["reader", "writers"] {
        let key = format!("{phase}_{what}");
        let value = output.get(&key).unwrap_or("missing");
        assert!(
            value.starts_with("ok:"),
            "{key} = {value}\n{}",
            output.diagnostics()
        );
    }
}

#[test]
fn blk_vm_migrates_there_and_back_under_io_and_the_control_finds_stale_data() {
    let phases = ["cancel", "ab", "ba", "an", "control"];
    let (output, record) = run(Kind::Blk, "migrate-blk", &phases);
    eprintln!("{:#?}\n{:#?}", record.actions, output.lines);
    output.assert_eq("disk_present", "yes");
    output.assert_eq("known", "ok");
    for phase in ["cancel", "ab", "ba", "an"] {
        assert_phase_ok(&output, phase);
    }
    assert_eq!(
        record.logging_off_after_cancel,
        Some(true),
        "rvhost A still logs after migrate_cancel"
    );
    // The control's writers are unaffected (writes only read guest memory); its reader must see
    // what the missing marks left behind.
    let control = output.get("control_reader").unwrap_or("missing");
    assert!(
        control.starts_with("stale:"),
        "negative control: migrating without marking the buffers went unnoticed: {control}\n{}",
        output.diagnostics()
    );
}

#[test]
fn scsi_vm_migrates_there_and_back_under_io_and_the_control_finds_stale_data() {
    // The cancel is the shell's, the same for both device types: checked once, with blk.
    let phases = ["ab", "ba", "an", "control"];
    let (output, record) = run(Kind::Scsi, "migrate-scsi", &phases);
    eprintln!("{:#?}\n{:#?}", record.actions, output.lines);
    output.assert_eq("disk_present", "yes");
    output.assert_eq("known", "ok");
    for phase in ["ab", "ba", "an"] {
        assert_phase_ok(&output, phase);
    }
    let control = output.get("control_reader").unwrap_or("missing");
    assert!(
        control.starts_with("stale:"),
        "negative control: migrating without marking the buffers went unnoticed: {control}\n{}",
        output.diagnostics()
    );
}
