//! Identify data structures (NVMe base spec 2.0, figures 275 and 280/NVM command set figure 97):
//! zero-copy views over the 4 KiB buffers the controller fills, and plain summaries of the fields
//! this driver uses.

use core::ops::Range;

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Byte ranges of the Identify Controller data structure.
mod ctrl_field {
    use core::ops::Range;
    pub const VID: Range<usize> = 0..2;
    pub const SSVID: Range<usize> = 2..4;
    pub const SN: Range<usize> = 4..24;
    pub const MN: Range<usize> = 24..64;
    pub const FR: Range<usize> = 64..72;
    pub const MDTS: usize = 77;
    pub const CNTLID: Range<usize> = 78..80;
    pub const VER: Range<usize> = 80..84;
    pub const OACS: Range<usize> = 256..258;
    pub const SQES: usize = 512;
    pub const CQES: usize = 513;
    pub const MAXCMD: Range<usize> = 514..516;
    pub const NN: Range<usize> = 516..520;
    pub const ONCS: Range<usize> = 520..522;
    pub const VWC: usize = 525;
    pub const SGLS: Range<usize> = 536..540;
}

/// Byte ranges of the Identify Namespace data structure (NVM command set).
mod ns_field {
    use core::ops::Range;
    pub const NSZE: Range<usize> = 0..8;
    pub const NCAP: Range<usize> = 8..16;
    pub const NUSE: Range<usize> = 16..24;
    pub const NSFEAT: usize = 24;
    pub const NLBAF: usize = 25;
    pub const FLBAS: usize = 26;
    pub const LBAF: usize = 128;
    pub const LBAF_LEN: usize = 4;
    pub const MAX_LBAF: usize = 64;
}

/// Optional NVM command support (ONCS) bits.
pub mod oncs {
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// An Identify buffer was shorter than 4096 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("identify buffer is {0} bytes, expected {IDENTIFY_LEN}")]
pub struct Truncated(pub usize);

fn le16(b: &[u8], r: Range<usize>) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[r]);
    u16::from_le_bytes(v)
}

fn le32(b: &[u8], r: Range<usize>) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[r]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], r: Range<usize>) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[r]);
    u64::from_le_bytes(v)
}

