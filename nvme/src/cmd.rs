//! Submission and completion queue entries (NVMe base spec 2.0, §4.2 and §4.6) and the admin and
//! NVM command set commands this driver issues.
//!
//! Both entries are `#[repr(C)]` so that one can be written to (or read from) DMA memory with a
//! single volatile access; [`SubmissionEntry::to_bytes`] and [`CompletionEntry::from_bytes`] give
//! the explicit little-endian wire form that the tests compare against the spec's layouts.

use core::mem::{offset_of, size_of};

/// Admin command set opcodes (§5, figure 28).
pub mod admin_opcode {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
}

/// NVM command set I/O opcodes (NVM command set spec 1.0, figure 18).
pub mod nvm_opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values (figure 273).
pub mod cns {
    /// Identify Namespace data structure for the given NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list (NSIDs greater than the given one).
    pub const ACTIVE_NAMESPACE_LIST: u8 = 0x02;
}

/// Feature identifiers (figure 317).
pub mod feature {
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// The NSID that addresses every namespace (Flush to all namespaces, when the controller allows it).
pub const NSID_ALL: u32 = 0xFFFF_FFFF;

/// How DPTR describes the data buffer (CDW0 PSDT, figure 88).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPointer {
    /// No data transfer, or a PRP pair.
    Prp {
        /// PRP entry 1: the first (possibly unaligned) page.
        prp1: u64,
        /// PRP entry 2: the second page or the address of a PRP list.
        prp2: u64,
    },
    /// An SGL descriptor in DPTR (PSDT = 01b: metadata, if any, is one contiguous buffer).
    Sgl(SglDescriptor),
}

/// A 16-byte SGL descriptor (§4.3.2, figure 90).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct SglDescriptor {
    /// Address of the data block or of the next segment.
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Reserved bytes 12..15.
    pub reserved: [u8; 3],
    /// Descriptor type (bits 7:4) and sub type (bits 3:0).
    pub identifier: u8,
}

const _: () = assert!(size_of::<SglDescriptor>() == 16);
const _: () = assert!(offset_of!(SglDescriptor, length) == 8);
const _: () = assert!(offset_of!(SglDescriptor, identifier) == 15);

/// SGL descriptor type: Data Block.
pub const SGL_TYPE_DATA_BLOCK: u8 = 0x0;
/// SGL descriptor type: Segment (points at a segment that is followed by more).
pub const SGL_TYPE_SEGMENT: u8 = 0x2;
/// SGL descriptor type: Last Segment (points at the final segment).
pub const SGL_TYPE_LAST_SEGMENT: u8 = 0x3;

impl SglDescriptor {
    /// A Data Block descriptor with sub type "address" for `length` bytes at `address`.
    pub const fn data_block(address: u64, length: u32) -> Self {
        SglDescriptor {
            address,
            length,
            reserved: [0; 3],
            identifier: SGL_TYPE_DATA_BLOCK << 4,
        }
    }

    /// A Last Segment descriptor for a list of `count` descriptors at `address`.
    pub const fn last_segment(address: u64, count: u32) -> Self {
        SglDescriptor {
            address,
            length: count.saturating_mul(16),
            reserved: [0; 3],
            identifier: SGL_TYPE_LAST_SEGMENT << 4,
        }
    }

    /// The little-endian wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..8].copy_from_slice(&self.address.to_le_bytes());
        out[8..12].copy_from_slice(&self.length.to_le_bytes());
        out[12..15].copy_from_slice(&self.reserved);
        out[15] = self.identifier;
        out
    }
}

/// A 64-byte submission queue entry in the common command format (§4.2, figure 88).
///
/// Field names follow the spec; CDW10..15 are command specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SubmissionEntry {
    /// Opcode (7:0), fused operation (9:8), PSDT (15:14), command identifier (31:16).
    pub cdw0: u32,
    /// Namespace identifier.
    pub nsid: u32,
    /// Command dword 2 (command specific, usually reserved).
    pub cdw2: u32,
    /// Command dword 3 (command specific, usually reserved).
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: PRP entry 1 or the first half of an SGL descriptor.
    pub dptr1: u64,
    /// Data pointer: PRP entry 2 or the second half of an SGL descriptor.
    pub dptr2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

