//! NVMe bdevs: one per active namespace of a PCIe controller driven in user space through VFIO
//! (`rvhost-nvme`), as SPDK's `bdev_nvme` with `trtype` `pcie`.
//!
//! Each reactor channel owns one I/O queue pair of the controller; commands are queued in
//! `submit` and completions reaped in `poll`, so the data path takes no locks.
//!
//! Zero copy, as SPDK does it: the memory an I/O's buffers lie in (a vhost-user memory table,
//! [`BdevIo::mem`]) is mapped for DMA at IOVA = host VA the first time an I/O arrives with it,
//! and the commands point straight at the guest's buffers (PRPs, or SGLs where the controller
//! offers them). The mappings belong to the controller, shared by its channels and bdevs, and hold
//! the memory object; they are unmapped once that memory is no longer used by its vhost device
//! (the frontend replaced the table or went away) and no I/O of it is in flight. A channel
//! remembers the last memory object it saw, so the registry's lock is taken only when a new one
//! arrives, not per I/O.
//!
//! Where zero copy is impossible, data goes through bounce buffers: a channel owns DMA memory cut
//! into fixed slots, and guest data is copied into a slot before a WRITE and out of it when a
//! READ completes (at `poll`, through the clone of the memory the I/O keeps). That is the case for
//! memory that could not be mapped (an IOMMU or locked-memory limit, an overlap, an owner that
//! cannot vouch for its ranges; logged once per memory object) and for buffer lists the
//! controller cannot take (PRP rules without SGL support, byte-aligned buffers). Every I/O is
//! counted as zero copy or bounced, with the reason (`bdev_get_bdevs`, `driver_specific.nvme`).
//!
//! I/O larger than one command is split; the I/O completes when the last command does and fails
//! if any one fails. A failed or removed controller fails every I/O (the driver's timeout, abort
//! and reset logic bounds how long a command can stay outstanding); waits within `submit` for a
//! free bounce slot or queue entry are additionally bounded by [`NvmeBdevConfig::io_timeout`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rvhost_nvme::io::{MAX_BLOCKS_PER_COMMAND, MAX_DSM_RANGES};
use rvhost_nvme::prp::{build_data_pointer, SglSupport, PAGE_SIZE};
use rvhost_nvme::{
    Controller, ControllerConfig, ControllerState, DmaRegion, DmaSegment, HostDmaMapping, IoError,
    IoQueuePair, NamespaceInfo, NvmeError,
};

