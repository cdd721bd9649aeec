//! Byte ranges of a scattered guest buffer: the one way this crate, and the devices built on it,
//! walk a list of [`Segment`]s.
//!
//! A request's data rarely sits in one segment: a header may be split across descriptors, a data
//! area begins after a header in the same segment, a response sits in front of data-in. A
//! [`SegmentRange`] names bytes `skip..skip + len` of a segment list (checked against the
//! segments' total when built), and from it:
//!
//! - [`SegmentRange::iter`] yields the range as trimmed, non-empty [`Segment`]s
//!   ([`SegmentPieces`]): what a zero-copy backend turns into iovecs;
//! - [`SegmentRange::reader`] copies bytes out of guest memory ([`SegmentReader`]: a header split
//!   across descriptors, a discard range list, a SCSI data-out parameter list);
//! - [`SegmentRange::writer`] copies bytes in ([`SegmentWriter`]: a response, data-in built by the
//!   device, a GET_ID string).
//!
//! Nothing allocates, all arithmetic is checked, and running out of segments is a
//! [`Truncated`] error, never a panic or a silent short copy (the `read`/`write` methods that
//! copy "as much as fits" say how much that was).
//!
//! ```
//! use rvhost_core::mem::{ByteMemory, Direction, GuestMemory, Segment};
//! use rvhost_core::segments::SegmentRange;
//!
//! let mut ram = vec![0u8; 0x100];
//! let mem = ByteMemory::new(0, 0x7f00_0000, &mut ram);
//! let seg = |addr, len| Segment {
//!     guest_addr: addr,
//!     host_addr: 0x7f00_0000 + addr,
//!     len,
//!     direction: Direction::DeviceWritable,
//! };
//! // A 12-byte response header split 8 + 4, then data-in.
//! let segments = [seg(0x10, 8), seg(0x40, 4 + 512 - 256)];
//! let whole = SegmentRange::whole(&segments);
//! whole.writer().write_all(&mem, &[0xaa; 12])?;
//! let data_in = whole.tail(12)?;
//! assert_eq!(data_in.len(), 256);
//! assert_eq!(data_in.iter().next(), Some(seg(0x44, 256)));
//! let mut back = [0u8; 4];
//! whole.sub(6, 4)?.reader().read_exact(&mem, &mut back)?;
//! assert_eq!(back, [0xaa; 4]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::ops::Range;

use crate::mem::{GuestMemory, MemError, Segment};
use crate::wire::Truncated;

/// Why a copy through a [`SegmentReader`] or [`SegmentWriter`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentIoError {
    /// The range holds fewer bytes than the copy needs (nothing was copied).
    Truncated(Truncated),
    /// Guest memory refused an access (the pieces before it were copied).
    Memory(MemError),
}

impl core::fmt::Display for SegmentIoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SegmentIoError::Truncated(t) => write!(f, "guest buffer too short: {t}"),
            SegmentIoError::Memory(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for SegmentIoError {}

impl From<Truncated> for SegmentIoError {
    fn from(t: Truncated) -> Self {
        SegmentIoError::Truncated(t)
    }
}

impl From<MemError> for SegmentIoError {
    fn from(e: MemError) -> Self {
        SegmentIoError::Memory(e)
    }
}

fn truncated(needed: u64, got: u64) -> Truncated {
    Truncated {
        needed: usize::try_from(needed).unwrap_or(usize::MAX),
        got: usize::try_from(got).unwrap_or(usize::MAX),
    }
}

/// The total length of `segments` (a sum of `u32`s: cannot overflow a `u64` for any slice).
#[inline]
pub fn total_len(segments: &[Segment]) -> u64 {
    segments
        .iter()
        .fold(0u64, |sum, s| sum.saturating_add(u64::from(s.len)))
}

/// Bytes `skip..skip + len` of a list of segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRange<'s> {
    segments: &'s [Segment],
    skip: u64,
    len: u64,
}

