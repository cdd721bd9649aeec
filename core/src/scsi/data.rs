//! Data-in payloads the logical unit builds itself: INQUIRY (standard data and VPD pages), READ
//! CAPACITY, REPORT LUNS and REPORT SUPPORTED OPERATION CODES.

use super::cdb::ReportSupportedOpcodes;
use super::lun::LunConfig;
use super::opcode as op;
use super::sense::Sense;

/// Writes a response into the caller's buffer, silently dropping what lies beyond `limit` (the
/// allocation length, the initiator's buffer and the caller's buffer, whichever is smallest)
/// while counting the full length, as SPC's allocation-length truncation requires.
#[derive(Debug)]
pub(crate) struct DataWriter<'b> {
    buf: &'b mut [u8],
    limit: usize,
    len: usize,
}

impl<'b> DataWriter<'b> {
    pub(crate) fn new(buf: &'b mut [u8], limit: u64) -> DataWriter<'b> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX).min(buf.len());
        DataWriter { buf, limit, len: 0 }
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) {
        let start = self.len;
        self.len = self.len.saturating_add(bytes.len());
        if start < self.limit {
            let n = (self.limit - start).min(bytes.len());
            if let (Some(dst), Some(src)) = (self.buf.get_mut(start..start + n), bytes.get(..n)) {
                dst.copy_from_slice(src);
            }
        }
    }

    pub(crate) fn put_u8(&mut self, v: u8) {
        self.put(&[v]);
    }

    pub(crate) fn put_be16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    pub(crate) fn put_be32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }

    pub(crate) fn put_be64(&mut self, v: u64) {
        self.put(&v.to_be_bytes());
    }

    pub(crate) fn put_zeros(&mut self, n: usize) {
        const ZEROS: [u8; 64] = [0; 64];
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len());
            self.put(ZEROS.get(..k).unwrap_or(&ZEROS));
            left -= k;
        }
    }

    /// Bytes actually written (the data-in transfer length).
    pub(crate) fn written(&self) -> usize {
        self.len.min(self.limit)
    }
}

/// Peripheral qualifier 000b, device type 00h: a direct-access block device is connected.
const PERIPHERAL_DISK: u8 = 0x00;
/// Peripheral qualifier 011b, device type 1Fh: no logical unit at this LUN.
pub(crate) const PERIPHERAL_NO_LUN: u8 = 0x7f;
/// VERSION: the device claims SPC-5.
const VERSION_SPC5: u8 = 0x07;
/// RESPONSE DATA FORMAT 2 (the only one SPC-5 defines).
const RESPONSE_DATA_FORMAT: u8 = 0x02;
/// CMDQUE: tagged command queuing (virtio-scsi carries many commands at once).
const CMDQUE: u8 = 0x02;
/// Standard INQUIRY data length rvhost returns.
pub(crate) const STANDARD_INQUIRY_LEN: usize = 36;

/// VPD page codes.
pub mod vpd {
    /// Supported VPD pages.
    pub const SUPPORTED_PAGES: u8 = 0x00;
    /// Unit serial number.
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    /// Device identification.
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    /// Block limits.
    pub const BLOCK_LIMITS: u8 = 0xb0;
    /// Block device characteristics.
    pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xb1;
    /// Logical block provisioning.
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;
}

const SUPPORTED_VPD_PAGES: [u8; 6] = [
    vpd::SUPPORTED_PAGES,
    vpd::UNIT_SERIAL_NUMBER,
    vpd::DEVICE_IDENTIFICATION,
    vpd::BLOCK_LIMITS,
    vpd::BLOCK_DEVICE_CHARACTERISTICS,
    vpd::LOGICAL_BLOCK_PROVISIONING,
];

pub(crate) fn standard_inquiry(
    w: &mut DataWriter<'_>,
    peripheral: u8,
    vendor: &[u8; 8],
    product: &[u8; 16],
    revision: &[u8; 4],
) {
    w.put_u8(peripheral);
    w.put_u8(0); // RMB = 0: not removable
    w.put_u8(VERSION_SPC5);
    w.put_u8(RESPONSE_DATA_FORMAT);
    w.put_u8((STANDARD_INQUIRY_LEN - 5) as u8);
    w.put_u8(0); // no SCCS/ACC/TPGS/3PC/PROTECT
    w.put_u8(0);
    w.put_u8(CMDQUE);
    w.put(vendor);
    w.put(product);
    w.put(revision);
}

fn vpd_header(w: &mut DataWriter<'_>, page: u8, len: u16) {
    w.put_u8(PERIPHERAL_DISK);
    w.put_u8(page);
    w.put_be16(len);
}