use super::common::{byte_range, check_iovs, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use super::{
    report_completions, Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoMemory, IoStatus, IoVec,
};

/// Submission/completion entries of each channel's I/O queue pair.
const QUEUE_ENTRIES: u16 = 128;
/// Bounce slots per channel: I/O commands carrying data that can be in flight at once.
const BOUNCE_SLOTS: usize = 32;
/// Largest bounce slot (bytes); each bounced data command moves at most one slot.
const MAX_SLOT_BYTES: u64 = 128 * 1024;
/// Largest zero-copy data command (bytes): at most 258 pages, well inside one PRP list page.
const MAX_ZERO_COPY_COMMAND_BYTES: u64 = 1024 * 1024;
/// Completions reaped per `IoQueuePair::poll` call.
const POLL_BATCH: usize = 64;
/// Blocks one DSM range may cover (32-bit count).
const MAX_DSM_RANGE_BLOCKS: u64 = u32::MAX as u64;
/// Tag bits that carry the command's bounce slot (plus one; 0 for none).
const SLOT_TAG_BITS: u32 = 16;

/// How to attach a controller.
#[derive(Debug, Clone)]
pub struct NvmeBdevConfig {
    /// Controller name (`Nvme0`); bdevs are named `<name>n<nsid>`.
    pub name: String,
    /// PCI address (`0000:01:00.0`), bound to `vfio-pci`.
    pub traddr: String,
    /// I/O queue pairs to ask the controller for (each channel uses one).
    pub io_queues: u16,
    /// How long one command may be outstanding before the driver aborts it.
    pub io_timeout: Duration,
}

/// I/O statistics of one controller, across its bdevs and channels.
#[derive(Debug, Default)]
pub struct NvmeStats {
    /// READs and WRITEs whose commands pointed straight at the submitter's buffers.
    pub zero_copy_ios: AtomicU64,
    /// I/Os whose data went through a bounce buffer (the sum of the two reasons below).
    pub bounced_ios: AtomicU64,
    /// Bounced because a buffer lay outside the memory mapped for DMA (mapping failed).
    pub bounced_unmapped_ios: AtomicU64,
    /// Bounced because the controller cannot take the buffer list as it is (PRP rules without
    /// SGL support, buffers not dword aligned, too many segments).
    pub bounced_unaligned_ios: AtomicU64,
    /// Host memory ranges that could not be mapped for DMA.
    pub dma_map_failures: AtomicU64,
    /// Bytes copied between guest memory and bounce buffers.
    pub bounced_bytes: AtomicU64,
    /// NVMe commands submitted.
    pub commands: AtomicU64,
    /// I/Os that failed (status, reset, failed controller, timeout).
    pub failed_ios: AtomicU64,
}

/// An attached controller: the device handle and what its bdevs share.
#[derive(Debug)]
pub struct NvmeController {
    name: String,
    traddr: String,
    // Dropped before `controller`: guest memory is unmapped while the device is still attached
    // to the IOMMU container (afterwards the kernel refuses the unmap).
    dma: Mutex<DmaRegistry>,
    controller: Controller,
    io_timeout: Duration,
    stats: NvmeStats,
    detached: AtomicBool,
}

impl NvmeController {
    /// Opens the controller and creates one bdev per usable namespace (`<name>n<nsid>`).
    pub fn attach(config: NvmeBdevConfig) -> Result<(Arc<Self>, Vec<Arc<NvmeBdev>>), BdevError> {
        if config.io_queues == 0 {
            return Err(BdevError::InvalidParams(
                "at least one I/O queue is needed".into(),
            ));
        }
        let controller = Controller::open(
            &config.traddr,
            ControllerConfig {
                io_queues: config.io_queues,
                io_timeout: config.io_timeout,
                ..ControllerConfig::default()
            },
        )
        .map_err(|e| attach_error(&config.traddr, e))?;
        let ctrl = Arc::new(NvmeController {
            name: config.name,
            traddr: controller.bdf().to_owned(),
            io_timeout: config.io_timeout,
            controller,
            stats: NvmeStats::default(),
            detached: AtomicBool::new(false),
            dma: Mutex::new(DmaRegistry::default()),
        });
        let mut bdevs = Vec::new();
        for ns in ctrl.controller.namespaces() {
            match NvmeBdev::new(&ctrl, ns) {
                Ok(bdev) => bdevs.push(Arc::new(bdev)),
                Err(e) => tracing::warn!(controller = %ctrl.name, nsid = ns.nsid, %e,
                    "namespace not exported"),
            }
        }
        if bdevs.is_empty() {
            return Err(BdevError::Backend(format!(
                "controller {} at {} has no namespace rvhost can serve",
                ctrl.name, ctrl.traddr
            )));
        }
        Ok((ctrl, bdevs))
    }

    /// Controller name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PCI address.
    pub fn traddr(&self) -> &str {
        &self.traddr
    }

    /// I/O counters.
    pub fn stats(&self) -> &NvmeStats {
        &self.stats
    }

    /// The driver handle.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Refuses new channels and I/O from now on (the controller is being detached). Channels
    /// already open keep the device open until they close.
    pub fn mark_detached(&self) {
        self.detached.store(true, Ordering::Release);
    }

    /// Whether the controller was detached.
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    fn dma_registry(&self) -> MutexGuard<'_, DmaRegistry> {
        // The registry stays consistent across a panic in another holder (every change is one
        // push or retain), so a poisoned lock is still usable.
        self.dma
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The DMA registration of `mem`, mapping its ranges if it is new. Unmaps registrations
    /// nobody uses any more on the way.
    fn dma_registration(&self, mem: &IoMemory) -> Arc<DmaRegistration> {
        let mut registry = self.dma_registry();
        registry.collect();
        let key = memory_key(mem);
        if let Some(found) = registry.registrations.iter().find(|r| r.key == key) {
            return Arc::clone(found);
        }
        let registration = Arc::new(registry.register(self, mem));
        registry.registrations.push(Arc::clone(&registration));
        registration
    }

    /// Unmaps and forgets the memory of vhost devices that replaced or dropped it, once no I/O
    /// of it is in flight. Called periodically from the RPC thread, so that memory is released
    /// even when no further I/O arrives.
    pub fn collect_dma(&self) {
        self.dma_registry().collect();
    }

    /// Bytes of host memory currently mapped for zero-copy DMA.
    pub fn dma_mapped_bytes(&self) -> u64 {
        self.dma_registry().mapped_bytes()
    }
}

/// Identity of a memory object: the address of its shared allocation. Unique while the object
/// lives, and a registration keeps it alive.
fn memory_key(mem: &IoMemory) -> usize {
    Arc::as_ptr(mem).cast::<()>() as usize
}

/// The memory objects of one controller that I/O arrived with, and their DMA mappings.
#[derive(Debug, Default)]
struct DmaRegistry {
    registrations: Vec<Arc<DmaRegistration>>,
}

/// One memory object mapped for DMA (as far as it could be).
struct DmaRegistration {
    key: usize,
    /// Keeps the memory object alive (its mappings hold further clones).
    mem: IoMemory,
    /// The mapped ranges, some possibly shared with other registrations: vhost-user tables that
    /// differ by one added or removed region share the other regions' mappings, and the IOMMU
    /// refuses to map the same range twice.
    mappings: Vec<Arc<HostDmaMapping>>,
    /// How many of `mappings` this registration created (each holds a clone of `mem`).
    own_mappings: usize,
}

impl std::fmt::Debug for DmaRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaRegistration")
            .field("key", &format_args!("{:#x}", self.key))
            .field("mappings", &self.mappings)
            .finish_non_exhaustive()
    }
}

impl DmaRegistration {
    /// Whether nothing but this registration and its own mappings holds the memory any more
    /// (one atomic load).
    fn abandoned(&self) -> bool {
        Arc::strong_count(&self.mem) == 1 + self.own_mappings
    }

    /// Whether every buffer lies inside one mapped range.
    fn covers(&self, iovs: &[IoVec]) -> bool {
        iovs.iter().all(|iov| {
            self.mappings
                .iter()
                .any(|m| m.contains(iov.addr, u64::from(iov.len)))
        })
    }
}

impl DmaRegistry {
    fn register(&self, ctrl: &NvmeController, mem: &IoMemory) -> DmaRegistration {
        let mut mappings = Vec::new();
        let mut own_mappings = 0;
        let mut first_failure: Option<String> = None;
        for range in mem.host_ranges() {
            // Only whole pages can be mapped; buffers in a partial page at either end bounce.
            let Some((vaddr, len)) = page_interior(range.addr, range.len) else {
                continue;
            };
            let shared = self
                .registrations
                .iter()
                .flat_map(|r| r.mappings.iter())
                .find(|m| m.vaddr() == vaddr && m.len() == len);
            if let Some(existing) = shared {
                mappings.push(Arc::clone(existing));
                continue;
            }
            let owner: Arc<dyn rvhost_platform_linux::HostMemory> = mem.clone();
            match ctrl.controller.map_host_memory(owner, vaddr, len) {
                Ok(mapping) => {
                    mappings.push(Arc::new(mapping));
                    own_mappings += 1;
                }
                Err(e) => {
                    ctrl.stats.dma_map_failures.fetch_add(1, Ordering::Relaxed);
                    first_failure.get_or_insert_with(|| format!("{vaddr:#x}+{len:#x}: {e}"));
                }
            }
        }
        let mapped: u64 = mappings.iter().map(|m| m.len()).sum();
        match first_failure {
            Some(reason) => tracing::warn!(controller = %ctrl.name, mapped, %reason,
                "guest memory not mapped for DMA; I/O to it goes through bounce buffers"),
            None => tracing::info!(controller = %ctrl.name, mapped, ranges = mappings.len(),
                "guest memory mapped for zero-copy DMA"),
        }
        DmaRegistration {
            key: memory_key(mem),
            mem: Arc::clone(mem),
            mappings,
            own_mappings,
        }
    }