const _: () = assert!(size_of::<SubmissionEntry>() == 64);
const _: () = assert!(offset_of!(SubmissionEntry, nsid) == 4);
const _: () = assert!(offset_of!(SubmissionEntry, mptr) == 16);
const _: () = assert!(offset_of!(SubmissionEntry, dptr1) == 24);
const _: () = assert!(offset_of!(SubmissionEntry, dptr2) == 32);
const _: () = assert!(offset_of!(SubmissionEntry, cdw10) == 40);
const _: () = assert!(offset_of!(SubmissionEntry, cdw15) == 60);

const PSDT_SHIFT: u32 = 14;
const PSDT_SGL_CONTIGUOUS_MPTR: u32 = 0b01;
const CID_SHIFT: u32 = 16;

impl SubmissionEntry {
    /// A command with `opcode` and everything else zero.
    pub const fn new(opcode: u8) -> Self {
        SubmissionEntry {
            cdw0: opcode as u32,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr1: 0,
            dptr2: 0,
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        (self.cdw0 & 0xFF) as u8
    }

    /// The command identifier.
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> CID_SHIFT) as u16
    }

    /// Sets the command identifier; the queue does this when it assigns a slot.
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0x0000_FFFF) | (u32::from(cid) << CID_SHIFT);
    }

    /// Sets DPTR and the matching PSDT field.
    pub fn set_data_pointer(&mut self, dptr: DataPointer) {
        self.cdw0 &= !(0b11 << PSDT_SHIFT);
        match dptr {
            DataPointer::Prp { prp1, prp2 } => {
                self.dptr1 = prp1;
                self.dptr2 = prp2;
            }
            DataPointer::Sgl(desc) => {
                self.cdw0 |= PSDT_SGL_CONTIGUOUS_MPTR << PSDT_SHIFT;
                self.dptr1 = desc.address;
                let mut high = [0u8; 8];
                high[0..4].copy_from_slice(&desc.length.to_le_bytes());
                high[4..7].copy_from_slice(&desc.reserved);
                high[7] = desc.identifier;
                self.dptr2 = u64::from_le_bytes(high);
            }
        }
    }

    /// The little-endian wire form of this entry.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        let dwords = [self.cdw0, self.nsid, self.cdw2, self.cdw3];
        for (i, dw) in dwords.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&dw.to_le_bytes());
        }
        out[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        out[24..32].copy_from_slice(&self.dptr1.to_le_bytes());
        out[32..40].copy_from_slice(&self.dptr2.to_le_bytes());
        let tail = [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ];
        for (i, dw) in tail.iter().enumerate() {
            out[40 + i * 4..44 + i * 4].copy_from_slice(&dw.to_le_bytes());
        }
        out
    }

    // ---- admin commands ----

    /// IDENTIFY with `cns` for `nsid`; the 4 KiB result lands at `buffer` (one page, PRP1).
    pub fn identify(cns: u8, nsid: u32, buffer: u64) -> Self {
        let mut e = Self::new(admin_opcode::IDENTIFY);
        e.nsid = nsid;
        e.dptr1 = buffer;
        e.cdw10 = u32::from(cns);
        e
    }

    /// CREATE I/O COMPLETION QUEUE: physically contiguous (in IOVA space), interrupts off.
    pub fn create_io_cq(qid: u16, entries: u16, base: u64) -> Self {
        let mut e = Self::new(admin_opcode::CREATE_IO_CQ);
        e.dptr1 = base;
        e.cdw10 = (u32::from(entries.saturating_sub(1)) << 16) | u32::from(qid);
        // PC = 1, IEN = 0: this driver polls.
        e.cdw11 = 1;
        e
    }

    /// CREATE I/O SUBMISSION QUEUE bound to completion queue `cqid`, physically contiguous.
    pub fn create_io_sq(qid: u16, entries: u16, base: u64, cqid: u16) -> Self {
        let mut e = Self::new(admin_opcode::CREATE_IO_SQ);
        e.dptr1 = base;
        e.cdw10 = (u32::from(entries.saturating_sub(1)) << 16) | u32::from(qid);
        e.cdw11 = (u32::from(cqid) << 16) | 1;
        e
    }

    /// DELETE I/O SUBMISSION QUEUE.
    pub fn delete_io_sq(qid: u16) -> Self {
        let mut e = Self::new(admin_opcode::DELETE_IO_SQ);
        e.cdw10 = u32::from(qid);
        e
    }

    /// DELETE I/O COMPLETION QUEUE.
    pub fn delete_io_cq(qid: u16) -> Self {
        let mut e = Self::new(admin_opcode::DELETE_IO_CQ);
        e.cdw10 = u32::from(qid);
        e
    }

    /// SET FEATURES Number of Queues, asking for `sq_count` submission and `cq_count` completion
    /// queues (1-based counts; the command carries them 0-based).
    pub fn set_number_of_queues(sq_count: u16, cq_count: u16) -> Self {
        let mut e = Self::new(admin_opcode::SET_FEATURES);
        e.cdw10 = u32::from(feature::NUMBER_OF_QUEUES);
        e.cdw11 =
            (u32::from(cq_count.saturating_sub(1)) << 16) | u32::from(sq_count.saturating_sub(1));
        e
    }

    /// ABORT the command `cid` on submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Self {
        let mut e = Self::new(admin_opcode::ABORT);
        e.cdw10 = (u32::from(cid) << 16) | u32::from(sqid);
        e
    }

    // ---- NVM I/O commands ----

    /// READ `blocks` (1-based, at most 65536) logical blocks from `slba`; DPTR is set separately.
    pub fn read(nsid: u32, slba: u64, blocks: u32) -> Self {
        Self::rw(nvm_opcode::READ, nsid, slba, blocks)
    }

    /// WRITE `blocks` logical blocks at `slba`; DPTR is set separately.
    pub fn write(nsid: u32, slba: u64, blocks: u32) -> Self {
        Self::rw(nvm_opcode::WRITE, nsid, slba, blocks)
    }

    fn rw(opcode: u8, nsid: u32, slba: u64, blocks: u32) -> Self {
        let mut e = Self::new(opcode);
        e.nsid = nsid;
        e.cdw10 = slba as u32;
        e.cdw11 = (slba >> 32) as u32;
        e.cdw12 = blocks.saturating_sub(1) & 0xFFFF;
        e
    }

    /// FLUSH the volatile write cache of `nsid`.
    pub fn flush(nsid: u32) -> Self {
        let mut e = Self::new(nvm_opcode::FLUSH);
        e.nsid = nsid;
        e
    }

    /// WRITE ZEROES `blocks` logical blocks at `slba`; `deallocate` lets the controller deallocate
    /// them (DEAC) instead of writing zeroes, as long as they read back as zeroes.
    pub fn write_zeroes(nsid: u32, slba: u64, blocks: u32, deallocate: bool) -> Self {
        let mut e = Self::rw(nvm_opcode::WRITE_ZEROES, nsid, slba, blocks);
        if deallocate {
            e.cdw12 |= 1 << 25;
        }
        e
    }

    /// DATASET MANAGEMENT with the Deallocate attribute over `ranges` (1..=256) [`DsmRange`]s at
    /// `list` (one page, PRP1).
    pub fn deallocate(nsid: u32, ranges: u16, list: u64) -> Self {
        let mut e = Self::new(nvm_opcode::DATASET_MANAGEMENT);
        e.nsid = nsid;
        e.dptr1 = list;
        e.cdw10 = u32::from(ranges.saturating_sub(1)) & 0xFF;
        e.cdw11 = 1 << 2;
        e
    }
}

