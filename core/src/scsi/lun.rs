//! The logical-unit model: a block device as a SCSI direct-access device.
//!
//! [`ScsiLun::execute`] takes one command and returns either a finished [`Completion`] (data
//! already in the caller's buffer, sense already in the caller's sense buffer) or an [`IoPlan`]
//! for the caller to run on its block device and then hand back to [`ScsiLun::complete_io`].
//! The model never touches guest memory or the block device itself.
//!
//! ```
//! use rvhost_core::scsi::lun::{IoOp, LunConfig, Outcome, Request, ScsiLun};
//! use rvhost_core::scsi::ScsiStatus;
//!
//! let config = LunConfig::new(512, 2048, [7; 16]).with_bdev_kind("Malloc").unwrap();
//! let mut lun = ScsiLun::new(config).unwrap();
//! let (mut data_in, mut sense) = ([0u8; 4096], [0u8; 96]);
//!
//! // READ(10) of 8 blocks at LBA 16 into a 4 KiB guest buffer: the model plans the I/O ...
//! let cdb = [0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0];
//! let req = Request { cdb: &cdb, data_out: &[], data_out_len: 0, data_in_len: 4096, luns: &[0] };
//! let Outcome::Io(plan) = lun.execute(&req, &mut data_in, &mut sense) else { unreachable!() };
//! assert_eq!(plan.op, IoOp::Read { lba: 16, blocks: 8, fua: false });
//! // ... the caller runs it on its bdev and completes it through the model.
//! let done = lun.complete_io(&plan, Ok(()), &mut sense);
//! assert_eq!((done.status, done.transferred, done.residual), (ScsiStatus::Good, 4096, 0));
//!
//! // INQUIRY is answered at once: 36 bytes of standard data in `data_in`.
//! let req = Request { cdb: &[0x12, 0, 0, 0, 96, 0], data_in_len: 96, ..req };
//! let Outcome::Done(c) = lun.execute(&req, &mut data_in, &mut sense) else { unreachable!() };
//! assert_eq!(c.transferred, 36);
//! assert_eq!(&data_in[8..16], b"RVHOST  ");
//! ```

use core::fmt;

use super::cdb::{
    CdbError, CdbSize, Command, ModeSelect, ReadWrite, StartStopUnit, SynchronizeCache, Verify,
    WriteSame,
};
use super::data::{self, DataWriter, PERIPHERAL_NO_LUN};
use super::mode;
use super::opcode as op;
use super::sense::Sense;
use super::ScsiStatus;
use crate::wire;

/// Most UNMAP block descriptors one command may carry (the BLOCK LIMITS page says so).
pub const MAX_UNMAP_DESCRIPTORS: u16 = 256;
/// Longest data-out the model reads itself (UNMAP and MODE SELECT parameter lists): an UNMAP
/// header and [`MAX_UNMAP_DESCRIPTORS`] descriptors. Callers copy at most this many bytes.
pub const MAX_PARAMETER_LIST_LEN: usize = 8 + 16 * MAX_UNMAP_DESCRIPTORS as usize;
/// Longest unit serial number.
pub const MAX_SERIAL_LEN: usize = 64;
/// Default vendor identification.
pub const DEFAULT_VENDOR: [u8; 8] = *b"RVHOST  ";
/// Default product revision level.
pub const DEFAULT_REVISION: [u8; 4] = *b"0001";
/// IEEE company ID used in NAA identifiers unless configured: QEMU's `52:54:00`, whose U/L bit
/// marks it locally administered, so it cannot collide with a registered company's identifiers.
pub const DEFAULT_IEEE_COMPANY_ID: u32 = 0x52_54_00;
/// Default MAXIMUM TRANSFER LENGTH in bytes (converted to blocks of the device).
pub const DEFAULT_MAX_TRANSFER_BYTES: u32 = 4 << 20;

/// The NAA IEEE Registered Extended identifier VPD page 0x83 reports for `config`.
pub fn naa_for(config: &LunConfig) -> [u8; 16] {
    data::naa_ieee_registered_extended(config.ieee_company_id, &config.uuid)
}

/// A printable-ASCII unit serial number of at most [`MAX_SERIAL_LEN`] bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SerialNumber {
    bytes: [u8; MAX_SERIAL_LEN],
    len: u8,
}

impl SerialNumber {
    /// Validates `s`: 1..=64 bytes of printable ASCII (SPC-5 requires ASCII graphic characters).
    pub fn new(s: &str) -> Result<SerialNumber, LunConfigError> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > MAX_SERIAL_LEN || !b.iter().all(|c| (0x20..0x7f).contains(c)) {
            return Err(LunConfigError::Serial);
        }
        let mut bytes = [0u8; MAX_SERIAL_LEN];
        wire::copy_prefix(&mut bytes, b);
        Ok(SerialNumber {
            bytes,
            len: b.len() as u8,
        })
    }

    /// The serial as 32 lowercase hex digits of a UUID.
    pub fn from_uuid(uuid: &[u8; 16]) -> SerialNumber {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; MAX_SERIAL_LEN];
        for (digits, b) in bytes.chunks_exact_mut(2).zip(uuid) {
            // Nibbles index a 16-entry table.
            let hex = |nibble: u8| HEX.get(usize::from(nibble)).copied().unwrap_or(b'0');
            digits.copy_from_slice(&[hex(b >> 4), hex(b & 0x0f)]);
        }
        SerialNumber { bytes, len: 32 }
    }

    /// The serial's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }
}

