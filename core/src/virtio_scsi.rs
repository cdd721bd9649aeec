//! virtio-scsi wire formats (virtio 1.2 §5.6): request and response headers of the request
//! queues, control-queue task management and asynchronous notification, events, the LUN
//! addressing format and the configuration space.
//!
//! Each structure has a zero-copy view (`Foo<T: AsRef<[u8]>>`, accessors over field ranges) and a
//! plain `FooRepr` with `parse`/`emit`. All integers are little-endian (a VERSION_1 device).
//! Accessors never panic: a view is only built by `new_checked`, which checks the length.

use core::fmt;

pub use crate::wire::Truncated;
use crate::wire::{byte, check_len, copy_prefix, field, le_u16, le_u32, le_u64, set, set_byte};

/// Feature bits (bit numbers) of virtio-scsi (§5.6.3).
pub mod feature {
    /// A single request may carry both data-out and data-in buffers.
    pub const VIRTIO_SCSI_F_INOUT: u32 = 0;
    /// The device reports hot-plug and hot-unplug of LUNs on the event queue.
    pub const VIRTIO_SCSI_F_HOTPLUG: u32 = 1;
    /// The device reports LUN parameter changes on the event queue.
    pub const VIRTIO_SCSI_F_CHANGE: u32 = 2;
    /// Requests carry T10 protection-information byte counts.
    pub const VIRTIO_SCSI_F_T10_PI: u32 = 3;
}

/// Default and device-reported CDB size.
pub const VIRTIO_SCSI_CDB_DEFAULT_SIZE: u32 = 32;
/// Default and device-reported sense buffer size.
pub const VIRTIO_SCSI_SENSE_DEFAULT_SIZE: u32 = 96;
/// Largest CDB a [`CmdReqRepr`] keeps; the bytes beyond are never looked at (SCSI CDBs rvhost
/// implements are at most 16 bytes).
pub const MAX_CDB_SIZE: usize = 32;

/// Why a request or its fields are invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioScsiError {
    /// The buffer is too short.
    Truncated(Truncated),
    /// The LUN field is not the single-level format virtio-scsi uses.
    BadLun([u8; 8]),
    /// A control request has an unknown `type`.
    UnknownControlType(u32),
    /// A task management request has an unknown `subtype`.
    UnknownTmfSubtype(u32),
    /// The task attribute is not SIMPLE/ORDERED/HEAD/ACA.
    UnknownTaskAttribute(u8),
}

impl fmt::Display for VirtioScsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtioScsiError::Truncated(t) => t.fmt(f),
            VirtioScsiError::BadLun(l) => write!(f, "invalid virtio-scsi LUN {l:02x?}"),
            VirtioScsiError::UnknownControlType(t) => write!(f, "unknown control request type {t}"),
            VirtioScsiError::UnknownTmfSubtype(t) => write!(f, "unknown TMF subtype {t}"),
            VirtioScsiError::UnknownTaskAttribute(a) => write!(f, "unknown task attribute {a}"),
        }
    }
}

impl core::error::Error for VirtioScsiError {}

impl From<Truncated> for VirtioScsiError {
    fn from(t: Truncated) -> Self {
        VirtioScsiError::Truncated(t)
    }
}

// ---------------------------------------------------------------------------------------------
// LUN addressing

/// A virtio-scsi LUN address: `lun[0] = 1`, `lun[1]` = target, `lun[2..4]` = the LUN in SAM
/// flat-space (`0x40 | lun >> 8, lun & 0xff`) or peripheral (`0x00, lun`, LUN < 256) format,
/// `lun[4..8] = 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LunAddress {
    /// Target id.
    pub target: u8,
    /// LUN, 0..=16383.
    pub lun: u16,
}

impl LunAddress {
    /// Largest LUN expressible in the flat format.
    pub const MAX_LUN: u16 = 0x3fff;

    /// Parses the 8-byte LUN field; anything but the format above is [`VirtioScsiError::BadLun`]
    /// (a device answers it with `VIRTIO_SCSI_S_BAD_TARGET`).
    // Inline: out of line it costs a command ~30 instructions (device_poll bench).
    #[inline]
    pub fn parse(raw: &[u8; 8]) -> Result<LunAddress, VirtioScsiError> {
        let bad = VirtioScsiError::BadLun(*raw);
        if raw[0] != 1 || raw[4..] != [0, 0, 0, 0] {
            return Err(bad);
        }
        let lun = match raw[2] >> 6 {
            // Peripheral device addressing: bus identifier (low 6 bits) must be 0.
            0b00 if raw[2] == 0 => u16::from(raw[3]),
            // Flat space addressing.
            0b01 => u16::from_be_bytes([raw[2] & 0x3f, raw[3]]),
            _ => return Err(bad),
        };
        Ok(LunAddress {
            target: raw[1],
            lun,
        })
    }

    /// The 8-byte field in flat-space format, as Linux's virtio_scsi driver writes it.
    pub fn emit(&self) -> [u8; 8] {
        let [hi, lo] = (self.lun & Self::MAX_LUN).to_be_bytes();
        [1, self.target, 0x40 | hi, lo, 0, 0, 0, 0]
    }
}

// ---------------------------------------------------------------------------------------------
// Request queue: command request

/// Task attributes (`task_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TaskAttr {
    /// SIMPLE.
    Simple = 0,
    /// ORDERED.
    Ordered = 1,
    /// HEAD OF QUEUE.
    Head = 2,
    /// ACA.
    Aca = 3,
}

impl TryFrom<u8> for TaskAttr {
    type Error = VirtioScsiError;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Ok(match v {
            0 => TaskAttr::Simple,
            1 => TaskAttr::Ordered,
            2 => TaskAttr::Head,
            3 => TaskAttr::Aca,
            _ => return Err(VirtioScsiError::UnknownTaskAttribute(v)),
        })
    }
}

