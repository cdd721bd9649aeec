//! Describing a scattered buffer to the controller: PRP entries and lists (NVMe base spec 2.0,
//! §4.3.1) or, where the buffer's shape does not fit PRP rules and the controller offers them,
//! SGLs (§4.3.2).
//!
//! The list entries go into a driver-owned DMA page per command slot; the builders write them
//! through a callback so that the caller decides how that memory is accessed (volatile writes to
//! DMA memory in the driver, a plain vector in tests).

use crate::cmd::{DataPointer, SglDescriptor};

/// The memory page size this driver configures (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;
/// PRP entries that fit one list page.
pub const PRP_ENTRIES_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;
/// SGL descriptors that fit one list page.
pub const SGL_DESCRIPTORS_PER_PAGE: usize = (PAGE_SIZE / 16) as usize;

/// A contiguous piece of a buffer in I/O virtual address space (equal to the process's virtual
/// address here, since the driver maps DMA memory with IOVA = VA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSegment {
    /// I/O virtual address of the first byte.
    pub iova: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Why a buffer cannot be described.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataPointerError {
    /// No segments, or a zero-length one.
    #[error("empty data buffer or zero-length segment")]
    Empty,
    /// PRP entries must be dword aligned.
    #[error("segment {index} at {iova:#x} is not dword aligned")]
    Unaligned {
        /// Index of the offending segment.
        index: usize,
        /// Its address.
        iova: u64,
    },
    /// A middle segment does not start and end on page boundaries, and SGLs are unavailable.
    #[error("segment {index} breaks the PRP page rules and the controller has no SGL support")]
    NotPrpCompatible {
        /// Index of the offending segment.
        index: usize,
    },
    /// More pages than one PRP list page holds.
    #[error("buffer spans {pages} pages, more than one PRP list holds")]
    TooManyPages {
        /// Pages the buffer spans.
        pages: usize,
    },
    /// More segments than one SGL segment page holds.
    #[error("{segments} segments, more than one SGL segment holds")]
    TooManySegments {
        /// Number of segments.
        segments: usize,
    },
    /// The total length does not fit 32 bits or the address arithmetic overflows.
    #[error("data buffer length or address overflows")]
    Overflow,
}

/// What the controller can take, from Identify Controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SglSupport {
    /// The controller accepts SGLs for NVM commands.
    pub supported: bool,
    /// Data blocks must be dword aligned (address and length).
    pub dword_aligned: bool,
    /// Use SGLs even where PRPs would do (exercises the SGL path; SPDK does the same when the
    /// controller supports SGLs).
    pub prefer: bool,
}

fn page_offset(addr: u64) -> u64 {
    addr & (PAGE_SIZE - 1)
}

/// Checks the PRP shape rules; returns the index of the first segment that breaks them.
fn prp_incompatible(segments: &[DmaSegment]) -> Option<usize> {
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        if i > 0 && page_offset(seg.iova) != 0 {
            return Some(i);
        }
        let end = seg.iova.wrapping_add(u64::from(seg.len));
        if i < last && page_offset(end) != 0 {
            return Some(i);
        }
    }
    None
}

/// Total length of `segments`, checking for emptiness and overflow.
pub fn total_length(segments: &[DmaSegment]) -> Result<u32, DataPointerError> {
    if segments.is_empty() {
        return Err(DataPointerError::Empty);
    }
    let mut total: u32 = 0;
    for seg in segments {
        if seg.len == 0 {
            return Err(DataPointerError::Empty);
        }
        seg.iova
            .checked_add(u64::from(seg.len))
            .ok_or(DataPointerError::Overflow)?;
        total = total
            .checked_add(seg.len)
            .ok_or(DataPointerError::Overflow)?;
    }
    Ok(total)
}

/// Builds the data pointer for `segments`, writing PRP-list or SGL-segment entries through
/// `write_list_entry(byte_offset, value)` into the list page at `list_iova`.
pub fn build_data_pointer(
    segments: &[DmaSegment],
    sgl: SglSupport,
    list_iova: u64,
    write_list_entry: impl FnMut(usize, u64),
) -> Result<DataPointer, DataPointerError> {
    total_length(segments)?;
    let use_sgl = sgl.supported && (sgl.prefer || prp_incompatible(segments).is_some());
    if use_sgl {
        build_sgl(segments, sgl.dword_aligned, list_iova, write_list_entry)
    } else {
        build_prp(segments, list_iova, write_list_entry)
    }
}