    /// Drops registrations whose memory only this registry still holds: no channel remembers
    /// them, no I/O of them is in flight, and their vhost device no longer uses the memory.
    fn collect(&mut self) {
        self.registrations.retain(|r| {
            let unused = Arc::strong_count(r) == 1 && r.abandoned();
            if unused {
                tracing::debug!(key = r.key, "guest memory unmapped for DMA");
            }
            !unused
        });
    }

    fn mapped_bytes(&self) -> u64 {
        let mut seen: Vec<u64> = Vec::new();
        let mut total = 0u64;
        for m in self.registrations.iter().flat_map(|r| r.mappings.iter()) {
            if !seen.contains(&m.vaddr()) {
                seen.push(m.vaddr());
                total = total.saturating_add(m.len());
            }
        }
        total
    }
}

/// The whole 4 KiB pages of `[addr, addr + len)`, if there are any.
fn page_interior(addr: u64, len: u64) -> Option<(u64, u64)> {
    let start = addr.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    let end = addr.checked_add(len)? & !(PAGE_SIZE - 1);
    (end > start).then(|| (start, end - start))
}

fn attach_error(traddr: &str, e: NvmeError) -> BdevError {
    BdevError::Backend(format!(
        "cannot attach NVMe controller at {traddr}: {e} (is it bound to vfio-pci?)"
    ))
}

/// Checks a PCI address in SPDK's forms (`0000:01:00.0` or `01:00.0`).
pub fn validate_traddr(traddr: &str) -> Result<(), BdevError> {
    let bad = || {
        BdevError::InvalidParams(format!(
            "traddr {traddr:?} is not a PCI address (DDDD:BB:DD.F)"
        ))
    };
    let (rest, function) = traddr.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let widths: &[usize] = match parts.len() {
        3 => &[4, 2, 2],
        2 => &[2, 2],
        _ => return Err(bad()),
    };
    let hex_ok = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    if !parts.iter().zip(widths).all(|(p, w)| hex_ok(p, *w)) {
        return Err(bad());
    }
    let device = parts.last().and_then(|d| u8::from_str_radix(d, 16).ok());
    let func = function.parse::<u8>().ok();
    match (device, func) {
        (Some(d), Some(f)) if d < 32 && f < 8 && function.len() == 1 => Ok(()),
        _ => Err(bad()),
    }
}

/// One namespace of an attached controller.
#[derive(Debug)]
pub struct NvmeBdev {
    name: String,
    ctrl: Arc<NvmeController>,
    nsid: u32,
    block_size: u32,
    num_blocks: u64,
    uuid: [u8; 16],
    /// Bytes each bounced data command moves at most (a multiple of the block size).
    slot_bytes: u32,
    /// Bytes each zero-copy data command moves at most (a multiple of the block size).
    zero_copy_bytes: u32,
    removed: AtomicBool,
}

impl NvmeBdev {
    fn new(ctrl: &Arc<NvmeController>, ns: &NamespaceInfo) -> Result<Self, BdevError> {
        if ns.format.metadata_size != 0 {
            return Err(BdevError::InvalidParams(format!(
                "namespace {} is formatted with {} bytes of metadata per block",
                ns.nsid, ns.format.metadata_size
            )));
        }
        let block_size = ns.block_size();
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two()
        {
            return Err(BdevError::InvalidParams(format!(
                "namespace {} has blocks of {block_size} bytes",
                ns.nsid
            )));
        }
        let max_transfer = ctrl.controller.max_transfer_bytes();
        let slot_bytes = command_bytes(max_transfer, block_size, MAX_SLOT_BYTES)?;
        let zero_copy_bytes = command_bytes(max_transfer, block_size, MAX_ZERO_COPY_COMMAND_BYTES)?;
        let info = ctrl.controller.info();
        Ok(NvmeBdev {
            name: format!("{}n{}", ctrl.name, ns.nsid),
            ctrl: Arc::clone(ctrl),
            nsid: ns.nsid,
            block_size,
            num_blocks: ns.size_blocks,
            uuid: namespace_uuid(&info.serial, &info.model, ns.nsid),
            slot_bytes,
            zero_copy_bytes,
            removed: AtomicBool::new(false),
        })
    }

    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<NvmeController> {
        &self.ctrl
    }

    /// Refuses new I/O from now on (the bdev is being deleted).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    fn refuses_io(&self) -> bool {
        self.removed.load(Ordering::Acquire) || self.ctrl.is_detached()
    }
}

/// Bytes one data command moves at most: the controller's transfer limit, at most `cap`, rounded
/// down to whole blocks and 4 KiB pages.
fn command_bytes(max_transfer: u64, block_size: u32, cap: u64) -> Result<u32, BdevError> {
    let unit = u64::from(block_size).max(4096);
    let bytes = max_transfer.min(cap) / unit * unit;
    if bytes == 0 {
        return Err(BdevError::InvalidParams(format!(
            "the controller transfers at most {max_transfer} bytes, less than one block of \
             {block_size}"
        )));
    }
    u32::try_from(bytes).map_err(|_| BdevError::InvalidParams("slot size overflow".into()))
}

