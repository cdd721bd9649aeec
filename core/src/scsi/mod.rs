//! The SCSI layer: CDB parsing (SBC-4, SPC-5), sense data and the logical-unit model.
//!
//! Layering follows SPDK's: a [`lun::ScsiLun`] knows the properties of the block device behind it
//! but nothing of virtio, and nothing of how block I/O is carried out. Given a CDB it either answers
//! at once (INQUIRY, MODE SENSE, errors, ...) or hands back an [`lun::IoPlan`] for the caller to run
//! on its block device and then complete through the model.

pub mod cdb;
pub mod lun;
pub mod sense;

mod data;
mod mode;

pub use cdb::{Cdb, CdbError, Command};
pub use lun::{Completion, IoOp, IoPlan, LunConfig, Outcome, Request, ScsiLun};
pub use sense::{Sense, SenseKey};

/// SCSI status codes (SAM-5 §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ScsiStatus {
    /// The command completed.
    Good = 0x00,
    /// Sense data describes why the command failed.
    CheckCondition = 0x02,
    /// The requested condition was met (PRE-FETCH).
    ConditionMet = 0x04,
    /// The logical unit is busy.
    Busy = 0x08,
    /// A reservation conflicts with the command.
    ReservationConflict = 0x18,
    /// The task set is full.
    TaskSetFull = 0x28,
    /// An ACA condition exists.
    AcaActive = 0x30,
    /// The command was aborted.
    TaskAborted = 0x40,
}

impl ScsiStatus {
    /// The status byte as it goes on the wire.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

/// Operation codes of every command rvhost implements (SPC-5 / SBC-4 tables "commands for
/// direct access block devices").
pub mod opcode {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// READ(6).
    pub const READ_6: u8 = 0x08;
    /// WRITE(6).
    pub const WRITE_6: u8 = 0x0a;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SELECT(6).
    pub const MODE_SELECT_6: u8 = 0x15;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1a;
    /// START STOP UNIT.
    pub const START_STOP_UNIT: u8 = 0x1b;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2a;
    /// VERIFY(10).
    pub const VERIFY_10: u8 = 0x2f;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// WRITE SAME(10).
    pub const WRITE_SAME_10: u8 = 0x41;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// MODE SELECT(10).
    pub const MODE_SELECT_10: u8 = 0x55;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8a;
    /// VERIFY(16).
    pub const VERIFY_16: u8 = 0x8f;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); READ CAPACITY(16) is its service action 0x10.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xa0;
    /// MAINTENANCE IN; REPORT SUPPORTED OPERATION CODES is its service action 0x0c.
    pub const MAINTENANCE_IN: u8 = 0xa3;
    /// READ(12).
    pub const READ_12: u8 = 0xa8;
    /// WRITE(12).
    pub const WRITE_12: u8 = 0xaa;

    /// SERVICE ACTION IN(16) service action: READ CAPACITY(16).
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    /// MAINTENANCE IN service action: REPORT SUPPORTED OPERATION CODES.
    pub const MI_REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0c;
}