/// Task attribute values (bindings-style names).
pub const VIRTIO_SCSI_S_SIMPLE: u8 = 0;
/// ORDERED task attribute.
pub const VIRTIO_SCSI_S_ORDERED: u8 = 1;
/// HEAD OF QUEUE task attribute.
pub const VIRTIO_SCSI_S_HEAD: u8 = 2;
/// ACA task attribute.
pub const VIRTIO_SCSI_S_ACA: u8 = 3;

mod cmd_req {
    use core::ops::Range;
    pub const LUN: Range<usize> = 0..8;
    pub const TAG: Range<usize> = 8..16;
    pub const TASK_ATTR: usize = 16;
    pub const PRIO: usize = 17;
    pub const CRN: usize = 18;
    pub const CDB: usize = 19;
    pub const PI_BYTESOUT: Range<usize> = 19..23;
    pub const PI_BYTESIN: Range<usize> = 23..27;
    pub const CDB_PI: usize = 27;
}

/// Length of a command request header without T10_PI for a negotiated `cdb_size` (the driver
/// may write any `cdb_size` into the configuration space; this saturates instead of wrapping).
pub const fn cmd_req_len(cdb_size: u32) -> usize {
    cmd_req::CDB.saturating_add(cdb_size as usize)
}

/// Length of a command request header with T10_PI for a negotiated `cdb_size`.
pub const fn cmd_req_pi_len(cdb_size: u32) -> usize {
    cmd_req::CDB_PI.saturating_add(cdb_size as usize)
}

/// View of `struct virtio_scsi_req_cmd` (or, with `pi`, `virtio_scsi_req_cmd_pi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdReq<T: AsRef<[u8]>> {
    buffer: T,
    pi: bool,
}

impl<T: AsRef<[u8]>> CmdReq<T> {
    /// Wraps a header without protection information; checks that `cdb_size` bytes of CDB follow.
    pub fn new_checked(buffer: T, cdb_size: u32) -> Result<CmdReq<T>, Truncated> {
        check_len(buffer.as_ref(), cmd_req_len(cdb_size))?;
        Ok(CmdReq { buffer, pi: false })
    }

    /// Wraps a header with `pi_bytesout`/`pi_bytesin` (VIRTIO_SCSI_F_T10_PI negotiated).
    pub fn new_checked_pi(buffer: T, cdb_size: u32) -> Result<CmdReq<T>, Truncated> {
        check_len(buffer.as_ref(), cmd_req_pi_len(cdb_size))?;
        Ok(CmdReq { buffer, pi: true })
    }

    /// The raw LUN field.
    pub fn lun(&self) -> [u8; 8] {
        field(self.buffer.as_ref(), cmd_req::LUN)
    }
    /// The command identifier (`id`, Linux's `tag`).
    pub fn tag(&self) -> u64 {
        le_u64(self.buffer.as_ref(), cmd_req::TAG)
    }
    /// Task attribute.
    pub fn task_attr(&self) -> u8 {
        byte(self.buffer.as_ref(), cmd_req::TASK_ATTR)
    }
    /// Priority.
    pub fn prio(&self) -> u8 {
        byte(self.buffer.as_ref(), cmd_req::PRIO)
    }
    /// Command reference number.
    pub fn crn(&self) -> u8 {
        byte(self.buffer.as_ref(), cmd_req::CRN)
    }
    /// Protection-information bytes in data-out (T10_PI layout only, else 0).
    pub fn pi_bytesout(&self) -> u32 {
        if self.pi {
            le_u32(self.buffer.as_ref(), cmd_req::PI_BYTESOUT)
        } else {
            0
        }
    }
    /// Protection-information bytes in data-in (T10_PI layout only, else 0).
    pub fn pi_bytesin(&self) -> u32 {
        if self.pi {
            le_u32(self.buffer.as_ref(), cmd_req::PI_BYTESIN)
        } else {
            0
        }
    }
    /// The CDB field (everything after the fixed header).
    pub fn cdb(&self) -> &[u8] {
        let start = if self.pi {
            cmd_req::CDB_PI
        } else {
            cmd_req::CDB
        };
        self.buffer.as_ref().get(start..).unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> CmdReq<T> {
    /// Sets the LUN field.
    pub fn set_lun(&mut self, v: [u8; 8]) {
        set(self.buffer.as_mut(), cmd_req::LUN, &v);
    }
    /// Sets the tag.
    pub fn set_tag(&mut self, v: u64) {
        set(self.buffer.as_mut(), cmd_req::TAG, &v.to_le_bytes());
    }
    /// Sets the task attribute.
    pub fn set_task_attr(&mut self, v: u8) {
        set_byte(self.buffer.as_mut(), cmd_req::TASK_ATTR, v);
    }
    /// Sets the priority.
    pub fn set_prio(&mut self, v: u8) {
        set_byte(self.buffer.as_mut(), cmd_req::PRIO, v);
    }
    /// Sets the CRN.
    pub fn set_crn(&mut self, v: u8) {
        set_byte(self.buffer.as_mut(), cmd_req::CRN, v);
    }
    /// Sets the PI byte counts (T10_PI layout only).
    pub fn set_pi_bytes(&mut self, out: u32, inb: u32) {
        if self.pi {
            set(
                self.buffer.as_mut(),
                cmd_req::PI_BYTESOUT,
                &out.to_le_bytes(),
            );
            set(
                self.buffer.as_mut(),
                cmd_req::PI_BYTESIN,
                &inb.to_le_bytes(),
            );
        }
    }
    /// The CDB field, writable.
    pub fn cdb_mut(&mut self) -> &mut [u8] {
        let start = if self.pi {
            cmd_req::CDB_PI
        } else {
            cmd_req::CDB
        };
        self.buffer.as_mut().get_mut(start..).unwrap_or(&mut [])
    }
}

/// A command request, copied out of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdReqRepr {
    /// Raw LUN field (see [`LunAddress::parse`]).
    pub lun: [u8; 8],
    /// Command identifier.
    pub tag: u64,
    /// Task attribute (raw: the device treats every command as SIMPLE).
    pub task_attr: u8,
    /// Priority.
    pub prio: u8,
    /// Command reference number.
    pub crn: u8,
    /// PI byte counts, when the T10_PI layout was used.
    pub pi: Option<(u32, u32)>,
    /// The first `cdb_len` bytes of the CDB field.
    pub cdb: [u8; MAX_CDB_SIZE],
    /// How many bytes of `cdb` are meaningful (`min(cdb_size, 32)`).
    pub cdb_len: u8,
}

impl CmdReqRepr {
    /// Copies the fields out of a checked view.
    pub fn parse<T: AsRef<[u8]>>(req: &CmdReq<T>) -> CmdReqRepr {
        let mut cdb = [0u8; MAX_CDB_SIZE];
        let n = copy_prefix(&mut cdb, req.cdb());
        CmdReqRepr {
            lun: req.lun(),
            tag: req.tag(),
            task_attr: req.task_attr(),
            prio: req.prio(),
            crn: req.crn(),
            pi: req.pi.then(|| (req.pi_bytesout(), req.pi_bytesin())),
            cdb,
            cdb_len: n as u8,
        }
    }