impl<'s> SegmentRange<'s> {
    /// No bytes.
    pub const EMPTY: SegmentRange<'static> = SegmentRange {
        segments: &[],
        skip: 0,
        len: 0,
    };

    /// Every byte of `segments`.
    #[inline]
    pub fn whole(segments: &'s [Segment]) -> Self {
        SegmentRange {
            segments,
            skip: 0,
            len: total_len(segments),
        }
    }

    /// Bytes `skip..skip + len` of `segments`, which must hold that many.
    pub fn new(segments: &'s [Segment], skip: u64, len: u64) -> Result<Self, Truncated> {
        SegmentRange::whole(segments).sub(skip, len)
    }

    /// Bytes `skip..skip + len` of segments whose total the caller already knows to be at least
    /// `skip + len` (a walked chain's readable or writable length). If it is not, the range
    /// simply ends early: iteration stops and copies report [`Truncated`], nothing panics.
    pub(crate) const fn new_unchecked(segments: &'s [Segment], skip: u64, len: u64) -> Self {
        SegmentRange {
            segments,
            skip,
            len,
        }
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `offset..offset + len` of this range.
    #[inline]
    pub fn sub(&self, offset: u64, len: u64) -> Result<SegmentRange<'s>, Truncated> {
        let end = offset
            .checked_add(len)
            .ok_or(truncated(u64::MAX, self.len))?;
        if end > self.len {
            return Err(truncated(end, self.len));
        }
        Ok(SegmentRange {
            segments: self.segments,
            // skip + offset <= skip + len of this range, which the segments hold.
            skip: self.skip.saturating_add(offset),
            len,
        })
    }

    /// Bytes from `offset` to the end of this range.
    #[inline]
    pub fn tail(&self, offset: u64) -> Result<SegmentRange<'s>, Truncated> {
        let len = self
            .len
            .checked_sub(offset)
            .ok_or(truncated(offset, self.len))?;
        self.sub(offset, len)
    }

    /// The first `len` bytes, or the whole range if it is shorter.
    #[inline]
    pub fn take(&self, len: u64) -> SegmentRange<'s> {
        SegmentRange {
            len: self.len.min(len),
            ..*self
        }
    }

    /// The range as trimmed, non-empty segments, in order.
    #[inline]
    pub fn iter(&self) -> SegmentPieces<'s> {
        SegmentPieces {
            segments: self.segments,
            skip: self.skip,
            remaining: self.len,
        }
    }

    /// A cursor that copies the range's bytes out of guest memory, from its start.
    #[inline]
    pub fn reader(&self) -> SegmentReader<'s> {
        SegmentReader {
            cursor: self.iter(),
        }
    }

    /// A cursor that copies bytes into the range's guest memory, from its start.
    #[inline]
    pub fn writer(&self) -> SegmentWriter<'s> {
        SegmentWriter {
            cursor: self.iter(),
        }
    }
}

impl<'s> IntoIterator for SegmentRange<'s> {
    type Item = Segment;
    type IntoIter = SegmentPieces<'s>;
    fn into_iter(self) -> SegmentPieces<'s> {
        self.iter()
    }
}

/// The pieces of a [`SegmentRange`]: each a [`Segment`] trimmed to the range, never empty.
#[derive(Debug, Clone)]
pub struct SegmentPieces<'s> {
    /// Segments not yet finished; the first may be partly consumed (`skip`).
    segments: &'s [Segment],
    /// Bytes of `segments` before the next piece.
    skip: u64,
    /// Bytes of the range not yet yielded.
    remaining: u64,
}