impl fmt::Debug for SerialNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SerialNumber")
            .field(&core::str::from_utf8(self.as_bytes()))
            .finish()
    }
}

/// Why a [`LunConfig`] is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LunConfigError {
    /// The block size is not a power of two in 512..=65536.
    BlockSize(u32),
    /// The device has no blocks, or its byte size overflows 64 bits.
    Capacity,
    /// An identification string is not printable ASCII of the right length.
    Identification,
    /// The serial number is empty, too long or not printable ASCII.
    Serial,
    /// A limit is zero or beyond what the model supports.
    Limit,
}

impl fmt::Display for LunConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LunConfigError::BlockSize(bs) => write!(f, "unsupported block size {bs}"),
            LunConfigError::Capacity => f.write_str("device capacity is zero or too large"),
            LunConfigError::Identification => {
                f.write_str("vendor/product/revision must be printable ASCII")
            }
            LunConfigError::Serial => f.write_str("serial must be 1..=64 printable ASCII bytes"),
            LunConfigError::Limit => f.write_str("transfer/unmap limit out of range"),
        }
    }
}

/// Pads printable ASCII `s` with spaces to `N` bytes (SPC's left-aligned ASCII fields).
pub fn pad_ascii<const N: usize>(s: &str) -> Result<[u8; N], LunConfigError> {
    let b = s.as_bytes();
    if b.len() > N || !b.iter().all(|c| (0x20..0x7f).contains(c)) {
        return Err(LunConfigError::Identification);
    }
    let mut out = [b' '; N];
    wire::copy_prefix(&mut out, b);
    Ok(out)
}

/// The properties of the block device behind a logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LunConfig {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Capacity in blocks.
    pub num_blocks: u64,
    /// Writes fail with DATA PROTECT.
    pub read_only: bool,
    /// The device can deallocate blocks (UNMAP, WRITE SAME with UNMAP).
    pub supports_unmap: bool,
    /// Deallocated blocks read back as zeros (LBPRZ).
    pub unmap_reads_zeroes: bool,
    /// The device can zero blocks without a data buffer.
    pub supports_write_zeroes: bool,
    /// The device has a cache to flush.
    pub supports_flush: bool,
    /// Default (and initial) value of the caching page's WCE bit.
    pub write_cache: bool,
    /// T10 VENDOR IDENTIFICATION.
    pub vendor: [u8; 8],
    /// PRODUCT IDENTIFICATION.
    pub product: [u8; 16],
    /// PRODUCT REVISION LEVEL.
    pub revision: [u8; 4],
    /// Unit serial number (VPD page 0x80 and the T10 vendor-ID designator).
    pub serial: SerialNumber,
    /// The device's UUID, from which the NAA identifier derives.
    pub uuid: [u8; 16],
    /// IEEE company ID of the NAA identifier (24 bits).
    pub ieee_company_id: u32,
    /// MAXIMUM TRANSFER LENGTH in blocks.
    pub max_transfer_blocks: u32,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (at most [`MAX_UNMAP_DESCRIPTORS`]).
    pub max_unmap_descriptors: u16,
    /// MAXIMUM WRITE SAME LENGTH in blocks.
    pub max_write_same_blocks: u32,
}

impl LunConfig {
    /// A read-write LUN of `num_blocks` blocks of `block_size` bytes with no unmap, write-zeroes
    /// or flush support and rvhost's default identification; the serial is the UUID in hex.
    pub fn new(block_size: u32, num_blocks: u64, uuid: [u8; 16]) -> LunConfig {
        let max_transfer_blocks = (DEFAULT_MAX_TRANSFER_BYTES / block_size.max(1)).max(1);
        LunConfig {
            block_size,
            num_blocks,
            read_only: false,
            supports_unmap: false,
            unmap_reads_zeroes: false,
            supports_write_zeroes: false,
            supports_flush: false,
            write_cache: false,
            vendor: DEFAULT_VENDOR,
            product: *b"rvhost          ",
            revision: DEFAULT_REVISION,
            serial: SerialNumber::from_uuid(&uuid),
            uuid,
            ieee_company_id: DEFAULT_IEEE_COMPANY_ID,
            max_transfer_blocks,
            max_unmap_blocks: u32::MAX,
            max_unmap_descriptors: MAX_UNMAP_DESCRIPTORS,
            max_write_same_blocks: max_transfer_blocks,
        }
    }

    /// Sets the product identification to `rvhost <kind>` (`rvhost Malloc`), as SPDK names its
    /// LUNs after the bdev module.
    pub fn with_bdev_kind(mut self, kind: &str) -> Result<LunConfig, LunConfigError> {
        let mut product = [b' '; 16];
        let prefix = b"rvhost ";
        let kind = kind.as_bytes();
        if prefix.len() + kind.len() > product.len()
            || !kind.iter().all(|c| (0x20..0x7f).contains(c))
        {
            return Err(LunConfigError::Identification);
        }
        let name = product.iter_mut().zip(prefix.iter().chain(kind));
        for (dst, &src) in name {
            *dst = src;
        }
        self.product = product;
        Ok(self)
    }