    /// The CDB bytes.
    pub fn cdb(&self) -> &[u8] {
        self.cdb
            .get(..usize::from(self.cdb_len))
            .unwrap_or(&self.cdb)
    }

    /// The parsed LUN address.
    pub fn lun_address(&self) -> Result<LunAddress, VirtioScsiError> {
        LunAddress::parse(&self.lun)
    }

    /// Writes the fields into a view (its CDB field is zero-filled past `cdb_len`).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, req: &mut CmdReq<T>) {
        req.set_lun(self.lun);
        req.set_tag(self.tag);
        req.set_task_attr(self.task_attr);
        req.set_prio(self.prio);
        req.set_crn(self.crn);
        if let Some((o, i)) = self.pi {
            req.set_pi_bytes(o, i);
        }
        let cdb = self.cdb;
        let len = usize::from(self.cdb_len);
        let dst = req.cdb_mut();
        dst.fill(0);
        copy_prefix(dst, cdb.get(..len).unwrap_or(&cdb));
    }
}

// ---------------------------------------------------------------------------------------------
// Request queue: command response

/// `response` codes of command and control responses (§5.6.6.1, §5.6.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Response {
    /// The command completed (the SCSI status tells how); TMF: FUNCTION COMPLETE.
    Ok = 0,
    /// The data-in buffer was too small for the data.
    Overrun = 1,
    /// The command was aborted by a TMF.
    Aborted = 2,
    /// The target in the LUN field does not exist.
    BadTarget = 3,
    /// The command was cancelled by a reset.
    Reset = 4,
    /// The command was not run; the driver may retry.
    Busy = 5,
    /// The transport (e.g. a path) failed.
    TransportFailure = 6,
    /// The target failed; retry elsewhere will not help.
    TargetFailure = 7,
    /// The I_T nexus failed.
    NexusFailure = 8,
    /// Any other failure.
    Failure = 9,
    /// TMF: FUNCTION SUCCEEDED (QUERY TASK found the task).
    FunctionSucceeded = 10,
    /// TMF: FUNCTION REJECTED.
    FunctionRejected = 11,
    /// TMF: INCORRECT LOGICAL UNIT NUMBER.
    IncorrectLun = 12,
}

impl Response {
    /// `VIRTIO_SCSI_S_FUNCTION_COMPLETE` is the same code as `VIRTIO_SCSI_S_OK`.
    pub const FUNCTION_COMPLETE: Response = Response::Ok;

    /// The wire value.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for Response {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            0 => Response::Ok,
            1 => Response::Overrun,
            2 => Response::Aborted,
            3 => Response::BadTarget,
            4 => Response::Reset,
            5 => Response::Busy,
            6 => Response::TransportFailure,
            7 => Response::TargetFailure,
            8 => Response::NexusFailure,
            9 => Response::Failure,
            10 => Response::FunctionSucceeded,
            11 => Response::FunctionRejected,
            12 => Response::IncorrectLun,
            _ => return Err(v),
        })
    }
}

mod cmd_resp {
    use core::ops::Range;
    pub const SENSE_LEN: Range<usize> = 0..4;
    pub const RESIDUAL: Range<usize> = 4..8;
    pub const STATUS_QUALIFIER: Range<usize> = 8..10;
    pub const STATUS: usize = 10;
    pub const RESPONSE: usize = 11;
    pub const SENSE: usize = 12;
}

/// Length of the fixed part of a command response.
pub const CMD_RESP_HEADER_LEN: usize = cmd_resp::SENSE;

/// Length of a command response for a negotiated `sense_size`.
pub const fn cmd_resp_len(sense_size: u32) -> usize {
    cmd_resp::SENSE.saturating_add(sense_size as usize)
}