impl SegmentPieces<'_> {
    /// Bytes of the range not yet yielded.
    #[inline]
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next piece, at most `max` bytes long.
    #[inline]
    fn next_piece(&mut self, max: u64) -> Option<Segment> {
        let want = self.remaining.min(max);
        if want == 0 {
            return None;
        }
        loop {
            let (seg, rest) = self.segments.split_first()?;
            let seg_len = u64::from(seg.len);
            if self.skip >= seg_len {
                self.skip -= seg_len;
                self.segments = rest;
                continue;
            }
            let offset = self.skip;
            let len = (seg_len - offset).min(want);
            if offset + len == seg_len {
                self.segments = rest;
                self.skip = 0;
            } else {
                self.skip = offset + len;
            }
            self.remaining -= len;
            // len <= seg.len fits in u32; offset < seg.len, and the whole segment was translated,
            // so the addresses cannot wrap.
            return Some(Segment {
                guest_addr: seg.guest_addr.saturating_add(offset),
                host_addr: seg.host_addr.saturating_add(offset),
                len: len as u32,
                direction: seg.direction,
            });
        }
    }

    /// Walks up to `len` bytes piece by piece, calling `access(guest_addr, range)` with each
    /// piece's guest address and its range within `0..len`; returns how many bytes were walked.
    /// On an error the cursor stands at the failing piece.
    #[inline]
    fn copy(
        &mut self,
        len: usize,
        mut access: impl FnMut(u64, Range<usize>) -> Result<(), MemError>,
    ) -> Result<usize, MemError> {
        let mut done = 0usize;
        while done < len {
            let before = self.clone();
            let Some(piece) = self.next_piece((len - done) as u64) else {
                break;
            };
            // piece.len <= len - done.
            let end = done + piece.len as usize;
            if let Err(e) = access(piece.guest_addr, done..end) {
                *self = before;
                return Err(e);
            }
            done = end;
        }
        Ok(done)
    }

    /// [`Self::copy`] of exactly `len` bytes: refuses (walking nothing) if fewer remain.
    #[inline]
    fn copy_exact(
        &mut self,
        len: usize,
        access: impl FnMut(u64, Range<usize>) -> Result<(), MemError>,
    ) -> Result<(), SegmentIoError> {
        let needed = len as u64;
        if needed > self.remaining {
            return Err(truncated(needed, self.remaining).into());
        }
        let done = self.copy(len, access)?;
        if done < len {
            // Only if the range was built unchecked over segments shorter than it claimed.
            return Err(truncated(needed, done as u64).into());
        }
        Ok(())
    }

    /// The guest address of the next byte if the next `len` bytes lie in the current segment
    /// (and in the range).
    #[inline]
    fn within_first(&self, len: usize) -> Option<u64> {
        let seg = self.segments.first()?;
        let len = len as u64;
        let end = self.skip.checked_add(len)?;
        (len <= self.remaining && end <= u64::from(seg.len))
            .then(|| seg.guest_addr.saturating_add(self.skip))
    }

    /// Moves `n` bytes forward without yielding them.
    fn advance(&mut self, n: u64) -> Result<(), Truncated> {
        if n > self.remaining {
            return Err(truncated(n, self.remaining));
        }
        self.skip = self.skip.saturating_add(n);
        self.remaining -= n;
        Ok(())
    }
}

impl Iterator for SegmentPieces<'_> {
    type Item = Segment;

    #[inline]
    fn next(&mut self) -> Option<Segment> {
        // `next_piece` without a size cap: a yielded piece either ends its segment or ends the
        // range, so the walk always moves on to the next segment (fewer branches on the data
        // path, where every request's iovecs are built here).
        while self.remaining > 0 {
            let (seg, rest) = self.segments.split_first()?;
            self.segments = rest;
            let seg_len = u64::from(seg.len);
            if self.skip >= seg_len {
                self.skip -= seg_len;
                continue;
            }
            let offset = self.skip;
            self.skip = 0;
            let len = (seg_len - offset).min(self.remaining);
            self.remaining -= len;
            // As in `next_piece`.
            return Some(Segment {
                guest_addr: seg.guest_addr.saturating_add(offset),
                host_addr: seg.host_addr.saturating_add(offset),
                len: len as u32,
                direction: seg.direction,
            });
        }
        None
    }
}

/// Copies bytes out of a [`SegmentRange`]'s guest memory, front to back.
#[derive(Debug, Clone)]
pub struct SegmentReader<'s> {
    cursor: SegmentPieces<'s>,
}