    /// Sets the unit serial number.
    pub fn with_serial(mut self, serial: &str) -> Result<LunConfig, LunConfigError> {
        self.serial = SerialNumber::new(serial)?;
        Ok(self)
    }

    fn validate(&self) -> Result<(), LunConfigError> {
        if !self.block_size.is_power_of_two() || !(512..=65536).contains(&self.block_size) {
            return Err(LunConfigError::BlockSize(self.block_size));
        }
        if self.num_blocks == 0
            || self
                .num_blocks
                .checked_mul(u64::from(self.block_size))
                .is_none()
        {
            return Err(LunConfigError::Capacity);
        }
        let printable = |b: &[u8]| b.iter().all(|c| (0x20..0x7f).contains(c));
        if !printable(&self.vendor) || !printable(&self.product) || !printable(&self.revision) {
            return Err(LunConfigError::Identification);
        }
        if self.max_transfer_blocks == 0
            || self.max_write_same_blocks == 0
            || self.max_unmap_descriptors > MAX_UNMAP_DESCRIPTORS
            || (self.supports_unmap
                && (self.max_unmap_blocks == 0 || self.max_unmap_descriptors == 0))
        {
            return Err(LunConfigError::Limit);
        }
        Ok(())
    }
}

/// Unit attention conditions the model can hold (SAM-5 §5.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitAttention {
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED: supersedes all others.
    PowerOnReset,
    /// REPORTED LUNS DATA HAS CHANGED.
    ReportedLunsChanged,
    /// MODE PARAMETERS CHANGED.
    ModeParametersChanged,
    /// CAPACITY DATA HAS CHANGED.
    CapacityChanged,
}

impl UnitAttention {
    const ALL: [UnitAttention; 4] = [
        UnitAttention::PowerOnReset,
        UnitAttention::ReportedLunsChanged,
        UnitAttention::ModeParametersChanged,
        UnitAttention::CapacityChanged,
    ];

    const fn bit(self) -> u8 {
        match self {
            UnitAttention::PowerOnReset => 0x01,
            UnitAttention::ReportedLunsChanged => 0x02,
            UnitAttention::ModeParametersChanged => 0x04,
            UnitAttention::CapacityChanged => 0x08,
        }
    }

    /// The sense data that reports it.
    pub const fn sense(self) -> Sense {
        match self {
            UnitAttention::PowerOnReset => Sense::POWER_ON_RESET,
            UnitAttention::ReportedLunsChanged => Sense::REPORTED_LUNS_DATA_CHANGED,
            UnitAttention::ModeParametersChanged => Sense::MODE_PARAMETERS_CHANGED,
            UnitAttention::CapacityChanged => Sense::CAPACITY_DATA_CHANGED,
        }
    }
}

/// One SCSI command as the transport received it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The CDB (may be padded: virtio-scsi sends `cdb_size` bytes).
    pub cdb: &'a [u8],
    /// The start of the data-out buffer, copied by the caller: [`ScsiLun::data_out_copy_len`]
    /// bytes (capped by what the initiator sent). Empty for commands that need none.
    pub data_out: &'a [u8],
    /// Total bytes of data-out the initiator provided (device-readable buffers).
    pub data_out_len: u64,
    /// Total bytes of data-in the initiator can take (device-writable buffers).
    pub data_in_len: u64,
    /// The LUNs of the target this LUN belongs to, for REPORT LUNS.
    pub luns: &'a [u16],
}

/// How a command ended, for the transport to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// SCSI status.
    pub status: ScsiStatus,
    /// Bytes of data moved. For completions from [`ScsiLun::execute`] these are data-in bytes
    /// written to the caller's buffer, to copy to the initiator (0 for commands without
    /// data-in); from [`ScsiLun::complete_io`], the plan's `data_len`.
    pub transferred: u64,
    /// Bytes of the initiator's buffer not transferred (virtio-scsi `residual`).
    pub residual: u32,
    /// Bytes of sense data written to the caller's sense buffer.
    pub sense_len: usize,
}

/// A contiguous range of logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRange {
    /// First block.
    pub lba: u64,
    /// Number of blocks (never 0 in a plan).
    pub blocks: u64,
}

/// The ranges of an unmap plan: one range (WRITE SAME with UNMAP) or the validated UNMAP block
/// descriptors of a parameter list, skipping descriptors of zero blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapRanges<'d> {
    single: Option<BlockRange>,
    descriptors: &'d [u8],
}