/// An ASCII field, space padded on the right as the spec requires; non-printable bytes become `?`.
fn ascii(b: &[u8]) -> String {
    let s: String = b
        .iter()
        .map(|&c| {
            if (0x20..0x7F).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    s.trim_end_matches([' ', '?']).trim_end().to_string()
}

/// A read-only view of an Identify Controller data structure.
#[derive(Debug, Clone, Copy)]
pub struct IdentifyController<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> IdentifyController<T> {
    /// Wraps `buffer`, which must hold the whole 4 KiB structure.
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        let len = buffer.as_ref().len();
        if len < IDENTIFY_LEN {
            return Err(Truncated(len));
        }
        Ok(IdentifyController { buffer })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// PCI vendor ID.
    pub fn vid(&self) -> u16 {
        le16(self.b(), ctrl_field::VID)
    }
    /// PCI subsystem vendor ID.
    pub fn ssvid(&self) -> u16 {
        le16(self.b(), ctrl_field::SSVID)
    }
    /// Serial number bytes.
    pub fn serial_number(&self) -> &[u8] {
        &self.b()[ctrl_field::SN]
    }
    /// Model number bytes.
    pub fn model_number(&self) -> &[u8] {
        &self.b()[ctrl_field::MN]
    }
    /// Firmware revision bytes.
    pub fn firmware_revision(&self) -> &[u8] {
        &self.b()[ctrl_field::FR]
    }
    /// Maximum data transfer size as a power of two of the minimum page size; 0 = no limit.
    pub fn mdts(&self) -> u8 {
        self.b()[ctrl_field::MDTS]
    }
    /// Controller ID.
    pub fn cntlid(&self) -> u16 {
        le16(self.b(), ctrl_field::CNTLID)
    }
    /// Version (same layout as the VS register), 0 for pre-1.2 controllers.
    pub fn ver(&self) -> u32 {
        le32(self.b(), ctrl_field::VER)
    }
    /// Optional admin command support.
    pub fn oacs(&self) -> u16 {
        le16(self.b(), ctrl_field::OACS)
    }
    /// Submission queue entry size: required (3:0) and maximum (7:4), as powers of two.
    pub fn sqes(&self) -> u8 {
        self.b()[ctrl_field::SQES]
    }
    /// Completion queue entry size: required (3:0) and maximum (7:4), as powers of two.
    pub fn cqes(&self) -> u8 {
        self.b()[ctrl_field::CQES]
    }
    /// Maximum outstanding commands (0 = not reported).
    pub fn maxcmd(&self) -> u16 {
        le16(self.b(), ctrl_field::MAXCMD)
    }
    /// Number of namespaces (the highest valid NSID).
    pub fn nn(&self) -> u32 {
        le32(self.b(), ctrl_field::NN)
    }
    /// Optional NVM command support.
    pub fn oncs(&self) -> u16 {
        le16(self.b(), ctrl_field::ONCS)
    }
    /// Volatile write cache (bit 0: present).
    pub fn vwc(&self) -> u8 {
        self.b()[ctrl_field::VWC]
    }
    /// SGL support.
    pub fn sgls(&self) -> u32 {
        le32(self.b(), ctrl_field::SGLS)
    }
}

/// The Identify Controller fields this driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// Serial number, trailing spaces removed.
    pub serial: String,
    /// Model number, trailing spaces removed.
    pub model: String,
    /// Firmware revision, trailing spaces removed.
    pub firmware: String,
    /// MDTS (0 = unlimited), in units of the minimum memory page size, as a power of two.
    pub mdts: u8,
    /// Controller ID.
    pub controller_id: u16,
    /// Version reported in Identify (0 before NVMe 1.2).
    pub version: u32,
    /// Required SQ entry size as a power of two.
    pub sq_entry_size_min: u8,
    /// Required CQ entry size as a power of two.
    pub cq_entry_size_min: u8,
    /// Number of namespaces.
    pub namespace_count: u32,
    /// Optional NVM command support.
    pub oncs: u16,
    /// Whether a volatile write cache is present (FLUSH is meaningful).
    pub volatile_write_cache: bool,
    /// Whether the NVM command set accepts SGLs (SGLS bits 1:0 non-zero).
    pub sgl_supported: bool,
    /// Whether SGL data blocks must be dword aligned (SGLS bits 1:0 = 10b).
    pub sgl_dword_aligned: bool,
}

impl ControllerInfo {
    /// Extracts the summary from a view.
    pub fn parse<T: AsRef<[u8]>>(view: &IdentifyController<T>) -> Self {
        let sgl_bits = view.sgls() & 0b11;
        ControllerInfo {
            vendor_id: view.vid(),
            serial: ascii(view.serial_number()),
            model: ascii(view.model_number()),
            firmware: ascii(view.firmware_revision()),
            mdts: view.mdts(),
            controller_id: view.cntlid(),
            version: view.ver(),
            sq_entry_size_min: view.sqes() & 0xF,
            cq_entry_size_min: view.cqes() & 0xF,
            namespace_count: view.nn(),
            oncs: view.oncs(),
            volatile_write_cache: view.vwc() & 1 != 0,
            sgl_supported: sgl_bits == 0b01 || sgl_bits == 0b10,
            sgl_dword_aligned: sgl_bits == 0b10,
        }
    }

    /// Maximum bytes in one transfer, given the minimum page size; `None` means no limit.
    pub fn max_transfer_bytes(&self, min_page_size: u64) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        1u64.checked_shl(u32::from(self.mdts))
            .and_then(|pages| pages.checked_mul(min_page_size))
    }

    /// Whether DATASET MANAGEMENT is supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & oncs::DATASET_MANAGEMENT != 0
    }

    /// Whether WRITE ZEROES is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & oncs::WRITE_ZEROES != 0
    }
}

/// A read-only view of an Identify Namespace data structure (NVM command set).
#[derive(Debug, Clone, Copy)]
pub struct IdentifyNamespace<T: AsRef<[u8]>> {
    buffer: T,
}

/// One LBA format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per LBA.
    pub metadata_size: u16,
    /// LBA data size as a power of two (9 = 512 B).
    pub data_size_shift: u8,
    /// Relative performance (0 best .. 3 degraded).
    pub relative_performance: u8,
}

