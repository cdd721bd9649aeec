//! [`VirtioPciTransport`] over VFIO: the virtio-vhost-user function inside a backend VM, bound to
//! `vfio-pci`.
//!
//! The transport speaks VFIO's device model (regions by index: BARs 0–5, configuration space 7;
//! interrupts by index: MSI-X 2) through [`VfioBackend`], which the real device implements with
//! `vfio-ioctls` ([`VfioDeviceBackend`]) and which an emulated device can implement as well, so the
//! whole transport — region lookup, bounds checks, BAR mapping, MSI-X and DMA set-up — is tested
//! without a VFIO device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use rvhost_platform_linux::EventFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::transport::{DmaRegion, TransportError, VirtioPciTransport};

/// VFIO region index of configuration space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION: u32 = 7;
/// VFIO interrupt index of MSI-X (`VFIO_PCI_MSIX_IRQ_INDEX`).
pub const MSIX_IRQ_INDEX: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_FLAG_MMAP: u32 = 1 << 2;

/// The VFIO operations the transport uses.
pub trait VfioBackend: Send + Sync {
    /// Size of region `index` (0 if it does not exist).
    fn region_size(&self, index: u32) -> u64;
    /// `VFIO_REGION_INFO_FLAG_*` of region `index`.
    fn region_flags(&self, index: u32) -> u32;
    /// Reads `buf.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]);
    /// Writes `buf` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, buf: &[u8]);
    /// A file and offset to `mmap` for `[offset, offset + len)` of region `index` (for VFIO: the
    /// device fd at the region's fd offset plus `offset`).
    fn region_mappable(&self, index: u32, offset: u64, len: u64) -> Result<(OwnedFd, u64), String>;
    /// `VFIO_DEVICE_SET_IRQS` for `MSIX_IRQ_INDEX` with one eventfd per vector.
    fn enable_msix(&self, fds: &[&vmm_sys_util::eventfd::EventFd]) -> Result<(), String>;
    /// `VFIO_IOMMU_MAP_DMA`.
    ///
    /// # Safety
    /// As [`VirtioPciTransport::map_dma`].
    unsafe fn dma_map(&self, region: DmaRegion<'_>) -> Result<(), String>;
}

/// A virtio PCI function driven through a [`VfioBackend`].
#[derive(Debug)]
pub struct VfioTransport<B: VfioBackend> {
    backend: B,
}

impl<B: VfioBackend> VfioTransport<B> {
    /// The transport over `backend`.
    pub fn new(backend: B) -> Self {
        VfioTransport { backend }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn check(&self, index: u32, what: String, offset: u64, len: u64) -> Result<(), TransportError> {
        let size = self.backend.region_size(index);
        let fits = offset.checked_add(len).is_some_and(|end| end <= size);
        if !fits {
            return Err(TransportError::OutOfRange {
                what,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn bar_region(&self, bar: u8) -> Result<u32, TransportError> {
        if bar >= 6 || self.backend.region_size(u32::from(bar)) == 0 {
            return Err(TransportError::NoBar { bar });
        }
        Ok(u32::from(bar))
    }
}

impl<B: VfioBackend> VirtioPciTransport for VfioTransport<B> {
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), TransportError> {
        self.check(
            CONFIG_REGION,
            "config space".into(),
            u64::from(offset),
            buf.len() as u64,
        )?;
        self.backend
            .region_read(CONFIG_REGION, u64::from(offset), buf);
        Ok(())
    }

    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), TransportError> {
        self.check(
            CONFIG_REGION,
            "config space".into(),
            u64::from(offset),
            buf.len() as u64,
        )?;
        self.backend
            .region_write(CONFIG_REGION, u64::from(offset), buf);
        Ok(())
    }

    fn bar_len(&self, bar: u8) -> Option<u64> {
        let index = self.bar_region(bar).ok()?;
        Some(self.backend.region_size(index))
    }

    fn read_bar(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), TransportError> {
        let index = self.bar_region(bar)?;
        self.check(index, format!("BAR {bar}"), offset, buf.len() as u64)?;
        self.backend.region_read(index, offset, buf);
        Ok(())
    }

    fn write_bar(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), TransportError> {
        let index = self.bar_region(bar)?;
        self.check(index, format!("BAR {bar}"), offset, buf.len() as u64)?;
        self.backend.region_write(index, offset, buf);
        Ok(())
    }

    fn bar_mappable(
        &self,
        bar: u8,
        offset: u64,
        len: u64,
    ) -> Result<(OwnedFd, u64), TransportError> {
        let index = self.bar_region(bar)?;
        self.check(index, format!("BAR {bar}"), offset, len)?;
        let not_mappable = |reason: String| TransportError::NotMappable {
            bar,
            offset,
            len,
            reason,
        };
        if self.backend.region_flags(index) & REGION_FLAG_MMAP == 0 {
            return Err(not_mappable("the region is not mappable".into()));
        }
        self.backend
            .region_mappable(index, offset, len)
            .map_err(not_mappable)
    }

    fn enable_msix(&self, vectors: &[&EventFd]) -> Result<(), TransportError> {
        let mut fds = Vec::with_capacity(vectors.len());
        for vector in vectors {
            let dup = vector
                .try_clone()
                .map_err(|e| TransportError::Device(format!("dup eventfd: {e}")))?;
            let owned = OwnedFd::from(dup);
            // SAFETY: `owned` is a fresh duplicate of an eventfd, handed over to the new
            // `EventFd`, which closes it.
            let fd = unsafe {
                vmm_sys_util::eventfd::EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                    owned,
                ))
            };
            fds.push(fd);
        }
        let refs: Vec<&vmm_sys_util::eventfd::EventFd> = fds.iter().collect();
        self.backend
            .enable_msix(&refs)
            .map_err(TransportError::Device)
    }

    unsafe fn map_dma(&self, region: DmaRegion<'_>) -> Result<(), TransportError> {
        // SAFETY: forwarded contract.
        unsafe { self.backend.dma_map(region) }.map_err(TransportError::Device)
    }
}

/// The real thing: a `vfio-pci` bound function, its IOMMU group in a VFIO container of its own.
pub struct VfioDeviceBackend {
    bdf: String,
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

impl core::fmt::Debug for VfioDeviceBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VfioDeviceBackend")
            .field("bdf", &self.bdf)
            .finish_non_exhaustive()
    }
}

/// Normalises `bb:dd.f` to `0000:bb:dd.f`.
pub fn normalize_bdf(bdf: &str) -> String {
    if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf.to_string()
    }
}

