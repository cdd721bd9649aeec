//! Controller bring-up (disable, admin queue, enable with the CAP timeout), admin commands
//! (IDENTIFY, SET FEATURES, queue creation, ABORT), controller reset, failure and removal.
//!
//! The controller is shared (`Arc`) between the thread that set it up and every I/O queue pair,
//! one per reactor. The admin queue sits behind a mutex: it is used at set-up, for queue creation
//! and deletion, and on the error paths (abort, reset), never per I/O.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cmd::{cns, CompletionEntry, Status, SubmissionEntry};
use crate::identify::{
    active_namespace_ids, ControllerInfo, IdentifyController, IdentifyNamespace, NamespaceError,
    NamespaceInfo, Truncated, IDENTIFY_LEN,
};
use crate::io::IoQueuePair;
use crate::prp::{SglSupport, PAGE_SIZE, PRP_ENTRIES_PER_PAGE};
use crate::queue::{memory_layout, QueueFull, QueueMemory, QueuePair};
use crate::regs::{self, Capabilities, ALL_ONES};
use crate::vfio::{Mmio, VfioPci, VfioPciError};
use rvhost_platform_linux::dma::{DmaBuffer, DmaError, DmaMapper, PagePolicy};
use rvhost_platform_linux::HostMemory;

/// Settings for [`Controller::open`].
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Admin queue entries.
    pub admin_entries: u16,
    /// I/O queue pairs to ask the controller for (one per reactor).
    pub io_queues: u16,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// How long an I/O command may take before it is aborted; as long again after the ABORT
    /// before the controller is reset.
    pub io_timeout: Duration,
    /// When to describe buffers with SGLs rather than PRPs.
    pub sgl: SglPolicy,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            admin_entries: 32,
            io_queues: 4,
            admin_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            sgl: SglPolicy::WhenNeeded,
        }
    }
}

/// When buffers are described with SGLs (if the controller supports them at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SglPolicy {
    /// PRPs only; buffers PRPs cannot describe are refused.
    Never,
    /// PRPs where the buffer allows, SGLs for the rest (byte-aligned pieces, ragged segments).
    #[default]
    WhenNeeded,
    /// SGLs for every transfer.
    Always,
}