impl LbaFormat {
    /// Decodes one 4-byte LBA format descriptor.
    pub fn from_dword(dw: u32) -> Self {
        LbaFormat {
            metadata_size: (dw & 0xFFFF) as u16,
            data_size_shift: ((dw >> 16) & 0xFF) as u8,
            relative_performance: ((dw >> 24) & 0b11) as u8,
        }
    }

    /// LBA data size in bytes, if the shift is one a block device can have (512 B .. 2 GiB).
    pub fn block_size(&self) -> Option<u32> {
        if (9..=31).contains(&self.data_size_shift) {
            Some(1u32 << self.data_size_shift)
        } else {
            None
        }
    }
}

impl<T: AsRef<[u8]>> IdentifyNamespace<T> {
    /// Wraps `buffer`, which must hold the whole 4 KiB structure.
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        let len = buffer.as_ref().len();
        if len < IDENTIFY_LEN {
            return Err(Truncated(len));
        }
        Ok(IdentifyNamespace { buffer })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Namespace size in logical blocks.
    pub fn nsze(&self) -> u64 {
        le64(self.b(), ns_field::NSZE)
    }
    /// Namespace capacity in logical blocks.
    pub fn ncap(&self) -> u64 {
        le64(self.b(), ns_field::NCAP)
    }
    /// Namespace utilization in logical blocks.
    pub fn nuse(&self) -> u64 {
        le64(self.b(), ns_field::NUSE)
    }
    /// Namespace features.
    pub fn nsfeat(&self) -> u8 {
        self.b()[ns_field::NSFEAT]
    }
    /// Number of LBA formats, 0-based.
    pub fn nlbaf(&self) -> u8 {
        self.b()[ns_field::NLBAF]
    }
    /// Formatted LBA size.
    pub fn flbas(&self) -> u8 {
        self.b()[ns_field::FLBAS]
    }
    /// The LBA format in use: FLBAS bits 3:0, plus bits 6:5 as the high bits when more than 16
    /// formats exist (NVMe 2.0).
    pub fn current_format_index(&self) -> usize {
        let flbas = self.flbas();
        let low = usize::from(flbas & 0xF);
        if self.nlbaf() >= 16 {
            low | (usize::from((flbas >> 5) & 0b11) << 4)
        } else {
            low
        }
    }
    /// LBA format `index` (0..64).
    pub fn lba_format(&self, index: usize) -> Option<LbaFormat> {
        if index >= ns_field::MAX_LBAF {
            return None;
        }
        let start = ns_field::LBAF + index * ns_field::LBAF_LEN;
        Some(LbaFormat::from_dword(le32(
            self.b(),
            start..start + ns_field::LBAF_LEN,
        )))
    }
}

/// The Identify Namespace fields this driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// Size in logical blocks.
    pub size_blocks: u64,
    /// Capacity in logical blocks.
    pub capacity_blocks: u64,
    /// Blocks in use.
    pub utilization_blocks: u64,
    /// The LBA format in use.
    pub format: LbaFormat,
    /// Index of the LBA format in use.
    pub format_index: usize,
    /// Every LBA format the namespace supports.
    pub formats: Vec<LbaFormat>,
}

/// An Identify Namespace structure that cannot describe a usable namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    /// NSZE is zero: the NSID is inactive.
    #[error("namespace {0} is inactive")]
    Inactive(u32),
    /// FLBAS names a format beyond NLBAF.
    #[error("namespace {nsid}: formatted LBA index {index} beyond the {count} formats")]
    FormatIndex {
        /// Namespace ID.
        nsid: u32,
        /// The index FLBAS names.
        index: usize,
        /// Number of formats (NLBAF + 1).
        count: usize,
    },
    /// The LBA data size is not 512 B .. 2 GiB.
    #[error("namespace {nsid}: unsupported LBA data size 2^{shift}")]
    BlockSize {
        /// Namespace ID.
        nsid: u32,
        /// LBADS.
        shift: u8,
    },
    /// The namespace uses interleaved or separate metadata, which this driver does not transfer.
    #[error("namespace {nsid}: {bytes} metadata bytes per block are not supported")]
    Metadata {
        /// Namespace ID.
        nsid: u32,
        /// Metadata bytes per block.
        bytes: u16,
    },
}