impl VfioDeviceBackend {
    /// Opens `bdf`, which must be bound to `vfio-pci`.
    pub fn open(bdf: &str) -> Result<Self, TransportError> {
        let bdf = normalize_bdf(bdf);
        let sysfs: PathBuf = ["/sys/bus/pci/devices", &bdf].iter().collect();
        if !sysfs.exists() {
            return Err(TransportError::Device(format!(
                "no PCI device {bdf} in /sys/bus/pci/devices"
            )));
        }
        let vfio = |e: vfio_ioctls::VfioError| TransportError::Device(format!("VFIO {bdf}: {e}"));
        let container = Arc::new(VfioContainer::new(None).map_err(vfio)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sysfs, ops, false).map_err(vfio)?;
        Ok(VfioDeviceBackend {
            bdf,
            device,
            container,
        })
    }
}

impl VfioBackend for VfioDeviceBackend {
    fn region_size(&self, index: u32) -> u64 {
        self.device.get_region_size(index)
    }

    fn region_flags(&self, index: u32) -> u32 {
        self.device.get_region_flags(index)
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) {
        self.device.region_read(index, buf, offset);
    }

    fn region_write(&self, index: u32, offset: u64, buf: &[u8]) {
        self.device.region_write(index, buf, offset);
    }

    fn region_mappable(
        &self,
        index: u32,
        offset: u64,
        _len: u64,
    ) -> Result<(OwnedFd, u64), String> {
        let file_offset = self
            .device
            .get_region_offset(index)
            .checked_add(offset)
            .ok_or("offset overflows")?;
        // SAFETY: dup of the device fd, which `self.device` keeps open; the result is checked
        // and owned by the returned `OwnedFd`.
        let raw = unsafe { libc::fcntl(self.device.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if raw < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor owned by nobody else.
        Ok((unsafe { OwnedFd::from_raw_fd(raw) }, file_offset))
    }

    fn enable_msix(&self, fds: &[&vmm_sys_util::eventfd::EventFd]) -> Result<(), String> {
        self.device
            .enable_irq(MSIX_IRQ_INDEX, fds.to_vec())
            .map_err(|e| e.to_string())
    }

    unsafe fn dma_map(&self, region: DmaRegion<'_>) -> Result<(), String> {
        let size = usize::try_from(region.len).map_err(|_| "DMA length overflows".to_string())?;
        // SAFETY: forwarded contract of `VirtioPciTransport::map_dma`: the range stays mapped
        // and is only accessed through copies while the device can reach it.
        unsafe {
            self.container
                .vfio_dma_map(region.iova, size, region.host_addr as *mut u8)
        }
        .map_err(|e| format!("VFIO DMA map {:#x}+{:#x}: {e}", region.iova, region.len))
    }
}