/// Controller-level errors.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// Opening the device through VFIO failed.
    #[error(transparent)]
    Vfio(#[from] VfioPciError),
    /// DMA memory could not be allocated or mapped.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// BAR0 reads all-ones: the device is gone.
    #[error("controller does not respond (BAR0 reads all-ones): removed or dead")]
    Removed,
    /// CSTS.CFS is set.
    #[error("controller fatal status (CSTS.CFS)")]
    Fatal,
    /// The controller was marked failed earlier (removal, fatal status, failed reset).
    #[error("controller has failed")]
    Failed,
    /// CSTS.RDY did not follow CC.EN within CAP.TO.
    #[error("controller did not become {0} within the CAP.TO timeout")]
    ReadyTimeout(&'static str),
    /// An admin command did not complete in time.
    #[error("admin command {opcode:#04x} timed out")]
    AdminTimeout {
        /// Its opcode.
        opcode: u8,
    },
    /// An admin command completed with an error.
    #[error("admin command {opcode:#04x} failed: {status}")]
    AdminStatus {
        /// Its opcode.
        opcode: u8,
        /// The status.
        status: Status,
    },
    /// The admin queue is full (commands leaked by timeouts).
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    /// The controller lacks something this driver needs.
    #[error("unsupported controller: {0}")]
    Unsupported(String),
    /// Identify data was truncated.
    #[error(transparent)]
    Identify(#[from] Truncated),
    /// Every I/O queue the controller granted is in use.
    #[error("no free I/O queue (the controller granted {0})")]
    NoFreeQueue(u16),
}

const STATE_RUNNING: u8 = 0;
const STATE_RESETTING: u8 = 1;
const STATE_FAILED: u8 = 2;

/// Health of the controller as the I/O path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerState {
    /// Serving I/O.
    Running,
    /// A reset is in progress.
    Resetting,
    /// Removed, fatal, or a reset failed: every I/O fails.
    Failed,
}

struct Admin {
    // `qp` points into `memory`: declared first so it is dropped first.
    qp: QueuePair,
    /// One page for Identify data and other admin payloads, after the rings and list pages.
    buffer_offset: usize,
    memory: DmaBuffer,
}

/// State shared by the controller handle and its I/O queue pairs.
pub(crate) struct Shared {
    admin: Mutex<Admin>,
    state: AtomicU8,
    generation: AtomicU64,
    pub(crate) cap: Capabilities,
    pub(crate) info: ControllerInfo,
    pub(crate) namespaces: Vec<NamespaceInfo>,
    io_queues_granted: u16,
    qids_in_use: Mutex<Vec<bool>>,
    pub(crate) config: ControllerConfig,
    /// The I/O timeout in nanoseconds (adjustable at run time).
    io_timeout_ns: AtomicU64,
    resets: AtomicU64,
    pub(crate) max_transfer_bytes: u64,
    pub(crate) sgl: SglSupport,
    // Dropped last: BAR0 and the VFIO container must outlive every DMA region and queue.
    pci: VfioPci,
}

impl core::fmt::Debug for Shared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Controller")
            .field("bdf", &self.pci.bdf())
            .field("model", &self.info.model)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the admin queue in a state worse than a
    // timeout does; keep going rather than propagate the poison.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads CSTS and classifies it.
fn controller_status(bar: &Mmio) -> Result<u32, NvmeError> {
    let csts = bar.read32(regs::CSTS);
    if csts == ALL_ONES {
        return Err(NvmeError::Removed);
    }
    if csts & regs::CSTS_CFS != 0 {
        return Err(NvmeError::Fatal);
    }
    Ok(csts)
}

fn wait_ready(bar: &Mmio, cap: &Capabilities, ready: bool) -> Result<(), NvmeError> {
    let deadline = Instant::now() + cap.ready_timeout();
    loop {
        let csts = bar.read32(regs::CSTS);
        if csts == ALL_ONES {
            return Err(NvmeError::Removed);
        }
        // CFS during disable is expected to clear with the reset; during enable it is fatal.
        if ready && csts & regs::CSTS_CFS != 0 {
            return Err(NvmeError::Fatal);
        }
        if (csts & regs::CSTS_RDY != 0) == ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NvmeError::ReadyTimeout(if ready {
                "ready"
            } else {
                "disabled"
            }));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Disables the controller (resetting it and deleting every queue), programs the admin queue and
/// enables it again.
fn disable_and_enable(bar: &Mmio, cap: &Capabilities, admin: &mut Admin) -> Result<(), NvmeError> {
    let cc = bar.read32(regs::CC);
    if cc == ALL_ONES {
        return Err(NvmeError::Removed);
    }
    if cc & regs::CC_EN != 0 {
        // Clearing EN while RDY has not caught up is undefined behaviour of the controller.
        let csts = bar.read32(regs::CSTS);
        if csts & regs::CSTS_RDY == 0 && csts & regs::CSTS_CFS == 0 {
            wait_ready(bar, cap, true)?;
        }
        bar.write32(regs::CC, cc & !regs::CC_EN);
    }
    wait_ready(bar, cap, false)?;

    admin.qp.reset();
    let entries = admin.qp.entries();
    bar.write32(regs::AQA, regs::admin_queue_attributes(entries, entries));
    bar.write64(regs::ASQ, admin.qp.sq_iova());
    bar.write64(regs::ACQ, admin.qp.cq_iova());
    bar.write32(regs::CC, regs::controller_configuration_enabled());
    wait_ready(bar, cap, true)
}

impl Admin {
    fn buffer_iova(&self) -> u64 {
        self.memory.iova() + self.buffer_offset as u64
    }

    fn read_buffer(&self) -> Vec<u8> {
        let mut out = vec![0u8; IDENTIFY_LEN];
        if let Err(e) = self.memory.read_at(self.buffer_offset, &mut out) {
            // Cannot happen: the buffer was allocated with room for it.
            tracing::error!(%e, "admin buffer outside its DMA memory");
        }
        out
    }

    fn clear_buffer(&self) {
        if let Err(e) = self.memory.fill_at(self.buffer_offset, IDENTIFY_LEN, 0) {
            tracing::error!(%e, "admin buffer outside its DMA memory");
        }
    }

    /// Runs one admin command to completion.
    fn execute(
        &mut self,
        bar: &Mmio,
        entry: SubmissionEntry,
        timeout: Duration,
    ) -> Result<CompletionEntry, NvmeError> {
        let opcode = entry.opcode();
        let cid = self.qp.reserve()?;
        let start = Instant::now();
        self.qp.submit(cid, entry, u64::from(cid), start)?;
        self.qp.ring_submissions();
        let mut spins = 0u32;
        loop {
            let mut result = None;
            self.qp.poll(usize::MAX, |c| {
                if c.tag == u64::from(cid) {
                    result = Some(c.entry);
                }
            });
            if let Some(cqe) = result {
                let status = cqe.status();
                if !status.is_success() {
                    return Err(NvmeError::AdminStatus { opcode, status });
                }
                return Ok(cqe);
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                if let Err(e) = controller_status(bar) {
                    self.qp.drain_in_flight(|_, _| {});
                    return Err(e);
                }
                if start.elapsed() >= timeout {
                    // The slot is recycled; a late completion for it is dropped by the queue.
                    self.qp.drain_in_flight(|_, _| {});
                    return Err(NvmeError::AdminTimeout { opcode });
                }
                std::thread::sleep(Duration::from_micros(50));
            } else {
                core::hint::spin_loop();
            }
        }
    }
}

/// Asks for `wanted` I/O queue pairs; returns how many the controller granted (capped at
/// `wanted`).
fn negotiate_queue_count(
    admin: &mut Admin,
    bar: &Mmio,
    wanted: u16,
    timeout: Duration,
) -> Result<u16, NvmeError> {
    let cqe = admin.execute(
        bar,
        SubmissionEntry::set_number_of_queues(wanted, wanted),
        timeout,
    )?;
    let nsqa = (cqe.dw0 & 0xFFFF) as u16;
    let ncqa = (cqe.dw0 >> 16) as u16;
    let granted = nsqa.min(ncqa).saturating_add(1).min(wanted);
    Ok(granted)
}

/// An NVMe controller driven from user space.
#[derive(Debug, Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl Controller {
    /// Opens the controller at `bdf` (bound to `vfio-pci`), resets and enables it, identifies it
    /// and its namespaces and negotiates the number of I/O queues.
    pub fn open(bdf: &str, config: ControllerConfig) -> Result<Self, NvmeError> {
        let pci = VfioPci::open(bdf)?;
        let bar = pci.bar0();
        let cap_raw = bar.read64(regs::CAP);
        if cap_raw == u64::MAX {
            return Err(NvmeError::Removed);
        }
        let cap = Capabilities::from_register(cap_raw);
        if !cap.supports_nvm_command_set() {
            return Err(NvmeError::Unsupported(
                "no NVM command set in CAP.CSS".into(),
            ));
        }
        if cap.mps_min != 0 {
            return Err(NvmeError::Unsupported(format!(
                "minimum page size {} B, this driver uses 4 KiB",
                4096u64 << cap.mps_min
            )));
        }
        let version = regs::Version::from_register(bar.read32(regs::VS));
        let admin_entries = config
            .admin_entries
            .clamp(2, 4096)
            .min(cap.max_queue_entries.min(4096) as u16);
        let (sq_len, cq_len, lists_len) = memory_layout(admin_entries);
        let buffer_offset = sq_len + cq_len + lists_len;
        let mapper: Arc<dyn DmaMapper> = pci.mapper();
        let memory = DmaBuffer::allocate_for_device(
            buffer_offset + PAGE_SIZE as usize,
            PagePolicy::PreferHuge,
            mapper,
        )?;
        let mem = queue_memory(&memory, bar, &cap, 0, admin_entries)?;
        // SAFETY: `mem` lies in `memory` (sized by `memory_layout`), which the `Admin` owns and
        // drops after the queue pair; the doorbells were bounds-checked against BAR0, which
        // outlives the admin queue (field order of `Shared`).
        let qp = unsafe { QueuePair::new(0, admin_entries, mem) };
        let mut admin = Admin {
            qp,
            buffer_offset,
            memory,
        };

        disable_and_enable(bar, &cap, &mut admin)?;
        tracing::info!(bdf = pci.bdf(), %version, mqes = cap.max_queue_entries, "controller enabled");

        let timeout = config.admin_timeout;
        admin.clear_buffer();
        let identify = SubmissionEntry::identify(cns::CONTROLLER, 0, admin.buffer_iova());
        admin.execute(bar, identify, timeout)?;
        let data = admin.read_buffer();
        let info = ControllerInfo::parse(&IdentifyController::new_checked(&data[..])?);
        if info.sq_entry_size_min > 6 || info.cq_entry_size_min > 4 {
            return Err(NvmeError::Unsupported(format!(
                "entry sizes 2^{}/2^{} (SQ/CQ), this driver uses 64/16 bytes",
                info.sq_entry_size_min, info.cq_entry_size_min
            )));
        }

        let wanted = config.io_queues.max(1);
        let granted = negotiate_queue_count(&mut admin, bar, wanted, timeout)?;
        let namespaces = identify_namespaces(&mut admin, bar, &info, timeout)?;

        let max_transfer_bytes = info
            .max_transfer_bytes(PAGE_SIZE)
            .unwrap_or(u64::MAX)
            .min(PRP_ENTRIES_PER_PAGE as u64 * PAGE_SIZE);
        let sgl = SglSupport {
            supported: info.sgl_supported && config.sgl != SglPolicy::Never,
            dword_aligned: info.sgl_dword_aligned,
            prefer: config.sgl == SglPolicy::Always && info.sgl_supported,
        };
        tracing::info!(
            model = %info.model,
            serial = %info.serial,
            namespaces = namespaces.len(),
            io_queues = granted,
            max_transfer_bytes,
            sgl = info.sgl_supported,
            "controller identified"
        );
        let shared = Shared {
            admin: Mutex::new(admin),
            state: AtomicU8::new(STATE_RUNNING),
            generation: AtomicU64::new(0),
            cap,
            info,
            namespaces,
            io_queues_granted: granted,
            qids_in_use: Mutex::new(vec![false; usize::from(granted)]),
            io_timeout_ns: AtomicU64::new(duration_ns(config.io_timeout)),
            resets: AtomicU64::new(0),
            config,
            max_transfer_bytes,
            sgl,
            pci,
        };
        Ok(Controller {
            shared: Arc::new(shared),
        })
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        self.shared.pci.bdf()
    }

    /// Identify Controller summary.
    pub fn info(&self) -> &ControllerInfo {
        &self.shared.info
    }

    /// Controller capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.shared.cap
    }

    /// The version register.
    pub fn version(&self) -> regs::Version {
        regs::Version::from_register(self.shared.pci.bar0().read32(regs::VS))
    }

    /// Active namespaces this driver can do I/O to.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        &self.shared.namespaces
    }

    /// I/O queue pairs the controller granted.
    pub fn io_queues_granted(&self) -> u16 {
        self.shared.io_queues_granted
    }

    /// Largest transfer of one command, in bytes.
    pub fn max_transfer_bytes(&self) -> u64 {
        self.shared.max_transfer_bytes
    }

    /// How data pointers are built.
    pub fn sgl_support(&self) -> SglSupport {
        self.shared.sgl
    }

    /// Current health.
    pub fn state(&self) -> ControllerState {
        self.shared.state()
    }

    /// Creates an I/O queue pair of `entries` slots for one reactor (the queue is owned by the
    /// calling thread from then on; it may be moved to another thread before use).
    pub fn create_io_queue_pair(&self, entries: u16) -> Result<IoQueuePair, NvmeError> {
        IoQueuePair::create(self.shared.clone(), entries)
    }

    /// Allocates DMA memory mapped for this controller (IOVA = VA).
    pub fn allocate_dma(&self, len: usize) -> Result<DmaBuffer, NvmeError> {
        let mapper: Arc<dyn DmaMapper> = self.shared.pci.mapper();
        Ok(DmaBuffer::allocate_for_device(
            len,
            PagePolicy::PreferHuge,
            mapper,
        )?)
    }

    /// Maps caller memory (e.g. guest memory) for DMA at IOVA = VA, so that its addresses can be
    /// passed in I/O segments without copying.
    ///
    /// # Safety
    /// `[vaddr, vaddr + len)` must be page-aligned memory of this process that stays mapped until
    /// [`Controller::unmap_dma`], and while I/O to it is in flight it must be accessed only through
    /// raw pointers (no Rust references), since the device reads and writes it concurrently.
    pub unsafe fn map_dma(&self, vaddr: u64, len: u64) -> Result<(), NvmeError> {
        if len == 0 || vaddr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(DmaError::Alignment { vaddr, len }.into());
        }
        // SAFETY: forwarded contract.
        unsafe { self.shared.pci.mapper().map(vaddr, len) }?;
        Ok(())
    }

    /// Removes a mapping made by [`Controller::map_dma`].
    pub fn unmap_dma(&self, vaddr: u64, len: u64) -> Result<(), NvmeError> {
        self.shared.pci.mapper().unmap(vaddr, len)?;
        Ok(())
    }

    /// Maps `[vaddr, vaddr + len)` of `owner`'s memory (e.g. a vhost-user guest memory table) for
    /// DMA at IOVA = VA, without the obligations of [`Controller::map_dma`]: `owner` must prove
    /// that the range lies inside one live mapping of its own ([`HostMemory`]'s range check), and
    /// the returned mapping keeps `owner` alive until it is dropped, which unmaps it. Page-aligned
    /// ranges only.
    pub fn map_host_memory(
        &self,
        owner: Arc<dyn HostMemory>,
        vaddr: u64,
        len: u64,
    ) -> Result<HostDmaMapping, NvmeError> {
        if len == 0 || vaddr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(DmaError::Alignment { vaddr, len }.into());
        }
        let checked_len = usize::try_from(len).map_err(|_| DmaError::Alignment { vaddr, len })?;
        match owner.checked_range(vaddr, checked_len) {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return Err(NvmeError::Unsupported(format!(
                    "host memory {vaddr:#x}+{len:#x} is not mapped by its owner: {e}"
                )))
            }
            None => {
                return Err(NvmeError::Unsupported(
                    "the memory's owner cannot vouch for its ranges".into(),
                ))
            }
        }
        let mapper: Arc<dyn DmaMapper> = self.shared.pci.mapper();
        // SAFETY: `owner` vouched that the range lies inside one live mapping it owns, and the
        // returned `HostDmaMapping` holds `owner` until after it has unmapped the range, so the
        // memory outlives the IOMMU mapping. `HostMemory` implementors reach their memory only
        // through raw-pointer copies (the memory is shared with a guest that writes it at any
        // time anyway), never through Rust references, which is what device access requires.
        unsafe { mapper.map(vaddr, len) }?;
        Ok(HostDmaMapping {
            vaddr,
            len,
            mapper,
            _owner: owner,
        })
    }

    /// Changes the I/O timeout (commands older than this are aborted, and the controller is reset
    /// if they are still outstanding after as long again).
    pub fn set_io_timeout(&self, timeout: Duration) {
        self.shared
            .io_timeout_ns
            .store(duration_ns(timeout), Ordering::Relaxed);
    }

    /// Controller resets performed so far (requested or triggered by timeouts or fatal status).
    pub fn reset_count(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    /// Fault injection for tests: makes BAR0 behave as if the device had been surprise-removed.
    /// Every I/O in flight then fails with [`crate::io::IoError::ControllerFailed`] at the next
    /// health check, and every new one at once.
    pub fn simulate_surprise_removal(&self) {
        tracing::warn!(bdf = self.bdf(), "simulating surprise removal");
        self.shared.pci.bar0().simulate_removal();
    }

    /// Whether the kernel has asked for the device back (PCI remove or unbind through sysfs). The
    /// first time it is seen, bus mastering is turned off and the controller is marked failed, so
    /// that every I/O in flight fails at its queue pair's next poll and no new one is accepted:
    /// the owner should then close the controller promptly, since the kernel's removal waits for
    /// that. Cheap enough for a periodic check (one non-blocking eventfd read).
    pub fn removal_requested(&self) -> bool {
        let pci = &self.shared.pci;
        let already = pci.removal_seen();
        if !pci.removal_requested() {
            return false;
        }
        if !already {
            tracing::warn!(
                bdf = self.bdf(),
                "the kernel requests the device back (removal)"
            );
            pci.stop_dma();
            self.shared.mark_failed(&NvmeError::Removed);
        }
        true
    }

    /// Resets the controller now: every command in flight fails with [`crate::io::IoError::Reset`]
    /// and every I/O queue pair re-creates its queues on its next poll.
    pub fn reset(&self) -> Result<(), NvmeError> {
        let observed = self.shared.generation();
        self.shared.reset(observed)
    }
}