/// One Dataset Management range (NVM command set spec, figure 39).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct DsmRange {
    /// Context attributes (zero: no hints).
    pub attributes: u32,
    /// Length in logical blocks.
    pub blocks: u32,
    /// Starting LBA.
    pub slba: u64,
}

const _: () = assert!(size_of::<DsmRange>() == 16);
const _: () = assert!(offset_of!(DsmRange, blocks) == 4);
const _: () = assert!(offset_of!(DsmRange, slba) == 8);

impl DsmRange {
    /// The little-endian wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.attributes.to_le_bytes());
        out[4..8].copy_from_slice(&self.blocks.to_le_bytes());
        out[8..16].copy_from_slice(&self.slba.to_le_bytes());
        out
    }
}

/// A 16-byte completion queue entry (§4.6, figure 89).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct CompletionEntry {
    /// Command specific dword 0 (e.g. the granted queue counts of Number of Queues).
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// Submission queue head pointer, as the controller has consumed it.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: u16,
}

const _: () = assert!(size_of::<CompletionEntry>() == 16);
const _: () = assert!(offset_of!(CompletionEntry, sq_head) == 8);
const _: () = assert!(offset_of!(CompletionEntry, sq_id) == 10);
const _: () = assert!(offset_of!(CompletionEntry, cid) == 12);
const _: () = assert!(offset_of!(CompletionEntry, status) == 14);