/// Designator header: code set, association "logical unit", designator type.
fn designator(w: &mut DataWriter<'_>, code_set: u8, designator_type: u8, len: u8) {
    w.put_u8(code_set & 0x0f);
    w.put_u8(designator_type & 0x0f);
    w.put_u8(0);
    w.put_u8(len);
}

const CODE_SET_BINARY: u8 = 1;
const CODE_SET_ASCII: u8 = 2;
const DESIGNATOR_T10_VENDOR_ID: u8 = 1;
const DESIGNATOR_NAA: u8 = 3;

/// The 16-byte NAA IEEE Registered Extended (NAA 6) identifier of a logical unit: NAA (4 bits),
/// IEEE company ID (24 bits), then 100 bits taken from the UUID (its first 36 bits as VENDOR
/// SPECIFIC IDENTIFIER, its last 64 as the EXTENSION), so the same UUID always yields the same
/// identifier and distinct random UUIDs distinct identifiers.
pub fn naa_ieee_registered_extended(company_id: u32, uuid: &[u8; 16]) -> [u8; 16] {
    let [u0, u1, u2, u3, u4, u5, u6, u7, e @ ..] = *uuid;
    let hi = u64::from_be_bytes([u0, u1, u2, u3, u4, u5, u6, u7]);
    let vendor_specific = hi >> 28; // 36 bits
    let extension = u64::from_be_bytes(e);
    let top: u64 = (6u64 << 60) | (u64::from(company_id & 0x00ff_ffff) << 36) | vendor_specific;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&top.to_be_bytes());
    out[8..].copy_from_slice(&extension.to_be_bytes());
    out
}

pub(crate) fn vpd_page(w: &mut DataWriter<'_>, cfg: &LunConfig, page: u8) -> Result<(), Sense> {
    match page {
        vpd::SUPPORTED_PAGES => {
            vpd_header(w, page, SUPPORTED_VPD_PAGES.len() as u16);
            w.put(&SUPPORTED_VPD_PAGES);
        }
        vpd::UNIT_SERIAL_NUMBER => {
            let serial = cfg.serial.as_bytes();
            vpd_header(w, page, serial.len() as u16);
            w.put(serial);
        }
        vpd::DEVICE_IDENTIFICATION => {
            let serial = cfg.serial.as_bytes();
            let t10_len = 8 + serial.len();
            let total = 4 + 16 + 4 + t10_len;
            vpd_header(w, page, total as u16);
            designator(w, CODE_SET_BINARY, DESIGNATOR_NAA, 16);
            w.put(&naa_ieee_registered_extended(
                cfg.ieee_company_id,
                &cfg.uuid,
            ));
            designator(w, CODE_SET_ASCII, DESIGNATOR_T10_VENDOR_ID, t10_len as u8);
            w.put(&cfg.vendor);
            w.put(serial);
        }
        vpd::BLOCK_LIMITS => {
            vpd_header(w, page, 0x3c);
            w.put_u8(0x01); // WSNZ: WRITE SAME with 0 blocks is rejected
            w.put_u8(0); // MAXIMUM COMPARE AND WRITE LENGTH: not supported
            w.put_be16(0); // OPTIMAL TRANSFER LENGTH GRANULARITY: not reported
            w.put_be32(cfg.max_transfer_blocks);
            w.put_be32(0); // OPTIMAL TRANSFER LENGTH: not reported
            w.put_be32(0); // MAXIMUM PREFETCH LENGTH
            if cfg.supports_unmap {
                w.put_be32(cfg.max_unmap_blocks);
                w.put_be32(u32::from(cfg.max_unmap_descriptors));
            } else {
                w.put_be32(0);
                w.put_be32(0);
            }
            w.put_be32(0); // OPTIMAL UNMAP GRANULARITY: not reported
            w.put_be32(0); // UGAVALID = 0
            w.put_be64(u64::from(cfg.max_write_same_blocks));
            w.put_zeros(0x40 - 44);
        }
        vpd::BLOCK_DEVICE_CHARACTERISTICS => {
            vpd_header(w, page, 0x3c);
            w.put_be16(0x0001); // MEDIUM ROTATION RATE: non-rotating medium
            w.put_u8(0); // PRODUCT TYPE
            w.put_u8(0); // WABEREQ/WACEREQ/NOMINAL FORM FACTOR
            w.put_zeros(0x40 - 8);
        }
        vpd::LOGICAL_BLOCK_PROVISIONING => {
            vpd_header(w, page, 0x04);
            w.put_u8(0); // THRESHOLD EXPONENT
            let mut flags = 0u8;
            if cfg.supports_unmap {
                flags |= 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
                if cfg.unmap_reads_zeroes {
                    flags |= 0x01 << 2; // LBPRZ = 001b
                }
            }
            w.put_u8(flags);
            // PROVISIONING TYPE: 010b thin provisioned when blocks can be unmapped.
            w.put_u8(if cfg.supports_unmap { 0x02 } else { 0x00 });
            w.put_u8(0);
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, None)),
    }
    Ok(())
}