/// Host memory mapped for DMA by [`Controller::map_host_memory`]; unmapped when dropped, before
/// the memory's owner is released.
pub struct HostDmaMapping {
    vaddr: u64,
    len: u64,
    mapper: Arc<dyn DmaMapper>,
    _owner: Arc<dyn HostMemory>,
}

impl HostDmaMapping {
    /// First address (IOVA = VA).
    pub fn vaddr(&self) -> u64 {
        self.vaddr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: empty ranges are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `[addr, addr + len)` lies inside this mapping.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.vaddr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.vaddr.saturating_add(self.len))
    }
}

impl core::fmt::Debug for HostDmaMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostDmaMapping")
            .field("vaddr", &format_args!("{:#x}", self.vaddr))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Drop for HostDmaMapping {
    fn drop(&mut self) {
        if let Err(e) = self.mapper.unmap(self.vaddr, self.len) {
            // The container keeps the pages pinned until it closes; nothing else to do.
            tracing::warn!(vaddr = self.vaddr, len = self.len, %e, "unmapping host memory failed");
        }
    }
}

/// Carves the queue rings and list pages out of `memory` and finds the doorbells of `qid`.
pub(crate) fn queue_memory(
    memory: &DmaBuffer,
    bar: &Mmio,
    cap: &Capabilities,
    qid: u16,
    entries: u16,
) -> Result<QueueMemory, NvmeError> {
    let (sq_len, cq_len, lists_len) = memory_layout(entries);
    let too_small = || NvmeError::Unsupported("queue memory too small".into());
    let sq = memory.ptr_at(0, sq_len).ok_or_else(too_small)?;
    let cq = memory.ptr_at(sq_len, cq_len).ok_or_else(too_small)?;
    let lists = memory
        .ptr_at(sq_len + cq_len, lists_len.max(1))
        .ok_or_else(too_small)?;
    let beyond = || {
        NvmeError::Unsupported(format!(
            "doorbells of queue {qid} lie beyond the mappable BAR0"
        ))
    };
    let sq_doorbell = bar.register(cap.sq_tail_doorbell(qid)).ok_or_else(beyond)?;
    let cq_doorbell = bar.register(cap.cq_head_doorbell(qid)).ok_or_else(beyond)?;
    Ok(QueueMemory {
        sq: sq.cast(),
        cq: cq.cast(),
        lists,
        sq_doorbell,
        cq_doorbell,
    })
}