impl<'d> UnmapRanges<'d> {
    /// The ranges, in the order the initiator gave them.
    pub fn iter(&self) -> impl Iterator<Item = BlockRange> + 'd {
        self.single
            .into_iter()
            .chain(self.descriptors.chunks_exact(16).filter_map(|d| {
                let range = unmap_descriptor(d);
                (range.blocks != 0).then_some(range)
            }))
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there are no ranges (never, in a plan).
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

fn unmap_descriptor(d: &[u8]) -> BlockRange {
    BlockRange {
        lba: wire::be_u64(d, 0..8),
        blocks: u64::from(wire::be_u32(d, 8..12)),
    }
}

/// The block-device operation of a plan. Ranges are validated against the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp<'d> {
    /// Read blocks into the initiator's data-in buffers.
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Write blocks from the initiator's data-out buffers.
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// Force unit access: the data must be durable before completion.
        fua: bool,
    },
    /// Make the range durable (the whole device for START STOP UNIT).
    Flush {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
    },
    /// Deallocate the ranges.
    Unmap(UnmapRanges<'d>),
    /// Make the range read back as zeros (a bdev without write-zeroes support is served by
    /// writing a zero buffer, as SPDK's bdev layer does).
    WriteZeroes {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
    },
    /// Write `block` (one logical block of data-out) to every block of the range. Also planned
    /// for an all-zero block when the device cannot write zeroes itself.
    WriteSame {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// The pattern, exactly one logical block long.
        block: &'d [u8],
    },
}

/// Block I/O the caller must run before the command can complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoPlan<'d> {
    /// What to do.
    pub op: IoOp<'d>,
    /// Bytes moved between the initiator's buffers and the device (blocks × block size for
    /// reads and writes; 0 for the others).
    pub data_len: u64,
    /// Initiator buffer bytes left over, to report as the residual on success.
    pub residual: u32,
}

/// How a planned I/O failed on the block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// The device reported an error for the data (media error, backend I/O error).
    Medium,
    /// The device does not implement the operation after all.
    Unsupported,
    /// The device is gone (hot-removed) or not ready.
    NotReady,
}

/// What [`ScsiLun::execute`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'d> {
    /// The command is finished.
    Done(Completion),
    /// Run this I/O, then call [`ScsiLun::complete_io`].
    Io(IoPlan<'d>),
}

/// A logical unit backed by a block device.
#[derive(Debug, Clone)]
pub struct ScsiLun {
    config: LunConfig,
    write_cache_enabled: bool,
    stopped: bool,
    unit_attention: u8,
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn length_field(size: CdbSize) -> u16 {
    match size {
        CdbSize::Six => 4,
        CdbSize::Ten => 7,
        CdbSize::Twelve => 6,
        CdbSize::Sixteen => 10,
    }
}

impl ScsiLun {
    /// A logical unit with `config`, started, with no unit attention pending.
    pub fn new(config: LunConfig) -> Result<ScsiLun, LunConfigError> {
        config.validate()?;
        Ok(ScsiLun {
            write_cache_enabled: config.write_cache,
            config,
            stopped: false,
            unit_attention: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LunConfig {
        &self.config
    }

    /// The caching page's current WCE bit: when false, the caller should make every write
    /// durable before completing it (treat it as FUA).
    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache_enabled
    }

    /// Whether START STOP UNIT stopped the unit.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Establishes a unit attention condition, reported on the next command that is not
    /// INQUIRY, REPORT LUNS or REQUEST SENSE. A power-on/reset condition replaces the others.
    pub fn raise_unit_attention(&mut self, ua: UnitAttention) {
        if ua == UnitAttention::PowerOnReset {
            self.unit_attention = ua.bit();
        } else {
            self.unit_attention |= ua.bit();
        }
    }

    /// The backing device changed size: from now on the unit has `num_blocks` blocks (READ
    /// CAPACITY, range checks) and a CAPACITY DATA HAS CHANGED unit attention is established.
    /// A size the configuration cannot have (zero, or over 2^64 bytes) is refused and changes
    /// nothing.
    pub fn resize(&mut self, num_blocks: u64) -> Result<(), LunConfigError> {
        let mut config = self.config;
        config.num_blocks = num_blocks;
        config.validate()?;
        self.config = config;
        self.raise_unit_attention(UnitAttention::CapacityChanged);
        Ok(())
    }

    /// The unit attention that would be reported next, if any.
    pub fn pending_unit_attention(&self) -> Option<UnitAttention> {
        UnitAttention::ALL
            .into_iter()
            .find(|ua| self.unit_attention & ua.bit() != 0)
    }

    fn take_unit_attention(&mut self) -> Option<UnitAttention> {
        let ua = self.pending_unit_attention()?;
        self.unit_attention &= !ua.bit();
        Some(ua)
    }

    /// LOGICAL UNIT RESET: mode parameters return to their defaults, the unit starts, and a
    /// power-on/reset unit attention is established.
    pub fn reset(&mut self) {
        self.write_cache_enabled = self.config.write_cache;
        self.stopped = false;
        self.raise_unit_attention(UnitAttention::PowerOnReset);
    }

    /// How many bytes of data-out the caller must copy into [`Request::data_out`] for `cdb`
    /// (before capping at what the initiator sent): the parameter list of UNMAP and MODE
    /// SELECT, the single block of WRITE SAME, nothing otherwise.
    pub fn data_out_copy_len(&self, cdb: &[u8]) -> usize {
        // Every command on the data path (READ, WRITE) copies nothing: answer those from the
        // opcode alone instead of parsing the CDB a second time (`execute` parses it again).
        let copies = matches!(
            cdb.first().copied(),
            Some(
                op::UNMAP
                    | op::MODE_SELECT_6
                    | op::MODE_SELECT_10
                    | op::WRITE_SAME_10
                    | op::WRITE_SAME_16
            )
        );
        if !copies {
            return 0;
        }
        match Command::parse(cdb) {
            Ok(Command::Unmap { param_len, .. }) => {
                usize::from(param_len).min(MAX_PARAMETER_LIST_LEN)
            }
            Ok(Command::ModeSelect(m)) => usize::from(m.param_len).min(MAX_PARAMETER_LIST_LEN),
            Ok(Command::WriteSame(w)) if !w.ndob => self.config.block_size as usize,
            _ => 0,
        }
    }

    /// Executes one command. Immediate data goes into `data_in` (which should hold at least the
    /// largest response wanted, 4 KiB covers everything but huge REPORT LUNS lists, which are
    /// then truncated), sense into `sense`.
    pub fn execute<'d>(
        &mut self,
        req: &Request<'d>,
        data_in: &mut [u8],
        sense: &mut [u8],
    ) -> Outcome<'d> {
        // READ/WRITE(10/16) without a pending unit attention or a stopped unit, the data path,
        // skip the general decode. Whatever this does not accept, including every READ/WRITE
        // that fails a check, goes through `dispatch`, which reports it.
        if self.unit_attention == 0 && !self.stopped {
            if let Some((rw, write)) = Command::parse_read_write(req.cdb) {
                if let Ok(outcome) = self.read_write(&rw, write, req) {
                    return outcome;
                }
            }
        }
        match self.dispatch(req, data_in) {
            Ok(outcome) => outcome,
            Err(s) => Outcome::Done(check_condition(&s, sense, req)),
        }
    }