pub(crate) fn read_capacity_10(w: &mut DataWriter<'_>, cfg: &LunConfig) {
    let last = cfg.num_blocks.saturating_sub(1);
    // SBC-4: 0xFFFFFFFF tells the initiator to use READ CAPACITY(16).
    w.put_be32(u32::try_from(last).unwrap_or(u32::MAX));
    w.put_be32(cfg.block_size);
}

pub(crate) fn read_capacity_16(w: &mut DataWriter<'_>, cfg: &LunConfig) {
    w.put_be64(cfg.num_blocks.saturating_sub(1));
    w.put_be32(cfg.block_size);
    w.put_u8(0); // P_TYPE / PROT_EN
    w.put_u8(0); // P_I_EXPONENT / LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    let mut b14 = 0u8;
    if cfg.supports_unmap {
        b14 |= 0x80; // LBPME
        if cfg.unmap_reads_zeroes {
            b14 |= 0x40; // LBPRZ
        }
    }
    w.put_u8(b14);
    w.put_u8(0);
    w.put_zeros(16);
}

/// REPORT LUNS data: `luns` in SAM-5 single-level format (peripheral addressing below 256, flat
/// space addressing above, as QEMU and Linux's `scsilun_to_int` expect).
pub(crate) fn report_luns(w: &mut DataWriter<'_>, luns: &[u16], select_report: u8) {
    let listed: &[u16] = if select_report == 0x01 { &[] } else { luns };
    let list_len = listed.len().saturating_mul(8);
    w.put_be32(u32::try_from(list_len).unwrap_or(u32::MAX));
    w.put_be32(0);
    for &lun in listed {
        w.put(&sam_lun(lun));
    }
}

/// An 8-byte single-level SAM LUN.
pub fn sam_lun(lun: u16) -> [u8; 8] {
    let mut out = [0u8; 8];
    if lun < 256 {
        out[1] = lun as u8;
    } else {
        let [hi, lo] = (lun & 0x3fff).to_be_bytes();
        out[0] = 0x40 | hi;
        out[1] = lo;
    }
    out
}

/// One row of REPORT SUPPORTED OPERATION CODES: what rvhost implements and which CDB bits it
/// examines (the CDB USAGE DATA bitmap).
struct CommandInfo {
    opcode: u8,
    service_action: Option<u8>,
    usage: &'static [u8],
}

const NACA: u8 = 0x04;

