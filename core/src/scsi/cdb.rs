//! Command descriptor blocks: a zero-copy view ([`Cdb`]) and the parsed form ([`Command`]) of every
//! command rvhost implements, with `parse` and `emit` (SBC-4 §5, SPC-5 §6).
//!
//! Parsing checks what the *format* of a CDB demands (length, service action, the NACA bit,
//! fields that must be zero for the command to mean anything); what depends on the logical unit
//! (capacity, supported pages, read-only) is checked by [`super::lun::ScsiLun`].

use core::fmt;
use core::ops::Range;

use super::opcode as op;
use super::sense::Sense;
use crate::wire;

/// Field offsets, per CDB layout.
pub mod field {
    use core::ops::Range;

    /// Operation code, in every CDB.
    pub const OPCODE: usize = 0;
    /// Byte 1 holds the flags (DPO, FUA, protection, ...) of most commands.
    pub const FLAGS: usize = 1;

    /// READ(6)/WRITE(6).
    pub mod rw6 {
        use core::ops::Range;
        /// 21-bit LBA (top 3 bits of byte 1 are reserved).
        pub const LBA: Range<usize> = 1..4;
        /// Transfer length; 0 means 256 blocks.
        pub const LENGTH: usize = 4;
    }
    /// READ/WRITE/VERIFY/SYNCHRONIZE CACHE/WRITE SAME (10).
    pub mod rw10 {
        use core::ops::Range;
        /// 32-bit LBA.
        pub const LBA: Range<usize> = 2..6;
        /// Group number.
        pub const GROUP: usize = 6;
        /// 16-bit transfer length / number of blocks.
        pub const LENGTH: Range<usize> = 7..9;
    }
    /// READ/WRITE (12).
    pub mod rw12 {
        use core::ops::Range;
        /// 32-bit LBA.
        pub const LBA: Range<usize> = 2..6;
        /// 32-bit transfer length.
        pub const LENGTH: Range<usize> = 6..10;
        /// Group number.
        pub const GROUP: usize = 10;
    }
    /// READ/WRITE/VERIFY/SYNCHRONIZE CACHE/WRITE SAME (16).
    pub mod rw16 {
        use core::ops::Range;
        /// 64-bit LBA.
        pub const LBA: Range<usize> = 2..10;
        /// 32-bit transfer length / number of blocks.
        pub const LENGTH: Range<usize> = 10..14;
        /// Group number.
        pub const GROUP: usize = 14;
    }
    /// INQUIRY.
    pub mod inquiry {
        use core::ops::Range;
        /// Page code (with EVPD in byte 1 bit 0).
        pub const PAGE_CODE: usize = 2;
        /// Allocation length.
        pub const ALLOC_LEN: Range<usize> = 3..5;
    }
    /// REQUEST SENSE, MODE SENSE(6), MODE SELECT(6): one-byte length in byte 4.
    pub const LEN6: usize = 4;
    /// MODE SENSE(10), MODE SELECT(10), UNMAP: two-byte length in bytes 7..9.
    pub const LEN10: Range<usize> = 7..9;
    /// MODE SENSE: PC and page code.
    pub const MODE_PAGE: usize = 2;
    /// MODE SENSE: subpage code.
    pub const MODE_SUBPAGE: usize = 3;
    /// START STOP UNIT: power condition, LOEJ, START.
    pub const START_STOP: usize = 4;
    /// REPORT LUNS: select report.
    pub const SELECT_REPORT: usize = 2;
    /// REPORT LUNS, REPORT SUPPORTED OPERATION CODES: allocation length.
    pub const ALLOC_LEN_6_10: Range<usize> = 6..10;
    /// READ CAPACITY(16): allocation length.
    pub const ALLOC_LEN_10_14: Range<usize> = 10..14;
    /// REPORT SUPPORTED OPERATION CODES: RCTD and reporting options.
    pub const RSOC_OPTIONS: usize = 2;
    /// REPORT SUPPORTED OPERATION CODES: requested operation code.
    pub const RSOC_OPCODE: usize = 3;
    /// REPORT SUPPORTED OPERATION CODES: requested service action.
    pub const RSOC_SERVICE_ACTION: Range<usize> = 4..6;
}

/// NACA bit of the CONTROL byte: rvhost does not support ACA.
const CONTROL_NACA: u8 = 0x04;