/// View of `struct virtio_scsi_resp_cmd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdResp<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> CmdResp<T> {
    /// Wraps a response buffer holding at least the fixed header.
    pub fn new_checked(buffer: T) -> Result<CmdResp<T>, Truncated> {
        check_len(buffer.as_ref(), CMD_RESP_HEADER_LEN)?;
        Ok(CmdResp { buffer })
    }
    /// Bytes of sense data written.
    pub fn sense_len(&self) -> u32 {
        le_u32(self.buffer.as_ref(), cmd_resp::SENSE_LEN)
    }
    /// Residual byte count.
    pub fn residual(&self) -> u32 {
        le_u32(self.buffer.as_ref(), cmd_resp::RESIDUAL)
    }
    /// Status qualifier.
    pub fn status_qualifier(&self) -> u16 {
        le_u16(self.buffer.as_ref(), cmd_resp::STATUS_QUALIFIER)
    }
    /// SCSI status.
    pub fn status(&self) -> u8 {
        byte(self.buffer.as_ref(), cmd_resp::STATUS)
    }
    /// virtio-scsi response code.
    pub fn response(&self) -> u8 {
        byte(self.buffer.as_ref(), cmd_resp::RESPONSE)
    }
    /// The sense area (everything after the fixed header).
    pub fn sense(&self) -> &[u8] {
        self.buffer.as_ref().get(cmd_resp::SENSE..).unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> CmdResp<T> {
    /// Sets `sense_len`.
    pub fn set_sense_len(&mut self, v: u32) {
        set(self.buffer.as_mut(), cmd_resp::SENSE_LEN, &v.to_le_bytes());
    }
    /// Sets `residual`.
    pub fn set_residual(&mut self, v: u32) {
        set(self.buffer.as_mut(), cmd_resp::RESIDUAL, &v.to_le_bytes());
    }
    /// Sets `status_qualifier`.
    pub fn set_status_qualifier(&mut self, v: u16) {
        set(
            self.buffer.as_mut(),
            cmd_resp::STATUS_QUALIFIER,
            &v.to_le_bytes(),
        );
    }
    /// Sets the SCSI status.
    pub fn set_status(&mut self, v: u8) {
        set_byte(self.buffer.as_mut(), cmd_resp::STATUS, v);
    }
    /// Sets the response code.
    pub fn set_response(&mut self, v: u8) {
        set_byte(self.buffer.as_mut(), cmd_resp::RESPONSE, v);
    }
    /// The sense area, writable.
    pub fn sense_mut(&mut self) -> &mut [u8] {
        self.buffer
            .as_mut()
            .get_mut(cmd_resp::SENSE..)
            .unwrap_or(&mut [])
    }
}

/// A command response's fixed header. [`CmdRespRepr::emit`] writes the header alone;
/// [`CmdRespRepr::emit_with_sense`] and [`CmdRespRepr::to_response_bytes`] write the whole
/// response, header and sense area, as the driver reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdRespRepr {
    /// Bytes of sense data.
    pub sense_len: u32,
    /// Residual byte count.
    pub residual: u32,
    /// Status qualifier.
    pub status_qualifier: u16,
    /// SCSI status.
    pub status: u8,
    /// Response code.
    pub response: Response,
}

impl CmdRespRepr {
    /// Parses a response header; an unknown response code is returned as `Err(code)`.
    pub fn parse<T: AsRef<[u8]>>(resp: &CmdResp<T>) -> Result<CmdRespRepr, u8> {
        Ok(CmdRespRepr {
            sense_len: resp.sense_len(),
            residual: resp.residual(),
            status_qualifier: resp.status_qualifier(),
            status: resp.status(),
            response: Response::try_from(resp.response())?,
        })
    }

    /// Writes the header into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, resp: &mut CmdResp<T>) {
        resp.set_sense_len(self.sense_len);
        resp.set_residual(self.residual);
        resp.set_status_qualifier(self.status_qualifier);
        resp.set_status(self.status);
        resp.set_response(self.response.code());
    }

    /// The response to a SCSI command that reached a logical unit (`response` OK: the SCSI
    /// status carries the outcome), with `sense_len` clamped to the negotiated `sense_size`.
    pub fn for_completion(c: &crate::scsi::Completion, sense_size: u32) -> CmdRespRepr {
        let sense_len = u32::try_from(c.sense_len)
            .unwrap_or(u32::MAX)
            .min(sense_size);
        CmdRespRepr {
            sense_len,
            residual: c.residual,
            status_qualifier: 0,
            status: c.status.code(),
            response: Response::Ok,
        }
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; CMD_RESP_HEADER_LEN] {
        let mut b = [0u8; CMD_RESP_HEADER_LEN];
        let mut v = CmdResp { buffer: &mut b[..] };
        self.emit(&mut v);
        b
    }

    /// Writes the whole response into a view: the header, then the first `sense_len` bytes of
    /// `sense` into the sense area, then zeros to the end of the area. The sense length written
    /// is what was copied, which is `sense_len` unless `sense` or the view's sense area (the
    /// negotiated `sense_size`) is shorter: a driver never reads sense the device did not write.
    pub fn emit_with_sense<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        sense: &[u8],
        resp: &mut CmdResp<T>,
    ) {
        let copied = self.emit_header_and_sense(sense, resp);
        if let Some(rest) = resp.sense_mut().get_mut(copied..) {
            rest.fill(0);
        }
    }

    /// The header and the sense bytes, without touching the rest of the sense area; returns how
    /// many sense bytes were copied.
    #[inline]
    fn emit_header_and_sense<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        sense: &[u8],
        resp: &mut CmdResp<T>,
    ) -> usize {
        let wanted = usize::try_from(self.sense_len).unwrap_or(usize::MAX);
        let copied = copy_prefix(resp.sense_mut(), sense.get(..wanted).unwrap_or(sense));
        CmdRespRepr {
            // copied <= sense_len, a u32.
            sense_len: u32::try_from(copied).unwrap_or(self.sense_len),
            ..*self
        }
        .emit(resp);
        copied
    }

    /// The whole response as `N` bytes (`N` is the response length for the negotiated
    /// `sense_size`, [`cmd_resp_len`]); see [`CmdRespRepr::emit_with_sense`].
    pub fn to_response_bytes<const N: usize>(&self, sense: &[u8]) -> [u8; N] {
        const {
            assert!(
                N >= CMD_RESP_HEADER_LEN,
                "a response holds at least its header"
            )
        };
        let mut b = [0u8; N];
        // `b` starts zeroed: only the header and the sense bytes need writing.
        self.emit_header_and_sense(sense, &mut CmdResp { buffer: &mut b[..] });
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Control queue

/// Control request types (`type`).
pub mod ctrl_type {
    /// Task management function.
    pub const VIRTIO_SCSI_T_TMF: u32 = 0;
    /// Asynchronous notification query.
    pub const VIRTIO_SCSI_T_AN_QUERY: u32 = 1;
    /// Asynchronous notification subscription.
    pub const VIRTIO_SCSI_T_AN_SUBSCRIBE: u32 = 2;
}

/// Task management functions (`subtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum TmfSubtype {
    /// ABORT TASK.
    AbortTask = 0,
    /// ABORT TASK SET.
    AbortTaskSet = 1,
    /// CLEAR ACA.
    ClearAca = 2,
    /// CLEAR TASK SET.
    ClearTaskSet = 3,
    /// I_T NEXUS RESET.
    ITNexusReset = 4,
    /// LOGICAL UNIT RESET.
    LogicalUnitReset = 5,
    /// QUERY TASK.
    QueryTask = 6,
    /// QUERY TASK SET.
    QueryTaskSet = 7,
}