fn identify_namespaces(
    admin: &mut Admin,
    bar: &Mmio,
    info: &ControllerInfo,
    timeout: Duration,
) -> Result<Vec<NamespaceInfo>, NvmeError> {
    admin.clear_buffer();
    let list_cmd = SubmissionEntry::identify(cns::ACTIVE_NAMESPACE_LIST, 0, admin.buffer_iova());
    let nsids: Vec<u32> = match admin.execute(bar, list_cmd, timeout) {
        Ok(_) => active_namespace_ids(&admin.read_buffer()).collect(),
        // NVMe 1.0 controllers lack CNS 02h: probe every NSID up to NN (bounded).
        Err(NvmeError::AdminStatus { .. }) => (1..=info.namespace_count.min(1024)).collect(),
        Err(e) => return Err(e),
    };
    let mut namespaces = Vec::new();
    for nsid in nsids {
        admin.clear_buffer();
        let cmd = SubmissionEntry::identify(cns::NAMESPACE, nsid, admin.buffer_iova());
        admin.execute(bar, cmd, timeout)?;
        let data = admin.read_buffer();
        match NamespaceInfo::parse(nsid, &IdentifyNamespace::new_checked(&data[..])?) {
            Ok(ns) => namespaces.push(ns),
            Err(NamespaceError::Inactive(_)) => {}
            Err(e) => tracing::warn!(%e, "skipping namespace"),
        }
    }
    Ok(namespaces)
}