impl CompletionEntry {
    /// Parses the little-endian wire form.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        CompletionEntry {
            dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            dw1: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sq_head: u16::from_le_bytes([b[8], b[9]]),
            sq_id: u16::from_le_bytes([b[10], b[11]]),
            cid: u16::from_le_bytes([b[12], b[13]]),
            status: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The little-endian wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        out[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        out[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        out[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        out[12..14].copy_from_slice(&self.cid.to_le_bytes());
        out[14..16].copy_from_slice(&self.status.to_le_bytes());
        out
    }

    /// The phase tag.
    pub fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// The decoded status field.
    pub fn status(&self) -> Status {
        Status::from_field(self.status >> 1)
    }
}

/// Status code types (figure 94).
pub mod status_type {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
}

/// Generic status codes this driver interprets (figure 95).
pub mod generic_status {
    /// Successful completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid field in command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Commands aborted due to power loss notification.
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    /// Internal error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// Command abort requested.
    pub const ABORTED_BY_REQUEST: u8 = 0x07;
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Namespace not ready.
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
}

/// The 15-bit status field of a completion, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status code type.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Command retry delay index.
    pub crd: u8,
    /// More information in the error log.
    pub more: bool,
    /// Do not retry.
    pub dnr: bool,
}

impl Status {
    /// Decodes the status field without the phase bit (CQE DW3 bits 31:17 shifted down by 17).
    pub fn from_field(field: u16) -> Self {
        Status {
            sc: (field & 0xFF) as u8,
            sct: ((field >> 8) & 0x7) as u8,
            crd: ((field >> 11) & 0x3) as u8,
            more: field & (1 << 13) != 0,
            dnr: field & (1 << 14) != 0,
        }
    }