/// Why a CDB cannot be parsed; [`CdbError::sense`] gives what to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdbError {
    /// The buffer is empty.
    Empty,
    /// The operation code (or its service action) is not implemented.
    UnsupportedOpcode {
        /// The operation code.
        opcode: u8,
        /// The service action, for SERVICE ACTION IN / MAINTENANCE IN.
        service_action: Option<u8>,
    },
    /// The buffer is shorter than the CDB length the operation code implies.
    TooShort {
        /// The operation code.
        opcode: u8,
        /// Bytes required.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// A field holds a value the command does not allow.
    InvalidField {
        /// Byte offset of the field.
        byte: u16,
        /// Leftmost bit of the field, when narrower than a byte.
        bit: Option<u8>,
    },
}

impl CdbError {
    /// The sense data an initiator should see for this error.
    pub const fn sense(&self) -> Sense {
        match *self {
            CdbError::Empty => Sense::INVALID_COMMAND_OPERATION_CODE,
            CdbError::UnsupportedOpcode {
                service_action: None,
                ..
            } => Sense::INVALID_COMMAND_OPERATION_CODE,
            // SPC-5: an unsupported service action of a supported operation code is an invalid
            // field in the CDB (the SERVICE ACTION field, byte 1 bits 4..0).
            CdbError::UnsupportedOpcode {
                service_action: Some(_),
                ..
            } => Sense::invalid_field_in_cdb(1, Some(4)),
            // A CDB shorter than its operation code demands cannot have come from a conforming
            // transport; report it like SPDK does for malformed CDBs.
            CdbError::TooShort { .. } => Sense::INVALID_FIELD_IN_CDB,
            CdbError::InvalidField { byte, bit } => Sense::invalid_field_in_cdb(byte, bit),
        }
    }
}

impl fmt::Display for CdbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CdbError::Empty => f.write_str("empty CDB"),
            CdbError::UnsupportedOpcode {
                opcode,
                service_action: None,
            } => {
                write!(f, "unsupported operation code {opcode:#04x}")
            }
            CdbError::UnsupportedOpcode {
                opcode,
                service_action: Some(sa),
            } => {
                write!(
                    f,
                    "unsupported service action {sa:#04x} of operation code {opcode:#04x}"
                )
            }
            CdbError::TooShort {
                opcode,
                needed,
                got,
            } => {
                write!(
                    f,
                    "CDB of operation code {opcode:#04x} needs {needed} bytes, got {got}"
                )
            }
            CdbError::InvalidField {
                byte,
                bit: Some(bit),
            } => {
                write!(f, "invalid field in CDB at byte {byte} bit {bit}")
            }
            CdbError::InvalidField { byte, bit: None } => {
                write!(f, "invalid field in CDB at byte {byte}")
            }
        }
    }
}

