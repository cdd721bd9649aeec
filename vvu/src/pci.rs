//! The virtio-pci (modern) layout of a virtio-vhost-user function: the numbers of virtio 1.2
//! §4.1.4 plus the device's three additional-resource capabilities, and the discovery of all of
//! them from configuration space with every offset checked against its BAR.

use crate::transport::{TransportError, VirtioPciTransport};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// The virtio device ID of the virtio-vhost-user device.
pub const VIRTIO_ID_VHOST_USER: u16 = 43;
/// PCI device ID of the RFC device (transitional numbering).
pub const PCI_DEVICE_VHOST_USER_TRANSITIONAL: u16 = 0x1017;
/// PCI device ID of a modern-only virtio-vhost-user function (0x1040 + 43).
pub const PCI_DEVICE_VHOST_USER_MODERN: u16 = 0x1040 + VIRTIO_ID_VHOST_USER;

/// Config space: vendor ID.
pub const PCI_VENDOR_ID: u16 = 0x00;
/// Config space: device ID.
pub const PCI_DEVICE_ID: u16 = 0x02;
/// Config space: command register.
pub const PCI_COMMAND: u16 = 0x04;
/// Config space: status register.
pub const PCI_STATUS: u16 = 0x06;
/// Status register: a capability list is present.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// Config space: first capability pointer.
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Command register: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Capability ID: vendor specific (every virtio capability).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Capability ID: MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// The size of configuration space this driver walks.
pub const CONFIG_SPACE_LEN: u16 = 256;

/// `cfg_type` of the virtio capabilities.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Queue notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// virtio-vhost-user: doorbells (the frontend's call notifications).
    pub const DOORBELL: u8 = 6;
    /// virtio-vhost-user: notification vector selection (the frontend's kicks).
    pub const NOTIFICATION: u8 = 7;
    /// virtio-vhost-user: the shared memory window (the frontend's memory).
    pub const SHARED_MEMORY: u8 = 8;
}

/// Offsets in the common configuration structure (§4.1.4.3).
pub mod common {
    /// `le32 device_feature_select`.
    pub const DEVICE_FEATURE_SELECT: u64 = 0;
    /// `le32 device_feature`.
    pub const DEVICE_FEATURE: u64 = 4;
    /// `le32 driver_feature_select`.
    pub const DRIVER_FEATURE_SELECT: u64 = 8;
    /// `le32 driver_feature`.
    pub const DRIVER_FEATURE: u64 = 12;
    /// `le16 config_msix_vector`.
    pub const CONFIG_MSIX_VECTOR: u64 = 16;
    /// `le16 num_queues`.
    pub const NUM_QUEUES: u64 = 18;
    /// `u8 device_status`.
    pub const DEVICE_STATUS: u64 = 20;
    /// `u8 config_generation`.
    pub const CONFIG_GENERATION: u64 = 21;
    /// `le16 queue_select`.
    pub const QUEUE_SELECT: u64 = 22;
    /// `le16 queue_size`.
    pub const QUEUE_SIZE: u64 = 24;
    /// `le16 queue_msix_vector`.
    pub const QUEUE_MSIX_VECTOR: u64 = 26;
    /// `le16 queue_enable`.
    pub const QUEUE_ENABLE: u64 = 28;
    /// `le16 queue_notify_off`.
    pub const QUEUE_NOTIFY_OFF: u64 = 30;
    /// `le64 queue_desc`.
    pub const QUEUE_DESC: u64 = 32;
    /// `le64 queue_driver`.
    pub const QUEUE_DRIVER: u64 = 40;
    /// `le64 queue_device`.
    pub const QUEUE_DEVICE: u64 = 48;
    /// The structure's size up to `queue_device`.
    pub const LEN: u64 = 56;
}