impl TryFrom<u32> for TmfSubtype {
    type Error = VirtioScsiError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Ok(match v {
            0 => TmfSubtype::AbortTask,
            1 => TmfSubtype::AbortTaskSet,
            2 => TmfSubtype::ClearAca,
            3 => TmfSubtype::ClearTaskSet,
            4 => TmfSubtype::ITNexusReset,
            5 => TmfSubtype::LogicalUnitReset,
            6 => TmfSubtype::QueryTask,
            7 => TmfSubtype::QueryTaskSet,
            _ => return Err(VirtioScsiError::UnknownTmfSubtype(v)),
        })
    }
}

mod tmf_req {
    use core::ops::Range;
    pub const TYPE: Range<usize> = 0..4;
    pub const SUBTYPE: Range<usize> = 4..8;
    pub const LUN: Range<usize> = 8..16;
    pub const TAG: Range<usize> = 16..24;
}

/// Length of `struct virtio_scsi_ctrl_tmf_req`.
pub const TMF_REQ_LEN: usize = 24;
/// Length of `struct virtio_scsi_ctrl_tmf_resp`.
pub const TMF_RESP_LEN: usize = 1;

/// View of `struct virtio_scsi_ctrl_tmf_req`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfReq<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TmfReq<T> {
    /// Wraps a buffer of at least 24 bytes.
    pub fn new_checked(buffer: T) -> Result<TmfReq<T>, Truncated> {
        check_len(buffer.as_ref(), TMF_REQ_LEN)?;
        Ok(TmfReq { buffer })
    }
    /// `type` (0 for TMF).
    pub fn request_type(&self) -> u32 {
        le_u32(self.buffer.as_ref(), tmf_req::TYPE)
    }
    /// `subtype`.
    pub fn subtype(&self) -> u32 {
        le_u32(self.buffer.as_ref(), tmf_req::SUBTYPE)
    }
    /// Raw LUN field.
    pub fn lun(&self) -> [u8; 8] {
        field(self.buffer.as_ref(), tmf_req::LUN)
    }
    /// Tag of the task to abort/query.
    pub fn tag(&self) -> u64 {
        le_u64(self.buffer.as_ref(), tmf_req::TAG)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TmfReq<T> {
    /// Sets `type`.
    pub fn set_request_type(&mut self, v: u32) {
        set(self.buffer.as_mut(), tmf_req::TYPE, &v.to_le_bytes());
    }
    /// Sets `subtype`.
    pub fn set_subtype(&mut self, v: u32) {
        set(self.buffer.as_mut(), tmf_req::SUBTYPE, &v.to_le_bytes());
    }
    /// Sets the LUN field.
    pub fn set_lun(&mut self, v: [u8; 8]) {
        set(self.buffer.as_mut(), tmf_req::LUN, &v);
    }
    /// Sets the tag.
    pub fn set_tag(&mut self, v: u64) {
        set(self.buffer.as_mut(), tmf_req::TAG, &v.to_le_bytes());
    }
}

/// A task management request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfReqRepr {
    /// The function.
    pub subtype: TmfSubtype,
    /// Raw LUN field.
    pub lun: [u8; 8],
    /// Tag of the task to abort/query.
    pub tag: u64,
}

impl TmfReqRepr {
    /// Parses a view whose `type` is `VIRTIO_SCSI_T_TMF`.
    pub fn parse<T: AsRef<[u8]>>(req: &TmfReq<T>) -> Result<TmfReqRepr, VirtioScsiError> {
        let t = req.request_type();
        if t != ctrl_type::VIRTIO_SCSI_T_TMF {
            return Err(VirtioScsiError::UnknownControlType(t));
        }
        Ok(TmfReqRepr {
            subtype: TmfSubtype::try_from(req.subtype())?,
            lun: req.lun(),
            tag: req.tag(),
        })
    }

    /// Writes the request into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, req: &mut TmfReq<T>) {
        req.set_request_type(ctrl_type::VIRTIO_SCSI_T_TMF);
        req.set_subtype(self.subtype as u32);
        req.set_lun(self.lun);
        req.set_tag(self.tag);
    }
}

/// The one-byte TMF response (`struct virtio_scsi_ctrl_tmf_resp`).
pub fn tmf_resp(response: Response) -> [u8; TMF_RESP_LEN] {
    [response.code()]
}

