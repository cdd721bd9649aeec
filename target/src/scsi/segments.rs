//! Byte ranges of a descriptor chain's segments: copied out of or into guest memory (headers,
//! immediate data, events), or turned into host-address vectors for zero-copy bdev I/O.

use rvhost_core::mem::{GuestMemory, Segment};

use crate::bdev::IoVec;

/// Walks bytes `skip..skip + total` of the segments piece by piece, calling `access(guest_addr,
/// range)` with each piece's guest address and its range within `0..total`; stops at the first
/// piece `access` refuses. Returns how many bytes were accessed.
fn walk_segments(
    segs: &[Segment],
    mut skip: u64,
    total: usize,
    mut access: impl FnMut(u64, std::ops::Range<usize>) -> bool,
) -> usize {
    let mut done = 0usize;
    for seg in segs {
        if done == total {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(total - done);
        if !access(seg.guest_addr.saturating_add(skip), done..done + n) {
            break;
        }
        done += n;
        skip = 0;
    }
    done
}

/// Copies `out.len()` bytes starting `skip` bytes into the segments; returns how many were copied.
pub fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    out: &mut [u8],
) -> usize {
    let total = out.len();
    walk_segments(segs, skip, total, |addr, range| {
        mem.read(addr, &mut out[range]).is_ok()
    })
}

/// Writes `data` starting `skip` bytes into the segments; returns how many bytes were written.
pub fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    data: &[u8],
) -> usize {
    walk_segments(segs, skip, data.len(), |addr, range| {
        mem.write(addr, &data[range]).is_ok()
    })
}

/// Appends host-address vectors for bytes `skip..skip + len` of the segments; false if the
/// segments are shorter.
pub fn sub_iovs(segs: &[Segment], mut skip: u64, mut len: u64, iovs: &mut Vec<IoVec>) -> bool {
    for seg in segs {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len);
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        iovs.push(IoVec {
            addr: seg.host_addr.saturating_add(skip),
            len: n32,
        });
        len -= n;
        skip = 0;
    }
    len == 0
}
