//! A PCI function driven through VFIO: its IOMMU group joined to a VFIO container (type1 v2
//! IOMMU), PCI config space, BAR0 mapped into this process, and IOMMU mappings at IOVA = VA.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};
use std::path::PathBuf;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::regs::ALL_ONES;
use rvhost_platform_linux::dma::{DmaError, DmaMapper};

/// VFIO region index of BAR0 (`VFIO_PCI_BAR0_REGION_INDEX`).
const BAR0_REGION: u32 = 0;
/// VFIO region index of PCI config space (`VFIO_PCI_CONFIG_REGION_INDEX`).
const CONFIG_REGION: u32 = 7;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_FLAG_MMAP: u32 = 1 << 2;

/// VFIO IRQ index of the device request (`VFIO_PCI_REQ_IRQ_INDEX`): the kernel signals it when it
/// wants the device back (PCI remove, unbind) and then waits until the user closes the device.
const REQ_IRQ_INDEX: u32 = 4;

/// PCI config space: command register.
const PCI_COMMAND: u64 = 0x04;
/// Command register: memory space enable.
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable (the device may DMA).
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command register: INTx disable (this driver polls).
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// PCI config space: programming interface, subclass, class (3 bytes).
const PCI_CLASS_PROG: u64 = 0x09;
/// Class code of an NVM Express controller: mass storage / NVM / NVMe.
const NVME_CLASS: [u8; 3] = [0x02, 0x08, 0x01];

/// Errors opening or driving the VFIO device.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// `BDF` is not of the form `dddd:bb:dd.f` / `bb:dd.f`, or no such device exists.
    #[error("no PCI device {0} in /sys/bus/pci/devices")]
    NoDevice(String),
    /// The VFIO layer refused (not bound to vfio-pci, group not viable, no IOMMU, ...).
    #[error("VFIO: {0}")]
    Vfio(#[from] vfio_ioctls::VfioError),
    /// The function is not an NVMe controller.
    #[error("{bdf} has class code {class:02x?}, not an NVMe controller (01 08 02)")]
    NotNvme {
        /// The device.
        bdf: String,
        /// Class, subclass, programming interface.
        class: [u8; 3],
    },
    /// The private link to the device's IOMMU group cannot be made.
    #[error("IOMMU group link: {0}")]
    Alias(String),
    /// BAR0 cannot be mapped.
    #[error("BAR0 of {bdf}: {reason}")]
    Bar0 {
        /// The device.
        bdf: String,
        /// What went wrong.
        reason: String,
    },
}

/// Normalises `bb:dd.f` to `0000:bb:dd.f`.
pub fn normalize_bdf(bdf: &str) -> String {
    if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf.to_string()
    }
}

/// The device's IOMMU address space: a VFIO container, usable for DMA mappings.
pub struct ContainerMapper {
    container: Arc<VfioContainer>,
}

impl core::fmt::Debug for ContainerMapper {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ContainerMapper").finish_non_exhaustive()
    }
}

impl DmaMapper for ContainerMapper {
    unsafe fn map(&self, vaddr: u64, len: u64) -> Result<(), DmaError> {
        let size = usize::try_from(len).map_err(|_| DmaError::Alignment { vaddr, len })?;
        // SAFETY: forwarded contract of `DmaMapper::map`: the range is mapped memory of this
        // process that outlives the IOMMU mapping and is accessed only through raw pointers.
        unsafe { self.container.vfio_dma_map(vaddr, size, vaddr as *mut u8) }.map_err(|e| {
            // IOVA = VA needs the IOMMU to cover user addresses (47 bits); the usual cause of
            // EINVAL here is a 39-bit IOMMU (QEMU's intel-iommu default; use aw-bits=48).
            let above_39_bits = vaddr.saturating_add(len) > 1 << 39;
            let hint = if above_39_bits {
                "; the range lies above 2^39, beyond an IOMMU with 39-bit address width"
            } else {
                ""
            };
            DmaError::Map {
                iova: vaddr,
                len,
                reason: format!("{e}{hint}"),
            }
        })
    }

    fn unmap(&self, vaddr: u64, len: u64) -> Result<(), DmaError> {
        let size = usize::try_from(len).map_err(|_| DmaError::Alignment { vaddr, len })?;
        self.container
            .vfio_dma_unmap(vaddr, size)
            .map_err(|e| DmaError::Unmap {
                iova: vaddr,
                len,
                reason: e.to_string(),
            })
    }
}

/// BAR0 mapped into this process: bounds-checked volatile 32-bit register access.
#[derive(Debug)]
pub struct Mmio {
    base: NonNull<u8>,
    len: usize,
    /// Fault injection: behave as a surprise-removed device (reads all-ones, writes vanish).
    simulated_removal: AtomicBool,
}