impl SegmentReader<'_> {
    /// Bytes not yet read.
    #[inline]
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining
    }

    /// Skips `n` bytes; fails (moving nothing) if fewer remain.
    pub fn skip(&mut self, n: u64) -> Result<(), Truncated> {
        self.cursor.advance(n)
    }

    /// Fills `buf`; fails with [`SegmentIoError::Truncated`] before copying anything if fewer
    /// than `buf.len()` bytes remain.
    #[inline]
    pub fn read_exact<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), SegmentIoError> {
        // The common case, a header inside one segment, in one read.
        if let Some(addr) = self.cursor.within_first(buf.len()) {
            mem.read(addr, buf)?;
            return self.skip(buf.len() as u64).map_err(SegmentIoError::from);
        }
        self.cursor.copy_exact(buf.len(), |addr, range| {
            mem.read(addr, buf.get_mut(range).unwrap_or(&mut []))
        })
    }

    /// Copies as many bytes as remain, up to `buf.len()`, into the front of `buf`; returns how
    /// many. On a memory error the pieces before the failing one were copied and consumed; the
    /// reader stands at the failing piece.
    pub fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<usize, MemError> {
        self.cursor.copy(buf.len(), |addr, range| {
            mem.read(addr, buf.get_mut(range).unwrap_or(&mut []))
        })
    }
}

/// Copies bytes into a [`SegmentRange`]'s guest memory, front to back.
#[derive(Debug, Clone)]
pub struct SegmentWriter<'s> {
    cursor: SegmentPieces<'s>,
}

