//! Controller registers in BAR0 (NVMe base spec 2.0, §3.1.3) and their fields.

use core::time::Duration;

/// Controller Capabilities (64 bit).
pub const CAP: usize = 0x00;
/// Version.
pub const VS: usize = 0x08;
/// Interrupt Mask Set.
pub const INTMS: usize = 0x0C;
/// Interrupt Mask Clear.
pub const INTMC: usize = 0x10;
/// Controller Configuration.
pub const CC: usize = 0x14;
/// Controller Status.
pub const CSTS: usize = 0x1C;
/// Admin Queue Attributes.
pub const AQA: usize = 0x24;
/// Admin Submission Queue Base Address (64 bit).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue Base Address (64 bit).
pub const ACQ: usize = 0x30;
/// First doorbell register.
pub const DOORBELL_BASE: usize = 0x1000;

/// The value every read returns once the device has gone (surprise removal, link down).
pub const ALL_ONES: u32 = 0xFFFF_FFFF;

/// CC.EN: enable.
pub const CC_EN: u32 = 1 << 0;
/// CC.SHN = 01b: normal shutdown notification.
pub const CC_SHN_NORMAL: u32 = 0b01 << 14;
/// CSTS.RDY: ready.
pub const CSTS_RDY: u32 = 1 << 0;
/// CSTS.CFS: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST mask.
pub const CSTS_SHST_MASK: u32 = 0b11 << 2;
/// CSTS.SHST = 10b: shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;

/// Decoded Controller Capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum queue entries supported, 1-based (MQES + 1).
    pub max_queue_entries: u32,
    /// Queues must be physically contiguous.
    pub contiguous_queues_required: bool,
    /// Worst-case time for CSTS.RDY to follow CC.EN (TO, in 500 ms units).
    pub timeout_500ms_units: u8,
    /// Doorbell stride: doorbells are `4 << dstrd` bytes apart.
    pub doorbell_stride_shift: u8,
    /// NVM Subsystem Reset supported.
    pub subsystem_reset: bool,
    /// Command sets supported (CSS bit field).
    pub command_sets: u8,
    /// Minimum memory page size: `4096 << mpsmin`.
    pub mps_min: u8,
    /// Maximum memory page size: `4096 << mpsmax`.
    pub mps_max: u8,
}

impl Capabilities {
    /// Decodes CAP.
    pub fn from_register(cap: u64) -> Self {
        Capabilities {
            max_queue_entries: (cap & 0xFFFF) as u32 + 1,
            contiguous_queues_required: cap & (1 << 16) != 0,
            timeout_500ms_units: ((cap >> 24) & 0xFF) as u8,
            doorbell_stride_shift: ((cap >> 32) & 0xF) as u8,
            subsystem_reset: cap & (1 << 36) != 0,
            command_sets: ((cap >> 37) & 0xFF) as u8,
            mps_min: ((cap >> 48) & 0xF) as u8,
            mps_max: ((cap >> 52) & 0xF) as u8,
        }
    }

    /// How long to wait for CSTS.RDY to follow CC.EN. A TO of zero would be a broken controller;
    /// it gets 500 ms rather than no time at all.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(500 * u64::from(self.timeout_500ms_units.max(1)))
    }

    /// Whether the NVM command set is supported (CSS bit 0).
    pub fn supports_nvm_command_set(&self) -> bool {
        self.command_sets & 1 != 0
    }

    /// Byte offset in BAR0 of the submission queue tail doorbell of queue `qid`.
    pub fn sq_tail_doorbell(&self, qid: u16) -> usize {
        DOORBELL_BASE + (2 * usize::from(qid)) * (4usize << self.doorbell_stride_shift)
    }

    /// Byte offset in BAR0 of the completion queue head doorbell of queue `qid`.
    pub fn cq_head_doorbell(&self, qid: u16) -> usize {
        DOORBELL_BASE + (2 * usize::from(qid) + 1) * (4usize << self.doorbell_stride_shift)
    }
}

/// CC for an enabled controller with 4 KiB pages, the NVM command set, round-robin arbitration and
/// 64-byte SQEs / 16-byte CQEs.
pub const fn controller_configuration_enabled() -> u32 {
    const IOSQES_64: u32 = 6 << 16;
    const IOCQES_16: u32 = 4 << 20;
    // CSS = 000b (NVM), MPS = 0 (4 KiB), AMS = 000b (round robin).
    IOSQES_64 | IOCQES_16 | CC_EN
}

/// AQA for admin queues of `sq_entries` and `cq_entries` (1-based; the register is 0-based).
pub fn admin_queue_attributes(sq_entries: u16, cq_entries: u16) -> u32 {
    (u32::from(cq_entries.saturating_sub(1)) & 0xFFF) << 16
        | (u32::from(sq_entries.saturating_sub(1)) & 0xFFF)
}

/// A version register value as `major.minor.tertiary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u8,
    /// Tertiary version.
    pub tertiary: u8,
}

impl Version {
    /// Decodes VS (or the Identify Controller VER field, which has the same layout).
    pub fn from_register(vs: u32) -> Self {
        Version {
            major: (vs >> 16) as u16,
            minor: (vs >> 8) as u8,
            tertiary: vs as u8,
        }
    }
}

impl core::fmt::Display for Version {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.tertiary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_decode() {
        // QEMU's emulated controller: MQES 2047, CQR, TO 15, DSTRD 0, CSS NVM (+ admin only bit 7),
        // MPSMIN 0, MPSMAX 4.
        let cap: u64 = 0x07FF | (1 << 16) | (0x0F << 24) | (0x81 << 37) | (4 << 52);
        let c = Capabilities::from_register(cap);
        assert_eq!(c.max_queue_entries, 2048);
        assert!(c.contiguous_queues_required);
        assert_eq!(c.ready_timeout(), Duration::from_millis(7500));
        assert!(c.supports_nvm_command_set());
        assert_eq!((c.mps_min, c.mps_max), (0, 4));
        assert_eq!(c.sq_tail_doorbell(0), 0x1000);
        assert_eq!(c.cq_head_doorbell(0), 0x1004);
        assert_eq!(c.sq_tail_doorbell(3), 0x1018);
        assert_eq!(c.cq_head_doorbell(3), 0x101C);

        let strided = Capabilities::from_register(2 << 32);
        assert_eq!(strided.sq_tail_doorbell(1), 0x1000 + 2 * 16);
        assert_eq!(strided.cq_head_doorbell(1), 0x1000 + 3 * 16);
        assert_eq!(strided.ready_timeout(), Duration::from_millis(500));
    }

    #[test]
    fn configuration_values() {
        assert_eq!(controller_configuration_enabled(), 0x0046_0001);
        assert_eq!(admin_queue_attributes(32, 32), 0x001F_001F);
        assert_eq!(Version::from_register(0x0001_0400).to_string(), "1.4.0");
    }
}