/// Offsets in the virtio-vhost-user device configuration.
pub mod device_cfg {
    /// `le32 status`.
    pub const STATUS: u64 = 0;
    /// `le32 max_vhost_queues`.
    pub const MAX_VHOST_QUEUES: u64 = 4;
    /// `u8 uuid[16]`.
    pub const UUID: u64 = 8;
    /// The structure's size.
    pub const LEN: u64 = 24;
    /// Status bit: the backend (driver) is ready (the draft's `SLAVE_UP`).
    pub const STATUS_BACKEND_UP: u32 = 1 << 0;
    /// Status bit: the frontend is connected (the draft's `MASTER_UP`).
    pub const STATUS_FRONTEND_UP: u32 = 1 << 1;
}

/// Offsets in the notification structure.
pub mod notification {
    /// `le16 notification_select`: the vring whose vector is read or written next.
    pub const SELECT: u64 = 0;
    /// `le16 notification_msix_vector`.
    pub const MSIX_VECTOR: u64 = 2;
    /// The structure's size.
    pub const LEN: u64 = 4;
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Where one virtio structure lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The BAR.
    pub bar: u8,
    /// Offset of the structure in the BAR.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

impl Region {
    /// BAR offset of byte `at` of the structure, if `at + width` fits in it.
    pub fn at(&self, at: u64, width: u64) -> Option<u64> {
        let end = at.checked_add(width)?;
        if end > self.len {
            return None;
        }
        self.offset.checked_add(at)
    }
}

/// Every capability the driver needs, as discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: Region,
    /// Queue notification area.
    pub notify: Region,
    /// `notify_off_multiplier`.
    pub notify_off_multiplier: u32,
    /// Device configuration.
    pub device: Region,
    /// Doorbells.
    pub doorbell: Region,
    /// `doorbell_off_multiplier`.
    pub doorbell_off_multiplier: u32,
    /// Notification vector selection.
    pub notification: Region,
    /// Start of the shared memory window (its length is not meaningful: the frontend's regions
    /// extend past it, to the end of the BAR at most).
    pub shared_memory: Region,
    /// MSI-X table size (vectors).
    pub msix_vectors: u16,
}

