//! The virtio-vhost-user driver: device initialization (§3.1), the two message queues driven with
//! core's [`DriverQueue`], doorbells, notification vectors and the shared memory window.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rvhost_core::mem::GuestMemory;
use rvhost_core::virtio::{bit, feature, has_feature, status};
use rvhost_core::virtq::{DriverBuffer, DriverError, DriverQueue, QueueConfig};
use rvhost_platform_linux::{EventFd, MemoryTable, MemoryTableError, RegionSpec};

use crate::pci::{self, common, device_cfg, notification, CapsError, VirtioCaps, NO_VECTOR};
use crate::transport::{DmaRegion, TransportError, VirtioPciTransport};

/// Queue index of the rxq (frontend → backend messages).
pub const RXQ: u16 = 0;
/// Queue index of the txq (backend → frontend messages).
pub const TXQ: u16 = 1;
/// Entries per queue this driver uses (the RFC device's size; smaller if the device says so).
pub const QUEUE_ENTRIES: u16 = 128;
/// Message buffers posted on each queue.
pub const BUFFERS: u16 = 32;
/// Size of one message buffer: a vhost-user header and the largest payload (4 KiB).
pub const BUFFER_LEN: u32 = 0x2000;
/// The vhost-user message header: `le32 request`, `le32 flags`, `le32 size`.
pub const HEADER_LEN: usize = 12;
/// The most vrings this driver gives notification vectors to.
pub const MAX_VRINGS: u16 = 64;
/// The device's limit on vrings (doorbell index `VIRTIO_QUEUE_MAX` is the log doorbell).
pub const DEVICE_MAX_VRINGS: u32 = 1024;
/// MSI-X vectors before the per-vring notification vectors: configuration change, rxq, txq.
pub const FIRST_VRING_VECTOR: u16 = 3;

/// Device-visible address of the driver's DMA memory. Any page-aligned IOVA the IOMMU accepts.
const DMA_IOVA: u64 = 0x1000_0000;
/// Layout of the DMA memory: two rings, then the buffers.
const RING_STRIDE: u64 = 0x2000;
const BUFFERS_AT: u64 = 2 * RING_STRIDE;
const DMA_LEN: u64 = BUFFERS_AT + 2 * BUFFERS as u64 * BUFFER_LEN as u64;