const COMMANDS: &[CommandInfo] = &[
    CommandInfo {
        opcode: op::TEST_UNIT_READY,
        service_action: None,
        usage: &[0x00, 0, 0, 0, 0, NACA],
    },
    CommandInfo {
        opcode: op::REQUEST_SENSE,
        service_action: None,
        usage: &[0x03, 0x01, 0, 0, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::READ_6,
        service_action: None,
        usage: &[0x08, 0x1f, 0xff, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::WRITE_6,
        service_action: None,
        usage: &[0x0a, 0x1f, 0xff, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::INQUIRY,
        service_action: None,
        usage: &[0x12, 0x03, 0xff, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::MODE_SELECT_6,
        service_action: None,
        usage: &[0x15, 0x11, 0, 0, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::MODE_SENSE_6,
        service_action: None,
        usage: &[0x1a, 0x08, 0xff, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::START_STOP_UNIT,
        service_action: None,
        usage: &[0x1b, 0x00, 0, 0x00, 0xf7, NACA],
    },
    CommandInfo {
        opcode: op::READ_CAPACITY_10,
        service_action: None,
        usage: &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, NACA],
    },
    CommandInfo {
        opcode: op::READ_10,
        service_action: None,
        usage: &[0x28, 0xf8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::WRITE_10,
        service_action: None,
        usage: &[0x2a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::VERIFY_10,
        service_action: None,
        usage: &[0x2f, 0xe6, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::SYNCHRONIZE_CACHE_10,
        service_action: None,
        usage: &[0x35, 0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::WRITE_SAME_10,
        service_action: None,
        usage: &[0x41, 0xf8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::UNMAP,
        service_action: None,
        usage: &[0x42, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::MODE_SELECT_10,
        service_action: None,
        usage: &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::MODE_SENSE_10,
        service_action: None,
        usage: &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, NACA],
    },
    CommandInfo {
        opcode: op::READ_16,
        service_action: None,
        usage: &[
            0x88, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            NACA,
        ],
    },
    CommandInfo {
        opcode: op::WRITE_16,
        service_action: None,
        usage: &[
            0x8a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            NACA,
        ],
    },
    CommandInfo {
        opcode: op::VERIFY_16,
        service_action: None,
        usage: &[
            0x8f, 0xe6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            NACA,
        ],
    },
    CommandInfo {
        opcode: op::SYNCHRONIZE_CACHE_16,
        service_action: None,
        usage: &[
            0x91, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            NACA,
        ],
    },
    CommandInfo {
        opcode: op::WRITE_SAME_16,
        service_action: None,
        usage: &[
            0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            NACA,
        ],
    },
    CommandInfo {
        opcode: op::SERVICE_ACTION_IN_16,
        service_action: Some(op::SAI_READ_CAPACITY_16),
        usage: &[
            0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, NACA,
        ],
    },
    CommandInfo {
        opcode: op::REPORT_LUNS,
        service_action: None,
        usage: &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, NACA],
    },
    CommandInfo {
        opcode: op::MAINTENANCE_IN,
        service_action: Some(op::MI_REPORT_SUPPORTED_OPERATION_CODES),
        usage: &[
            0xa3, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, NACA,
        ],
    },
    CommandInfo {
        opcode: op::READ_12,
        service_action: None,
        usage: &[
            0xa8, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, NACA,
        ],
    },
    CommandInfo {
        opcode: op::WRITE_12,
        service_action: None,
        usage: &[
            0xaa, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, NACA,
        ],
    },
];

fn command_enabled(cfg: &LunConfig, info: &CommandInfo) -> bool {
    // UNMAP is only implemented when the bdev can deallocate.
    info.opcode != op::UNMAP || cfg.supports_unmap
}

/// Whether `opcode` is one that takes a service action (so must be asked for with one).
fn has_service_actions(opcode: u8) -> bool {
    matches!(opcode, op::SERVICE_ACTION_IN_16 | op::MAINTENANCE_IN)
}

const SUPPORT_NOT_SUPPORTED: u8 = 0x01;
const SUPPORT_STANDARD: u8 = 0x03;
const CTDP: u8 = 0x80;

fn timeouts_descriptor(w: &mut DataWriter<'_>) {
    w.put_be16(0x000a); // DESCRIPTOR LENGTH
    w.put_u8(0);
    w.put_u8(0); // COMMAND SPECIFIC
    w.put_be32(0); // NOMINAL COMMAND PROCESSING TIMEOUT: not specified
    w.put_be32(0); // RECOMMENDED COMMAND TIMEOUT: not specified
}

pub(crate) fn report_supported_opcodes(
    w: &mut DataWriter<'_>,
    cfg: &LunConfig,
    req: &ReportSupportedOpcodes,
) -> Result<(), Sense> {
    let options_field = Sense::invalid_field_in_cdb(2, Some(2));
    match req.options {
        0 => {
            let descriptor_len: usize = if req.rctd { 20 } else { 8 };
            let count = COMMANDS.iter().filter(|c| command_enabled(cfg, c)).count();
            w.put_be32((count * descriptor_len) as u32);
            for c in COMMANDS.iter().filter(|c| command_enabled(cfg, c)) {
                w.put_u8(c.opcode);
                w.put_u8(0);
                w.put_be16(u16::from(c.service_action.unwrap_or(0)));
                w.put_u8(0);
                w.put_u8((u8::from(req.rctd) << 1) | u8::from(c.service_action.is_some()));
                w.put_be16(c.usage.len() as u16);
                if req.rctd {
                    timeouts_descriptor(w);
                }
            }
            Ok(())
        }
        1..=3 => {
            let sa_based = has_service_actions(req.opcode);
            let wanted_sa = match req.options {
                1 if sa_based => return Err(options_field),
                1 => None,
                2 if !sa_based => return Err(options_field),
                _ if sa_based => Some(req.service_action),
                _ => None,
            };
            let found = COMMANDS.iter().find(|c| {
                c.opcode == req.opcode
                    && command_enabled(cfg, c)
                    && wanted_sa.is_none_or(|sa| c.service_action.map(u16::from) == Some(sa))
            });
            w.put_u8(0);
            match found {
                Some(c) => {
                    w.put_u8(if req.rctd { CTDP } else { 0 } | SUPPORT_STANDARD);
                    w.put_be16(c.usage.len() as u16);
                    w.put(c.usage);
                    if req.rctd {
                        timeouts_descriptor(w);
                    }
                }
                None => {
                    w.put_u8(SUPPORT_NOT_SUPPORTED);
                    w.put_be16(0);
                }
            }
            Ok(())
        }
        _ => Err(options_field),
    }
}
