//! Mode parameters (SPC-5 §7.5, SBC-4 §6.5): MODE SENSE data and MODE SELECT parameter lists.
//!
//! rvhost implements the caching page (0x08), whose WCE bit is changeable, and the control page
//! (0x0A), which is read-only. Saved values are not supported.

use super::cdb::{ModeSelect, ModeSense, PageControl};
use super::data::DataWriter;
use super::lun::LunConfig;
use super::sense::Sense;
use crate::wire;

/// Caching mode page code.
pub const PAGE_CACHING: u8 = 0x08;
/// Control mode page code.
pub const PAGE_CONTROL: u8 = 0x0a;
/// "Return all pages".
pub const PAGE_ALL: u8 = 0x3f;

const CACHING_LEN: usize = 20;
const CONTROL_LEN: usize = 12;
/// Write cache enable, byte 2 bit 2 of the caching page.
const WCE: u8 = 0x04;
/// WP bit of the device-specific parameter: the medium is write-protected.
const DEVICE_SPECIFIC_WP: u8 = 0x80;
/// DPOFUA bit of the device-specific parameter: DPO and FUA are honoured.
const DEVICE_SPECIFIC_DPOFUA: u8 = 0x10;

fn caching_page(values: PageValues, wce: bool) -> [u8; CACHING_LEN] {
    let mut p = [0u8; CACHING_LEN];
    p[0] = PAGE_CACHING;
    p[1] = (CACHING_LEN - 2) as u8;
    p[2] = match values {
        PageValues::Changeable => WCE,
        PageValues::Value => {
            if wce {
                WCE
            } else {
                0
            }
        }
    };
    p
}

fn control_page(values: PageValues) -> [u8; CONTROL_LEN] {
    let mut p = [0u8; CONTROL_LEN];
    p[0] = PAGE_CONTROL;
    p[1] = (CONTROL_LEN - 2) as u8;
    if values == PageValues::Value {
        // QUEUE ALGORITHM MODIFIER 1: commands may be reordered (each virtqueue request is
        // independent); TST 000b, D_SENSE 0 (fixed-format sense), QERR 00b.
        p[3] = 0x10;
    }
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageValues {
    /// Current or default values.
    Value,
    /// The changeable-bits mask.
    Changeable,
}

/// Builds MODE SENSE data. `wce` is the value to report (current or default, as `pc` asks).
pub(crate) fn mode_sense(
    w: &mut DataWriter<'_>,
    cfg: &LunConfig,
    req: &ModeSense,
    current_wce: bool,
) -> Result<(), Sense> {
    let (values, wce) = match req.pc {
        PageControl::Current => (PageValues::Value, current_wce),
        PageControl::Default => (PageValues::Value, cfg.write_cache),
        PageControl::Changeable => (PageValues::Changeable, false),
        PageControl::Saved => return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED),
    };
    // Subpage 0x00 is the page itself; 0xFF asks for the page and all its subpages, and no page
    // here has subpages.
    if req.subpage != 0x00 && req.subpage != 0xff {
        return Err(Sense::invalid_field_in_cdb(3, None));
    }
    let (caching, control) = match req.page {
        PAGE_CACHING => (true, false),
        PAGE_CONTROL => (false, true),
        PAGE_ALL => (true, true),
        _ => return Err(Sense::invalid_field_in_cdb(2, Some(5))),
    };
    let long_lba = req.ten && req.llbaa;
    let block_descriptor_len: usize = match (req.dbd, long_lba) {
        (true, _) => 0,
        (false, false) => 8,
        (false, true) => 16,
    };
    let header_len: usize = if req.ten { 8 } else { 4 };
    let pages_len = usize::from(caching) * CACHING_LEN + usize::from(control) * CONTROL_LEN;
    let total = header_len + block_descriptor_len + pages_len;

    let mut device_specific = DEVICE_SPECIFIC_DPOFUA;
    if cfg.read_only {
        device_specific |= DEVICE_SPECIFIC_WP;
    }
    if values == PageValues::Changeable {
        device_specific = 0;
    }
    if req.ten {
        // MODE DATA LENGTH excludes itself.
        w.put_be16((total - 2) as u16);
        w.put_u8(0); // MEDIUM TYPE
        w.put_u8(device_specific);
        w.put_u8(u8::from(long_lba && block_descriptor_len > 0)); // LONGLBA
        w.put_u8(0);
        w.put_be16(block_descriptor_len as u16);
    } else {
        w.put_u8((total - 1) as u8);
        w.put_u8(0);
        w.put_u8(device_specific);
        w.put_u8(block_descriptor_len as u8);
    }
    let (blocks, block_len) = match values {
        PageValues::Value => (cfg.num_blocks, cfg.block_size),
        PageValues::Changeable => (0, 0),
    };
    match block_descriptor_len {
        8 => {
            // Short LBA descriptor: NUMBER OF LOGICAL BLOCKS saturates at 0xFFFFFFFF.
            w.put_be32(u32::try_from(blocks).unwrap_or(u32::MAX));
            w.put_u8(0);
            let [_, b1, b2, b3] = block_len.to_be_bytes();
            w.put(&[b1, b2, b3]);
        }
        16 => {
            w.put_be64(blocks);
            w.put_be32(0);
            w.put_be32(block_len);
        }
        _ => {}
    }
    if caching {
        w.put(&caching_page(values, wce));
    }
    if control {
        w.put(&control_page(values));
    }
    Ok(())
}