/// The CDB length implied by an operation code's group code (SPC-5 §4.2.5.1), or `None` for the
/// reserved and vendor-specific groups and variable-length CDBs.
pub const fn cdb_len_for_opcode(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A read-only view of a CDB's bytes. Accessors are valid once [`Cdb::new_checked`] succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cdb<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Cdb<T> {
    /// Wraps `buffer` without checking its length; accessors read zeros past its end.
    pub const fn new_unchecked(buffer: T) -> Cdb<T> {
        Cdb { buffer }
    }

    /// Wraps `buffer`, checking that it holds the whole CDB its operation code implies.
    pub fn new_checked(buffer: T) -> Result<Cdb<T>, CdbError> {
        let cdb = Cdb { buffer };
        cdb.check_len()?;
        Ok(cdb)
    }

    /// Checks the buffer against the operation code's CDB length.
    pub fn check_len(&self) -> Result<(), CdbError> {
        let bytes = self.buffer.as_ref();
        let opcode = *bytes.first().ok_or(CdbError::Empty)?;
        let needed = cdb_len_for_opcode(opcode).ok_or(CdbError::UnsupportedOpcode {
            opcode,
            service_action: None,
        })?;
        if bytes.len() < needed {
            return Err(CdbError::TooShort {
                opcode,
                needed,
                got: bytes.len(),
            });
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The operation code.
    #[inline]
    pub fn opcode(&self) -> u8 {
        self.byte(field::OPCODE)
    }

    /// The CDB length implied by the operation code.
    #[inline]
    pub fn len(&self) -> usize {
        cdb_len_for_opcode(self.opcode()).unwrap_or(0)
    }

    /// Whether the view holds no CDB (never, after `new_checked`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CDB bytes proper (without trailing padding of the transport's CDB field).
    pub fn bytes(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        b.get(..self.len()).unwrap_or(b)
    }

    /// Byte `i` (0 past the end of the buffer).
    #[inline]
    pub fn byte(&self, i: usize) -> u8 {
        wire::byte(self.buffer.as_ref(), i)
    }

    /// Bit `bit` of byte `i`.
    pub fn bit(&self, i: usize, bit: u8) -> bool {
        self.byte(i) & (1 << bit) != 0
    }

    /// The big-endian unsigned integer in `range` (0 if the range is past the end of the
    /// buffer; a range longer than 8 bytes keeps its last 8).
    #[inline]
    pub fn be(&self, range: Range<usize>) -> u64 {
        wire::be_uint(self.buffer.as_ref(), range)
    }

    /// The CONTROL byte (the last byte of the CDB).
    #[inline]
    pub fn control(&self) -> u8 {
        self.byte(self.len().saturating_sub(1))
    }

    /// The service action (byte 1, bits 4..0) of SERVICE ACTION IN / MAINTENANCE IN.
    pub fn service_action(&self) -> u8 {
        self.byte(field::FLAGS) & 0x1f
    }

    /// The LOGICAL BLOCK ADDRESS of a 6/10/12/16-byte block command.
    #[inline]
    pub fn lba(&self) -> u64 {
        match self.len() {
            6 => self.be(field::rw6::LBA) & 0x1f_ffff,
            10 => self.be(field::rw10::LBA),
            12 => self.be(field::rw12::LBA),
            _ => self.be(field::rw16::LBA),
        }
    }

    /// The raw TRANSFER LENGTH (or NUMBER OF LOGICAL BLOCKS) field of a block command; for a
    /// 6-byte CDB, 0 is returned as 0 (READ/WRITE(6) interpret it as 256).
    #[inline]
    pub fn transfer_length(&self) -> u32 {
        match self.len() {
            6 => u32::from(self.byte(field::rw6::LENGTH)),
            10 => self.be(field::rw10::LENGTH) as u32,
            12 => self.be(field::rw12::LENGTH) as u32,
            _ => self.be(field::rw16::LENGTH) as u32,
        }
    }

    /// The GROUP NUMBER field of a 10/12/16-byte block command (0 for 6-byte CDBs).
    #[inline]
    pub fn group_number(&self) -> u8 {
        match self.len() {
            10 => self.byte(field::rw10::GROUP) & 0x3f,
            12 => self.byte(field::rw12::GROUP) & 0x3f,
            16 => self.byte(field::rw16::GROUP) & 0x3f,
            _ => 0,
        }
    }
}

/// The size of a block command's CDB, where a command exists in several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CdbSize {
    /// 6-byte CDB.
    Six,
    /// 10-byte CDB.
    Ten,
    /// 12-byte CDB.
    Twelve,
    /// 16-byte CDB.
    Sixteen,
}

impl CdbSize {
    /// Length in bytes.
    pub const fn len(self) -> usize {
        match self {
            CdbSize::Six => 6,
            CdbSize::Ten => 10,
            CdbSize::Twelve => 12,
            CdbSize::Sixteen => 16,
        }
    }

    /// Whether the length is zero (never).
    pub const fn is_empty(self) -> bool {
        false
    }

    const fn of_len(len: usize) -> CdbSize {
        match len {
            6 => CdbSize::Six,
            10 => CdbSize::Ten,
            12 => CdbSize::Twelve,
            _ => CdbSize::Sixteen,
        }
    }
}

/// READ or WRITE (6/10/12/16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadWrite {
    /// Which CDB.
    pub size: CdbSize,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks (READ/WRITE(6): 1..=256, the CDB's 0 meaning 256).
    pub blocks: u32,
    /// RDPROTECT / WRPROTECT (0 for the 6-byte CDBs).
    pub protect: u8,
    /// Disable page out.
    pub dpo: bool,
    /// Force unit access.
    pub fua: bool,
    /// GROUP NUMBER.
    pub group: u8,
}

/// VERIFY (10/16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verify {
    /// Which CDB (10 or 16).
    pub size: CdbSize,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks.
    pub blocks: u32,
    /// VRPROTECT.
    pub protect: u8,
    /// Disable page out.
    pub dpo: bool,
    /// BYTCHK (0: medium verification only).
    pub bytchk: u8,
    /// GROUP NUMBER.
    pub group: u8,
}