    fn dispatch<'d>(
        &mut self,
        req: &Request<'d>,
        data_in: &mut [u8],
    ) -> Result<Outcome<'d>, Sense> {
        let opcode = req.cdb.first().copied();
        // SAM-5: INQUIRY, REPORT LUNS and REQUEST SENSE run despite a unit attention.
        let ua_exempt = matches!(
            opcode,
            Some(op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
        );
        if !ua_exempt && self.unit_attention != 0 {
            if let Some(ua) = self.take_unit_attention() {
                return Err(ua.sense());
            }
        }
        let cmd = Command::parse(req.cdb).map_err(|e: CdbError| e.sense())?;
        if self.stopped && needs_medium(&cmd) {
            return Err(Sense::NOT_READY_INITIALIZING_COMMAND_REQUIRED);
        }
        // The data path first, before the configuration is copied for the response builders.
        match cmd {
            Command::Read(rw) => return self.read_write(&rw, false, req),
            Command::Write(rw) => return self.read_write(&rw, true, req),
            _ => {}
        }
        let cfg = self.config;
        let immediate =
            |data_in: &mut [u8],
             limit: u64,
             build: &dyn Fn(&mut DataWriter<'_>) -> Result<(), Sense>| {
                let mut w = DataWriter::new(data_in, limit.min(req.data_in_len));
                build(&mut w)?;
                Ok(Outcome::Done(good(w.written() as u64, req.data_in_len)))
            };
        match cmd {
            Command::TestUnitReady => Ok(Outcome::Done(good(0, req.data_in_len))),
            Command::RequestSense { desc, alloc_len } => {
                if desc {
                    return Err(Sense::invalid_field_in_cdb(1, Some(0)));
                }
                let reported = match self.take_unit_attention() {
                    Some(ua) => ua.sense(),
                    None if self.stopped => Sense::NOT_READY_INITIALIZING_COMMAND_REQUIRED,
                    None => Sense::NO_SENSE,
                };
                let mut fixed = [0u8; super::sense::FIXED_SENSE_LEN];
                reported.emit_fixed(&mut fixed);
                immediate(data_in, u64::from(alloc_len), &|w| {
                    w.put(&fixed);
                    Ok(())
                })
            }
            Command::Inquiry {
                evpd,
                page_code,
                alloc_len,
            } => immediate(data_in, u64::from(alloc_len), &|w| {
                if evpd {
                    data::vpd_page(w, &cfg, page_code)
                } else {
                    data::standard_inquiry(w, 0x00, &cfg.vendor, &cfg.product, &cfg.revision);
                    Ok(())
                }
            }),
            Command::ModeSense(m) => {
                let wce = self.write_cache_enabled;
                immediate(data_in, u64::from(m.alloc_len), &|w| {
                    mode::mode_sense(w, &cfg, &m, wce)
                })
            }
            Command::ModeSelect(m) => self.mode_select(&m, req),
            Command::StartStopUnit(s) => self.start_stop(&s, req),
            Command::ReadCapacity10 => immediate(data_in, 8, &|w| {
                data::read_capacity_10(w, &cfg);
                Ok(())
            }),
            Command::ReadCapacity16 { alloc_len } => {
                immediate(data_in, u64::from(alloc_len), &|w| {
                    data::read_capacity_16(w, &cfg);
                    Ok(())
                })
            }
            Command::Read(rw) => self.read_write(&rw, false, req),
            Command::Write(rw) => self.read_write(&rw, true, req),
            Command::Verify(v) => self.verify(&v, req),
            Command::SynchronizeCache(s) => self.synchronize_cache(&s, req),
            Command::WriteSame(w) => self.write_same(&w, req),
            Command::Unmap {
                anchor, param_len, ..
            } => self.unmap(anchor, param_len, req),
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => {
                if !matches!(select_report, 0x00..=0x02) {
                    return Err(Sense::invalid_field_in_cdb(2, None));
                }
                if alloc_len < 16 {
                    return Err(Sense::invalid_field_in_cdb(6, None));
                }
                // Reporting the LUN inventory clears the condition that announced its change.
                self.unit_attention &= !UnitAttention::ReportedLunsChanged.bit();
                immediate(data_in, u64::from(alloc_len), &|w| {
                    data::report_luns(w, req.luns, select_report);
                    Ok(())
                })
            }
            Command::ReportSupportedOpcodes(r) => {
                immediate(data_in, u64::from(r.alloc_len), &|w| {
                    data::report_supported_opcodes(w, &cfg, &r)
                })
            }
        }
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let cap = self.config.num_blocks;
        if lba >= cap || blocks > cap - lba {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        Ok(())
    }

    fn read_write<'d>(
        &self,
        rw: &ReadWrite,
        write: bool,
        req: &Request<'d>,
    ) -> Result<Outcome<'d>, Sense> {
        if rw.protect != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)));
        }
        if write && self.config.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        let blocks = u64::from(rw.blocks);
        self.check_range(rw.lba, blocks)?;
        let buffer = if write {
            req.data_out_len
        } else {
            req.data_in_len
        };
        if blocks == 0 {
            return Ok(Outcome::Done(good(0, buffer)));
        }
        if rw.blocks > self.config.max_transfer_blocks {
            return Err(Sense::invalid_field_in_cdb(length_field(rw.size), None));
        }
        // Cannot overflow: both factors are at most 32 bits wide.
        let bytes = blocks * u64::from(self.config.block_size);
        // SPDK fails a command whose buffers are smaller than its transfer length; a larger
        // buffer is an underrun reported through the residual.
        let residual = buffer
            .checked_sub(bytes)
            .ok_or(Sense::invalid_field_in_cdb(length_field(rw.size), None))?;
        let op = if write {
            IoOp::Write {
                lba: rw.lba,
                blocks,
                fua: rw.fua,
            }
        } else {
            IoOp::Read {
                lba: rw.lba,
                blocks,
                fua: rw.fua,
            }
        };
        Ok(Outcome::Io(IoPlan {
            op,
            data_len: bytes,
            residual: clamp_u32(residual),
        }))
    }

    fn verify<'d>(&self, v: &Verify, req: &Request<'d>) -> Result<Outcome<'d>, Sense> {
        if v.protect != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)));
        }
        if v.bytchk != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(2)));
        }
        self.check_range(v.lba, u64::from(v.blocks))?;
        // Medium verification of a block device that reports errors on read is a no-op, as in
        // SPDK.
        Ok(Outcome::Done(good(0, req.data_out_len)))
    }

    fn synchronize_cache<'d>(
        &self,
        s: &SynchronizeCache,
        req: &Request<'d>,
    ) -> Result<Outcome<'d>, Sense> {
        let cap = self.config.num_blocks;
        let blocks = if s.blocks == 0 {
            // Zero means "through the last block".
            cap.checked_sub(s.lba)
                .filter(|&n| n > 0)
                .ok_or(Sense::LBA_OUT_OF_RANGE)?
        } else {
            u64::from(s.blocks)
        };
        self.check_range(s.lba, blocks)?;
        if !self.config.supports_flush {
            return Ok(Outcome::Done(good(0, req.data_out_len)));
        }
        Ok(Outcome::Io(IoPlan {
            op: IoOp::Flush { lba: s.lba, blocks },
            data_len: 0,
            residual: clamp_u32(req.data_out_len.max(req.data_in_len)),
        }))
    }

    fn write_same<'d>(&self, w: &WriteSame, req: &Request<'d>) -> Result<Outcome<'d>, Sense> {
        if w.protect != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)));
        }
        if w.anchor {
            return Err(Sense::invalid_field_in_cdb(1, Some(4)));
        }
        if self.config.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        let len_at = length_field(w.size);
        // WSNZ is set in the BLOCK LIMITS page: zero blocks is not "to the end of the medium".
        if w.blocks == 0 || w.blocks > self.config.max_write_same_blocks {
            return Err(Sense::invalid_field_in_cdb(len_at, None));
        }
        let blocks = u64::from(w.blocks);
        self.check_range(w.lba, blocks)?;
        let block_size = self.config.block_size as usize;
        let (pattern, consumed) = if w.ndob {
            (None, 0u64)
        } else {
            if req.data_out_len < block_size as u64 {
                return Err(Sense::invalid_field_in_cdb(len_at, None));
            }
            let block = req
                .data_out
                .get(..block_size)
                .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
            (Some(block), block_size as u64)
        };
        let zero = pattern.is_none_or(|b| b.iter().all(|&x| x == 0));
        let lba = w.lba;
        let op = match pattern {
            _ if zero
                && w.unmap
                && self.config.supports_unmap
                && self.config.unmap_reads_zeroes =>
            {
                IoOp::Unmap(UnmapRanges {
                    single: Some(BlockRange { lba, blocks }),
                    descriptors: &[],
                })
            }
            Some(block) if !zero => IoOp::WriteSame { lba, blocks, block },
            // Without write-zeroes support the zero block the initiator sent is the pattern.
            Some(block) if !self.config.supports_write_zeroes => {
                IoOp::WriteSame { lba, blocks, block }
            }
            _ => IoOp::WriteZeroes { lba, blocks },
        };
        Ok(Outcome::Io(IoPlan {
            op,
            data_len: consumed,
            residual: clamp_u32(req.data_out_len.saturating_sub(consumed)),
        }))
    }

    fn unmap<'d>(
        &self,
        anchor: bool,
        param_len: u16,
        req: &Request<'d>,
    ) -> Result<Outcome<'d>, Sense> {
        if !self.config.supports_unmap {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
        }
        if anchor {
            return Err(Sense::invalid_field_in_cdb(1, Some(0)));
        }
        if self.config.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        let param_len = u64::from(param_len);
        if param_len == 0 {
            // SBC-4: no parameter data is not an error.
            return Ok(Outcome::Done(good(0, req.data_out_len)));
        }
        // The caller copies at most MAX_PARAMETER_LIST_LEN bytes; a longer list is only valid if
        // its header describes no more than that, which the descriptor check below enforces.
        let available = param_len.min(req.data_out_len) as usize;
        let list = req.data_out.get(..available).unwrap_or(req.data_out);
        if list.len() < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let descriptor_data_len = usize::from(wire::be_u16(list, 2..4));
        // A trailing partial descriptor is ignored (SBC-4 §5.32.2).
        let count = descriptor_data_len / 16;
        if count > usize::from(self.config.max_unmap_descriptors) {
            return Err(Sense::invalid_field_in_parameter_list(2, None));
        }
        let descriptors = list
            .get(8..8 + count * 16)
            .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let mut total: u64 = 0;
        for (i, d) in descriptors.chunks_exact(16).enumerate() {
            let range = unmap_descriptor(d);
            if range.blocks == 0 {
                continue;
            }
            self.check_range(range.lba, range.blocks)?;
            total = total.saturating_add(range.blocks);
            if total > u64::from(self.config.max_unmap_blocks) {
                return Err(Sense::invalid_field_in_parameter_list(
                    (8 + i * 16 + 8) as u16,
                    None,
                ));
            }
        }
        let residual = clamp_u32(req.data_out_len.saturating_sub(available as u64));
        if total == 0 {
            return Ok(Outcome::Done(Completion {
                status: ScsiStatus::Good,
                transferred: 0,
                residual,
                sense_len: 0,
            }));
        }
        Ok(Outcome::Io(IoPlan {
            op: IoOp::Unmap(UnmapRanges {
                single: None,
                descriptors,
            }),
            data_len: 0,
            residual,
        }))
    }

    fn mode_select<'d>(&mut self, m: &ModeSelect, req: &Request<'d>) -> Result<Outcome<'d>, Sense> {
        if m.sp {
            return Err(Sense::invalid_field_in_cdb(1, Some(0)));
        }
        if m.param_len == 0 {
            return Ok(Outcome::Done(good(0, req.data_out_len)));
        }
        if !m.pf {
            return Err(Sense::invalid_field_in_cdb(1, Some(4)));
        }
        let param_len = u64::from(m.param_len);
        if req.data_out_len < param_len {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let list = req
            .data_out
            .get(..usize::from(m.param_len))
            .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        if let Some(wce) = mode::mode_select(&self.config, m, list, self.write_cache_enabled)? {
            self.write_cache_enabled = wce;
        }
        // `transferred` counts data-in only: nothing goes back to the initiator here.
        Ok(Outcome::Done(good(0, req.data_out_len - param_len)))
    }

    fn start_stop<'d>(
        &mut self,
        s: &StartStopUnit,
        req: &Request<'d>,
    ) -> Result<Outcome<'d>, Sense> {
        let start = match s.power_condition {
            0x0 => {
                // Non-removable medium: nothing to load or eject.
                if s.loej {
                    return Err(Sense::invalid_field_in_cdb(4, Some(1)));
                }
                Some(s.start)
            }
            0x1 => Some(true),                   // ACTIVE
            0x2 | 0x3 | 0x7 | 0xa | 0xb => None, // IDLE, STANDBY, LU_CONTROL, FORCE_*: no-ops
            _ => return Err(Sense::invalid_field_in_cdb(4, Some(7))),
        };
        let done = Outcome::Done(good(0, req.data_in_len.max(req.data_out_len)));
        match start {
            Some(true) => {
                self.stopped = false;
                Ok(done)
            }
            Some(false) => {
                self.stopped = true;
                // SBC-4: stopping writes back the cache unless NO_FLUSH.
                if self.config.supports_flush && !s.no_flush {
                    Ok(Outcome::Io(IoPlan {
                        op: IoOp::Flush {
                            lba: 0,
                            blocks: self.config.num_blocks,
                        },
                        data_len: 0,
                        residual: 0,
                    }))
                } else {
                    Ok(done)
                }
            }
            None => Ok(done),
        }
    }

    /// Completes a planned I/O: GOOD with the plan's transfer, or CHECK CONDITION with the sense
    /// that describes `result` (MEDIUM ERROR for data errors) written into `sense`.
    pub fn complete_io(
        &self,
        plan: &IoPlan<'_>,
        result: Result<(), IoError>,
        sense: &mut [u8],
    ) -> Completion {
        match result {
            Ok(()) => Completion {
                status: ScsiStatus::Good,
                transferred: plan.data_len,
                residual: plan.residual,
                sense_len: 0,
            },
            Err(e) => {
                let s = match (e, plan.op) {
                    (IoError::Medium, IoOp::Read { .. }) => Sense::UNRECOVERED_READ_ERROR,
                    (IoError::Medium, _) => Sense::WRITE_ERROR,
                    (IoError::Unsupported, _) => Sense::INVALID_COMMAND_OPERATION_CODE,
                    (IoError::NotReady, _) => Sense::NOT_READY_CAUSE_NOT_REPORTABLE,
                };
                let sense_len = s.emit_fixed(sense);
                Completion {
                    status: ScsiStatus::CheckCondition,
                    transferred: 0,
                    residual: clamp_u32(plan.data_len.saturating_add(u64::from(plan.residual))),
                    sense_len,
                }
            }
        }
    }
}

