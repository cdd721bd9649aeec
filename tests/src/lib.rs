//! Integration and property tests for rvhost, including real QEMU guests.
//!
//! The guest harness boots a Debian kernel under `qemu-system-x86_64 -accel tcg` with a busybox
//! initramfs built on the fly, attaches vhost-user devices served by a backend on the host
//! (`qemu-storage-daemon` as the reference, `rvhost` under test), runs a shell script in the guest
//! and returns the `RESULT key=value` lines it printed on a dedicated serial port:
//!
//! ```no_run
//! use rvhost_tests::{run_guest, GuestConfig, Qsd, QsdOptions, VhostUserDevice};
//! let qsd = Qsd::start(QsdOptions::default())?;
//! let guest = GuestConfig::new("example", ". /lib/guest.sh\nsysval size /sys/block/vda/size\n")
//!     .device(VhostUserDevice::Blk { socket: qsd.socket().to_path_buf(), num_queues: 1 });
//! let output = run_guest(&guest)?;
//! output.assert_eq("size", "131072");
//! # Ok::<(), rvhost_tests::HarnessError>(())
//! ```
//!
//! Guest scripts source `/lib/guest.sh` (`tests/guest/lib.sh`) for `result`, `check`, `run`,
//! `sysval`, `wait_for`. Host tools are installed on demand (as root) or by `scripts/setup.sh`; the
//! kernel package is downloaded once into `build/guest-assets/`.

pub mod assets;
pub mod cpio;
pub mod error;
pub mod files;
pub mod guest;
pub mod host;
pub mod migration;
pub mod peer;

pub use error::{HarnessError, Result};
pub use guest::{
    parse_results, run_guest, run_guest_with, GuestConfig, GuestOutput, VhostUserDevice,
    VIRTIO_BLK_MODULES, VIRTIO_SCSI_MODULES,
};
pub use peer::{blkcheck_binary, rvhost_binary, Qsd, QsdBacking, QsdOptions, Rvhost};

/// Sends `tracing` output of the harness to the test's captured output (call at a test's start).
pub fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