/// A UUID that stays the same across restarts for the same namespace of the same device
/// (SCSI NAA identifiers and `bdev_get_bdevs` derive from it).
fn namespace_uuid(serial: &str, model: &str, nsid: u32) -> [u8; 16] {
    fn fnv1a(seed: u64, parts: &[&[u8]]) -> u64 {
        let mut hash = seed;
        for part in parts {
            for &b in *part {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
            hash ^= 0xff;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash
    }
    let nsid = nsid.to_le_bytes();
    let parts: [&[u8]; 3] = [serial.as_bytes(), model.as_bytes(), &nsid];
    let hi = fnv1a(0xcbf2_9ce4_8422_2325, &parts);
    let lo = fnv1a(0x84222325_cbf29ce4, &parts);
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&hi.to_be_bytes());
    uuid[8..].copy_from_slice(&lo.to_be_bytes());
    // RFC 9562 version 8 (custom), variant 10.
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

impl Bdev for NvmeBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn prepare_memory(&self, mem: &IoMemory) {
        if !self.refuses_io() {
            // Registered now, on the control thread; the channels find it on their first I/O.
            drop(self.ctrl.dma_registration(mem));
        }
    }
    fn product_name(&self) -> &str {
        "NVMe disk"
    }
    fn module_name(&self) -> &'static str {
        "nvme"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn supports(&self, kind: IoKind) -> bool {
        let info = self.ctrl.controller.info();
        match kind {
            IoKind::Read | IoKind::Write | IoKind::Flush => true,
            IoKind::Unmap => info.supports_dsm(),
            IoKind::WriteZeroes => info.supports_write_zeroes(),
        }
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        if self.refuses_io() {
            return Err(BdevError::Removed(self.name.clone()));
        }
        let controller = &self.ctrl.controller;
        let qp = controller
            .create_io_queue_pair(QUEUE_ENTRIES)
            .map_err(|e| {
                BdevError::Backend(format!(
                    "{}: cannot create an I/O queue pair: {e}",
                    self.name
                ))
            })?;
        let slot = usize::try_from(self.slot_bytes)
            .map_err(|_| BdevError::Backend("slot size overflow".into()))?;
        let bounce = controller
            .allocate_dma(slot.saturating_mul(BOUNCE_SLOTS))
            .map_err(|e| {
                BdevError::Backend(format!("{}: cannot allocate DMA memory: {e}", self.name))
            })?;
        let zero_copy_len = usize::try_from(self.zero_copy_bytes)
            .map_err(|_| BdevError::Backend("command size overflow".into()))?;
        let sgl = controller.sgl_support();
        Ok(Box::new(NvmeChannel {
            scratch: vec![0; slot],
            slot_len: slot,
            zero_copy_len,
            sgl,
            segments: Vec::new(),
            dma: None,
            reaped: Vec::new(),
            failure_log: FailureLog::default(),
            free_slots: (0..BOUNCE_SLOTS).rev().collect(),
            bounce,
            qp,
            bdev: self,
            ios: Vec::new(),
            free_ios: Vec::new(),
            completions: VecDeque::new(),
        }))
    }
    fn driver_specific(&self) -> serde_json::Value {
        let ctrl = &self.ctrl;
        let info = ctrl.controller.info();
        let stats = &ctrl.stats;
        serde_json::json!({
            "nvme": [{
                "pci_address": ctrl.traddr,
                "trid": { "trtype": "PCIe", "traddr": ctrl.traddr },
                "ctrlr_data": {
                    "vendor_id": format!("{:#06x}", info.vendor_id),
                    "model_number": info.model,
                    "serial_number": info.serial,
                    "firmware_revision": info.firmware,
                    "oncs": { "dsm": info.supports_dsm(), "write_zeroes": info.supports_write_zeroes() },
                },
                "ns_data": { "id": self.nsid },
                "controller_state": format!("{:?}", ctrl.controller.state()),
                "zero_copy_ios": stats.zero_copy_ios.load(Ordering::Relaxed),
                "bounced_ios": stats.bounced_ios.load(Ordering::Relaxed),
                "bounced_unmapped_ios": stats.bounced_unmapped_ios.load(Ordering::Relaxed),
                "bounced_unaligned_ios": stats.bounced_unaligned_ios.load(Ordering::Relaxed),
                "bounced_bytes": stats.bounced_bytes.load(Ordering::Relaxed),
                "dma_mapped_bytes": ctrl.dma_mapped_bytes(),
                "dma_map_failures": stats.dma_map_failures.load(Ordering::Relaxed),
                "commands": stats.commands.load(Ordering::Relaxed),
                "failed_ios": stats.failed_ios.load(Ordering::Relaxed),
            }]
        })
    }
}

/// One bdev I/O, possibly split over several commands.
struct ChannelIo {
    tag: u64,
    /// Commands still outstanding.
    outstanding: u32,
    failed: bool,
    /// Bounce slots held until the I/O completes.
    slots: Vec<usize>,
    /// A zero-copy I/O keeps the mapping of its buffers (and so the memory) until it completes.
    registration: Option<Arc<DmaRegistration>>,
    /// A bounced READ copies its slots out to these buffers when it completes.
    copy_out: Option<CopyOut>,
}

/// Where a bounced READ's data goes once the device has written the slots.
struct CopyOut {
    mem: IoMemory,
    iovs: Vec<IoVec>,
    len: u64,
}

/// One reactor's view of an [`NvmeBdev`].
struct NvmeChannel {
    // `qp` and `bounce` are dropped before `bdev`, which keeps the controller open.
    qp: IoQueuePair,
    bounce: DmaRegion,
    bdev: Arc<NvmeBdev>,
    slot_len: usize,
    free_slots: Vec<usize>,
    scratch: Vec<u8>,
    /// Bytes one zero-copy command moves at most.
    zero_copy_len: usize,
    /// How the controller takes scattered buffers.
    sgl: SglSupport,
    /// Reused for the segments of one command (no allocation per I/O).
    segments: Vec<DmaSegment>,
    /// The registration of the memory the last I/O came with: the registry is consulted only
    /// when the memory object changes.
    dma: Option<Arc<DmaRegistration>>,
    /// Reused by `reap` (no allocation per poll).
    reaped: Vec<(usize, bool)>,
    failure_log: FailureLog,
    ios: Vec<Option<ChannelIo>>,
    free_ios: Vec<usize>,
    completions: VecDeque<(u64, IoStatus)>,
}

/// Logs the first of a run of command failures and how many there were once commands succeed
/// again: a failed controller fails every I/O, and a warning per I/O would flood the log.
#[derive(Debug, Default)]
struct FailureLog {
    /// Failures since the last success (the first was logged).
    run: u64,
}

impl FailureLog {
    fn failed(&mut self, bdev: &str, what: &str, error: &IoError) {
        if self.run == 0 {
            tracing::warn!(%bdev, %error, "{what} (further failures are counted, not logged)");
        }
        self.run = self.run.saturating_add(1);
    }

    fn succeeded(&mut self, bdev: &str) {
        if self.run > 1 {
            tracing::info!(%bdev, failures = self.run, "NVMe commands succeed again");
        }
        self.run = 0;
    }
}

fn command_tag(io: usize, slot: Option<usize>) -> u64 {
    let slot = slot.map_or(0, |s| s as u64 + 1);
    ((io as u64) << SLOT_TAG_BITS) | slot
}

fn io_of_tag(tag: u64) -> usize {
    (tag >> SLOT_TAG_BITS) as usize
}

/// Calls `each(host_addr, offset_in_piece, len)` for the parts of `iovs` that cover bytes
/// `[start, start + len)` of the transfer.
fn for_each_span(
    iovs: &[IoVec],
    start: u64,
    len: u64,
    mut each: impl FnMut(u64, usize, usize) -> Result<(), BdevError>,
) -> Result<(), BdevError> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| BdevError::InvalidParams("I/O range overflows".into()))?;
    let mut iov_start = 0u64;
    for iov in iovs {
        let iov_end = iov_start.saturating_add(u64::from(iov.len));
        let from = start.max(iov_start);
        let to = end.min(iov_end);
        if from < to {
            let addr = iov
                .addr
                .checked_add(from - iov_start)
                .ok_or_else(|| BdevError::InvalidParams("I/O buffer address overflows".into()))?;
            // Both are below the command length, which is a `usize`.
            each(addr, (from - start) as usize, (to - from) as usize)?;
        }
        if iov_end >= end {
            break;
        }
        iov_start = iov_end;
    }
    Ok(())
}