impl NamespaceInfo {
    /// Extracts the summary, rejecting namespaces this driver cannot do I/O to.
    pub fn parse<T: AsRef<[u8]>>(
        nsid: u32,
        view: &IdentifyNamespace<T>,
    ) -> Result<Self, NamespaceError> {
        if view.nsze() == 0 {
            return Err(NamespaceError::Inactive(nsid));
        }
        let count = usize::from(view.nlbaf()) + 1;
        let formats: Vec<LbaFormat> = (0..count.min(ns_field::MAX_LBAF))
            .filter_map(|i| view.lba_format(i))
            .collect();
        let index = view.current_format_index();
        let format =
            *formats
                .get(index)
                .ok_or(NamespaceError::FormatIndex { nsid, index, count })?;
        if format.block_size().is_none() {
            return Err(NamespaceError::BlockSize {
                nsid,
                shift: format.data_size_shift,
            });
        }
        if format.metadata_size != 0 {
            return Err(NamespaceError::Metadata {
                nsid,
                bytes: format.metadata_size,
            });
        }
        Ok(NamespaceInfo {
            nsid,
            size_blocks: view.nsze(),
            capacity_blocks: view.ncap(),
            utilization_blocks: view.nuse(),
            format,
            format_index: index,
            formats,
        })
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.format.block_size().unwrap_or(512)
    }

    /// Size in bytes (saturating; no real namespace comes near 2^64 bytes).
    pub fn size_bytes(&self) -> u64 {
        self.size_blocks
            .saturating_mul(u64::from(self.block_size()))
    }
}

