//! Block devices ("bdevs"): the storage behind a controller, in SPDK's sense.
//!
//! A [`Bdev`] describes a device and is shared (`Arc`) between the control thread and the reactors.
//! Each reactor that does I/O to it opens its own [`BdevChannel`] (SPDK's I/O channel), so the data
//! path needs no locks: submissions and completions on a channel happen on one thread only.

pub mod common;
pub mod fanout;
pub mod file;
pub mod iostat;
pub mod module;
pub mod qos;
pub mod registry;
pub mod testing;

// The bdev modules, each registered by one line in `modules` below.
pub mod aio;
pub mod delay;
pub mod malloc;
pub mod null;
pub mod nvme;
pub mod rbd;
pub mod uring;

pub use module::{BdevContext, BdevModule, ModuleEnv};
pub use registry::BdevRegistry;

/// Every bdev module, in the order `rpc_get_methods` lists their methods.
///
/// Adding a module (`rbd`, say): write `bdev/rbd.rs` (or `bdev/rbd/`) implementing
/// [`BdevModule`] — its RPC methods, its `save_config` calls, its housekeeping — declare it with
/// the other modules above (`pub mod rbd;`), and register it with one line here:
/// `Box::new(rbd::RbdModule::new(env)),`. Nothing else changes: the JSON-RPC layer lists,
/// dispatches, saves and ticks modules only through this list.
pub fn modules(env: &ModuleEnv) -> Vec<Box<dyn module::AnyBdevModule>> {
    vec![
        Box::new(malloc::MallocModule::new(env)),
        Box::new(null::NullModule::new(env)),
        Box::new(aio::AioModule::new(env)),
        Box::new(nvme::NvmeModule::new(env)),
        Box::new(uring::UringModule::new(env)),
        Box::new(delay::DelayModule::new(env)),
        Box::new(rbd::RbdModule::new(env)),
    ]
}

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use rvhost_core::mem::MemError;
pub use rvhost_platform_linux::HostMemory;
use rvhost_platform_linux::SharedDmaMemory;

/// The operations a bdev may support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// Read blocks into the I/O vectors.
    Read,
    /// Write blocks from the I/O vectors.
    Write,
    /// Make previously completed writes durable.
    Flush,
    /// Deallocate blocks (discard / TRIM / UNMAP); they may read back as anything, usually zeros.
    Unmap,
    /// Make blocks read back as zeros.
    WriteZeroes,
}

/// A contiguous buffer by host virtual address, as validated by the guest memory table (or owned
/// by the target itself), lying inside the [`IoMemory`] of its I/O. A bdev copies through that
/// memory object, or hands the address to the kernel (io_uring, AIO) or to a device behind an
/// IOMMU mapping it made from [`HostMemoryAccess::host_ranges`]; never through a Rust reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoVec {
    /// Host virtual address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// One I/O submitted to a channel. Offsets and lengths are in blocks of the bdev's block size.
#[derive(Clone, Copy)]
pub struct BdevIo<'a> {
    /// What to do.
    pub kind: IoKind,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (0 for a flush of the whole device).
    pub num_blocks: u64,
    /// Data buffers for read/write; their total length is `num_blocks * block_size`.
    pub iovs: &'a [IoVec],
    /// Returned unchanged with the completion.
    pub tag: u64,
    /// The memory the I/O vectors lie in. The submitter keeps it mapped until the completion has
    /// been polled; a bdev that uses it after `submit` returns (copying a bounced read out at
    /// completion, or letting the kernel or a device access the vectors) keeps a clone until it
    /// reports the completion, which keeps it alive whatever the submitter does.
    pub mem: &'a IoMemory,
}

impl fmt::Debug for BdevIo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BdevIo")
            .field("kind", &self.kind)
            .field("offset_blocks", &self.offset_blocks)
            .field("num_blocks", &self.num_blocks)
            .field("iovs", &self.iovs)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// How an I/O ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// Done.
    Success,
    /// The device failed it (media error, backend error, bdev removed).
    Failed,
    /// The bdev does not support this kind of I/O.
    Unsupported,
}