/// Builds PRP1/PRP2 and, for three or more pages, a PRP list.
pub fn build_prp(
    segments: &[DmaSegment],
    list_iova: u64,
    mut write_list_entry: impl FnMut(usize, u64),
) -> Result<DataPointer, DataPointerError> {
    total_length(segments)?;
    if let Some(index) = prp_incompatible(segments) {
        return Err(DataPointerError::NotPrpCompatible { index });
    }
    let first = segments[0];
    if first.iova & 0b11 != 0 {
        return Err(DataPointerError::Unaligned {
            index: 0,
            iova: first.iova,
        });
    }
    let prp1 = first.iova;
    // Walk every page after the one PRP1 points into. The list is written lazily: only a third
    // page makes PRP2 a list pointer, and then the second page becomes the list's first entry.
    let mut second = 0u64;
    let mut pages_after_first = 0usize;
    for (i, seg) in segments.iter().enumerate() {
        // Cannot overflow: `total_length` checked `iova + len`, and pages start below that end.
        let end = seg.iova + u64::from(seg.len);
        let mut page = if i == 0 {
            match (seg.iova - page_offset(seg.iova)).checked_add(PAGE_SIZE) {
                Some(p) => p,
                None => continue,
            }
        } else {
            seg.iova
        };
        while page < end {
            pages_after_first += 1;
            match pages_after_first {
                1 => second = page,
                n => {
                    // One list page and no chaining: with MDTS-limited transfers, 512 entries
                    // (2 MiB) suffice.
                    if n > PRP_ENTRIES_PER_PAGE {
                        return Err(DataPointerError::TooManyPages { pages: n + 1 });
                    }
                    if n == 2 {
                        write_list_entry(0, second);
                    }
                    write_list_entry((n - 1) * 8, page);
                }
            }
            page = match page.checked_add(PAGE_SIZE) {
                Some(p) => p,
                None => break,
            };
        }
    }
    Ok(match pages_after_first {
        0 => DataPointer::Prp { prp1, prp2: 0 },
        1 => DataPointer::Prp { prp1, prp2: second },
        _ => DataPointer::Prp {
            prp1,
            prp2: list_iova,
        },
    })
}