/// Fills `segments` with the buffers of bytes `[start, start + len)` of the transfer, as the
/// device sees them (IOVA = host VA).
fn command_segments(
    iovs: &[IoVec],
    start: u64,
    len: u64,
    segments: &mut Vec<DmaSegment>,
) -> Result<(), BdevError> {
    segments.clear();
    for_each_span(iovs, start, len, |addr, _, n| {
        let len = u32::try_from(n).map_err(|_| BdevError::Backend("segment too long".into()))?;
        segments.push(DmaSegment { iova: addr, len });
        Ok(())
    })
}

/// Whether the controller can take the buffers of a `len`-byte transfer as they are, cut into
/// commands of `command_len` bytes: each command's buffer list must be describable by PRPs (or
/// SGLs if offered). A split inside a buffer keeps a valid PRP shape: the earlier command ends
/// there (its last entry may end anywhere) and the later one starts there (its first entry may
/// start anywhere).
fn describable(
    iovs: &[IoVec],
    len: u64,
    command_len: u64,
    sgl: SglSupport,
    segments: &mut Vec<DmaSegment>,
) -> bool {
    let mut done = 0u64;
    while done < len {
        let piece = (len - done).min(command_len);
        if command_segments(iovs, done, piece, segments).is_err() {
            return false;
        }
        // A dry run into no list page: the same checks the driver makes when it builds the
        // command.
        if build_data_pointer(segments, sgl, 0, |_, _| {}).is_err() {
            return false;
        }
        done += piece;
    }
    true
}

impl NvmeChannel {
    fn new_io(&mut self, tag: u64) -> usize {
        let io = ChannelIo {
            tag,
            outstanding: 0,
            failed: false,
            slots: Vec::new(),
            registration: None,
            copy_out: None,
        };
        match self.free_ios.pop() {
            Some(i) => {
                if let Some(entry) = self.ios.get_mut(i) {
                    *entry = Some(io);
                }
                i
            }
            None => {
                self.ios.push(Some(io));
                self.ios.len() - 1
            }
        }
    }

    /// Ends I/O `index`: copies a bounced READ out, releases its slots and mapping, and records
    /// its completion.
    fn finish(&mut self, index: usize) {
        let Some(mut io) = self.ios.get_mut(index).and_then(Option::take) else {
            return;
        };
        if let Some(out) = io.copy_out.take() {
            if !io.failed {
                if let Err(e) = self.copy_out(&io.slots, &out) {
                    tracing::warn!(bdev = %self.bdev.name, %e, "copying read data to the guest failed");
                    io.failed = true;
                }
            }
        }
        self.free_slots.extend(io.slots);
        self.free_ios.push(index);
        let status = if io.failed {
            self.bdev
                .ctrl
                .stats
                .failed_ios
                .fetch_add(1, Ordering::Relaxed);
            IoStatus::Failed
        } else {
            IoStatus::Success
        };
        self.completions.push_back((io.tag, status));
    }

    /// Reaps completions from the queue pair into the I/Os they belong to; returns how many
    /// commands finished. `hold` is an I/O still being submitted, which must not end yet.
    fn reap(&mut self, hold: Option<usize>) -> usize {
        let mut finished = std::mem::take(&mut self.reaped);
        finished.clear();
        let bdev = &self.bdev.name;
        let failures = &mut self.failure_log;
        let n = self.qp.poll(POLL_BATCH, |tag, result| {
            match &result {
                Err(e) => failures.failed(bdev, "NVMe command failed", e),
                Ok(()) => failures.succeeded(bdev),
            }
            finished.push((io_of_tag(tag), result.is_ok()));
        });
        for &(index, ok) in &finished {
            let Some(Some(io)) = self.ios.get_mut(index) else {
                tracing::error!(index, "NVMe completion for an unknown I/O");
                continue;
            };
            io.outstanding = io.outstanding.saturating_sub(1);
            io.failed |= !ok;
            if io.outstanding == 0 && hold != Some(index) {
                self.finish(index);
            }
        }
        self.reaped = finished;
        n
    }

    fn io_outstanding(&self, index: usize) -> u32 {
        match self.ios.get(index) {
            Some(Some(io)) => io.outstanding,
            _ => 0,
        }
    }

    fn mark_failed(&mut self, index: usize) {
        if let Some(Some(io)) = self.ios.get_mut(index) {
            io.failed = true;
        }
    }

    /// When a wait in `submit` gives up; `None` for never (a timeout too large to add).
    fn deadline(&self) -> Option<Instant> {
        // The driver aborts after one timeout and resets after another; allow a third for the
        // reset itself before giving up on the wait.
        Instant::now().checked_add(self.bdev.ctrl.io_timeout.saturating_mul(3))
    }