/// Errors from bdev management and submission.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// Invalid parameters (size, block size, name).
    #[error("invalid bdev parameters: {0}")]
    InvalidParams(String),
    /// The I/O range lies past the end of the device or its buffers do not add up.
    #[error("I/O out of range: blocks {offset}+{count} on a device of {capacity} blocks")]
    OutOfRange {
        /// First block.
        offset: u64,
        /// Number of blocks.
        count: u64,
        /// Device size in blocks.
        capacity: u64,
    },
    /// A buffer did not lie in mapped memory.
    #[error("bad I/O buffer: {0}")]
    Memory(MemError),
    /// The bdev has been removed; no new I/O is accepted.
    #[error("bdev {0} has been removed")]
    Removed(String),
    /// Backend-specific failure (allocation, file, device).
    #[error("{0}")]
    Backend(String),
}

/// A range of host virtual memory kept mapped by a [`HostMemoryAccess`] for as long as it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Host virtual address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl HostRange {
    /// Whether `[addr, addr + len)` lies entirely inside this range.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let end = self.addr.saturating_add(self.len);
        addr >= self.addr && addr.checked_add(len).is_some_and(|e| e <= end)
    }
}

/// The host memory that [`IoVec`]s point at: the mapped guest memory table of a vhost-user device
/// (`rvhost_platform_linux::MemoryTable`) or memory of the target's own. Every copy checks that the
/// whole range lies inside memory the implementor keeps mapped ([`HostMemory`]); in addition the
/// mapped ranges can be listed, so a bdev can register them with an IOMMU or check that a buffer it
/// gives to the kernel lies inside them.
pub trait HostMemoryAccess: HostMemory {
    /// Every range of host memory this object keeps mapped while it lives.
    fn host_ranges(&self) -> Vec<HostRange>;
}

/// Shared ownership of the memory an I/O's buffers lie in (see [`BdevIo::mem`]). Compare two with
/// [`same_memory`].
pub type IoMemory = Arc<dyn HostMemoryAccess>;

/// Whether `a` and `b` are the same memory object (and so the same mappings).
pub fn same_memory(a: &IoMemory, b: &IoMemory) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl HostMemoryAccess for SharedDmaMemory {
    fn host_ranges(&self) -> Vec<HostRange> {
        vec![HostRange {
            addr: self.va(),
            len: self.len() as u64,
        }]
    }
}

/// A block device. Static properties plus a factory for per-reactor channels.
pub trait Bdev: Send + Sync + fmt::Debug {
    /// Unique name (`Malloc0`).
    fn name(&self) -> &str;
    /// Human-readable product name, as SPDK reports it (`Malloc disk`, `Null disk`).
    fn product_name(&self) -> &str;
    /// The module that created it (`malloc`, `null`), for `bdev_get_bdevs`' `driver_specific`.
    fn module_name(&self) -> &'static str;
    /// Logical block size in bytes (a power of two, at least 512).
    fn block_size(&self) -> u32;
    /// Size in blocks.
    fn num_blocks(&self) -> u64;
    /// Stable UUID (SCSI NAA identifiers and `bdev_get_bdevs` derive from it).
    fn uuid(&self) -> [u8; 16];
    /// Whether `kind` is supported.
    fn supports(&self, kind: IoKind) -> bool;
    /// Opens an I/O channel for the calling reactor.
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError>;
    /// Called on the control thread when a device that uses this bdev receives a new memory
    /// table, before any I/O with it. A bdev that maps memory for DMA does it here (as SPDK does
    /// at `SET_MEM_TABLE`), so that the first I/O does not stall its reactor doing so.
    fn prepare_memory(&self, _mem: &IoMemory) {}
    /// Module-specific JSON for `bdev_get_bdevs` (`driver_specific`).
    fn driver_specific(&self) -> serde_json::Value {
        serde_json::Value::Object(Default::default())
    }
}

/// Reports the completions a channel queued (oldest first) through `done`; returns how many. For
/// [`BdevChannel::poll`] of channels that finish I/O ahead of the poll that reports it.
pub(crate) fn report_completions(
    completions: &mut VecDeque<(u64, IoStatus)>,
    done: &mut dyn FnMut(u64, IoStatus),
) -> usize {
    let count = completions.len();
    for (tag, status) in completions.drain(..) {
        done(tag, status);
    }
    count
}

/// A per-reactor submission/completion context for one bdev. Owned by exactly one reactor thread.
pub trait BdevChannel: Send {
    /// Submits `io`. Must not wait for the device: the completion is reported by a later
    /// [`BdevChannel::poll`]. An `Err` means the I/O was not accepted and no completion will follow.
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError>;
    /// Reports finished I/Os by calling `done(tag, status)` for each; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize;
    /// Number of submitted I/Os whose completion has not been polled yet.
    fn in_flight(&self) -> usize;
}