/// Asynchronous notification event classes (`event_requested` / `event_actual` bits).
pub mod an_event {
    /// OPERATIONAL CHANGE.
    pub const OPERATIONAL_CHANGE: u32 = 2;
    /// POWER MANAGEMENT.
    pub const POWER_MGMT: u32 = 4;
    /// EXTERNAL REQUEST.
    pub const EXTERNAL_REQUEST: u32 = 8;
    /// MEDIA.
    pub const MEDIA_CHANGE: u32 = 16;
    /// MULTI-HOST.
    pub const MULTI_HOST: u32 = 32;
    /// DEVICE BUSY.
    pub const DEVICE_BUSY: u32 = 64;
}

mod an_req {
    use core::ops::Range;
    pub const TYPE: Range<usize> = 0..4;
    pub const LUN: Range<usize> = 4..12;
    pub const EVENT_REQUESTED: Range<usize> = 12..16;
}

mod an_resp {
    use core::ops::Range;
    pub const EVENT_ACTUAL: Range<usize> = 0..4;
    pub const RESPONSE: usize = 4;
}

/// Length of `struct virtio_scsi_ctrl_an_req`.
pub const AN_REQ_LEN: usize = 16;
/// Length of `struct virtio_scsi_ctrl_an_resp`.
pub const AN_RESP_LEN: usize = 5;

/// View of `struct virtio_scsi_ctrl_an_req`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnReq<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> AnReq<T> {
    /// Wraps a buffer of at least 16 bytes.
    pub fn new_checked(buffer: T) -> Result<AnReq<T>, Truncated> {
        check_len(buffer.as_ref(), AN_REQ_LEN)?;
        Ok(AnReq { buffer })
    }
    /// `type` (AN_QUERY or AN_SUBSCRIBE).
    pub fn request_type(&self) -> u32 {
        le_u32(self.buffer.as_ref(), an_req::TYPE)
    }
    /// Raw LUN field.
    pub fn lun(&self) -> [u8; 8] {
        field(self.buffer.as_ref(), an_req::LUN)
    }
    /// Requested event classes.
    pub fn event_requested(&self) -> u32 {
        le_u32(self.buffer.as_ref(), an_req::EVENT_REQUESTED)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> AnReq<T> {
    /// Sets `type`.
    pub fn set_request_type(&mut self, v: u32) {
        set(self.buffer.as_mut(), an_req::TYPE, &v.to_le_bytes());
    }
    /// Sets the LUN field.
    pub fn set_lun(&mut self, v: [u8; 8]) {
        set(self.buffer.as_mut(), an_req::LUN, &v);
    }
    /// Sets the requested event classes.
    pub fn set_event_requested(&mut self, v: u32) {
        set(
            self.buffer.as_mut(),
            an_req::EVENT_REQUESTED,
            &v.to_le_bytes(),
        );
    }
}

/// An asynchronous-notification request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnReqRepr {
    /// Subscribe (true) or query (false).
    pub subscribe: bool,
    /// Raw LUN field.
    pub lun: [u8; 8],
    /// Requested event classes.
    pub event_requested: u32,
}

impl AnReqRepr {
    /// Parses a view whose `type` is AN_QUERY or AN_SUBSCRIBE.
    pub fn parse<T: AsRef<[u8]>>(req: &AnReq<T>) -> Result<AnReqRepr, VirtioScsiError> {
        let subscribe = match req.request_type() {
            ctrl_type::VIRTIO_SCSI_T_AN_QUERY => false,
            ctrl_type::VIRTIO_SCSI_T_AN_SUBSCRIBE => true,
            t => return Err(VirtioScsiError::UnknownControlType(t)),
        };
        Ok(AnReqRepr {
            subscribe,
            lun: req.lun(),
            event_requested: req.event_requested(),
        })
    }

    /// Writes the request into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, req: &mut AnReq<T>) {
        req.set_request_type(if self.subscribe {
            ctrl_type::VIRTIO_SCSI_T_AN_SUBSCRIBE
        } else {
            ctrl_type::VIRTIO_SCSI_T_AN_QUERY
        });
        req.set_lun(self.lun);
        req.set_event_requested(self.event_requested);
    }
}

/// An asynchronous-notification response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnRespRepr {
    /// Event classes the device supports/reports.
    pub event_actual: u32,
    /// Response code.
    pub response: Response,
}

impl AnRespRepr {
    /// Parses 5 bytes of `struct virtio_scsi_ctrl_an_resp`.
    pub fn parse(buf: &[u8]) -> Result<AnRespRepr, VirtioScsiError> {
        check_len(buf, AN_RESP_LEN)?;
        let code = byte(buf, an_resp::RESPONSE);
        Ok(AnRespRepr {
            event_actual: le_u32(buf, an_resp::EVENT_ACTUAL),
            response: Response::try_from(code)
                .map_err(|_| VirtioScsiError::UnknownControlType(u32::from(code)))?,
        })
    }

    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; AN_RESP_LEN] {
        let mut b = [0u8; AN_RESP_LEN];
        set(
            &mut b,
            an_resp::EVENT_ACTUAL,
            &self.event_actual.to_le_bytes(),
        );
        set_byte(&mut b, an_resp::RESPONSE, self.response.code());
        b
    }
}

/// A control-queue request, dispatched on its leading `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// Task management.
    Tmf(TmfReqRepr),
    /// Asynchronous notification query or subscription.
    An(AnReqRepr),
}

impl ControlRequest {
    /// Parses the device-readable part of a control request.
    pub fn parse(buf: &[u8]) -> Result<ControlRequest, VirtioScsiError> {
        check_len(buf, 4)?;
        match le_u32(buf, 0..4) {
            ctrl_type::VIRTIO_SCSI_T_TMF => Ok(ControlRequest::Tmf(TmfReqRepr::parse(
                &TmfReq::new_checked(buf)?,
            )?)),
            ctrl_type::VIRTIO_SCSI_T_AN_QUERY | ctrl_type::VIRTIO_SCSI_T_AN_SUBSCRIBE => Ok(
                ControlRequest::An(AnReqRepr::parse(&AnReq::new_checked(buf)?)?),
            ),
            t => Err(VirtioScsiError::UnknownControlType(t)),
        }
    }

