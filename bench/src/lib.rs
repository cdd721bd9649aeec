//! Microbenchmarks and the `rvhost-perf` vhost-user load generator.
//!
//! `rvhost-perf` is the driver side of vhost-user: it owns the "guest" memory (a memfd, on
//! hugepages when the host has them), lays out split virtqueues in it, hands both to a target over
//! its socket with the `vhost` crate's `Frontend`, and then drives the queues from one pinned
//! thread by polling, the way SPDK's `bdevperf` drives a `virtio-user` bdev. Modules:
//!
//! - [`shm`]: the shared memory and where each queue's rings and buffers live in it;
//! - [`vring`]: the driver's half of a split virtqueue (descriptors, avail ring, used ring,
//!   notification suppression);
//! - [`device`]: connecting to a vhost-user-blk or vhost-user-scsi target and request formats;
//! - [`dirty_log`]: `--dirty-log`, the migrating frontend's dirty log, to measure what logging
//!   costs the target;
//! - [`workload`]: fio-like options, the offset/direction generator and the verify patterns;
//! - [`engine`]: the poll loop and its statistics;
//! - [`responder`]: a trivial in-process device, to measure the initiator's own cost per I/O;
//! - [`probe`]: the core-to-core cache-line round trip, which bounds every poll-mode figure.

pub mod device;
pub mod dirty_log;
pub mod engine;
pub mod probe;
pub mod responder;
pub mod shm;
pub mod vring;
pub mod workload;

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// Creating or mapping the shared memory failed.
    #[error("shared memory: {0}")]
    Memory(String),
    /// A vhost-user message failed or was refused.
    #[error("vhost-user {step}: {source}")]
    VhostUser {
        /// What was being done.
        step: &'static str,
        /// The `vhost` crate's error.
        source: vhost::Error,
    },
    /// The target lacks something the run needs.
    #[error("target: {0}")]
    Target(String),
    /// An eventfd could not be created or written.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The options do not describe a valid run.
    #[error("invalid options: {0}")]
    Options(String),
    /// A ring or buffer offset fell outside the shared memory (a layout bug, never the device).
    #[error("shared memory access at {offset:#x}: {source}")]
    Access {
        /// Offset into the shared memory.
        offset: usize,
        /// vm-memory's error.
        source: vm_memory::volatile_memory::Error,
    },
    /// The device broke the virtqueue protocol (a used id that is not in flight, and so on).
    #[error("device protocol violation on queue {queue}: {what}")]
    Protocol {
        /// The queue's index among the request queues.
        queue: usize,
        /// What it did.
        what: String,
    },
    /// Requests were still in flight when the drain timed out.
    #[error("{0} requests never completed")]
    Stuck(u64),
    /// Pinning to a CPU failed.
    #[error("pinning to CPU {cpu}: {source}")]
    Pin {
        /// The CPU.
        cpu: usize,
        /// Why.
        source: rvhost_platform_linux::cpu::CpuError,
    },
}

pub use engine::{run, RunReport};
pub use workload::{DeviceType, RwMode, WorkloadOptions};
