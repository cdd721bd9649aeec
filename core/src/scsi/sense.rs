//! Fixed-format sense data (SPC-5 §4.4.3) and the sense codes rvhost reports.

use core::fmt;

/// The sense keys of SPC-5 table 49.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    /// No specific sense key information.
    NoSense = 0x0,
    /// The command completed after recovery.
    RecoveredError = 0x1,
    /// The logical unit cannot be accessed.
    NotReady = 0x2,
    /// A non-recoverable error in the medium.
    MediumError = 0x3,
    /// A non-recoverable hardware failure.
    HardwareError = 0x4,
    /// The CDB or its parameter data is invalid.
    IllegalRequest = 0x5,
    /// A unit attention condition was established.
    UnitAttention = 0x6,
    /// The medium is protected against the operation.
    DataProtect = 0x7,
    /// Blank or end-of-data medium.
    BlankCheck = 0x8,
    /// Vendor specific.
    VendorSpecific = 0x9,
    /// A copy command was aborted.
    CopyAborted = 0xa,
    /// The device server aborted the command.
    AbortedCommand = 0xb,
    /// A buffered device reached the end of partition.
    VolumeOverflow = 0xd,
    /// Source data did not match the medium.
    Miscompare = 0xe,
    /// A command completed with sense data to report.
    Completed = 0xf,
}

impl SenseKey {
    /// The key for a 4-bit code, or `None` for the reserved code 0xC and codes above 0xF.
    pub const fn from_code(code: u8) -> Option<SenseKey> {
        Some(match code {
            0x0 => SenseKey::NoSense,
            0x1 => SenseKey::RecoveredError,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0x8 => SenseKey::BlankCheck,
            0x9 => SenseKey::VendorSpecific,
            0xa => SenseKey::CopyAborted,
            0xb => SenseKey::AbortedCommand,
            0xd => SenseKey::VolumeOverflow,
            0xe => SenseKey::Miscompare,
            0xf => SenseKey::Completed,
            _ => return None,
        })
    }

    /// The 4-bit code.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

/// Where in the CDB or parameter list the device server found an invalid field: the
/// sense-key-specific "field pointer" of SPC-5 §4.4.2.2 (ILLEGAL REQUEST only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// `true` if the field is in the CDB, `false` if in the parameter list (C/D bit).
    pub in_cdb: bool,
    /// Byte offset of the field.
    pub byte: u16,
    /// Leftmost bit (7..=0) of the field, when it is narrower than a byte.
    pub bit: Option<u8>,
}

/// One sense condition: key, additional sense code and qualifier, and the optional
/// sense-key-specific field pointer and INFORMATION field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    /// The sense key.
    pub key: SenseKey,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// Field pointer for ILLEGAL REQUEST.
    pub field: Option<FieldPointer>,
    /// The INFORMATION field (for example the failing LBA), with the VALID bit set when present.
    pub information: Option<u32>,
}

/// Length of fixed-format sense data without additional bytes.
pub const FIXED_SENSE_LEN: usize = 18;

/// Response code of fixed-format sense data for the current command.
pub const RESPONSE_CODE_FIXED_CURRENT: u8 = 0x70;
/// Response code of fixed-format sense data for a deferred error.
pub const RESPONSE_CODE_FIXED_DEFERRED: u8 = 0x71;

mod field {
    use core::ops::Range;
    pub const RESPONSE_CODE: usize = 0;
    pub const SENSE_KEY: usize = 2;
    pub const INFORMATION: Range<usize> = 3..7;
    pub const ADDITIONAL_LEN: usize = 7;
    pub const ASC: usize = 12;
    pub const ASCQ: usize = 13;
    pub const SKS: Range<usize> = 15..18;
}

const VALID: u8 = 0x80;
const SKSV: u8 = 0x80;
const SKS_C_D: u8 = 0x40;
const SKS_BPV: u8 = 0x08;