    /// Length of the device-writable response this request expects.
    pub fn response_len(&self) -> usize {
        match self {
            ControlRequest::Tmf(_) => TMF_RESP_LEN,
            ControlRequest::An(_) => AN_RESP_LEN,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Event queue

/// Event types (`event`, without the EVENTS_MISSED flag).
pub mod event {
    /// No event.
    pub const VIRTIO_SCSI_T_NO_EVENT: u32 = 0;
    /// A LUN was added, removed or the target needs a rescan.
    pub const VIRTIO_SCSI_T_TRANSPORT_RESET: u32 = 1;
    /// An asynchronous notification.
    pub const VIRTIO_SCSI_T_ASYNC_NOTIFY: u32 = 2;
    /// A LUN parameter changed (reason = ASC | ASCQ << 8).
    pub const VIRTIO_SCSI_T_PARAM_CHANGE: u32 = 3;
    /// Flag: the device dropped events for lack of event buffers.
    pub const VIRTIO_SCSI_T_EVENTS_MISSED: u32 = 0x8000_0000;
    /// Transport reset reason: hard reset.
    pub const VIRTIO_SCSI_EVT_RESET_HARD: u32 = 0;
    /// Transport reset reason: a LUN appeared, rescan.
    pub const VIRTIO_SCSI_EVT_RESET_RESCAN: u32 = 1;
    /// Transport reset reason: a LUN was removed.
    pub const VIRTIO_SCSI_EVT_RESET_REMOVED: u32 = 2;
}

/// Length of `struct virtio_scsi_event`.
pub const EVENT_LEN: usize = 16;

mod ev {
    use core::ops::Range;
    pub const EVENT: Range<usize> = 0..4;
    pub const LUN: Range<usize> = 4..12;
    pub const REASON: Range<usize> = 12..16;
}

/// Why a transport reset event is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// Hard reset of the target.
    Hard,
    /// A LUN was added: rescan.
    Rescan,
    /// A LUN was removed.
    Removed,
}

impl ResetReason {
    /// The wire value.
    pub const fn code(self) -> u32 {
        match self {
            ResetReason::Hard => event::VIRTIO_SCSI_EVT_RESET_HARD,
            ResetReason::Rescan => event::VIRTIO_SCSI_EVT_RESET_RESCAN,
            ResetReason::Removed => event::VIRTIO_SCSI_EVT_RESET_REMOVED,
        }
    }
}

/// View of `struct virtio_scsi_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Event<T> {
    /// Wraps a buffer of at least 16 bytes.
    pub fn new_checked(buffer: T) -> Result<Event<T>, Truncated> {
        check_len(buffer.as_ref(), EVENT_LEN)?;
        Ok(Event { buffer })
    }
    /// `event`, including the EVENTS_MISSED flag.
    pub fn event(&self) -> u32 {
        le_u32(self.buffer.as_ref(), ev::EVENT)
    }
    /// Raw LUN field.
    pub fn lun(&self) -> [u8; 8] {
        field(self.buffer.as_ref(), ev::LUN)
    }
    /// `reason`.
    pub fn reason(&self) -> u32 {
        le_u32(self.buffer.as_ref(), ev::REASON)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Event<T> {
    /// Sets `event`.
    pub fn set_event(&mut self, v: u32) {
        set(self.buffer.as_mut(), ev::EVENT, &v.to_le_bytes());
    }
    /// Sets the LUN field.
    pub fn set_lun(&mut self, v: [u8; 8]) {
        set(self.buffer.as_mut(), ev::LUN, &v);
    }
    /// Sets `reason`.
    pub fn set_reason(&mut self, v: u32) {
        set(self.buffer.as_mut(), ev::REASON, &v.to_le_bytes());
    }
}

/// An event for the event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRepr {
    /// Event type without the flag.
    pub event: u32,
    /// The device dropped events before this one.
    pub events_missed: bool,
    /// Raw LUN field.
    pub lun: [u8; 8],
    /// Reason.
    pub reason: u32,
}

impl EventRepr {
    /// A TRANSPORT_RESET event for `addr`.
    pub fn transport_reset(addr: LunAddress, reason: ResetReason) -> EventRepr {
        EventRepr {
            event: event::VIRTIO_SCSI_T_TRANSPORT_RESET,
            events_missed: false,
            lun: addr.emit(),
            reason: reason.code(),
        }
    }

    /// A PARAM_CHANGE event carrying the unit attention's ASC/ASCQ (e.g. 2Ah/09h capacity data
    /// changed).
    pub fn param_change(addr: LunAddress, asc: u8, ascq: u8) -> EventRepr {
        EventRepr {
            event: event::VIRTIO_SCSI_T_PARAM_CHANGE,
            events_missed: false,
            lun: addr.emit(),
            reason: u32::from(asc) | (u32::from(ascq) << 8),
        }
    }

    /// Parses a view.
    pub fn parse<T: AsRef<[u8]>>(e: &Event<T>) -> EventRepr {
        let raw = e.event();
        EventRepr {
            event: raw & !event::VIRTIO_SCSI_T_EVENTS_MISSED,
            events_missed: raw & event::VIRTIO_SCSI_T_EVENTS_MISSED != 0,
            lun: e.lun(),
            reason: e.reason(),
        }
    }

    /// Writes into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, e: &mut Event<T>) {
        let flag = if self.events_missed {
            event::VIRTIO_SCSI_T_EVENTS_MISSED
        } else {
            0
        };
        e.set_event((self.event & !event::VIRTIO_SCSI_T_EVENTS_MISSED) | flag);
        e.set_lun(self.lun);
        e.set_reason(self.reason);
    }

    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; EVENT_LEN] {
        let mut b = [0u8; EVENT_LEN];
        self.emit(&mut Event { buffer: &mut b[..] });
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration space

/// Length of `struct virtio_scsi_config`.
pub const CONFIG_LEN: usize = 36;

mod cfg {
    use core::ops::Range;
    pub const NUM_QUEUES: Range<usize> = 0..4;
    pub const SEG_MAX: Range<usize> = 4..8;
    pub const MAX_SECTORS: Range<usize> = 8..12;
    pub const CMD_PER_LUN: Range<usize> = 12..16;
    pub const EVENT_INFO_SIZE: Range<usize> = 16..20;
    pub const SENSE_SIZE: Range<usize> = 20..24;
    pub const CDB_SIZE: Range<usize> = 24..28;
    pub const MAX_CHANNEL: Range<usize> = 28..30;
    pub const MAX_TARGET: Range<usize> = 30..32;
    pub const MAX_LUN: Range<usize> = 32..36;
}

/// Offset of `sense_size`, which the driver may write.
pub const CONFIG_SENSE_SIZE_OFFSET: usize = cfg::SENSE_SIZE.start;
/// Offset of `cdb_size`, which the driver may write.
pub const CONFIG_CDB_SIZE_OFFSET: usize = cfg::CDB_SIZE.start;

/// `struct virtio_scsi_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigRepr {
    /// Number of request queues.
    pub num_queues: u32,
    /// Most data segments per command.
    pub seg_max: u32,
    /// Most 512-byte sectors per command.
    pub max_sectors: u32,
    /// Most linked commands per LUN.
    pub cmd_per_lun: u32,
    /// Size of event buffers the driver should provide.
    pub event_info_size: u32,
    /// Sense buffer size in responses.
    pub sense_size: u32,
    /// CDB size in requests.
    pub cdb_size: u32,
    /// Highest channel (0).
    pub max_channel: u16,
    /// Highest target id.
    pub max_target: u16,
    /// Highest LUN.
    pub max_lun: u32,
}

impl ConfigRepr {
    /// Parses 36 bytes of configuration space.
    pub fn parse(buf: &[u8]) -> Result<ConfigRepr, Truncated> {
        check_len(buf, CONFIG_LEN)?;
        Ok(ConfigRepr {
            num_queues: le_u32(buf, cfg::NUM_QUEUES),
            seg_max: le_u32(buf, cfg::SEG_MAX),
            max_sectors: le_u32(buf, cfg::MAX_SECTORS),
            cmd_per_lun: le_u32(buf, cfg::CMD_PER_LUN),
            event_info_size: le_u32(buf, cfg::EVENT_INFO_SIZE),
            sense_size: le_u32(buf, cfg::SENSE_SIZE),
            cdb_size: le_u32(buf, cfg::CDB_SIZE),
            max_channel: le_u16(buf, cfg::MAX_CHANNEL),
            max_target: le_u16(buf, cfg::MAX_TARGET),
            max_lun: le_u32(buf, cfg::MAX_LUN),
        })
    }