/// Why the function is not a usable virtio-vhost-user device.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// Accessing the function failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Vendor or device ID do not name a virtio-vhost-user function.
    #[error("PCI ID {vendor:04x}:{device:04x} is not a virtio-vhost-user device")]
    NotVhostUser {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
    /// No capability list, or one that loops or leaves config space.
    #[error("malformed PCI capability list: {0}")]
    BadList(String),
    /// A required capability is missing.
    #[error("the device has no {0} capability")]
    Missing(&'static str),
    /// A capability points outside its BAR, or is too short for its structure.
    #[error("{what} capability: BAR {bar} offset {offset:#x} length {len:#x} does not fit (BAR size {bar_len:?}, needs {needed:#x})")]
    BadRegion {
        /// Which capability.
        what: &'static str,
        /// Its BAR.
        bar: u8,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The BAR's size, if the BAR exists.
        bar_len: Option<u64>,
        /// The smallest length the structure needs.
        needed: u64,
    },
    /// A zero multiplier where the device has more than one vring.
    #[error("{0} multiplier is zero")]
    ZeroMultiplier(&'static str),
}

fn read_u8<T: VirtioPciTransport + ?Sized>(t: &T, off: u16) -> Result<u8, TransportError> {
    let mut b = [0u8; 1];
    t.read_config(off, &mut b)?;
    Ok(b[0])
}

fn read_u16<T: VirtioPciTransport + ?Sized>(t: &T, off: u16) -> Result<u16, TransportError> {
    let mut b = [0u8; 2];
    t.read_config(off, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_u32<T: VirtioPciTransport + ?Sized>(t: &T, off: u16) -> Result<u32, TransportError> {
    let mut b = [0u8; 4];
    t.read_config(off, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Walks the capability list of `t` and checks every structure against its BAR.
pub fn discover<T: VirtioPciTransport + ?Sized>(t: &T) -> Result<VirtioCaps, CapsError> {
    let vendor = read_u16(t, PCI_VENDOR_ID)?;
    let device = read_u16(t, PCI_DEVICE_ID)?;
    if vendor != VIRTIO_VENDOR
        || (device != PCI_DEVICE_VHOST_USER_TRANSITIONAL && device != PCI_DEVICE_VHOST_USER_MODERN)
    {
        return Err(CapsError::NotVhostUser { vendor, device });
    }
    if read_u16(t, PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
        return Err(CapsError::BadList("no capability list".into()));
    }
    let mut found: [Option<(Region, u32)>; 9] = [None; 9];
    let mut msix_vectors = None;
    let mut ptr = read_u8(t, PCI_CAPABILITY_LIST)? & !3;
    // At most 48 capabilities fit in the 192 bytes after the header: more means a loop.
    let mut budget = 48;
    while ptr != 0 {
        if budget == 0 {
            return Err(CapsError::BadList("the list loops".into()));
        }
        budget -= 1;
        let at = u16::from(ptr);
        if at < 0x40 || at + 4 > CONFIG_SPACE_LEN {
            return Err(CapsError::BadList(format!("capability at {at:#x}")));
        }
        let id = read_u8(t, at)?;
        let next = read_u8(t, at + 1)? & !3;
        if id == PCI_CAP_ID_MSIX {
            msix_vectors = Some((read_u16(t, at + 2)? & 0x7ff) + 1);
        } else if id == PCI_CAP_ID_VNDR {
            if at + 16 > CONFIG_SPACE_LEN {
                return Err(CapsError::BadList(format!("virtio capability at {at:#x}")));
            }
            let cap_len = read_u8(t, at + 2)?;
            let kind = read_u8(t, at + 3)?;
            let bar = read_u8(t, at + 4)?;
            let offset = u64::from(read_u32(t, at + 8)?);
            let len = u64::from(read_u32(t, at + 12)?);
            let needs_multiplier = matches!(kind, cfg_type::NOTIFY | cfg_type::DOORBELL);
            let multiplier = if needs_multiplier {
                if cap_len < 20 || at + 20 > CONFIG_SPACE_LEN {
                    return Err(CapsError::BadList(format!(
                        "capability {kind} at {at:#x} is too short"
                    )));
                }
                read_u32(t, at + 16)?
            } else {
                0
            };
            // The first capability of each type is the one to use (§4.1.4).
            if let Some(slot @ None) = found.get_mut(usize::from(kind)) {
                if bar < 6 {
                    *slot = Some((Region { bar, offset, len }, multiplier));
                }
            }
        }
        ptr = next;
    }
    let get = |kind: u8, what: &'static str, needed: u64| -> Result<(Region, u32), CapsError> {
        let (region, mult) = found
            .get(usize::from(kind))
            .copied()
            .flatten()
            .ok_or(CapsError::Missing(what))?;
        let bar_len = t.bar_len(region.bar);
        let fits = region.len >= needed
            && region
                .offset
                .checked_add(region.len)
                .zip(bar_len)
                .is_some_and(|(end, bar_len)| end <= bar_len);
        if !fits {
            return Err(CapsError::BadRegion {
                what,
                bar: region.bar,
                offset: region.offset,
                len: region.len,
                bar_len,
                needed,
            });
        }
        Ok((region, mult))
    };
    let (common, _) = get(cfg_type::COMMON, "common configuration", common::LEN)?;
    let (notify, notify_off_multiplier) = get(cfg_type::NOTIFY, "notify", 2)?;
    let (device, _) = get(cfg_type::DEVICE, "device configuration", device_cfg::LEN)?;
    let (doorbell, doorbell_off_multiplier) = get(cfg_type::DOORBELL, "doorbell", 2)?;
    let (notification, _) = get(cfg_type::NOTIFICATION, "notification", notification::LEN)?;
    let (shared_memory, _) = get(cfg_type::SHARED_MEMORY, "shared memory", 0)?;
    if doorbell_off_multiplier == 0 {
        return Err(CapsError::ZeroMultiplier("doorbell"));
    }
    Ok(VirtioCaps {
        common,
        notify,
        notify_off_multiplier,
        device,
        doorbell,
        doorbell_off_multiplier,
        notification,
        shared_memory,
        msix_vectors: msix_vectors.ok_or(CapsError::Missing("MSI-X"))?,
    })
}