/// SYNCHRONIZE CACHE (10/16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SynchronizeCache {
    /// Which CDB (10 or 16).
    pub size: CdbSize,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks; 0 means "to the end of the medium".
    pub blocks: u32,
    /// Return status before the cache is flushed.
    pub immed: bool,
    /// GROUP NUMBER.
    pub group: u8,
}

/// WRITE SAME (10/16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteSame {
    /// Which CDB (10 or 16).
    pub size: CdbSize,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks.
    pub blocks: u32,
    /// WRPROTECT.
    pub protect: u8,
    /// ANCHOR.
    pub anchor: bool,
    /// UNMAP: the blocks may be deallocated.
    pub unmap: bool,
    /// NDOB (16 only): no data-out buffer, the blocks become zeros.
    pub ndob: bool,
    /// GROUP NUMBER.
    pub group: u8,
}

/// Page control of MODE SENSE (SPC-5 table 150).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageControl {
    /// Current values.
    Current,
    /// Changeable values (a mask).
    Changeable,
    /// Default values.
    Default,
    /// Saved values.
    Saved,
}

impl PageControl {
    const fn from_bits(bits: u8) -> PageControl {
        match bits & 0x03 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => PageControl::Saved,
        }
    }

    const fn bits(self) -> u8 {
        match self {
            PageControl::Current => 0,
            PageControl::Changeable => 1,
            PageControl::Default => 2,
            PageControl::Saved => 3,
        }
    }
}

/// MODE SENSE (6/10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModeSense {
    /// MODE SENSE(10) rather than (6).
    pub ten: bool,
    /// Disable block descriptors.
    pub dbd: bool,
    /// Long LBA block descriptors accepted (10 only).
    pub llbaa: bool,
    /// Page control.
    pub pc: PageControl,
    /// Page code (0x3F: all pages).
    pub page: u8,
    /// Subpage code.
    pub subpage: u8,
    /// Allocation length.
    pub alloc_len: u16,
}

/// MODE SELECT (6/10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModeSelect {
    /// MODE SELECT(10) rather than (6).
    pub ten: bool,
    /// Page format: the pages follow SPC.
    pub pf: bool,
    /// Save pages.
    pub sp: bool,
    /// Parameter list length.
    pub param_len: u16,
}

/// START STOP UNIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StartStopUnit {
    /// Return before the operation completes.
    pub immed: bool,
    /// POWER CONDITION MODIFIER.
    pub power_condition_modifier: u8,
    /// POWER CONDITION.
    pub power_condition: u8,
    /// NO_FLUSH.
    pub no_flush: bool,
    /// Load/eject.
    pub loej: bool,
    /// START.
    pub start: bool,
}

/// REPORT SUPPORTED OPERATION CODES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReportSupportedOpcodes {
    /// Return command timeouts descriptors.
    pub rctd: bool,
    /// REPORTING OPTIONS (0: all commands; 1..=3: one command).
    pub options: u8,
    /// Requested operation code.
    pub opcode: u8,
    /// Requested service action.
    pub service_action: u16,
    /// Allocation length.
    pub alloc_len: u32,
}

/// A parsed CDB of a command rvhost implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense {
        /// Descriptor-format sense requested.
        desc: bool,
        /// Allocation length.
        alloc_len: u8,
    },
    /// INQUIRY.
    Inquiry {
        /// Vital product data requested.
        evpd: bool,
        /// VPD page code (0 for standard data).
        page_code: u8,
        /// Allocation length.
        alloc_len: u16,
    },
    /// MODE SENSE (6/10).
    ModeSense(ModeSense),
    /// MODE SELECT (6/10).
    ModeSelect(ModeSelect),
    /// START STOP UNIT.
    StartStopUnit(StartStopUnit),
    /// READ CAPACITY(10).
    ReadCapacity10,
    /// READ CAPACITY(16).
    ReadCapacity16 {
        /// Allocation length.
        alloc_len: u32,
    },
    /// READ (6/10/12/16).
    Read(ReadWrite),
    /// WRITE (6/10/12/16).
    Write(ReadWrite),
    /// VERIFY (10/16).
    Verify(Verify),
    /// SYNCHRONIZE CACHE (10/16).
    SynchronizeCache(SynchronizeCache),
    /// WRITE SAME (10/16).
    WriteSame(WriteSame),
    /// UNMAP.
    Unmap {
        /// ANCHOR.
        anchor: bool,
        /// GROUP NUMBER.
        group: u8,
        /// Parameter list length.
        param_len: u16,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// SELECT REPORT.
        select_report: u8,
        /// Allocation length.
        alloc_len: u32,
    },
    /// REPORT SUPPORTED OPERATION CODES.
    ReportSupportedOpcodes(ReportSupportedOpcodes),
}