impl Sense {
    /// A sense condition without field pointer or INFORMATION.
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            field: None,
            information: None,
        }
    }

    /// NO SENSE, no additional sense information (what REQUEST SENSE reports when all is well).
    pub const NO_SENSE: Sense = Sense::new(SenseKey::NoSense, 0x00, 0x00);
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (05/20/00).
    pub const INVALID_COMMAND_OPERATION_CODE: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x20, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (05/21/00).
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(SenseKey::IllegalRequest, 0x21, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (05/24/00) without field pointer.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(SenseKey::IllegalRequest, 0x24, 0x00);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (05/25/00).
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Sense = Sense::new(SenseKey::IllegalRequest, 0x25, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (05/26/00) without field pointer.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x26, 0x00);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (05/1A/00).
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (05/39/00).
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense =
        Sense::new(SenseKey::IllegalRequest, 0x39, 0x00);
    /// DATA PROTECT, WRITE PROTECTED (07/27/00).
    pub const WRITE_PROTECTED: Sense = Sense::new(SenseKey::DataProtect, 0x27, 0x00);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR (03/11/00).
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x11, 0x00);
    /// MEDIUM ERROR, WRITE ERROR (03/0C/00).
    pub const WRITE_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x0c, 0x00);
    /// NOT READY, LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE (02/04/00).
    pub const NOT_READY_CAUSE_NOT_REPORTABLE: Sense = Sense::new(SenseKey::NotReady, 0x04, 0x00);
    /// NOT READY, LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED (02/04/02): the unit was
    /// stopped by START STOP UNIT.
    pub const NOT_READY_INITIALIZING_COMMAND_REQUIRED: Sense =
        Sense::new(SenseKey::NotReady, 0x04, 0x02);
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (06/29/00).
    pub const POWER_ON_RESET: Sense = Sense::new(SenseKey::UnitAttention, 0x29, 0x00);
    /// UNIT ATTENTION, MODE PARAMETERS CHANGED (06/2A/01).
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x01);
    /// UNIT ATTENTION, CAPACITY DATA HAS CHANGED (06/2A/09).
    pub const CAPACITY_DATA_CHANGED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x09);
    /// UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED (06/3F/0E).
    pub const REPORTED_LUNS_DATA_CHANGED: Sense = Sense::new(SenseKey::UnitAttention, 0x3f, 0x0e);

    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`, the field's leftmost bit).
    pub const fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            ..Sense::INVALID_FIELD_IN_CDB
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` (and `bit`) of the parameter list.
    pub const fn invalid_field_in_parameter_list(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
            ..Sense::INVALID_FIELD_IN_PARAMETER_LIST
        }
    }

    /// Writes this sense as fixed-format sense data (response code 0x70) into `buf`, truncated to
    /// `buf.len()` if shorter than [`FIXED_SENSE_LEN`] (the initiator's sense buffer may be
    /// small). Returns the number of bytes written.
    pub fn emit_fixed(&self, buf: &mut [u8]) -> usize {
        let mut full = [0u8; FIXED_SENSE_LEN];
        let mut response_code = RESPONSE_CODE_FIXED_CURRENT;
        if let Some(info) = self.information {
            response_code |= VALID;
            full[field::INFORMATION].copy_from_slice(&info.to_be_bytes());
        }
        full[field::RESPONSE_CODE] = response_code;
        full[field::SENSE_KEY] = self.key.code();
        // Additional sense length counts the bytes after byte 7.
        full[field::ADDITIONAL_LEN] = (FIXED_SENSE_LEN - 8) as u8;
        full[field::ASC] = self.asc;
        full[field::ASCQ] = self.ascq;
        if let Some(ptr) = self.field {
            let mut b = SKSV;
            if ptr.in_cdb {
                b |= SKS_C_D;
            }
            if let Some(bit) = ptr.bit {
                b |= SKS_BPV | (bit & 0x07);
            }
            let [hi, lo] = ptr.byte.to_be_bytes();
            full[field::SKS].copy_from_slice(&[b, hi, lo]);
        }
        crate::wire::copy_prefix(buf, &full)
    }

    /// Parses fixed-format sense data (response code 0x70 or 0x71).
    pub fn parse_fixed(buf: &[u8]) -> Result<Sense, SenseParseError> {
        let fixed: &[u8; FIXED_SENSE_LEN] = buf
            .get(..FIXED_SENSE_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(SenseParseError::Truncated { len: buf.len() })?;
        let code = fixed[field::RESPONSE_CODE] & 0x7f;
        if code != RESPONSE_CODE_FIXED_CURRENT && code != RESPONSE_CODE_FIXED_DEFERRED {
            return Err(SenseParseError::NotFixedFormat {
                response_code: code,
            });
        }
        if usize::from(fixed[field::ADDITIONAL_LEN]) < FIXED_SENSE_LEN - 8 {
            return Err(SenseParseError::Truncated {
                len: usize::from(fixed[field::ADDITIONAL_LEN]) + 8,
            });
        }
        let raw_key = fixed[field::SENSE_KEY] & 0x0f;
        let key = SenseKey::from_code(raw_key).ok_or(SenseParseError::ReservedKey(raw_key))?;
        let information = if fixed[field::RESPONSE_CODE] & VALID != 0 {
            let [a, b, c, d] = [fixed[3], fixed[4], fixed[5], fixed[6]];
            Some(u32::from_be_bytes([a, b, c, d]))
        } else {
            None
        };
        let sks = [fixed[15], fixed[16], fixed[17]];
        let field = if sks[0] & SKSV != 0 && key == SenseKey::IllegalRequest {
            Some(FieldPointer {
                in_cdb: sks[0] & SKS_C_D != 0,
                byte: u16::from_be_bytes([sks[1], sks[2]]),
                bit: (sks[0] & SKS_BPV != 0).then_some(sks[0] & 0x07),
            })
        } else {
            None
        };
        Ok(Sense {
            key,
            asc: fixed[field::ASC],
            ascq: fixed[field::ASCQ],
            field,
            information,
        })
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sense {:x}/{:02x}/{:02x}",
            self.key.code(),
            self.asc,
            self.ascq
        )
    }
}