/// Why the device cannot be driven.
#[derive(Debug, thiserror::Error)]
pub enum VvuError {
    /// Accessing the function failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Its capabilities are missing or malformed.
    #[error(transparent)]
    Caps(#[from] CapsError),
    /// The device did not complete a reset.
    #[error("the device did not reset (status {0:#x})")]
    ResetTimeout(u8),
    /// The device lacks `VIRTIO_F_VERSION_1`.
    #[error("the device does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NotModern(u64),
    /// The device refused the features (`FEATURES_OK` did not stick).
    #[error("the device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// The device has fewer than two queues or unusable queue sizes.
    #[error("unusable queue {queue}: {reason}")]
    BadQueue {
        /// The queue.
        queue: u16,
        /// Why.
        reason: String,
    },
    /// The device's `max_vhost_queues` is zero or above the device limit.
    #[error("max_vhost_queues {0} is not in 1..=1024")]
    BadMaxQueues(u32),
    /// Not enough MSI-X vectors for the queues and notifications.
    #[error("the device has {have} MSI-X vectors, {need} are needed")]
    TooFewVectors {
        /// Table size.
        have: u16,
        /// Needed.
        need: u16,
    },
    /// The device did not accept an MSI-X vector.
    #[error("the device refused MSI-X vector {0}")]
    VectorRefused(u16),
    /// Creating an eventfd or the DMA memory failed.
    #[error("{0}")]
    Resource(String),
    /// A ring operation failed, or the device broke the ring protocol.
    #[error("virtqueue {queue}: {err}")]
    Ring {
        /// The queue.
        queue: u16,
        /// What failed.
        err: DriverError,
    },
    /// The device delivered a message that is not a vhost-user message.
    #[error("rxq delivered a malformed message: {0}")]
    BadMessage(String),
    /// A message to send is malformed or too large.
    #[error("cannot send: {0}")]
    BadReply(String),
    /// All txq buffers are still in flight.
    #[error("the txq is full")]
    TxqFull,
    /// A vring index beyond what the device supports.
    #[error("vring {vring} is beyond the device's {max}")]
    NoSuchVring {
        /// The vring.
        vring: u16,
        /// The device's `max_vhost_queues`.
        max: u32,
    },
    /// The frontend's memory table does not fit the shared memory window.
    #[error("memory region {index} does not fit the shared memory window: {reason}")]
    BadMemoryRegion {
        /// Index in the table.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Mapping the window failed.
    #[error(transparent)]
    Memory(#[from] MemoryTableError),
}

/// The interrupts of the device, one eventfd per MSI-X vector.
#[derive(Debug)]
pub struct Interrupts {
    /// Vector 0: configuration change (`FRONTEND_UP` changed).
    pub config: EventFd,
    /// Vector 1: rxq used buffers (messages arrived).
    pub rxq: EventFd,
    /// Vector 2: txq used buffers.
    pub txq: EventFd,
    /// Vector 3 + n: the frontend kicked vring n.
    pub vrings: Vec<EventFd>,
}

/// One of the two message queues.
#[derive(Debug)]
struct MessageQueue {
    ring: DriverQueue<{ QUEUE_ENTRIES as usize }>,
    /// BAR offset of its notification register.
    notify_at: u64,
    /// Per head: which buffer the chain holds.
    buffer_of_head: [u16; QUEUE_ENTRIES as usize],
    /// Buffers not in flight.
    free: Vec<u16>,
    first_buffer: u64,
}

impl MessageQueue {
    fn buffer_addr(&self, buffer: u16) -> u64 {
        self.first_buffer + u64::from(buffer) * u64::from(BUFFER_LEN)
    }
}

/// A virtio-vhost-user device, initialized and connected to the driver's queues.
pub struct VvuDevice<T: VirtioPciTransport> {
    transport: Arc<T>,
    caps: VirtioCaps,
    /// The driver's DMA memory, by IOVA.
    dma: Arc<MemoryTable>,
    _dma_fd: OwnedFd,
    rxq: MessageQueue,
    txq: MessageQueue,
    interrupts: Interrupts,
    max_vhost_queues: u32,
    features: u64,
}

impl<T: VirtioPciTransport> core::fmt::Debug for VvuDevice<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VvuDevice")
            .field("caps", &self.caps)
            .field("max_vhost_queues", &self.max_vhost_queues)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

fn ring_err(queue: u16) -> impl Fn(DriverError) -> VvuError {
    move |err| VvuError::Ring { queue, err }
}

/// Zero-filled memory in a memfd of `len` bytes, mapped as a one-region table at `iova`.
fn dma_memory(iova: u64, len: u64) -> Result<(Arc<MemoryTable>, OwnedFd), VvuError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let raw = unsafe { libc::memfd_create(c"rvhost-vvu-dma".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(VvuError::Resource(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `raw` is a new descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let file = std::fs::File::from(fd);
    file.set_len(len)
        .map_err(|e| VvuError::Resource(format!("sizing DMA memory: {e}")))?;
    let fd = OwnedFd::from(file);
    let spec = RegionSpec {
        guest_phys_addr: iova,
        memory_size: len,
        userspace_addr: iova,
        mmap_offset: 0,
    };
    let mapped = fd
        .try_clone()
        .map_err(|e| VvuError::Resource(format!("dup: {e}")))?;
    let table = MemoryTable::from_regions([(spec, mapped)])?;
    Ok((table, fd))
}

impl<T: VirtioPciTransport> VvuDevice<T> {
    /// Initializes the device behind `transport` (reset, features, MSI-X, both queues,
    /// `DRIVER_OK`), posts the rxq buffers and sets `BACKEND_UP`.
    pub fn open(transport: T) -> Result<Self, VvuError> {
        let caps = pci::discover(&transport)?;
        let mut cmd = [0u8; 2];
        transport.read_config(pci::PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | pci::PCI_COMMAND_MEMORY | pci::PCI_COMMAND_MASTER;
        transport.write_config(pci::PCI_COMMAND, &cmd.to_le_bytes())?;

        let mut dev = Partial {
            transport: &transport,
            caps,
        };
        dev.reset()?;
        dev.set_status(status::ACKNOWLEDGE)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        let offered = dev.device_features()?;
        if !has_feature(offered, feature::VIRTIO_F_VERSION_1) {
            return Err(VvuError::NotModern(offered));
        }
        let wanted = bit(feature::VIRTIO_F_VERSION_1)
            | bit(feature::VIRTIO_F_RING_EVENT_IDX)
            | bit(feature::VIRTIO_F_ACCESS_PLATFORM);
        let features = offered & wanted;
        dev.set_driver_features(features)?;
        let before_ok = status::ACKNOWLEDGE | status::DRIVER;
        dev.set_status(before_ok | status::FEATURES_OK)?;
        if dev.status()? & status::FEATURES_OK == 0 {
            return Err(VvuError::FeaturesRefused(features));
        }

        let max_vhost_queues = dev.device_u32(device_cfg::MAX_VHOST_QUEUES)?;
        if max_vhost_queues == 0 || max_vhost_queues > DEVICE_MAX_VRINGS {
            return Err(VvuError::BadMaxQueues(max_vhost_queues));
        }
        let vrings = u16::try_from(max_vhost_queues)
            .unwrap_or(MAX_VRINGS)
            .min(MAX_VRINGS);
        let need = FIRST_VRING_VECTOR + vrings;
        if caps.msix_vectors < need {
            return Err(VvuError::TooFewVectors {
                have: caps.msix_vectors,
                need,
            });
        }
        let new_fd = || EventFd::new().map_err(|e| VvuError::Resource(e.to_string()));
        let interrupts = Interrupts {
            config: new_fd()?,
            rxq: new_fd()?,
            txq: new_fd()?,
            vrings: (0..vrings).map(|_| new_fd()).collect::<Result<_, _>>()?,
        };
        let mut vector_fds = vec![&interrupts.config, &interrupts.rxq, &interrupts.txq];
        vector_fds.extend(interrupts.vrings.iter());
        transport.enable_msix(&vector_fds)?;
        dev.write_common16(common::CONFIG_MSIX_VECTOR, 0)?;
        if dev.read_common16(common::CONFIG_MSIX_VECTOR)? != 0 {
            return Err(VvuError::VectorRefused(0));
        }

        let num_queues = dev.read_common16(common::NUM_QUEUES)?;
        if num_queues < 2 {
            return Err(VvuError::BadQueue {
                queue: num_queues,
                reason: "the device has fewer than two queues".into(),
            });
        }
        let (dma, dma_fd) = dma_memory(DMA_IOVA, DMA_LEN)?;
        let host_addr = dma
            .translate(DMA_IOVA, DMA_LEN)
            .map_err(|e| VvuError::Resource(e.to_string()))?;
        // SAFETY: `dma` (the mapping) and `dma_fd` live in the returned device, which the
        // transport (and so the device's access) does not outlive; the mapping is only accessed
        // through `GuestMemory` copies and atomics.
        unsafe {
            transport.map_dma(DmaRegion {
                iova: DMA_IOVA,
                len: DMA_LEN,
                host_addr,
                fd: dma_fd.as_fd(),
            })?
        };
        let rxq = dev.setup_queue(&dma, RXQ, features, BUFFERS_AT)?;
        let txq = dev.setup_queue(
            &dma,
            TXQ,
            features,
            BUFFERS_AT + u64::from(BUFFERS) * u64::from(BUFFER_LEN),
        )?;
        dev.set_status(before_ok | status::FEATURES_OK | status::DRIVER_OK)?;

        let mut device = VvuDevice {
            transport: Arc::new(transport),
            caps,
            dma,
            _dma_fd: dma_fd,
            rxq,
            txq,
            interrupts,
            max_vhost_queues,
            features,
        };
        for vring in 0..vrings {
            device.set_notification_vector(vring, FIRST_VRING_VECTOR + vring)?;
        }
        device.post_rx_buffers()?;
        device.set_backend_up(true)?;
        tracing::info!(
            max_vhost_queues,
            features = format_args!("{features:#x}"),
            "virtio-vhost-user device ready"
        );
        Ok(device)
    }

    /// The transport (for tests and diagnostics).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The capabilities as discovered.
    pub fn caps(&self) -> &VirtioCaps {
        &self.caps
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device's `max_vhost_queues`.
    pub fn max_vhost_queues(&self) -> u32 {
        self.max_vhost_queues
    }

    /// The interrupt eventfds.
    pub fn interrupts(&self) -> &Interrupts {
        &self.interrupts
    }

    fn partial(&self) -> Partial<'_, T> {
        Partial {
            transport: &*self.transport,
            caps: self.caps,
        }
    }

    /// The device configuration's `status` (`STATUS_BACKEND_UP`, `STATUS_FRONTEND_UP`).
    pub fn connection_status(&self) -> Result<u32, VvuError> {
        self.partial().device_u32(device_cfg::STATUS)
    }

    /// Whether a frontend is connected.
    pub fn frontend_up(&self) -> Result<bool, VvuError> {
        Ok(self.connection_status()? & device_cfg::STATUS_FRONTEND_UP != 0)
    }

    /// Sets or clears `BACKEND_UP`: the device connects to the frontend only while it is set.
    pub fn set_backend_up(&self, up: bool) -> Result<(), VvuError> {
        let value = if up { device_cfg::STATUS_BACKEND_UP } else { 0 };
        let at = self.device_at(device_cfg::STATUS, 4)?;
        self.transport
            .write_bar(self.caps.device.bar, at, &value.to_le_bytes())?;
        Ok(())
    }

    fn device_at(&self, offset: u64, width: u64) -> Result<u64, VvuError> {
        self.caps.device.at(offset, width).ok_or_else(|| {
            VvuError::Transport(TransportError::OutOfRange {
                what: "device configuration".into(),
                offset,
                len: width,
                size: self.caps.device.len,
            })
        })
    }

    fn post_rx_buffers(&mut self) -> Result<(), VvuError> {
        let q = &mut self.rxq;
        while let Some(buffer) = q.free.pop() {
            let head = q
                .ring
                .add(
                    &*self.dma,
                    &[DriverBuffer::writable(q.buffer_addr(buffer), BUFFER_LEN)],
                )
                .map_err(ring_err(RXQ))?;
            if let Some(slot) = q.buffer_of_head.get_mut(usize::from(head)) {
                *slot = buffer;
            }
        }
        self.publish(RXQ)
    }

    fn publish(&mut self, queue: u16) -> Result<(), VvuError> {
        let q = if queue == RXQ {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        q.ring.publish(&*self.dma).map_err(ring_err(queue))?;
        if q.ring.needs_kick(&*self.dma).map_err(ring_err(queue))? {
            self.transport
                .write_bar(self.caps.notify.bar, q.notify_at, &queue.to_le_bytes())?;
        }
        Ok(())
    }

    /// Takes the next vhost-user message the frontend sent, if one has arrived (does not block;
    /// wait on [`Interrupts::rxq`]). The buffer goes straight back to the device.
    pub fn recv_message(&mut self) -> Result<Option<Vec<u8>>, VvuError> {
        let Some(used) = self.rxq.ring.pop_used(&*self.dma).map_err(ring_err(RXQ))? else {
            return Ok(None);
        };
        let buffer = self
            .rxq
            .buffer_of_head
            .get(usize::from(used.head))
            .copied()
            .unwrap_or(0);
        let addr = self.rxq.buffer_addr(buffer);
        let len = used.len as usize;
        let mut message = vec![0u8; len];
        let copied = self.dma.read(addr, &mut message);
        // The buffer is offered again whatever the message turns out to be.
        let head = self
            .rxq
            .ring
            .add(&*self.dma, &[DriverBuffer::writable(addr, BUFFER_LEN)])
            .map_err(ring_err(RXQ))?;
        if let Some(slot) = self.rxq.buffer_of_head.get_mut(usize::from(head)) {
            *slot = buffer;
        }
        self.publish(RXQ)?;
        copied.map_err(|e| VvuError::BadMessage(e.to_string()))?;
        check_message(&message).map_err(VvuError::BadMessage)?;
        Ok(Some(message))
    }

    /// Reaps the txq: buffers the device has sent.
    fn reap_tx(&mut self) -> Result<(), VvuError> {
        while let Some(used) = self.txq.ring.pop_used(&*self.dma).map_err(ring_err(TXQ))? {
            let buffer = self
                .txq
                .buffer_of_head
                .get(usize::from(used.head))
                .copied()
                .unwrap_or(0);
            self.txq.free.push(buffer);
        }
        Ok(())
    }

    /// Sends one vhost-user message (a reply, or a backend request) to the frontend.
    pub fn send_message(&mut self, message: &[u8]) -> Result<(), VvuError> {
        check_message(message).map_err(VvuError::BadReply)?;
        if message.len() > BUFFER_LEN as usize {
            return Err(VvuError::BadReply(format!(
                "{} bytes exceed the {BUFFER_LEN}-byte buffer",
                message.len()
            )));
        }
        self.reap_tx()?;
        let buffer = self.txq.free.pop().ok_or(VvuError::TxqFull)?;
        let addr = self.txq.buffer_addr(buffer);
        if let Err(e) = self.dma.write(addr, message) {
            self.txq.free.push(buffer);
            return Err(VvuError::Resource(e.to_string()));
        }
        // check_message bounded the length by BUFFER_LEN.
        let len = message.len() as u32;
        let head = match self
            .txq
            .ring
            .add(&*self.dma, &[DriverBuffer::readable(addr, len)])
        {
            Ok(head) => head,
            Err(err) => {
                self.txq.free.push(buffer);
                return Err(VvuError::Ring { queue: TXQ, err });
            }
        };
        if let Some(slot) = self.txq.buffer_of_head.get_mut(usize::from(head)) {
            *slot = buffer;
        }
        self.publish(TXQ)
    }

    fn check_vring(&self, vring: u16) -> Result<(), VvuError> {
        if u32::from(vring) >= self.max_vhost_queues {
            return Err(VvuError::NoSuchVring {
                vring,
                max: self.max_vhost_queues,
            });
        }
        Ok(())
    }

    /// Rings vring `vring`'s doorbell: the frontend's call notification for it.
    pub fn doorbell(&self, vring: u16) -> Result<(), VvuError> {
        self.doorbells().ring(vring)
    }

    /// A handle that rings doorbells from any thread (a queue's completion path).
    pub fn doorbells(&self) -> Doorbells<T> {
        Doorbells {
            transport: Arc::clone(&self.transport),
            caps: self.caps,
            max_vhost_queues: self.max_vhost_queues,
        }
    }

    /// Routes the frontend's kicks of `vring` to MSI-X vector `vector` (`NO_VECTOR`: nowhere).
    pub fn set_notification_vector(&self, vring: u16, vector: u16) -> Result<(), VvuError> {
        self.check_vring(vring)?;
        let region = self.caps.notification;
        let select = region.at(notification::SELECT, 2);
        let msix = region.at(notification::MSIX_VECTOR, 2);
        let (Some(select), Some(msix)) = (select, msix) else {
            return Err(VvuError::Caps(CapsError::Missing("notification")));
        };
        self.transport
            .write_bar(region.bar, select, &vring.to_le_bytes())?;
        self.transport
            .write_bar(region.bar, msix, &vector.to_le_bytes())?;
        let mut back = [0u8; 2];
        self.transport.read_bar(region.bar, msix, &mut back)?;
        if u16::from_le_bytes(back) != vector && vector != NO_VECTOR {
            return Err(VvuError::VectorRefused(vector));
        }
        Ok(())
    }

    /// Where the frontend's memory, as `SET_MEM_TABLE` described it (`regions`, in message
    /// order), can be mapped from the shared memory window: region `i` occupies
    /// `mmap_offset + memory_size` bytes there, back to back from the window's start, and must
    /// lie inside the BAR. Returns each region with the file and file offset to map it from (in
    /// `mmap_offset`), ready for `MemoryTable::from_regions`.
    pub fn frontend_memory_fds(
        &self,
        regions: &[RegionSpec],
    ) -> Result<Vec<(RegionSpec, OwnedFd)>, VvuError> {
        let window = self.caps.shared_memory;
        let bar_len = self
            .transport
            .bar_len(window.bar)
            .ok_or(TransportError::NoBar { bar: window.bar })?;
        let mut cursor = window.offset;
        let mut mapped: Vec<(RegionSpec, OwnedFd)> = Vec::with_capacity(regions.len());
        for (index, region) in regions.iter().enumerate() {
            let bad = |reason: &str| VvuError::BadMemoryRegion {
                index,
                reason: reason.to_string(),
            };
            let total = region
                .mmap_offset
                .checked_add(region.memory_size)
                .ok_or_else(|| bad("mmap_offset + memory_size overflows"))?;
            let start = cursor
                .checked_add(region.mmap_offset)
                .ok_or_else(|| bad("window offset overflows"))?;
            let end = cursor
                .checked_add(total)
                .ok_or_else(|| bad("window offset overflows"))?;
            if end > bar_len {
                return Err(bad(&format!(
                    "it ends at BAR offset {end:#x}, past the BAR's {bar_len:#x} bytes"
                )));
            }
            let (fd, file_offset) =
                self.transport
                    .bar_mappable(window.bar, start, region.memory_size)?;
            mapped.push((
                RegionSpec {
                    mmap_offset: file_offset,
                    ..*region
                },
                fd,
            ));
            cursor = end;
        }
        Ok(mapped)
    }

    /// [`VvuDevice::frontend_memory_fds`], mapped.
    pub fn map_frontend_memory(
        &self,
        regions: &[RegionSpec],
    ) -> Result<Arc<MemoryTable>, VvuError> {
        Ok(MemoryTable::from_regions(
            self.frontend_memory_fds(regions)?,
        )?)
    }

    /// The driver's DMA memory (rings and buffers), for tests.
    pub fn dma_memory(&self) -> &Arc<MemoryTable> {
        &self.dma
    }

    /// Waits up to `timeout` for a message (on the rxq interrupt), then takes it.
    pub fn wait_message(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, VvuError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(message) = self.recv_message()? {
                return Ok(Some(message));
            }
            // Ask for an interrupt for the next message; one may have arrived meanwhile.
            let pending = self
                .rxq
                .ring
                .enable_interrupts(&*self.dma)
                .map_err(ring_err(RXQ))?;
            if pending {
                continue;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let _ = self.interrupts.rxq.wait(deadline - now);
            let _ = self.interrupts.rxq.consume();
        }
    }
}

/// Rings the device's doorbells; cheap to clone, usable from any thread.
pub struct Doorbells<T: VirtioPciTransport> {
    transport: Arc<T>,
    caps: VirtioCaps,
    max_vhost_queues: u32,
}

impl<T: VirtioPciTransport> Clone for Doorbells<T> {
    fn clone(&self) -> Self {
        Doorbells {
            transport: Arc::clone(&self.transport),
            caps: self.caps,
            max_vhost_queues: self.max_vhost_queues,
        }
    }
}

impl<T: VirtioPciTransport> core::fmt::Debug for Doorbells<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Doorbells")
            .field("doorbell", &self.caps.doorbell)
            .finish_non_exhaustive()
    }
}

impl<T: VirtioPciTransport> Doorbells<T> {
    /// Rings vring `vring`'s doorbell (a 16-bit write at `vring * doorbell_off_multiplier`).
    pub fn ring(&self, vring: u16) -> Result<(), VvuError> {
        if u32::from(vring) >= self.max_vhost_queues {
            return Err(VvuError::NoSuchVring {
                vring,
                max: self.max_vhost_queues,
            });
        }
        let offset = u64::from(vring) * u64::from(self.caps.doorbell_off_multiplier);
        let at = self.caps.doorbell.at(offset, 2).ok_or_else(|| {
            VvuError::Transport(TransportError::OutOfRange {
                what: "doorbell area".into(),
                offset,
                len: 2,
                size: self.caps.doorbell.len,
            })
        })?;
        self.transport
            .write_bar(self.caps.doorbell.bar, at, &vring.to_le_bytes())?;
        Ok(())
    }
}

/// Checks that `message` is one whole vhost-user message: a header and exactly `size` payload
/// bytes.
pub fn check_message(message: &[u8]) -> Result<(), String> {
    let Some(size) = message.get(8..12) else {
        return Err(format!(
            "{} bytes are shorter than a message header",
            message.len()
        ));
    };
    let mut raw = [0u8; 4];
    raw.copy_from_slice(size);
    let size = u32::from_le_bytes(raw) as usize;
    if message.len() != HEADER_LEN + size {
        return Err(format!(
            "header says {size} payload bytes, the buffer holds {}",
            message.len() - HEADER_LEN
        ));
    }
    Ok(())
}

/// The device during initialization, before the queues exist.
struct Partial<'t, T: VirtioPciTransport> {
    transport: &'t T,
    caps: VirtioCaps,
}

impl<T: VirtioPciTransport> Partial<'_, T> {
    fn common_at(&self, offset: u64, width: u64) -> Result<u64, VvuError> {
        self.caps.common.at(offset, width).ok_or_else(|| {
            VvuError::Transport(TransportError::OutOfRange {
                what: "common configuration".into(),
                offset,
                len: width,
                size: self.caps.common.len,
            })
        })
    }

    fn read_common<const N: usize>(&self, offset: u64) -> Result<[u8; N], VvuError> {
        let mut b = [0u8; N];
        let at = self.common_at(offset, N as u64)?;
        self.transport.read_bar(self.caps.common.bar, at, &mut b)?;
        Ok(b)
    }

    fn write_common(&self, offset: u64, bytes: &[u8]) -> Result<(), VvuError> {
        let at = self.common_at(offset, bytes.len() as u64)?;
        self.transport.write_bar(self.caps.common.bar, at, bytes)?;
        Ok(())
    }

    fn read_common16(&self, offset: u64) -> Result<u16, VvuError> {
        Ok(u16::from_le_bytes(self.read_common(offset)?))
    }

    fn write_common16(&self, offset: u64, value: u16) -> Result<(), VvuError> {
        self.write_common(offset, &value.to_le_bytes())
    }

    fn status(&self) -> Result<u8, VvuError> {
        Ok(self.read_common::<1>(common::DEVICE_STATUS)?[0])
    }

    fn set_status(&mut self, value: u8) -> Result<(), VvuError> {
        self.write_common(common::DEVICE_STATUS, &[value])
    }

    fn reset(&mut self) -> Result<(), VvuError> {
        self.set_status(0)?;
        for _ in 0..1000 {
            let now = self.status()?;
            if now == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(VvuError::ResetTimeout(self.status()?))
    }

    fn device_features(&self) -> Result<u64, VvuError> {
        let mut features = 0u64;
        for half in 0..2u32 {
            self.write_common(common::DEVICE_FEATURE_SELECT, &half.to_le_bytes())?;
            let word = u32::from_le_bytes(self.read_common(common::DEVICE_FEATURE)?);
            features |= u64::from(word) << (32 * half);
        }
        Ok(features)
    }

    fn set_driver_features(&self, features: u64) -> Result<(), VvuError> {
        for half in 0..2u32 {
            self.write_common(common::DRIVER_FEATURE_SELECT, &half.to_le_bytes())?;
            let word = (features >> (32 * half)) as u32;
            self.write_common(common::DRIVER_FEATURE, &word.to_le_bytes())?;
        }
        Ok(())
    }

    fn device_u32(&self, offset: u64) -> Result<u32, VvuError> {
        let at = self.caps.device.at(offset, 4).ok_or_else(|| {
            VvuError::Transport(TransportError::OutOfRange {
                what: "device configuration".into(),
                offset,
                len: 4,
                size: self.caps.device.len,
            })
        })?;
        let mut b = [0u8; 4];
        self.transport.read_bar(self.caps.device.bar, at, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn setup_queue(
        &mut self,
        dma: &MemoryTable,
        index: u16,
        features: u64,
        first_buffer: u64,
    ) -> Result<MessageQueue, VvuError> {
        let bad = |reason: String| VvuError::BadQueue {
            queue: index,
            reason,
        };
        self.write_common16(common::QUEUE_SELECT, index)?;
        let max = self.read_common16(common::QUEUE_SIZE)?;
        if max == 0 {
            return Err(bad("size 0 (queue not available)".into()));
        }
        // The largest power of two within both limits.
        let size = 1u16 << (max.min(QUEUE_ENTRIES).ilog2());
        let base = DMA_IOVA + u64::from(index) * RING_STRIDE;
        let config = QueueConfig {
            size,
            desc_table: base,
            avail_ring: base + 0x800,
            used_ring: base + 0x1000,
        };
        let ring = DriverQueue::new(config, features).map_err(ring_err(index))?;
        ring.init(dma).map_err(ring_err(index))?;
        self.write_common16(common::QUEUE_SIZE, size)?;
        let vector = index + 1;
        self.write_common16(common::QUEUE_MSIX_VECTOR, vector)?;
        if self.read_common16(common::QUEUE_MSIX_VECTOR)? != vector {
            return Err(VvuError::VectorRefused(vector));
        }
        self.write_common(common::QUEUE_DESC, &config.desc_table.to_le_bytes())?;
        self.write_common(common::QUEUE_DRIVER, &config.avail_ring.to_le_bytes())?;
        self.write_common(common::QUEUE_DEVICE, &config.used_ring.to_le_bytes())?;
        let notify_off = self.read_common16(common::QUEUE_NOTIFY_OFF)?;
        let offset = u64::from(notify_off) * u64::from(self.caps.notify_off_multiplier);
        let notify_at = self.caps.notify.at(offset, 2).ok_or_else(|| {
            bad(format!(
                "notify offset {offset:#x} is outside the notify area"
            ))
        })?;
        self.write_common16(common::QUEUE_ENABLE, 1)?;
        let buffers = BUFFERS.min(size);
        Ok(MessageQueue {
            ring,
            notify_at,
            buffer_of_head: [0; QUEUE_ENTRIES as usize],
            free: (0..buffers).rev().collect(),
            first_buffer: DMA_IOVA + first_buffer,
        })
    }
}