fn invalid(byte: usize, bit: Option<u8>) -> CdbError {
    // CDBs are at most 16 bytes here, so the offset always fits.
    CdbError::InvalidField {
        byte: byte as u16,
        bit,
    }
}

impl Command {
    /// READ(10/16) and WRITE(10/16), the commands of the data path, decoded without the general
    /// dispatch of [`Command::parse`]: `Some((fields, is_write))` exactly when `parse` returns
    /// `Command::Read` / `Command::Write` for one of those opcodes, with the same fields; `None`
    /// for every other CDB (use `parse` then, which also reports what is wrong).
    #[inline]
    pub fn parse_read_write(bytes: &[u8]) -> Option<(ReadWrite, bool)> {
        let (size, write) = match *bytes.first()? {
            op::READ_10 => (CdbSize::Ten, false),
            op::READ_16 => (CdbSize::Sixteen, false),
            op::WRITE_10 => (CdbSize::Ten, true),
            op::WRITE_16 => (CdbSize::Sixteen, true),
            _ => return None,
        };
        let cdb = Cdb::new_checked(bytes).ok()?;
        if cdb.control() & CONTROL_NACA != 0 {
            return None;
        }
        let flags = cdb.byte(field::FLAGS);
        let rw = ReadWrite {
            size,
            lba: cdb.lba(),
            blocks: cdb.transfer_length(),
            protect: flags >> 5,
            dpo: flags & 0x10 != 0,
            fua: flags & 0x08 != 0,
            group: cdb.group_number(),
        };
        Some((rw, write))
    }

    /// Parses a CDB. `bytes` may be longer than the CDB (virtio-scsi pads it to `cdb_size`).
    pub fn parse(bytes: &[u8]) -> Result<Command, CdbError> {
        let cdb = Cdb::new_checked(bytes)?;
        Command::parse_view(&cdb)
    }