impl SegmentWriter<'_> {
    /// Bytes not yet written.
    #[inline]
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining
    }

    /// Skips `n` bytes (leaves them as they are); fails (moving nothing) if fewer remain.
    pub fn skip(&mut self, n: u64) -> Result<(), Truncated> {
        self.cursor.advance(n)
    }

    /// Writes all of `data`; fails with [`SegmentIoError::Truncated`] before writing anything if
    /// fewer than `data.len()` bytes remain.
    pub fn write_all<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        data: &[u8],
    ) -> Result<(), SegmentIoError> {
        self.cursor.copy_exact(data.len(), |addr, range| {
            mem.write(addr, data.get(range).unwrap_or(&[]))
        })
    }

    /// Writes as much of `data` as fits; returns how many bytes. On a memory error the pieces
    /// before the failing one were written and consumed; the writer stands at the failing piece.
    pub fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        data: &[u8],
    ) -> Result<usize, MemError> {
        self.cursor.copy(data.len(), |addr, range| {
            mem.write(addr, data.get(range).unwrap_or(&[]))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{ByteMemory, Direction};
    use std::vec::Vec;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            guest_addr: addr,
            host_addr: 0x7f00_0000 + addr,
            len,
            direction: Direction::DeviceReadable,
        }
    }

    fn pieces(r: SegmentRange<'_>) -> Vec<(u64, u32)> {
        r.iter().map(|s| (s.guest_addr, s.len)).collect()
    }

    #[test]
    fn ranges_trim_segments_and_skip_empty_ones() {
        let segs = [seg(0x100, 4), seg(0x200, 0), seg(0x300, 10), seg(0x400, 6)];
        let whole = SegmentRange::whole(&segs);
        assert_eq!(whole.len(), 20);
        assert_eq!(
            pieces(whole),
            [(0x100, 4), (0x300, 10), (0x400, 6)],
            "empty segments are never yielded"
        );
        assert_eq!(pieces(whole.sub(4, 10).unwrap()), [(0x300, 10)]);
        assert_eq!(pieces(whole.sub(2, 4).unwrap()), [(0x102, 2), (0x300, 2)]);
        assert_eq!(pieces(whole.tail(13).unwrap()), [(0x309, 1), (0x400, 6)]);
        assert_eq!(pieces(whole.sub(3, 0).unwrap()), []);
        assert_eq!(pieces(whole.take(5)), [(0x100, 4), (0x300, 1)]);
        let inner = whole.sub(2, 12).unwrap().sub(3, 9).unwrap();
        assert_eq!(pieces(inner), [(0x301, 9)]);
        assert_eq!(inner.iter().next().unwrap().host_addr, 0x7f00_0301);
        assert_eq!(SegmentRange::new(&segs, 20, 0).map(|r| r.len()), Ok(0));
    }

    #[test]
    fn ranges_past_the_segments_are_refused() {
        let segs = [seg(0x100, 4), seg(0x300, 10)];
        assert_eq!(
            SegmentRange::new(&segs, 10, 5),
            Err(Truncated {
                needed: 15,
                got: 14
            })
        );
        assert!(SegmentRange::new(&segs, u64::MAX, 2).is_err());
        assert!(SegmentRange::whole(&segs).tail(15).is_err());
        let mut pieces = SegmentRange::new(&segs, 1, 13).unwrap().iter();
        assert_eq!(pieces.remaining(), 13);
        pieces.next();
        assert_eq!(pieces.remaining(), 10);
    }

    #[test]
    fn an_unchecked_range_longer_than_its_segments_ends_early() {
        let segs = [seg(0x100, 4)];
        let r = SegmentRange::new_unchecked(&segs, 2, 100);
        assert_eq!(pieces(r), [(0x102, 2)]);
        let mut ram = [0u8; 0x10];
        let mem = ByteMemory::new(0x100, 0, &mut ram);
        let mut buf = [0u8; 3];
        assert_eq!(
            r.reader().read_exact(&mem, &mut buf),
            Err(SegmentIoError::Truncated(Truncated { needed: 3, got: 2 }))
        );
        assert_eq!(r.writer().write(&mem, &[1, 2, 3]), Ok(2));
    }

    #[test]
    fn reader_and_writer_copy_across_segments() {
        let mut ram = [0u8; 0x40];
        let mem = ByteMemory::new(0x1000, 0, &mut ram);
        let segs = [
            seg(0x1000, 3),
            seg(0x1010, 0),
            seg(0x1020, 5),
            seg(0x1030, 8),
        ];
        let whole = SegmentRange::whole(&segs);
        let mut w = whole.writer();
        w.skip(1).unwrap();
        w.write_all(&mem, &[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(w.remaining(), 10);
        assert_eq!(
            w.write_all(&mem, &[0; 11]),
            Err(SegmentIoError::Truncated(Truncated {
                needed: 11,
                got: 10
            })),
            "nothing is written when it would not fit"
        );
        assert_eq!(w.write(&mem, &[9; 11]), Ok(10));
        assert_eq!(w.remaining(), 0);
        let mut raw = [0u8; 0x40];
        mem.read(0x1000, &mut raw).unwrap();
        assert_eq!(raw[..3], [0, 1, 2]);
        assert_eq!(raw[0x20..0x25], [3, 4, 5, 9, 9]);
        assert_eq!(raw[0x30..0x38], [9; 8]);

        let mut r = whole.sub(2, 6).unwrap().reader();
        let mut two = [0u8; 2];
        r.read_exact(&mem, &mut two).unwrap();
        assert_eq!(two, [2, 3]);
        assert!(r.skip(5).is_err());
        r.skip(1).unwrap();
        let mut rest = [0u8; 8];
        assert_eq!(r.read(&mem, &mut rest), Ok(3));
        assert_eq!(rest[..3], [5, 9, 9]);
        assert_eq!(r.read(&mem, &mut rest), Ok(0));
    }

    #[test]
    fn a_memory_error_stops_the_copy_after_what_was_done() {
        let mut ram = [0u8; 0x10];
        let mem = ByteMemory::new(0x1000, 0, &mut ram);
        let segs = [seg(0x1000, 4), seg(0x9000, 4)];
        let whole = SegmentRange::whole(&segs);
        let mut w = whole.writer();
        assert_eq!(
            w.write_all(&mem, &[7; 6]),
            Err(SegmentIoError::Memory(MemError::Unmapped {
                addr: 0x9000,
                len: 2
            }))
        );
        assert_eq!(w.remaining(), 4, "the first piece was written");
        let mut back = [0u8; 4];
        mem.read(0x1000, &mut back).unwrap();
        assert_eq!(back, [7; 4]);
    }
}