/// Commands that need the medium, refused while the unit is stopped (SBC-4 §4.20).
fn needs_medium(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::TestUnitReady
            | Command::ReadCapacity10
            | Command::ReadCapacity16 { .. }
            | Command::Read(_)
            | Command::Write(_)
            | Command::Verify(_)
            | Command::SynchronizeCache(_)
            | Command::WriteSame(_)
            | Command::Unmap { .. }
    )
}

fn good(transferred: u64, buffer_len: u64) -> Completion {
    Completion {
        status: ScsiStatus::Good,
        transferred,
        residual: clamp_u32(buffer_len.saturating_sub(transferred)),
        sense_len: 0,
    }
}

fn check_condition(s: &Sense, sense: &mut [u8], req: &Request<'_>) -> Completion {
    Completion {
        status: ScsiStatus::CheckCondition,
        transferred: 0,
        residual: clamp_u32(req.data_in_len.max(req.data_out_len)),
        sense_len: s.emit_fixed(sense),
    }
}

/// Answers a command addressed to a LUN that does not exist on an existing target (SPC-5
/// §4.5.2): INQUIRY reports peripheral qualifier 011b, REPORT LUNS lists the target's LUNs,
/// REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as data, and everything else fails with it.
pub fn execute_without_lun(req: &Request<'_>, data_in: &mut [u8], sense: &mut [u8]) -> Completion {
    let fail = |s: Sense, sense: &mut [u8]| check_condition(&s, sense, req);
    let cmd = match Command::parse(req.cdb) {
        Ok(cmd) => cmd,
        Err(CdbError::UnsupportedOpcode { .. } | CdbError::Empty) => {
            return fail(Sense::LOGICAL_UNIT_NOT_SUPPORTED, sense)
        }
        Err(e) => return fail(e.sense(), sense),
    };
    match cmd {
        Command::Inquiry {
            evpd: false,
            alloc_len,
            ..
        } => {
            let mut w = DataWriter::new(data_in, u64::from(alloc_len).min(req.data_in_len));
            data::standard_inquiry(
                &mut w,
                PERIPHERAL_NO_LUN,
                &DEFAULT_VENDOR,
                b"rvhost          ",
                &DEFAULT_REVISION,
            );
            good(w.written() as u64, req.data_in_len)
        }
        Command::ReportLuns {
            select_report,
            alloc_len,
        } => {
            if !matches!(select_report, 0x00..=0x02) {
                return fail(Sense::invalid_field_in_cdb(2, None), sense);
            }
            if alloc_len < 16 {
                return fail(Sense::invalid_field_in_cdb(6, None), sense);
            }
            let mut w = DataWriter::new(data_in, u64::from(alloc_len).min(req.data_in_len));
            data::report_luns(&mut w, req.luns, select_report);
            good(w.written() as u64, req.data_in_len)
        }
        Command::RequestSense {
            desc: false,
            alloc_len,
        } => {
            let mut fixed = [0u8; super::sense::FIXED_SENSE_LEN];
            Sense::LOGICAL_UNIT_NOT_SUPPORTED.emit_fixed(&mut fixed);
            let mut w = DataWriter::new(data_in, u64::from(alloc_len).min(req.data_in_len));
            w.put(&fixed);
            good(w.written() as u64, req.data_in_len)
        }
        _ => fail(Sense::LOGICAL_UNIT_NOT_SUPPORTED, sense),
    }
}