    /// Parses a checked [`Cdb`] view.
    pub fn parse_view<T: AsRef<[u8]>>(cdb: &Cdb<T>) -> Result<Command, CdbError> {
        cdb.check_len()?;
        let opcode = cdb.opcode();
        let len = cdb.len();
        let size = CdbSize::of_len(len);
        if cdb.control() & CONTROL_NACA != 0 {
            return Err(invalid(len - 1, Some(2)));
        }
        let flags = cdb.byte(field::FLAGS);
        let cmd = match opcode {
            op::TEST_UNIT_READY => Command::TestUnitReady,
            op::REQUEST_SENSE => Command::RequestSense {
                desc: flags & 0x01 != 0,
                alloc_len: cdb.byte(field::LEN6),
            },
            op::INQUIRY => {
                let evpd = flags & 0x01 != 0;
                let page_code = cdb.byte(field::inquiry::PAGE_CODE);
                if !evpd && page_code != 0 {
                    return Err(invalid(field::inquiry::PAGE_CODE, None));
                }
                // CMDDT (byte 1 bit 1) is obsolete; SPC-5 requires rejecting it when set.
                if flags & 0x02 != 0 {
                    return Err(invalid(field::FLAGS, Some(1)));
                }
                Command::Inquiry {
                    evpd,
                    page_code,
                    alloc_len: cdb.be(field::inquiry::ALLOC_LEN) as u16,
                }
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
                let ten = opcode == op::MODE_SENSE_10;
                let page_byte = cdb.byte(field::MODE_PAGE);
                Command::ModeSense(ModeSense {
                    ten,
                    dbd: flags & 0x08 != 0,
                    llbaa: ten && flags & 0x10 != 0,
                    pc: PageControl::from_bits(page_byte >> 6),
                    page: page_byte & 0x3f,
                    subpage: cdb.byte(field::MODE_SUBPAGE),
                    alloc_len: if ten {
                        cdb.be(field::LEN10) as u16
                    } else {
                        u16::from(cdb.byte(field::LEN6))
                    },
                })
            }
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
                let ten = opcode == op::MODE_SELECT_10;
                Command::ModeSelect(ModeSelect {
                    ten,
                    pf: flags & 0x10 != 0,
                    sp: flags & 0x01 != 0,
                    param_len: if ten {
                        cdb.be(field::LEN10) as u16
                    } else {
                        u16::from(cdb.byte(field::LEN6))
                    },
                })
            }
            op::START_STOP_UNIT => {
                let b = cdb.byte(field::START_STOP);
                Command::StartStopUnit(StartStopUnit {
                    immed: flags & 0x01 != 0,
                    power_condition_modifier: cdb.byte(3) & 0x0f,
                    power_condition: b >> 4,
                    no_flush: b & 0x04 != 0,
                    loej: b & 0x02 != 0,
                    start: b & 0x01 != 0,
                })
            }
            op::READ_CAPACITY_10 => Command::ReadCapacity10,
            op::SERVICE_ACTION_IN_16 => match cdb.service_action() {
                op::SAI_READ_CAPACITY_16 => Command::ReadCapacity16 {
                    alloc_len: cdb.be(field::ALLOC_LEN_10_14) as u32,
                },
                sa => {
                    return Err(CdbError::UnsupportedOpcode {
                        opcode,
                        service_action: Some(sa),
                    })
                }
            },
            op::READ_6 | op::WRITE_6 => {
                let raw = cdb.transfer_length();
                let rw = ReadWrite {
                    size,
                    lba: cdb.lba(),
                    blocks: if raw == 0 { 256 } else { raw },
                    protect: 0,
                    dpo: false,
                    fua: false,
                    group: 0,
                };
                if opcode == op::READ_6 {
                    Command::Read(rw)
                } else {
                    Command::Write(rw)
                }
            }
            op::READ_10
            | op::READ_12
            | op::READ_16
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16 => {
                let rw = ReadWrite {
                    size,
                    lba: cdb.lba(),
                    blocks: cdb.transfer_length(),
                    protect: flags >> 5,
                    dpo: flags & 0x10 != 0,
                    fua: flags & 0x08 != 0,
                    group: cdb.group_number(),
                };
                if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                    Command::Read(rw)
                } else {
                    Command::Write(rw)
                }
            }
            op::VERIFY_10 | op::VERIFY_16 => Command::Verify(Verify {
                size,
                lba: cdb.lba(),
                blocks: cdb.transfer_length(),
                protect: flags >> 5,
                dpo: flags & 0x10 != 0,
                bytchk: (flags >> 1) & 0x03,
                group: cdb.group_number(),
            }),
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                Command::SynchronizeCache(SynchronizeCache {
                    size,
                    lba: cdb.lba(),
                    blocks: cdb.transfer_length(),
                    immed: flags & 0x02 != 0,
                    group: cdb.group_number(),
                })
            }
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => Command::WriteSame(WriteSame {
                size,
                lba: cdb.lba(),
                blocks: cdb.transfer_length(),
                protect: flags >> 5,
                anchor: flags & 0x10 != 0,
                unmap: flags & 0x08 != 0,
                ndob: opcode == op::WRITE_SAME_16 && flags & 0x01 != 0,
                group: cdb.group_number(),
            }),
            op::UNMAP => Command::Unmap {
                anchor: flags & 0x01 != 0,
                group: cdb.byte(field::rw10::GROUP) & 0x3f,
                param_len: cdb.be(field::LEN10) as u16,
            },
            op::REPORT_LUNS => Command::ReportLuns {
                select_report: cdb.byte(field::SELECT_REPORT),
                alloc_len: cdb.be(field::ALLOC_LEN_6_10) as u32,
            },
            op::MAINTENANCE_IN => match cdb.service_action() {
                op::MI_REPORT_SUPPORTED_OPERATION_CODES => {
                    let options_byte = cdb.byte(field::RSOC_OPTIONS);
                    Command::ReportSupportedOpcodes(ReportSupportedOpcodes {
                        rctd: options_byte & 0x80 != 0,
                        options: options_byte & 0x07,
                        opcode: cdb.byte(field::RSOC_OPCODE),
                        service_action: cdb.be(field::RSOC_SERVICE_ACTION) as u16,
                        alloc_len: cdb.be(field::ALLOC_LEN_6_10) as u32,
                    })
                }
                sa => {
                    return Err(CdbError::UnsupportedOpcode {
                        opcode,
                        service_action: Some(sa),
                    })
                }
            },
            _ => {
                return Err(CdbError::UnsupportedOpcode {
                    opcode,
                    service_action: None,
                })
            }
        };
        Ok(cmd)
    }

    /// The length of the CDB [`Command::emit`] writes.
    pub fn cdb_len(&self) -> usize {
        cdb_len_for_opcode(self.opcode()).unwrap_or(16)
    }

    /// The operation code.
    pub fn opcode(&self) -> u8 {
        match self {
            Command::TestUnitReady => op::TEST_UNIT_READY,
            Command::RequestSense { .. } => op::REQUEST_SENSE,
            Command::Inquiry { .. } => op::INQUIRY,
            Command::ModeSense(m) => {
                if m.ten {
                    op::MODE_SENSE_10
                } else {
                    op::MODE_SENSE_6
                }
            }
            Command::ModeSelect(m) => {
                if m.ten {
                    op::MODE_SELECT_10
                } else {
                    op::MODE_SELECT_6
                }
            }
            Command::StartStopUnit(_) => op::START_STOP_UNIT,
            Command::ReadCapacity10 => op::READ_CAPACITY_10,
            Command::ReadCapacity16 { .. } => op::SERVICE_ACTION_IN_16,
            Command::Read(rw) => match rw.size {
                CdbSize::Six => op::READ_6,
                CdbSize::Ten => op::READ_10,
                CdbSize::Twelve => op::READ_12,
                CdbSize::Sixteen => op::READ_16,
            },
            Command::Write(rw) => match rw.size {
                CdbSize::Six => op::WRITE_6,
                CdbSize::Ten => op::WRITE_10,
                CdbSize::Twelve => op::WRITE_12,
                CdbSize::Sixteen => op::WRITE_16,
            },
            Command::Verify(v) => {
                if v.size == CdbSize::Sixteen {
                    op::VERIFY_16
                } else {
                    op::VERIFY_10
                }
            }
            Command::SynchronizeCache(s) => {
                if s.size == CdbSize::Sixteen {
                    op::SYNCHRONIZE_CACHE_16
                } else {
                    op::SYNCHRONIZE_CACHE_10
                }
            }
            Command::WriteSame(w) => {
                if w.size == CdbSize::Sixteen {
                    op::WRITE_SAME_16
                } else {
                    op::WRITE_SAME_10
                }
            }
            Command::Unmap { .. } => op::UNMAP,
            Command::ReportLuns { .. } => op::REPORT_LUNS,
            Command::ReportSupportedOpcodes(_) => op::MAINTENANCE_IN,
        }
    }

    /// Writes the CDB into the start of `buf` (reserved bits and CONTROL zero) and returns its
    /// length. Fields too wide for the chosen CDB size are truncated to the field's width, so
    /// `parse(emit(x)) == x` holds for every `x` that `parse` can return.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, EmitError> {
        let len = self.cdb_len();
        let out = buf.get_mut(..len).ok_or(EmitError { needed: len })?;
        out.fill(0);
        wire::set_byte(out, 0, self.opcode());
        match *self {
            Command::TestUnitReady | Command::ReadCapacity10 => {}
            Command::RequestSense { desc, alloc_len } => {
                wire::set_byte(out, 1, u8::from(desc));
                wire::set_byte(out, field::LEN6, alloc_len);
            }
            Command::Inquiry {
                evpd,
                page_code,
                alloc_len,
            } => {
                wire::set_byte(out, 1, u8::from(evpd));
                wire::set_byte(out, field::inquiry::PAGE_CODE, page_code);
                wire::set(out, field::inquiry::ALLOC_LEN, &alloc_len.to_be_bytes());
            }
            Command::ModeSense(m) => {
                wire::set_byte(
                    out,
                    1,
                    (u8::from(m.llbaa && m.ten) << 4) | (u8::from(m.dbd) << 3),
                );
                wire::set_byte(out, field::MODE_PAGE, (m.pc.bits() << 6) | (m.page & 0x3f));
                wire::set_byte(out, field::MODE_SUBPAGE, m.subpage);
                if m.ten {
                    wire::set(out, field::LEN10, &m.alloc_len.to_be_bytes());
                } else {
                    wire::set_byte(out, field::LEN6, m.alloc_len as u8);
                }
            }
            Command::ModeSelect(m) => {
                wire::set_byte(out, 1, (u8::from(m.pf) << 4) | u8::from(m.sp));
                if m.ten {
                    wire::set(out, field::LEN10, &m.param_len.to_be_bytes());
                } else {
                    wire::set_byte(out, field::LEN6, m.param_len as u8);
                }
            }
            Command::StartStopUnit(s) => {
                wire::set_byte(out, 1, u8::from(s.immed));
                wire::set_byte(out, 3, s.power_condition_modifier & 0x0f);
                wire::set_byte(
                    out,
                    field::START_STOP,
                    (s.power_condition << 4)
                        | (u8::from(s.no_flush) << 2)
                        | (u8::from(s.loej) << 1)
                        | u8::from(s.start),
                );
            }
            Command::ReadCapacity16 { alloc_len } => {
                wire::set_byte(out, 1, op::SAI_READ_CAPACITY_16);
                wire::set(out, field::ALLOC_LEN_10_14, &alloc_len.to_be_bytes());
            }
            Command::Read(rw) | Command::Write(rw) => {
                if rw.size == CdbSize::Six {
                    let lba = (rw.lba as u32 & 0x1f_ffff).to_be_bytes();
                    wire::set(out, field::rw6::LBA, &lba[1..]);
                    // 256 blocks is encoded as 0.
                    wire::set_byte(out, field::rw6::LENGTH, rw.blocks as u8);
                } else {
                    wire::set_byte(
                        out,
                        1,
                        (rw.protect << 5) | (u8::from(rw.dpo) << 4) | (u8::from(rw.fua) << 3),
                    );
                    put_block_fields(out, rw.size, rw.lba, rw.blocks, rw.group);
                }
            }
            Command::Verify(v) => {
                wire::set_byte(
                    out,
                    1,
                    (v.protect << 5) | (u8::from(v.dpo) << 4) | ((v.bytchk & 0x03) << 1),
                );
                put_block_fields(out, v.size, v.lba, v.blocks, v.group);
            }
            Command::SynchronizeCache(s) => {
                wire::set_byte(out, 1, u8::from(s.immed) << 1);
                put_block_fields(out, s.size, s.lba, s.blocks, s.group);
            }
            Command::WriteSame(w) => {
                wire::set_byte(
                    out,
                    1,
                    (w.protect << 5)
                        | (u8::from(w.anchor) << 4)
                        | (u8::from(w.unmap) << 3)
                        | u8::from(w.ndob && w.size == CdbSize::Sixteen),
                );
                put_block_fields(out, w.size, w.lba, w.blocks, w.group);
            }
            Command::Unmap {
                anchor,
                group,
                param_len,
            } => {
                wire::set_byte(out, 1, u8::from(anchor));
                wire::set_byte(out, field::rw10::GROUP, group & 0x3f);
                wire::set(out, field::LEN10, &param_len.to_be_bytes());
            }
            Command::ReportLuns {
                select_report,
                alloc_len,
            } => {
                wire::set_byte(out, field::SELECT_REPORT, select_report);
                wire::set(out, field::ALLOC_LEN_6_10, &alloc_len.to_be_bytes());
            }
            Command::ReportSupportedOpcodes(r) => {
                wire::set_byte(out, 1, op::MI_REPORT_SUPPORTED_OPERATION_CODES);
                wire::set_byte(
                    out,
                    field::RSOC_OPTIONS,
                    (u8::from(r.rctd) << 7) | (r.options & 0x07),
                );
                wire::set_byte(out, field::RSOC_OPCODE, r.opcode);
                wire::set(
                    out,
                    field::RSOC_SERVICE_ACTION,
                    &r.service_action.to_be_bytes(),
                );
                wire::set(out, field::ALLOC_LEN_6_10, &r.alloc_len.to_be_bytes());
            }
        }
        Ok(len)
    }
}

fn put_block_fields(out: &mut [u8], size: CdbSize, lba: u64, blocks: u32, group: u8) {
    let group = group & 0x3f;
    match size {
        CdbSize::Six => {}
        CdbSize::Ten => {
            wire::set(out, field::rw10::LBA, &(lba as u32).to_be_bytes());
            wire::set_byte(out, field::rw10::GROUP, group);
            wire::set(out, field::rw10::LENGTH, &(blocks as u16).to_be_bytes());
        }
        CdbSize::Twelve => {
            wire::set(out, field::rw12::LBA, &(lba as u32).to_be_bytes());
            wire::set(out, field::rw12::LENGTH, &blocks.to_be_bytes());
            wire::set_byte(out, field::rw12::GROUP, group);
        }
        CdbSize::Sixteen => {
            wire::set(out, field::rw16::LBA, &lba.to_be_bytes());
            wire::set(out, field::rw16::LENGTH, &blocks.to_be_bytes());
            wire::set_byte(out, field::rw16::GROUP, group);
        }
    }
}

/// The output buffer is too small for the CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmitError {
    /// Bytes needed.
    pub needed: usize,
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "buffer too small: {} bytes needed", self.needed)
    }
}
