//! Where the emulated device puts its structures (the same choices as the QEMU RFC device where
//! it makes one: BAR 2 for the additional resources, 2^36 bytes, doorbells first, then the
//! notification structure, then the page-aligned shared memory window).

/// BAR holding common configuration, notify, ISR and device configuration.
pub const REGS_BAR: u8 = 0;
/// Its size.
pub const REGS_BAR_LEN: u64 = 0x4000;
/// Common configuration in `REGS_BAR`.
pub const COMMON_AT: u64 = 0x0;
/// Its length.
pub const COMMON_LEN: u64 = 0x100;
/// Notify area in `REGS_BAR`.
pub const NOTIFY_AT: u64 = 0x1000;
/// Its length.
pub const NOTIFY_LEN: u64 = 0x1000;
/// `notify_off_multiplier`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// ISR status in `REGS_BAR`.
pub const ISR_AT: u64 = 0x2000;
/// Device configuration in `REGS_BAR`.
pub const DEVICE_AT: u64 = 0x3000;
/// Its length.
pub const DEVICE_LEN: u64 = 24;

/// BAR holding the additional resources.
pub const RESOURCES_BAR: u8 = 2;
/// Its size (the RFC device's).
pub const RESOURCES_BAR_LEN: u64 = 1 << 36;
/// The device's vring limit (QEMU's `VIRTIO_QUEUE_MAX`); doorbell index 1024 is the log's.
pub const QUEUE_MAX: u64 = 1024;
/// `doorbell_off_multiplier`.
pub const DOORBELL_MULTIPLIER: u32 = 4;
/// Doorbells in `RESOURCES_BAR`.
pub const DOORBELL_AT: u64 = 0;
/// Their length: (`QUEUE_MAX` + 1) doorbells, page aligned.
pub const DOORBELL_LEN: u64 =
    ((QUEUE_MAX + 1) * DOORBELL_MULTIPLIER as u64).next_multiple_of(0x1000);
/// Notification structure in `RESOURCES_BAR`.
pub const NOTIFICATION_AT: u64 = DOORBELL_AT + DOORBELL_LEN;
/// Its length.
pub const NOTIFICATION_LEN: u64 = 0x1000;
/// Start of the shared memory window in `RESOURCES_BAR`.
pub const SHARED_MEMORY_AT: u64 = NOTIFICATION_AT + NOTIFICATION_LEN;
/// The length the capability reports (not meaningful; see the design document).
pub const SHARED_MEMORY_CAP_LEN: u64 = 0x1000;

/// Size of the rxq and txq.
pub const QUEUE_SIZE: u16 = 128;
/// Protocol features the device forwards (the RFC device's `MQ` and `REPLY_ACK`, and `CONFIG`,
/// without which QEMU's vhost-user-blk frontend refuses to start).
pub const SUPPORTED_PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 3) | (1 << 9);
/// The most memory regions `SET_MEM_TABLE` may carry (`VHOST_MEMORY_BASELINE_NREGIONS`).
pub const MAX_MEM_REGIONS: usize = 8;
/// The largest vhost-user payload the device accepts.
pub const MAX_PAYLOAD: usize = 0x1000;
/// vhost-user message header length.
pub const HEADER_LEN: usize = 12;