/// Validates a MODE SELECT parameter list and returns the write-cache setting it asks for
/// (`None` if it carries no caching page). Nothing changes unless the whole list is valid.
pub(crate) fn mode_select(
    cfg: &LunConfig,
    req: &ModeSelect,
    list: &[u8],
    current_wce: bool,
) -> Result<Option<bool>, Sense> {
    let header_len: usize = if req.ten { 8 } else { 4 };
    let header = list
        .get(..header_len)
        .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
    let (block_descriptor_len, long_lba) = if req.ten {
        (
            usize::from(wire::be_u16(header, 6..8)),
            wire::byte(header, 4) & 0x01 != 0,
        )
    } else {
        (usize::from(wire::byte(header, 3)), false)
    };
    let descriptor_size: usize = if long_lba { 16 } else { 8 };
    let pages_start = header_len + block_descriptor_len;
    let descriptors = list
        .get(header_len..pages_start)
        .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
    if block_descriptor_len % descriptor_size != 0 {
        let at = if req.ten { 6 } else { 3 };
        return Err(Sense::invalid_field_in_parameter_list(at, None));
    }
    for (i, d) in descriptors.chunks_exact(descriptor_size).enumerate() {
        let base = header_len + i * descriptor_size;
        // `d` is one whole descriptor (`chunks_exact`).
        let (blocks, block_len, blocks_at, len_at) = if long_lba {
            (
                wire::be_u64(d, 0..8),
                wire::be_u32(d, 12..16),
                base,
                base + 12,
            )
        } else {
            (
                u64::from(wire::be_u32(d, 0..4)),
                wire::be_uint(d, 5..8) as u32,
                base,
                base + 5,
            )
        };
        // The block size cannot change; the capacity may only be restated (0 = unchanged).
        if block_len != cfg.block_size {
            return Err(Sense::invalid_field_in_parameter_list(len_at as u16, None));
        }
        let current_blocks = if long_lba {
            cfg.num_blocks
        } else {
            cfg.num_blocks.min(u64::from(u32::MAX))
        };
        if blocks != 0 && blocks != current_blocks {
            return Err(Sense::invalid_field_in_parameter_list(
                blocks_at as u16,
                None,
            ));
        }
    }

    let mut new_wce = None;
    let mut off = pages_start;
    while let Some(&b0) = list.get(off) {
        let subpage_format = b0 & 0x40 != 0;
        let code = b0 & 0x3f;
        let (hdr, body_len, subpage) = if subpage_format {
            let h = list
                .get(off..off + 4)
                .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
            (4usize, usize::from(wire::be_u16(h, 2..4)), wire::byte(h, 1))
        } else {
            let h = list
                .get(off..off + 2)
                .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
            (2usize, usize::from(wire::byte(h, 1)), 0)
        };
        let end = off + hdr + body_len;
        let page = list
            .get(off..end)
            .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let at = |i: usize| (off + i) as u16;
        match (code, subpage, subpage_format) {
            (PAGE_CACHING, 0, false) => {
                if page.len() != CACHING_LEN {
                    return Err(Sense::invalid_field_in_parameter_list(at(1), None));
                }
                let current = caching_page(PageValues::Value, current_wce);
                let changeable = caching_page(PageValues::Changeable, false);
                let fields = page.iter().zip(current.iter().zip(&changeable));
                // Byte 0 carries PS, which is reserved in MODE SELECT; byte 1 is the length.
                if let Some((i, _)) = fields
                    .enumerate()
                    .skip(2)
                    .find(|(_, (p, (c, ch)))| (*p ^ *c) & !*ch != 0)
                {
                    return Err(Sense::invalid_field_in_parameter_list(at(i), None));
                }
                new_wce = Some(wire::byte(page, 2) & WCE != 0);
            }
            (PAGE_CONTROL, 0, false) => {
                if page.len() != CONTROL_LEN {
                    return Err(Sense::invalid_field_in_parameter_list(at(1), None));
                }
                let current = control_page(PageValues::Value);
                if let Some((i, _)) = page
                    .iter()
                    .zip(&current)
                    .enumerate()
                    .skip(2)
                    .find(|(_, (p, c))| p != c)
                {
                    return Err(Sense::invalid_field_in_parameter_list(at(i), None));
                }
            }
            _ => return Err(Sense::invalid_field_in_parameter_list(at(0), Some(5))),
        }
        off = end;
    }
    Ok(new_wce)
}