    /// Writes the configuration space into `buf` (at least 36 bytes).
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), Truncated> {
        check_len(buf, CONFIG_LEN)?;
        set(buf, cfg::NUM_QUEUES, &self.num_queues.to_le_bytes());
        set(buf, cfg::SEG_MAX, &self.seg_max.to_le_bytes());
        set(buf, cfg::MAX_SECTORS, &self.max_sectors.to_le_bytes());
        set(buf, cfg::CMD_PER_LUN, &self.cmd_per_lun.to_le_bytes());
        set(
            buf,
            cfg::EVENT_INFO_SIZE,
            &self.event_info_size.to_le_bytes(),
        );
        set(buf, cfg::SENSE_SIZE, &self.sense_size.to_le_bytes());
        set(buf, cfg::CDB_SIZE, &self.cdb_size.to_le_bytes());
        set(buf, cfg::MAX_CHANNEL, &self.max_channel.to_le_bytes());
        set(buf, cfg::MAX_TARGET, &self.max_target.to_le_bytes());
        set(buf, cfg::MAX_LUN, &self.max_lun.to_le_bytes());
        Ok(())
    }

    /// The configuration space as bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        // Cannot fail: `b` is exactly CONFIG_LEN long.
        let _ = self.emit(&mut b);
        b
    }

    /// Applies a driver write of `data` at `offset`. Only `sense_size` and `cdb_size` are
    /// writable (§5.6.4); a write touching anything else, or not a whole aligned field, is
    /// rejected and changes nothing.
    pub fn apply_driver_write(
        &mut self,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ConfigWriteError> {
        let value = match <[u8; 4]>::try_from(data) {
            Ok(v) => u32::from_le_bytes(v),
            Err(_) => {
                return Err(ConfigWriteError {
                    offset,
                    len: data.len(),
                })
            }
        };
        match offset {
            CONFIG_SENSE_SIZE_OFFSET => self.sense_size = value,
            CONFIG_CDB_SIZE_OFFSET => self.cdb_size = value,
            _ => {
                return Err(ConfigWriteError {
                    offset,
                    len: data.len(),
                })
            }
        }
        Ok(())
    }
}

/// A driver tried to write a read-only part of the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigWriteError {
    /// Offset written.
    pub offset: usize,
    /// Bytes written.
    pub len: usize,
}

impl fmt::Display for ConfigWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config write of {} bytes at {} is not to sense_size or cdb_size",
            self.len, self.offset
        )
    }
}

impl core::error::Error for ConfigWriteError {}