// SAFETY: the mapping is owned by this value and unmapped only on drop; MMIO registers are meant
// to be accessed from any thread (each access is a single volatile 32-bit load or store).
unsafe impl Send for Mmio {}
// SAFETY: as above; concurrent volatile accesses to distinct or even the same register are what
// hardware registers are designed for, and no Rust reference to the mapping exists.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Length of the mapped part of BAR0.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true; for clippy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A pointer to the 32-bit register at `offset`, if it lies inside the mapping and is aligned.
    pub fn register(&self, offset: usize) -> Option<NonNull<u32>> {
        if offset % 4 != 0 || offset.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: `offset + 4 <= len`, inside the mapping.
        NonNull::new(unsafe { self.base.as_ptr().add(offset) }.cast::<u32>())
    }

    /// Reads the register at `offset`; outside the mapping reads all-ones, like a vanished device.
    pub fn read32(&self, offset: usize) -> u32 {
        if self.simulated_removal.load(Ordering::Relaxed) {
            return ALL_ONES;
        }
        match self.register(offset) {
            // SAFETY: `register` checked bounds and alignment; BAR0 stays mapped while `self` lives.
            Some(reg) => unsafe { reg.as_ptr().read_volatile() },
            None => ALL_ONES,
        }
    }

    /// Writes the register at `offset`; writes outside the mapping are dropped.
    pub fn write32(&self, offset: usize, value: u32) {
        if self.simulated_removal.load(Ordering::Relaxed) {
            return;
        }
        if let Some(reg) = self.register(offset) {
            // SAFETY: `register` checked bounds and alignment; BAR0 stays mapped while `self`
            // lives.
            unsafe { reg.as_ptr().write_volatile(value) };
        }
    }

    /// Fault injection for tests: from now on the registers behave as those of a device that was
    /// pulled out (reads return all-ones, writes are lost), which is how a surprise removal or a
    /// dead link looks from the CPU. Doorbells already handed to queue pairs are not affected; the
    /// driver stops ringing them once it sees the failure.
    pub fn simulate_removal(&self) {
        self.simulated_removal.store(true, Ordering::Relaxed);
    }

    /// Reads a 64-bit register as two 32-bit reads, low half first (not every platform can
    /// issue 64-bit MMIO reads).
    pub fn read64(&self, offset: usize) -> u64 {
        let low = self.read32(offset);
        let high = self.read32(offset + 4);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Writes a 64-bit register as two 32-bit writes, low half first.
    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `VfioPci::open`; no references into it exist.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// An NVMe PCI function opened through VFIO, with BAR0 mapped and bus mastering on.
pub struct VfioPci {
    bdf: String,
    // Field order matters for drop: BAR0 is unmapped before the device fd closes, and the device
    // before the container.
    bar0: Mmio,
    device: VfioDevice,
    mapper: Arc<ContainerMapper>,
    /// Signalled by the kernel when the device is to be removed (`None`: the kernel offers no
    /// request channel, so a removal blocks until the controller is detached).
    removal_request: Option<EventFd>,
    removal_seen: AtomicBool,
    // Dropped after `device`, which reads it when it closes.
    _alias: GroupAlias,
}

/// A private stand-in for the device's sysfs directory, holding only its `iommu_group` link.
///
/// `vfio-ioctls` finds the device's IOMMU group through `<path>/iommu_group` when opening the
/// device and again when closing it, and panics if the link is gone by then. After a PCI removal
/// the sysfs directory disappears as soon as the device fd is closed, that is in the middle of
/// that close. A link of our own that outlives the device avoids that; the group number it
/// points to (its last path component) is all that is read.
struct GroupAlias {
    dir: PathBuf,
    device_path: PathBuf,
}

impl GroupAlias {
    fn create(sysfs: &std::path::Path, bdf: &str) -> Result<Self, VfioPciError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let io = |e: std::io::Error| VfioPciError::Alias(e.to_string());
        let group = std::fs::read_link(sysfs.join("iommu_group"))
            .map_err(|e| VfioPciError::Alias(format!("{bdf} has no IOMMU group: {e}")))?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rvhost-vfio-{}-{n}", std::process::id()));
        let device_path = dir.join(bdf);
        std::fs::create_dir_all(&device_path).map_err(io)?;
        let alias = GroupAlias { dir, device_path };
        std::os::unix::fs::symlink(&group, alias.device_path.join("iommu_group")).map_err(io)?;
        Ok(alias)
    }
}

impl Drop for GroupAlias {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl core::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VfioPci")
            .field("bdf", &self.bdf)
            .field("bar0", &self.bar0)
            .finish()
    }
}