/// Builds an SGL: one data block in DPTR, or a last-segment descriptor pointing at a list of data
/// blocks.
pub fn build_sgl(
    segments: &[DmaSegment],
    dword_aligned: bool,
    list_iova: u64,
    mut write_list_entry: impl FnMut(usize, u64),
) -> Result<DataPointer, DataPointerError> {
    total_length(segments)?;
    if dword_aligned {
        if let Some((index, seg)) = segments
            .iter()
            .enumerate()
            .find(|(_, s)| s.iova & 0b11 != 0 || s.len & 0b11 != 0)
        {
            return Err(DataPointerError::Unaligned {
                index,
                iova: seg.iova,
            });
        }
    }
    if let [only] = segments {
        return Ok(DataPointer::Sgl(SglDescriptor::data_block(
            only.iova, only.len,
        )));
    }
    if segments.len() > SGL_DESCRIPTORS_PER_PAGE {
        return Err(DataPointerError::TooManySegments {
            segments: segments.len(),
        });
    }
    for (i, seg) in segments.iter().enumerate() {
        let bytes = SglDescriptor::data_block(seg.iova, seg.len).to_bytes();
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&bytes[0..8]);
        hi.copy_from_slice(&bytes[8..16]);
        write_list_entry(i * 16, u64::from_le_bytes(lo));
        write_list_entry(i * 16 + 8, u64::from_le_bytes(hi));
    }
    let count = u32::try_from(segments.len()).map_err(|_| DataPointerError::Overflow)?;
    Ok(DataPointer::Sgl(SglDescriptor::last_segment(
        list_iova, count,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::{SGL_TYPE_DATA_BLOCK, SGL_TYPE_LAST_SEGMENT};

    const LIST: u64 = 0x7700_0000;

    fn seg(iova: u64, len: u32) -> DmaSegment {
        DmaSegment { iova, len }
    }

    fn prp(segments: &[DmaSegment]) -> (Result<DataPointer, DataPointerError>, Vec<u64>) {
        let mut list = Vec::new();
        let r = build_prp(segments, LIST, |off, v| {
            assert_eq!(off, list.len() * 8);
            list.push(v)
        });
        (r, list)
    }

    #[test]
    fn one_page() {
        let (r, list) = prp(&[seg(0x10_0000, 4096)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0000,
                prp2: 0
            })
        );
        assert!(list.is_empty());
        // Unaligned but inside one page.
        let (r, _) = prp(&[seg(0x10_0200, 512)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0200,
                prp2: 0
            })
        );
    }

    #[test]
    fn two_pages() {
        let (r, list) = prp(&[seg(0x10_0000, 8192)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0000,
                prp2: 0x10_1000
            })
        );
        assert!(list.is_empty());
        // Unaligned first segment crossing one page boundary: still two pages.
        let (r, _) = prp(&[seg(0x10_0E00, 1024)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0E00,
                prp2: 0x10_1000
            })
        );
        // Two segments of one page each.
        let (r, _) = prp(&[seg(0x10_0000, 4096), seg(0x90_0000, 4096)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0000,
                prp2: 0x90_0000
            })
        );
    }

    #[test]
    fn three_pages_use_a_list() {
        let (r, list) = prp(&[seg(0x10_0000, 3 * 4096)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0000,
                prp2: LIST
            })
        );
        assert_eq!(list, vec![0x10_1000, 0x10_2000]);
    }

    #[test]
    fn unaligned_first_segment_then_scattered_pages() {
        // 0x200 bytes short of a page, then a whole page elsewhere, then a partial last page.
        let (r, list) = prp(&[
            seg(0x10_0200, 0xE00),
            seg(0x50_0000, 0x1000),
            seg(0x80_0000, 0x1200),
        ]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x10_0200,
                prp2: LIST
            })
        );
        assert_eq!(list, vec![0x50_0000, 0x80_0000, 0x80_1000]);
    }

    #[test]
    fn prp_list_capacity() {
        // 1 + 512 pages fits: PRP1 plus a full list page.
        let (r, list) = prp(&[seg(0x100_0000, 513 * 4096)]);
        assert_eq!(
            r,
            Ok(DataPointer::Prp {
                prp1: 0x100_0000,
                prp2: LIST
            })
        );
        assert_eq!(list.len(), 512);
        assert_eq!(list[511], 0x100_0000 + 512 * 4096);
        let (r, _) = prp(&[seg(0x100_0000, 514 * 4096)]);
        assert!(matches!(r, Err(DataPointerError::TooManyPages { .. })));
    }

    #[test]
    fn prp_rejects_bad_shapes() {
        assert_eq!(prp(&[]).0, Err(DataPointerError::Empty));
        assert_eq!(prp(&[seg(0x1000, 0)]).0, Err(DataPointerError::Empty));
        assert_eq!(
            prp(&[seg(0x1001, 512)]).0,
            Err(DataPointerError::Unaligned {
                index: 0,
                iova: 0x1001
            })
        );
        // First segment does not end on a page boundary.
        assert_eq!(
            prp(&[seg(0x1000, 512), seg(0x5000, 512)]).0,
            Err(DataPointerError::NotPrpCompatible { index: 0 })
        );
        // Second segment does not start on a page boundary.
        assert_eq!(
            prp(&[seg(0x1000, 4096), seg(0x5200, 512)]).0,
            Err(DataPointerError::NotPrpCompatible { index: 1 })
        );
        assert_eq!(
            prp(&[seg(u64::MAX - 10, 512)]).0,
            Err(DataPointerError::Overflow)
        );
        assert_eq!(
            prp(&[seg(0x1000, u32::MAX), seg(0x1000, u32::MAX)]).0,
            Err(DataPointerError::Overflow)
        );
    }

    #[test]
    fn sgl_single_and_multiple_segments() {
        let mut list = Vec::new();
        let r = build_sgl(&[seg(0x10_0201, 100)], false, LIST, |_, v| list.push(v));
        assert_eq!(
            r,
            Ok(DataPointer::Sgl(SglDescriptor::data_block(0x10_0201, 100)))
        );
        assert!(list.is_empty());

        let mut raw = [0u8; 48];
        let r = build_sgl(
            &[seg(0x1000, 512), seg(0x5200, 512), seg(0x9000, 7)],
            false,
            LIST,
            |off, v| raw[off..off + 8].copy_from_slice(&v.to_le_bytes()),
        );
        let Ok(DataPointer::Sgl(d)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(d.address, LIST);
        assert_eq!(d.length, 48);
        assert_eq!(d.identifier >> 4, SGL_TYPE_LAST_SEGMENT);
        assert_eq!(&raw[16..24], &0x5200u64.to_le_bytes());
        assert_eq!(&raw[24..28], &512u32.to_le_bytes());
        assert_eq!(raw[31] >> 4, SGL_TYPE_DATA_BLOCK);
        assert_eq!(&raw[40..44], &7u32.to_le_bytes());

        assert!(matches!(
            build_sgl(&[seg(0x1000, 7)], true, LIST, |_, _| {}),
            Err(DataPointerError::Unaligned { index: 0, .. })
        ));
        let many: Vec<_> = (0..257).map(|i| seg(i * 0x1000, 16)).collect();
        assert_eq!(
            build_sgl(&many, false, LIST, |_, _| {}),
            Err(DataPointerError::TooManySegments { segments: 257 })
        );
    }

    #[test]
    fn chooser_falls_back_to_sgl_only_when_needed() {
        let odd = [seg(0x1000, 512), seg(0x5200, 512)];
        let none = SglSupport::default();
        assert_eq!(
            build_data_pointer(&odd, none, LIST, |_, _| {}),
            Err(DataPointerError::NotPrpCompatible { index: 0 })
        );
        let sgl = SglSupport {
            supported: true,
            ..SglSupport::default()
        };
        assert!(matches!(
            build_data_pointer(&odd, sgl, LIST, |_, _| {}),
            Ok(DataPointer::Sgl(_))
        ));
        let even = [seg(0x1000, 4096)];
        assert!(matches!(
            build_data_pointer(&even, sgl, LIST, |_, _| {}),
            Ok(DataPointer::Prp { .. })
        ));
        let prefer = SglSupport {
            prefer: true,
            ..sgl
        };
        assert!(matches!(
            build_data_pointer(&even, prefer, LIST, |_, _| {}),
            Ok(DataPointer::Sgl(_))
        ));
    }
}