/// The NSIDs of an Active Namespace ID list (CNS 02h): ascending, terminated by the first zero.
pub fn active_namespace_ids(list: &[u8]) -> impl Iterator<Item = u32> + '_ {
    list.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&id| id != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller_bytes() -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0..2].copy_from_slice(&[0x36, 0x1B]); // VID 0x1b36 (Red Hat / QEMU)
        b[2..4].copy_from_slice(&[0xF4, 0x1A]); // SSVID 0x1af4
        b[4..24].copy_from_slice(b"deadbeef            ");
        b[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        b[64..72].copy_from_slice(b"7.2.0   ");
        b[77] = 7; // MDTS: 2^7 pages
        b[78..80].copy_from_slice(&[0x00, 0x00]);
        b[80..84].copy_from_slice(&[0x00, 0x04, 0x01, 0x00]); // VER 1.4.0
        b[256..258].copy_from_slice(&[0x0A, 0x00]);
        b[512] = 0x66; // SQES: 64 B
        b[513] = 0x44; // CQES: 16 B
        b[514..516].copy_from_slice(&[0x00, 0x00]);
        b[516..520].copy_from_slice(&[0x00, 0x01, 0x00, 0x00]); // NN 256
        b[520..522].copy_from_slice(&[0x5F, 0x01]); // ONCS incl. DSM + Write Zeroes
        b[525] = 0x07; // VWC present
        b[536..540].copy_from_slice(&[0x01, 0x00, 0x10, 0x00]); // SGLS: byte aligned SGLs
        b
    }

    #[test]
    fn identify_controller_fields_at_spec_offsets() {
        let bytes = controller_bytes();
        let v = IdentifyController::new_checked(&bytes[..]).unwrap();
        assert_eq!(v.vid(), 0x1B36);
        assert_eq!(v.ssvid(), 0x1AF4);
        assert_eq!(v.mdts(), 7);
        assert_eq!(v.ver(), 0x0001_0400);
        assert_eq!(v.sqes(), 0x66);
        assert_eq!(v.cqes(), 0x44);
        assert_eq!(v.nn(), 256);
        assert_eq!(v.oncs(), 0x015F);
        assert_eq!(v.sgls(), 0x0010_0001);

        let info = ControllerInfo::parse(&v);
        assert_eq!(info.serial, "deadbeef");
        assert_eq!(info.model, "QEMU NVMe Ctrl");
        assert_eq!(info.firmware, "7.2.0");
        assert_eq!(info.max_transfer_bytes(4096), Some(512 * 1024));
        assert_eq!((info.sq_entry_size_min, info.cq_entry_size_min), (6, 4));
        assert!(info.supports_dsm() && info.supports_write_zeroes());
        assert!(info.volatile_write_cache);
        assert!(info.sgl_supported && !info.sgl_dword_aligned);
    }

    #[test]
    fn identify_controller_rejects_short_buffer_and_odd_values() {
        assert_eq!(
            IdentifyController::new_checked(&[0u8; 100][..]).unwrap_err(),
            Truncated(100)
        );
        let mut bytes = controller_bytes();
        bytes[77] = 0;
        bytes[4] = 0xFF; // non-ASCII in the serial number
        bytes[536] = 0b11; // reserved SGLS value: treat as unsupported
        let info = ControllerInfo::parse(&IdentifyController::new_checked(&bytes[..]).unwrap());
        assert_eq!(info.max_transfer_bytes(4096), None);
        assert_eq!(info.serial, "?eadbeef");
        assert!(!info.sgl_supported);
        bytes[77] = 200;
        let info = ControllerInfo::parse(&IdentifyController::new_checked(&bytes[..]).unwrap());
        assert_eq!(info.max_transfer_bytes(4096), None, "overflowing MDTS");
    }

    fn namespace_bytes() -> Vec<u8> {
        let mut b = vec![0u8; IDENTIFY_LEN];
        b[0..8].copy_from_slice(&0x20_0000u64.to_le_bytes()); // NSZE
        b[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes()); // NCAP
        b[16..24].copy_from_slice(&0x1000u64.to_le_bytes()); // NUSE
        b[25] = 7; // 8 formats
        b[26] = 4; // format 4 in use
        let formats: [u32; 8] = [
            9 << 16,
            (9 << 16) | 8,
            (9 << 16) | 16,
            (9 << 16) | 64,
            12 << 16,
            (12 << 16) | 8,
            (12 << 16) | 16,
            (12 << 16) | 64,
        ];
        for (i, f) in formats.iter().enumerate() {
            b[128 + 4 * i..132 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        b
    }

    #[test]
    fn identify_namespace_fields_at_spec_offsets() {
        let bytes = namespace_bytes();
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            (v.nsze(), v.ncap(), v.nuse()),
            (0x20_0000, 0x20_0000, 0x1000)
        );
        assert_eq!((v.nlbaf(), v.flbas()), (7, 4));
        assert_eq!(
            v.lba_format(3),
            Some(LbaFormat {
                metadata_size: 64,
                data_size_shift: 9,
                relative_performance: 0
            })
        );
        let info = NamespaceInfo::parse(1, &v).unwrap();
        assert_eq!(info.block_size(), 4096);
        assert_eq!(info.size_bytes(), 0x20_0000 * 4096);
        assert_eq!(info.formats.len(), 8);
        assert_eq!(info.format_index, 4);
    }

    #[test]
    fn identify_namespace_rejects_unusable() {
        let mut bytes = namespace_bytes();
        bytes[26] = 5; // 4 KiB + 8 B metadata
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            NamespaceInfo::parse(1, &v),
            Err(NamespaceError::Metadata { nsid: 1, bytes: 8 })
        );
        bytes[26] = 9; // beyond NLBAF
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert!(matches!(
            NamespaceInfo::parse(1, &v),
            Err(NamespaceError::FormatIndex { .. })
        ));
        bytes[26] = 0;
        bytes[130] = 3; // LBADS 2^3
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            NamespaceInfo::parse(2, &v),
            Err(NamespaceError::BlockSize { nsid: 2, shift: 3 })
        );
        bytes[0..8].fill(0);
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            NamespaceInfo::parse(2, &v),
            Err(NamespaceError::Inactive(2))
        );
    }

    #[test]
    fn flbas_high_bits_used_with_more_than_16_formats() {
        let mut bytes = namespace_bytes();
        bytes[25] = 20;
        bytes[26] = 0b0010_0001; // index 0x11
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert_eq!(v.current_format_index(), 17);
        bytes[25] = 7;
        let v = IdentifyNamespace::new_checked(&bytes[..]).unwrap();
        assert_eq!(v.current_format_index(), 1);
    }

    #[test]
    fn active_namespace_list() {
        let mut list = vec![0u8; IDENTIFY_LEN];
        list[0..4].copy_from_slice(&1u32.to_le_bytes());
        list[4..8].copy_from_slice(&3u32.to_le_bytes());
        list[12..16].copy_from_slice(&9u32.to_le_bytes()); // after the terminator: ignored
        assert_eq!(active_namespace_ids(&list).collect::<Vec<_>>(), vec![1, 3]);
    }
}