    /// Polls until `ready` holds or the controller cannot make progress; `false` on failure.
    fn wait_until(&mut self, hold: Option<usize>, ready: impl Fn(&Self) -> bool) -> bool {
        let deadline = self.deadline();
        loop {
            if ready(self) {
                return true;
            }
            let reaped = self.reap(hold);
            if reaped == 0 {
                if self.bdev.ctrl.controller.state() == ControllerState::Failed
                    && self.qp.in_flight() == 0
                {
                    return ready(self);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    tracing::error!(bdev = %self.bdev.name, "NVMe I/O wait timed out");
                    return false;
                }
                std::hint::spin_loop();
            }
        }
    }

    fn take_slot(&mut self, hold: Option<usize>) -> Option<usize> {
        if self.free_slots.is_empty() && !self.wait_until(hold, |ch| !ch.free_slots.is_empty()) {
            return None;
        }
        self.free_slots.pop()
    }

    /// Issues one command with `issue`, retrying while the queue is full.
    fn issue(
        &mut self,
        index: usize,
        slot: Option<usize>,
        mut issue: impl FnMut(&mut IoQueuePair, u64) -> Result<(), IoError>,
    ) -> bool {
        let tag = command_tag(index, slot);
        let deadline = self.deadline();
        loop {
            match issue(&mut self.qp, tag) {
                Ok(()) => {
                    if let Some(Some(io)) = self.ios.get_mut(index) {
                        io.outstanding += 1;
                    }
                    self.bdev
                        .ctrl
                        .stats
                        .commands
                        .fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(IoError::QueueFull) if deadline.is_none_or(|d| Instant::now() < d) => {
                    self.reap(Some(index));
                }
                Err(e) => {
                    self.failure_log
                        .failed(&self.bdev.name, "NVMe command not submitted", &e);
                    return false;
                }
            }
        }
    }

    /// The registration of `mem`, from the channel's memory of the last one when it matches.
    fn registration_for(&mut self, mem: &IoMemory) -> Arc<DmaRegistration> {
        match &self.dma {
            Some(reg) if reg.key == memory_key(mem) => Arc::clone(reg),
            _ => {
                let reg = self.bdev.ctrl.dma_registration(mem);
                self.dma = Some(Arc::clone(&reg));
                reg
            }
        }
    }

    /// Whether `io` can go to the device without copying; counts the reason when not.
    fn zero_copy_possible(&mut self, io: &BdevIo<'_>, len: u64) -> Option<Arc<DmaRegistration>> {
        let reg = self.registration_for(io.mem);
        let stats = &self.bdev.ctrl.stats;
        if !reg.covers(io.iovs) {
            stats.bounced_unmapped_ios.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !describable(
            io.iovs,
            len,
            self.zero_copy_len as u64,
            self.sgl,
            &mut self.segments,
        ) {
            stats.bounced_unaligned_ios.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(reg)
    }

    /// Submits the commands of a zero-copy READ or WRITE, pointing at the I/O's own buffers;
    /// `false` once one could not be issued (commands already issued still complete).
    fn submit_zero_copy(
        &mut self,
        index: usize,
        io: &BdevIo<'_>,
        len: u64,
        registration: Arc<DmaRegistration>,
    ) -> Result<bool, BdevError> {
        if let Some(Some(entry)) = self.ios.get_mut(index) {
            entry.registration = Some(registration);
        }
        let nsid = self.bdev.nsid;
        let block_size = u64::from(self.bdev.block_size);
        let write = io.kind == IoKind::Write;
        let mut segments = std::mem::take(&mut self.segments);
        let mut done = 0u64;
        let mut issued_all = true;
        while done < len {
            let piece = (len - done).min(self.zero_copy_len as u64);
            command_segments(io.iovs, done, piece, &mut segments)?;
            let lba = io.offset_blocks + done / block_size;
            let blocks = (piece / block_size) as u32;
            let issued = self.issue(index, None, |qp, tag| {
                if write {
                    qp.write(nsid, lba, blocks, &segments, tag)
                } else {
                    qp.read(nsid, lba, blocks, &segments, tag)
                }
            });
            if !issued {
                issued_all = false;
                break;
            }
            done += piece;
        }
        self.segments = segments;
        if issued_all {
            self.bdev
                .ctrl
                .stats
                .zero_copy_ios
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(issued_all)
    }

    /// Submits the data commands of a bounced READ or WRITE; `false` once one could not be
    /// issued (the I/O is then marked failed; commands already issued still complete).
    fn submit_bounced(
        &mut self,
        index: usize,
        io: &BdevIo<'_>,
        len: u64,
    ) -> Result<bool, BdevError> {
        let nsid = self.bdev.nsid;
        let block_size = u64::from(self.bdev.block_size);
        let write = io.kind == IoKind::Write;
        if !write {
            if let Some(Some(entry)) = self.ios.get_mut(index) {
                entry.copy_out = Some(CopyOut {
                    mem: Arc::clone(io.mem),
                    iovs: io.iovs.to_vec(),
                    len,
                });
            }
        }
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(self.slot_len as u64);
            let Some(slot) = self.take_slot(Some(index)) else {
                return Ok(false);
            };
            if let Some(Some(entry)) = self.ios.get_mut(index) {
                entry.slots.push(slot);
            }
            let slot_offset = slot * self.slot_len;
            if write {
                let scratch = &mut self.scratch;
                let bounce = &self.bounce;
                let mem = io.mem;
                for_each_span(io.iovs, done, piece, |addr, at, n| {
                    let buf = scratch
                        .get_mut(at..at + n)
                        .ok_or_else(|| BdevError::Backend("span beyond the bounce slot".into()))?;
                    mem.copy_from_host(addr, buf).map_err(BdevError::Memory)?;
                    if bounce.write_bytes(slot_offset + at, buf) {
                        Ok(())
                    } else {
                        Err(BdevError::Backend("bounce slot out of range".into()))
                    }
                })?;
            }
            let lba = io.offset_blocks + done / block_size;
            let blocks = (piece / block_size) as u32;
            let segment = [DmaSegment {
                iova: self.bounce.iova() + slot_offset as u64,
                len: piece as u32,
            }];
            let issued = self.issue(index, Some(slot), |qp, tag| {
                if write {
                    qp.write(nsid, lba, blocks, &segment, tag)
                } else {
                    qp.read(nsid, lba, blocks, &segment, tag)
                }
            });
            if !issued {
                return Ok(false);
            }
            done += piece;
        }
        let stats = &self.bdev.ctrl.stats;
        stats.bounced_ios.fetch_add(1, Ordering::Relaxed);
        stats.bounced_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// Copies the slots of a finished READ into the guest buffers.
    fn copy_out(&mut self, slots: &[usize], out: &CopyOut) -> Result<(), BdevError> {
        let mut done = 0u64;
        for &slot in slots {
            if done >= out.len {
                break;
            }
            let piece = (out.len - done).min(self.slot_len as u64);
            let slot_offset = slot * self.slot_len;
            let scratch = &mut self.scratch;
            let bounce = &self.bounce;
            for_each_span(&out.iovs, done, piece, |addr, at, n| {
                let buf = scratch
                    .get_mut(at..at + n)
                    .ok_or_else(|| BdevError::Backend("span beyond the bounce slot".into()))?;
                if !bounce.read_bytes(slot_offset + at, buf) {
                    return Err(BdevError::Backend("bounce slot out of range".into()));
                }
                out.mem.copy_to_host(addr, buf).map_err(BdevError::Memory)
            })?;
            done += piece;
        }
        if done < out.len {
            return Err(BdevError::Backend("read data short of its slots".into()));
        }
        Ok(())
    }

    fn submit_unmap(&mut self, index: usize, io: &BdevIo<'_>) -> bool {
        let nsid = self.bdev.nsid;
        let mut lba = io.offset_blocks;
        let end = io.offset_blocks + io.num_blocks;
        while lba < end {
            let mut ranges: Vec<(u64, u32)> = Vec::new();
            while lba < end && ranges.len() < MAX_DSM_RANGES {
                let blocks = (end - lba).min(MAX_DSM_RANGE_BLOCKS);
                ranges.push((lba, blocks as u32));
                lba += blocks;
            }
            if !self.issue(index, None, |qp, tag| qp.deallocate(nsid, &ranges, tag)) {
                return false;
            }
        }
        true
    }

    fn submit_write_zeroes(&mut self, index: usize, io: &BdevIo<'_>) -> bool {
        let nsid = self.bdev.nsid;
        let mut lba = io.offset_blocks;
        let end = io.offset_blocks + io.num_blocks;
        while lba < end {
            let blocks = (end - lba).min(u64::from(MAX_BLOCKS_PER_COMMAND)) as u32;
            if !self.issue(index, None, |qp, tag| {
                qp.write_zeroes(nsid, lba, blocks, false, tag)
            }) {
                return false;
            }
            lba += u64::from(blocks);
        }
        true
    }

    /// Ends an I/O after its submission stopped early: it fails once the commands already
    /// issued have completed.
    fn fail_after_issued(&mut self, index: usize) {
        self.mark_failed(index);
        if self.io_outstanding(index) == 0 {
            self.finish(index);
        }
    }

    /// Ends an I/O whose submission went through once its commands have completed (they may
    /// all have completed while later ones were being issued).
    fn end_submission(&mut self, index: usize) {
        if self.io_outstanding(index) == 0 {
            self.finish(index);
        }
    }
}

impl BdevChannel for NvmeChannel {
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        let bdev = Arc::clone(&self.bdev);
        if bdev.refuses_io() {
            return Err(BdevError::Removed(bdev.name.clone()));
        }
        if !bdev.supports(io.kind) {
            self.completions.push_back((io.tag, IoStatus::Unsupported));
            return Ok(());
        }
        if io.kind == IoKind::Flush {
            let index = self.new_io(io.tag);
            let nsid = bdev.nsid;
            if !self.issue(index, None, |qp, tag| qp.flush(nsid, tag)) {
                self.fail_after_issued(index);
            }
            self.qp.ring();
            return Ok(());
        }
        let (_, len) = byte_range(io, bdev.num_blocks, bdev.block_size)?;
        if io.num_blocks == 0 {
            self.completions.push_back((io.tag, IoStatus::Success));
            return Ok(());
        }
        match io.kind {
            IoKind::Read | IoKind::Write => {
                check_iovs(io, len, bdev.num_blocks)?;
                let index = self.new_io(io.tag);
                let submitted = match self.zero_copy_possible(io, len) {
                    Some(reg) => self.submit_zero_copy(index, io, len, reg),
                    None => self.submit_bounced(index, io, len),
                };
                let submitted = submitted.unwrap_or_else(|e| {
                    // Guest buffers went bad midway: commands already issued still complete.
                    tracing::warn!(bdev = %bdev.name, %e, "I/O buffer error");
                    false
                });
                if submitted {
                    self.end_submission(index);
                } else {
                    self.fail_after_issued(index);
                }
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                let index = self.new_io(io.tag);
                let ok = if io.kind == IoKind::Unmap {
                    self.submit_unmap(index, io)
                } else {
                    self.submit_write_zeroes(index, io)
                };
                if ok {
                    self.end_submission(index);
                } else {
                    self.fail_after_issued(index);
                }
            }
            IoKind::Flush => {}
        }
        // One doorbell write per submitted I/O rather than waiting for the next poll.
        self.qp.ring();
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        if self.ios.len() > self.free_ios.len() {
            self.reap(None);
        } else if self.dma.as_ref().is_some_and(|reg| reg.abandoned()) {
            // Idle, and the vhost device has let go of the memory this channel last saw (a new
            // table, or the session ended): stop holding it, so the registry can unmap it.
            self.dma = None;
        }
        report_completions(&mut self.completions, done)
    }

    fn in_flight(&self) -> usize {
        self.ios.iter().filter(|io| io.is_some()).count() + self.completions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        for ok in ["0000:01:00.0", "01:00.0", "ffff:ff:1f.7", "0000:00:04.0"] {
            assert!(validate_traddr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0000:01:00",
            "0000:01:00.8",
            "0000:01:20.0",
            "00000:01:00.0",
            "0000:001:00.0",
            "x000:01:00.0",
            "0000:01:00.00",
            "1:2:3:4.0",
            "/dev/nvme0",
            "0000:01:00.0 ",
        ] {
            assert!(
                matches!(validate_traddr(bad), Err(BdevError::InvalidParams(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn slot_sizes() {
        assert_eq!(
            command_bytes(u64::MAX, 512, MAX_SLOT_BYTES).unwrap(),
            128 * 1024
        );
        assert_eq!(
            command_bytes(2 << 20, 4096, MAX_SLOT_BYTES).unwrap(),
            128 * 1024
        );
        // MDTS of 8 KiB with 512-byte blocks.
        assert_eq!(command_bytes(8192, 512, MAX_SLOT_BYTES).unwrap(), 8192);
        // A slot is whole pages even for small blocks.
        assert_eq!(command_bytes(6000, 512, MAX_SLOT_BYTES).unwrap(), 4096);
        assert_eq!(command_bytes(65536, 65536, MAX_SLOT_BYTES).unwrap(), 65536);
        assert!(command_bytes(32768, 65536, MAX_SLOT_BYTES).is_err());
        assert!(command_bytes(2048, 512, MAX_SLOT_BYTES).is_err());
    }

    #[test]
    fn only_whole_pages_are_mapped() {
        assert_eq!(page_interior(0x1000, 0x3000), Some((0x1000, 0x3000)));
        assert_eq!(page_interior(0x1800, 0x3000), Some((0x2000, 0x2000)));
        assert_eq!(page_interior(0x1001, 0xfff), None);
        assert_eq!(page_interior(0x1000, 0), None);
        assert_eq!(page_interior(u64::MAX - 0x10, 0x20), None);
    }

    fn iov(addr: u64, len: u32) -> IoVec {
        IoVec { addr, len }
    }

    #[test]
    fn prp_shaped_buffers_go_straight_to_the_device() {
        let prp_only = SglSupport::default();
        let sgl = SglSupport {
            supported: true,
            dword_aligned: true,
            prefer: false,
        };
        let mut segs = Vec::new();
        // virtio-blk as Linux sends it: page-sized buffers; the first may start mid-page.
        let pages = [
            iov(0x10_0200, 0xe00),
            iov(0x20_0000, 0x1000),
            iov(0x30_0000, 0x200),
        ];
        assert!(describable(&pages, 0x2000, 0x10_0000, prp_only, &mut segs));
        // Split into 4 KiB commands inside the first and second buffers: still PRP-shaped.
        assert!(describable(&pages, 0x2000, 0x1000, prp_only, &mut segs));
        // A middle buffer that does not end on a page boundary breaks PRP rules; SGLs take it.
        let ragged = [iov(0x10_0000, 0x800), iov(0x20_0000, 0x800)];
        assert!(!describable(
            &ragged, 0x1000, 0x10_0000, prp_only, &mut segs
        ));
        assert!(describable(&ragged, 0x1000, 0x10_0000, sgl, &mut segs));
        // Byte-aligned buffers: neither PRPs nor dword-aligned SGLs.
        let odd = [iov(0x10_0001, 0x1000)];
        assert!(!describable(&odd, 0x1000, 0x10_0000, prp_only, &mut segs));
        assert!(!describable(&odd, 0x1000, 0x10_0000, sgl, &mut segs));
    }

    #[test]
    fn command_segments_follow_the_split() {
        let iovs = [iov(0x10_0000, 0x1800), iov(0x20_0000, 0x800)];
        let mut segs = Vec::new();
        command_segments(&iovs, 0x1000, 0x1000, &mut segs).unwrap();
        assert_eq!(
            segs,
            vec![
                DmaSegment {
                    iova: 0x10_1000,
                    len: 0x800
                },
                DmaSegment {
                    iova: 0x20_0000,
                    len: 0x800
                }
            ]
        );
    }

    #[test]
    fn tags_carry_io_and_slot() {
        for (io, slot) in [(0, None), (0, Some(0)), (7, Some(31)), (1 << 40, Some(5))] {
            let tag = command_tag(io, slot);
            assert_eq!(io_of_tag(tag), io);
            assert_eq!(tag & 0xffff, slot.map_or(0, |s| s as u64 + 1));
        }
    }

    #[test]
    fn spans_split_iovs_at_piece_boundaries() {
        let iovs = [
            IoVec {
                addr: 0x1000,
                len: 100,
            },
            IoVec {
                addr: 0x9000,
                len: 50,
            },
            IoVec {
                addr: 0x20000,
                len: 106,
            },
        ];
        let collect = |start, len| {
            let mut spans = Vec::new();
            for_each_span(&iovs, start, len, |addr, at, n| {
                spans.push((addr, at, n));
                Ok(())
            })
            .unwrap();
            spans
        };
        assert_eq!(
            collect(0, 256),
            vec![(0x1000, 0, 100), (0x9000, 100, 50), (0x20000, 150, 106)]
        );
        assert_eq!(collect(0, 128), vec![(0x1000, 0, 100), (0x9000, 100, 28)]);
        assert_eq!(
            collect(128, 128),
            vec![(0x9000 + 28, 0, 22), (0x20000, 22, 106)]
        );
        assert_eq!(collect(100, 50), vec![(0x9000, 0, 50)]);
        assert!(for_each_span(&iovs, u64::MAX, 2, |_, _, _| Ok(())).is_err());
    }

    #[test]
    fn uuids_are_stable_and_distinct() {
        let a = namespace_uuid("SER1", "QEMU NVMe Ctrl", 1);
        assert_eq!(a, namespace_uuid("SER1", "QEMU NVMe Ctrl", 1));
        assert_ne!(a, namespace_uuid("SER1", "QEMU NVMe Ctrl", 2));
        assert_ne!(a, namespace_uuid("SER2", "QEMU NVMe Ctrl", 1));
        // Field boundaries count: ("AB", "C") is not ("A", "BC").
        assert_ne!(namespace_uuid("AB", "C", 1), namespace_uuid("A", "BC", 1));
        assert_eq!(a[6] >> 4, 8);
        assert_eq!(a[8] >> 6, 0b10);
    }

    #[test]
    fn attach_to_a_missing_device_fails_cleanly() {
        let err = NvmeController::attach(NvmeBdevConfig {
            name: "Nvme0".into(),
            traddr: "0000:7f:1f.7".into(),
            io_queues: 2,
            io_timeout: Duration::from_secs(5),
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("0000:7f:1f.7"), "{text}");
        assert!(matches!(err, BdevError::Backend(_)), "{err:?}");
    }
}