impl Shared {
    pub(crate) fn bar(&self) -> &Mmio {
        self.pci.bar0()
    }

    pub(crate) fn state(&self) -> ControllerState {
        match self.state.load(Ordering::Acquire) {
            STATE_RUNNING => ControllerState::Running,
            STATE_RESETTING => ControllerState::Resetting,
            _ => ControllerState::Failed,
        }
    }

    pub(crate) fn io_timeout(&self) -> Duration {
        Duration::from_nanos(self.io_timeout_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn mark_failed(&self, why: &NvmeError) {
        if self.state.swap(STATE_FAILED, Ordering::AcqRel) != STATE_FAILED {
            tracing::error!(bdf = self.pci.bdf(), %why, "controller failed; failing all I/O");
        }
    }

    pub(crate) fn mapper(&self) -> Arc<dyn DmaMapper> {
        self.pci.mapper()
    }

    pub(crate) fn allocate_qid(&self) -> Result<u16, NvmeError> {
        let mut used = lock(&self.qids_in_use);
        let index = used
            .iter()
            .position(|u| !u)
            .ok_or(NvmeError::NoFreeQueue(self.io_queues_granted))?;
        used[index] = true;
        Ok(index as u16 + 1)
    }

    pub(crate) fn release_qid(&self, qid: u16) {
        if let Some(slot) = lock(&self.qids_in_use).get_mut(usize::from(qid).wrapping_sub(1)) {
            *slot = false;
        }
    }

    fn admin_command(&self, entry: SubmissionEntry) -> Result<CompletionEntry, NvmeError> {
        if self.state() == ControllerState::Failed {
            return Err(NvmeError::Failed);
        }
        let mut admin = lock(&self.admin);
        let result = admin.execute(self.bar(), entry, self.config.admin_timeout);
        if matches!(result, Err(NvmeError::Removed)) {
            self.mark_failed(&NvmeError::Removed);
        }
        result
    }

    /// Creates I/O completion queue then submission queue `qp.qid()`.
    pub(crate) fn create_io_queues(&self, qp: &QueuePair) -> Result<(), NvmeError> {
        let qid = qp.qid();
        self.admin_command(SubmissionEntry::create_io_cq(
            qid,
            qp.entries(),
            qp.cq_iova(),
        ))?;
        if let Err(e) = self.admin_command(SubmissionEntry::create_io_sq(
            qid,
            qp.entries(),
            qp.sq_iova(),
            qid,
        )) {
            let _ = self.admin_command(SubmissionEntry::delete_io_cq(qid));
            return Err(e);
        }
        Ok(())
    }

    /// Deletes submission queue then completion queue `qid`.
    pub(crate) fn delete_io_queues(&self, qid: u16) -> Result<(), NvmeError> {
        let sq = self.admin_command(SubmissionEntry::delete_io_sq(qid));
        let cq = self.admin_command(SubmissionEntry::delete_io_cq(qid));
        sq.and(cq).map(|_| ())
    }

    /// Sends ABORT for command `cid` on `sqid`. Success only means the request was accepted; the
    /// command itself completes (aborted or not) on its own queue.
    pub(crate) fn abort(&self, sqid: u16, cid: u16) -> Result<(), NvmeError> {
        self.admin_command(SubmissionEntry::abort(sqid, cid))
            .map(|_| ())
    }

    /// Resets the controller unless another thread already did since `observed_generation`.
    pub(crate) fn reset(&self, observed_generation: u64) -> Result<(), NvmeError> {
        let mut admin = lock(&self.admin);
        if self.generation() != observed_generation {
            return Ok(());
        }
        if self.state() == ControllerState::Failed {
            return Err(NvmeError::Failed);
        }
        self.state.store(STATE_RESETTING, Ordering::Release);
        self.resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(bdf = self.pci.bdf(), "resetting controller");
        admin.qp.drain_in_flight(|_, _| {});
        let result = disable_and_enable(self.bar(), &self.cap, &mut admin).and_then(|()| {
            let granted = negotiate_queue_count(
                &mut admin,
                self.bar(),
                self.io_queues_granted,
                self.config.admin_timeout,
            )?;
            if granted < self.io_queues_granted {
                return Err(NvmeError::Unsupported(format!(
                    "after reset only {granted} of {} I/O queues granted",
                    self.io_queues_granted
                )));
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                // Bumped only after the controller is back: queue pairs that see the new
                // generation may re-create their queues at once.
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.state.store(STATE_RUNNING, Ordering::Release);
                tracing::info!(bdf = self.pci.bdf(), "controller reset complete");
                Ok(())
            }
            Err(e) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.mark_failed(&e);
                Err(e)
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let bar = self.pci.bar0();
        if bar.read32(regs::CSTS) == ALL_ONES {
            // Gone: there is nothing left to tell.
            return;
        }
        if self.state() != ControllerState::Failed {
            // Normal shutdown so that a volatile write cache is written back.
            let cc = bar.read32(regs::CC);
            bar.write32(regs::CC, cc | regs::CC_SHN_NORMAL);
            let deadline = Instant::now() + self.cap.ready_timeout();
            while bar.read32(regs::CSTS) & regs::CSTS_SHST_MASK != regs::CSTS_SHST_COMPLETE {
                if Instant::now() >= deadline || bar.read32(regs::CSTS) == ALL_ONES {
                    tracing::warn!(
                        bdf = self.pci.bdf(),
                        "shutdown notification not acknowledged"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Disabled even when failed: a controller that is still there must stop DMA before the
        // memory it was given is freed.
        bar.write32(regs::CC, 0);
        let _ = wait_ready(bar, &self.cap, false);
    }
}