    /// Whether the command succeeded.
    pub fn is_success(&self) -> bool {
        self.sct == status_type::GENERIC && self.sc == generic_status::SUCCESS
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match (self.sct, self.sc) {
            (status_type::GENERIC, generic_status::SUCCESS) => "success",
            (status_type::GENERIC, generic_status::INVALID_OPCODE) => "invalid opcode",
            (status_type::GENERIC, generic_status::INVALID_FIELD) => "invalid field",
            (status_type::GENERIC, generic_status::DATA_TRANSFER_ERROR) => "data transfer error",
            (status_type::GENERIC, generic_status::INTERNAL_ERROR) => "internal error",
            (status_type::GENERIC, generic_status::ABORTED_BY_REQUEST) => "aborted by request",
            (status_type::GENERIC, generic_status::ABORTED_SQ_DELETION) => "aborted: SQ deleted",
            (status_type::GENERIC, generic_status::LBA_OUT_OF_RANGE) => "LBA out of range",
            (status_type::GENERIC, generic_status::NAMESPACE_NOT_READY) => "namespace not ready",
            (status_type::MEDIA, _) => "media error",
            _ => "error",
        };
        write!(
            f,
            "{name} (sct {:#x}, sc {:#04x}{})",
            self.sct,
            self.sc,
            if self.dnr { ", dnr" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dword(b: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes([b[offset], b[offset + 1], b[offset + 2], b[offset + 3]])
    }

    #[test]
    fn read_command_bytes_match_spec_layout() {
        let mut e = SubmissionEntry::read(1, 0x1_2345_6789, 8);
        e.set_cid(0xBEEF);
        e.set_data_pointer(DataPointer::Prp {
            prp1: 0x1000_0200,
            prp2: 0x2000_0000,
        });
        let b = e.to_bytes();
        #[rustfmt::skip]
        let expected: [u8; 64] = [
            0x02, 0x00, 0xEF, 0xBE, // CDW0: opcode READ, PSDT 00, CID 0xBEEF
            0x01, 0x00, 0x00, 0x00, // NSID 1
            0, 0, 0, 0, 0, 0, 0, 0, // CDW2, CDW3
            0, 0, 0, 0, 0, 0, 0, 0, // MPTR
            0x00, 0x02, 0x00, 0x10, 0, 0, 0, 0, // PRP1
            0x00, 0x00, 0x00, 0x20, 0, 0, 0, 0, // PRP2
            0x89, 0x67, 0x45, 0x23, // CDW10: SLBA low
            0x01, 0x00, 0x00, 0x00, // CDW11: SLBA high
            0x07, 0x00, 0x00, 0x00, // CDW12: NLB 0-based
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // CDW13..15
        ];
        assert_eq!(b, expected);
        assert_eq!(e.opcode(), nvm_opcode::READ);
        assert_eq!(e.cid(), 0xBEEF);
    }

    #[test]
    fn write_command_with_sgl_sets_psdt_and_descriptor() {
        let mut e = SubmissionEntry::write(3, 16, 1);
        e.set_cid(7);
        e.set_data_pointer(DataPointer::Sgl(SglDescriptor::data_block(
            0xAABB_CC00,
            512,
        )));
        let b = e.to_bytes();
        assert_eq!(b[0], 0x01);
        assert_eq!(b[1], 0b0100_0000, "PSDT = 01b in CDW0 bits 15:14");
        assert_eq!(&b[2..4], &[7, 0]);
        assert_eq!(&b[24..32], &0xAABB_CC00u64.to_le_bytes());
        assert_eq!(&b[32..36], &512u32.to_le_bytes());
        assert_eq!(b[39], 0x00, "data block descriptor, address sub type");
        assert_eq!(dword(&b, 40), 16);
        assert_eq!(dword(&b, 48), 0);
        // Switching back to PRP clears PSDT.
        e.set_data_pointer(DataPointer::Prp { prp1: 1, prp2: 0 });
        assert_eq!(e.to_bytes()[1], 0);
    }

    #[test]
    fn sgl_descriptor_bytes() {
        let d = SglDescriptor::last_segment(0x1122_3344_5566_7788, 3);
        assert_eq!(
            d.to_bytes(),
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 48, 0, 0, 0, 0, 0, 0, 0x30]
        );
        let d = SglDescriptor::data_block(0x1000, 4096);
        assert_eq!(
            d.to_bytes(),
            [0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn admin_command_encodings() {
        let b = SubmissionEntry::identify(cns::CONTROLLER, 0, 0xABC000).to_bytes();
        assert_eq!(b[0], 0x06);
        assert_eq!(dword(&b, 4), 0);
        assert_eq!(&b[24..32], &0xABC000u64.to_le_bytes());
        assert_eq!(dword(&b, 40), 1);

        let b = SubmissionEntry::identify(cns::NAMESPACE, 5, 0x1000).to_bytes();
        assert_eq!(dword(&b, 4), 5);
        assert_eq!(dword(&b, 40), 0);

        let b = SubmissionEntry::create_io_cq(3, 256, 0x40_0000).to_bytes();
        assert_eq!(b[0], 0x05);
        assert_eq!(dword(&b, 40), (255 << 16) | 3);
        assert_eq!(dword(&b, 44), 1, "PC set, interrupts disabled");

        let b = SubmissionEntry::create_io_sq(3, 256, 0x50_0000, 3).to_bytes();
        assert_eq!(b[0], 0x01);
        assert_eq!(dword(&b, 40), (255 << 16) | 3);
        assert_eq!(dword(&b, 44), (3 << 16) | 1);

        let b = SubmissionEntry::delete_io_sq(9).to_bytes();
        assert_eq!((b[0], dword(&b, 40)), (0x00, 9));
        let b = SubmissionEntry::delete_io_cq(9).to_bytes();
        assert_eq!((b[0], dword(&b, 40)), (0x04, 9));

        let b = SubmissionEntry::set_number_of_queues(4, 2).to_bytes();
        assert_eq!(b[0], 0x09);
        assert_eq!(dword(&b, 40), 0x07);
        assert_eq!(
            dword(&b, 44),
            (1 << 16) | 3,
            "NCQR 31:16 and NSQR 15:0, both 0-based"
        );

        let b = SubmissionEntry::abort(2, 0x55).to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(dword(&b, 40), (0x55 << 16) | 2);
    }

    #[test]
    fn nvm_command_encodings() {
        let b = SubmissionEntry::flush(1).to_bytes();
        assert_eq!((b[0], dword(&b, 4)), (0x00, 1));

        let b = SubmissionEntry::write_zeroes(1, 100, 65536, true).to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(dword(&b, 40), 100);
        assert_eq!(dword(&b, 48), (1 << 25) | 0xFFFF);
        let b = SubmissionEntry::write_zeroes(1, 100, 1, false).to_bytes();
        assert_eq!(dword(&b, 48), 0);

        let b = SubmissionEntry::deallocate(1, 3, 0x7000).to_bytes();
        assert_eq!(b[0], 0x09);
        assert_eq!(&b[24..32], &0x7000u64.to_le_bytes());
        assert_eq!(dword(&b, 40), 2, "NR is 0-based");
        assert_eq!(dword(&b, 44), 0b100, "AD attribute");

        let r = DsmRange {
            attributes: 0,
            blocks: 8,
            slba: 0x1_0000_0000,
        };
        assert_eq!(
            r.to_bytes(),
            [0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
        );
    }

    #[test]
    fn completion_entry_decodes_spec_layout() {
        #[rustfmt::skip]
        let raw: [u8; 16] = [
            0x03, 0x00, 0x07, 0x00, // DW0: NSQA 3, NCQA 7
            0, 0, 0, 0,             // DW1
            0x05, 0x00, 0x02, 0x00, // SQHD 5, SQID 2
            0x34, 0x12,             // CID 0x1234
            0x01, 0x00,             // phase 1, success
        ];
        let c = CompletionEntry::from_bytes(&raw);
        assert_eq!(c.dw0, 0x0007_0003);
        assert_eq!((c.sq_head, c.sq_id, c.cid), (5, 2, 0x1234));
        assert!(c.phase());
        assert!(c.status().is_success());
        assert_eq!(c.to_bytes(), raw);

        // DW3 bits: P=0, SC=0x80 (LBA out of range), SCT=0, M=1, DNR=1.
        let status_field: u16 = 0x80 | (1 << 13) | (1 << 14);
        let raw_status = (status_field << 1).to_le_bytes();
        let mut raw2 = raw;
        raw2[14] = raw_status[0];
        raw2[15] = raw_status[1];
        let c = CompletionEntry::from_bytes(&raw2);
        assert!(!c.phase());
        let s = c.status();
        assert_eq!((s.sct, s.sc, s.more, s.dnr), (0, 0x80, true, true));
        assert!(!s.is_success());

        // SCT 2 (media), SC 0x81 (unrecovered read error), CRD 1.
        let s = Status::from_field(0x81 | (2 << 8) | (1 << 11));
        assert_eq!((s.sct, s.sc, s.crd, s.dnr), (2, 0x81, 1, false));
    }
}
