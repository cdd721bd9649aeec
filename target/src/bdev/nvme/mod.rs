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
//! I/O larger than one command (the controller's transfer limit, DSM range limits) is split; the
//! I/O completes when the last command does and fails if any one fails (a [`super::fanout::Fanout`]
//! per I/O keeps that count, as for every request served by several bdev I/Os). A failed or
//! removed controller fails every I/O (the driver's timeout, abort and reset logic bounds how long
//! a command can stay outstanding); waits within `submit` for a free bounce slot or queue entry
//! are additionally bounded by [`NvmeBdevConfig::io_timeout`].

mod channel;
mod module;

pub use module::NvmeModule;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rvhost_nvme::prp::PAGE_SIZE;
use rvhost_nvme::{Controller, ControllerConfig, HostDmaMapping, NamespaceInfo, NvmeError};

use super::common::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use super::{Bdev, BdevChannel, BdevError, IoKind, IoMemory, IoVec};
use channel::NvmeChannel;

/// Largest bounce slot (bytes); each bounced data command moves at most one slot.
const MAX_SLOT_BYTES: u64 = 128 * 1024;
/// Largest zero-copy data command (bytes): at most 258 pages, well inside one PRP list page.
const MAX_ZERO_COPY_COMMAND_BYTES: u64 = 1024 * 1024;

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
        Ok(Box::new(NvmeChannel::open(self)?))
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