impl VfioPci {
    /// Opens `bdf` (which must be bound to `vfio-pci`), checks it is an NVMe controller, maps BAR0
    /// and enables memory decoding and bus mastering.
    pub fn open(bdf: &str) -> Result<Self, VfioPciError> {
        let bdf = normalize_bdf(bdf);
        let sysfs: PathBuf = ["/sys/bus/pci/devices", &bdf].iter().collect();
        if !sysfs.exists() {
            return Err(VfioPciError::NoDevice(bdf));
        }
        let alias = GroupAlias::create(&sysfs, &bdf)?;
        let container = Arc::new(VfioContainer::new(None)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&alias.device_path, ops, false)?;

        let mut class = [0u8; 3];
        device.region_read(CONFIG_REGION, &mut class, PCI_CLASS_PROG);
        if class != NVME_CLASS {
            class.reverse();
            return Err(VfioPciError::NotNvme { bdf, class });
        }

        let bar0 = Self::map_bar0(&device, &bdf)?;

        let mut cmd = [0u8; 2];
        device.region_read(CONFIG_REGION, &mut cmd, PCI_COMMAND);
        let value = u16::from_le_bytes(cmd)
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_INTX_DISABLE;
        device.region_write(CONFIG_REGION, &value.to_le_bytes(), PCI_COMMAND);

        let removal_request = Self::register_removal_request(&device, &bdf);
        tracing::info!(%bdf, bar0_len = bar0.len, "opened NVMe controller through VFIO");
        Ok(VfioPci {
            bdf,
            bar0,
            device,
            mapper: Arc::new(ContainerMapper { container }),
            removal_request,
            removal_seen: AtomicBool::new(false),
            _alias: alias,
        })
    }

    fn register_removal_request(device: &VfioDevice, bdf: &str) -> Option<EventFd> {
        let offered = device
            .get_irq_info(REQ_IRQ_INDEX)
            .is_some_and(|irq| irq.count > 0);
        if !offered {
            tracing::info!(%bdf, "no VFIO device request interrupt: removal waits for a detach");
            return None;
        }
        let registered = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                device
                    .enable_irq(REQ_IRQ_INDEX, vec![&fd])
                    .map_err(|e| e.to_string())?;
                Ok(fd)
            });
        match registered {
            Ok(fd) => Some(fd),
            Err(reason) => {
                tracing::warn!(%bdf, %reason, "cannot register for device removal requests");
                None
            }
        }
    }

    /// Whether [`VfioPci::removal_requested`] has returned `true` before.
    pub fn removal_seen(&self) -> bool {
        self.removal_seen.load(Ordering::Relaxed)
    }

    /// Whether the kernel has asked for the device back (it is being removed or unbound). Stays
    /// `true` once seen. Non-blocking: one `read` of an eventfd.
    pub fn removal_requested(&self) -> bool {
        if self.removal_seen.load(Ordering::Relaxed) {
            return true;
        }
        let signalled = self
            .removal_request
            .as_ref()
            .is_some_and(|fd| fd.read().is_ok());
        if signalled {
            self.removal_seen.store(true, Ordering::Relaxed);
        }
        signalled
    }

    /// Turns bus mastering off, so that the device can no longer write into memory that the
    /// driver is about to hand back (commands it still holds are failed by the driver instead).
    pub fn stop_dma(&self) {
        let mut cmd = [0u8; 2];
        self.device
            .region_read(CONFIG_REGION, &mut cmd, PCI_COMMAND);
        let value = u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER;
        self.device
            .region_write(CONFIG_REGION, &value.to_le_bytes(), PCI_COMMAND);
    }

    fn map_bar0(device: &VfioDevice, bdf: &str) -> Result<Mmio, VfioPciError> {
        let err = |reason: String| VfioPciError::Bar0 {
            bdf: bdf.to_string(),
            reason,
        };
        if device.get_region_flags(BAR0_REGION) & REGION_FLAG_MMAP == 0 {
            return Err(err("region is not mappable".into()));
        }
        let region_offset = device.get_region_offset(BAR0_REGION);
        let mut area_offset = 0u64;
        let mut area_len = device.get_region_size(BAR0_REGION);
        // When the MSI-X table shares BAR0 the kernel may allow mmap of only parts of it; the
        // registers and doorbells live in the part that starts at offset 0.
        for cap in device.get_region_caps(BAR0_REGION) {
            if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
                let first = sparse.areas.iter().find(|a| a.offset == 0);
                let Some(first) = first else {
                    return Err(err("no mappable area at offset 0".into()));
                };
                area_offset = first.offset;
                area_len = first.size;
            }
        }
        // Registers (0x00..0x40) and at least the admin doorbells (0x1000..0x1008).
        if area_len < 0x1008 {
            return Err(err(format!("only {area_len:#x} bytes mappable")));
        }
        let len = usize::try_from(area_len).map_err(|_| err("too large".into()))?;
        let file_offset = region_offset
            .checked_add(area_offset)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| err("offset overflows".into()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: maps the VFIO device's BAR0 window (an fd offset the kernel gave us) at an
        // address of the kernel's choosing; nothing existing is replaced. Checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                file_offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err(format!("mmap: {}", std::io::Error::last_os_error())));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| err("mmap returned NULL".into()))?;
        Ok(Mmio {
            base,
            len,
            simulated_removal: AtomicBool::new(false),
        })
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// BAR0.
    pub fn bar0(&self) -> &Mmio {
        &self.bar0
    }

    /// The VFIO device (config space, interrupts).
    pub fn device(&self) -> &VfioDevice {
        &self.device
    }

    /// The IOMMU address space of this device.
    pub fn mapper(&self) -> Arc<ContainerMapper> {
        self.mapper.clone()
    }
}
