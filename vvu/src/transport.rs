//! How the driver reaches a virtio PCI function: one trait, implemented by VFIO (the real device
//! inside a backend VM, [`crate::vfio`]) and by an emulated device for tests (`rvhost-vvu-emu`).

use std::os::fd::{BorrowedFd, OwnedFd};

use rvhost_platform_linux::EventFd;

/// Why an access to the PCI function failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The BAR does not exist or is not memory.
    #[error("BAR {bar} does not exist")]
    NoBar {
        /// The BAR index.
        bar: u8,
    },
    /// The access lies (partly) outside the BAR or the config space.
    #[error("access {offset:#x}+{len:#x} is outside {what} (size {size:#x})")]
    OutOfRange {
        /// "config space" or "BAR n".
        what: String,
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// The space's size.
        size: u64,
    },
    /// The range cannot be mapped into this process (not backed by anything mappable).
    #[error("BAR {bar} range {offset:#x}+{len:#x} cannot be mapped: {reason}")]
    NotMappable {
        /// The BAR index.
        bar: u8,
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: String,
    },
    /// The device or the kernel refused an operation.
    #[error("{0}")]
    Device(String),
}

/// Memory of this process the device may read and write (rings and message buffers), given to
/// [`VirtioPciTransport::map_dma`].
#[derive(Debug, Clone, Copy)]
pub struct DmaRegion<'a> {
    /// The address the device uses for its first byte.
    pub iova: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
    /// Where this process has it mapped.
    pub host_addr: u64,
    /// The file it is mapped from (offset 0), for a device that maps it itself.
    pub fd: BorrowedFd<'a>,
}

/// Access to one virtio PCI function (virtio 1.2 §4.1).
///
/// All multi-byte values are little-endian as on the bus. Reads and writes of BARs are register
/// accesses of the given width (1, 2, 4 or 8 bytes); a hostile device may return anything, so the
/// driver validates what it reads.
pub trait VirtioPciTransport: Send + Sync {
    /// Reads PCI configuration space at `offset`.
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), TransportError>;

    /// Writes PCI configuration space at `offset`.
    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), TransportError>;

    /// The size of memory BAR `bar`, if it exists.
    fn bar_len(&self, bar: u8) -> Option<u64>;

    /// A register read from BAR `bar`.
    fn read_bar(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), TransportError>;

    /// A register write to BAR `bar`.
    fn write_bar(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), TransportError>;

    /// A file and file offset whose `MAP_SHARED` mapping of `len` bytes is
    /// `[offset, offset + len)` of BAR `bar` (for the shared memory window, which the driver maps
    /// rather than reads register by register).
    fn bar_mappable(
        &self,
        bar: u8,
        offset: u64,
        len: u64,
    ) -> Result<(OwnedFd, u64), TransportError>;

    /// Enables MSI-X with one eventfd per vector, in vector order: the device's interrupts
    /// signal them.
    fn enable_msix(&self, vectors: &[&EventFd]) -> Result<(), TransportError>;

    /// Makes `region` accessible to the device at `region.iova`.
    ///
    /// # Safety
    /// `region.host_addr..+len` must stay mapped (and `region.fd` open) until the device is
    /// dropped or reset, and this process must access it only through raw pointers or copies
    /// (the device writes it at any time).
    unsafe fn map_dma(&self, region: DmaRegion<'_>) -> Result<(), TransportError>;
}