/// Why bytes are not fixed-format sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseParseError {
    /// Fewer than 18 bytes (or an additional sense length below 10).
    Truncated {
        /// The length found.
        len: usize,
    },
    /// The response code is not 0x70/0x71 (descriptor format or garbage).
    NotFixedFormat {
        /// The response code found.
        response_code: u8,
    },
    /// The sense key is the reserved code 0xC.
    ReservedKey(u8),
}

impl fmt::Display for SenseParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SenseParseError::Truncated { len } => write!(f, "sense data truncated to {len} bytes"),
            SenseParseError::NotFixedFormat { response_code } => {
                write!(
                    f,
                    "response code {response_code:#04x} is not fixed-format sense"
                )
            }
            SenseParseError::ReservedKey(k) => write!(f, "reserved sense key {k:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_field_in_cdb_with_bit_pointer_matches_spc5_layout() {
        let mut buf = [0u8; 32];
        let n = Sense::invalid_field_in_cdb(1, Some(4)).emit_fixed(&mut buf);
        assert_eq!(n, 18);
        assert_eq!(
            &buf[..18],
            &[0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0xcc, 0x00, 0x01]
        );
        assert_eq!(
            Sense::parse_fixed(&buf),
            Ok(Sense::invalid_field_in_cdb(1, Some(4)))
        );
    }

    #[test]
    fn short_sense_buffer_is_truncated_not_overrun() {
        let mut buf = [0u8; 8];
        assert_eq!(Sense::LBA_OUT_OF_RANGE.emit_fixed(&mut buf), 8);
        assert_eq!(buf, [0x70, 0, 0x05, 0, 0, 0, 0, 10]);
    }
}
