//! The wire toolkit every parser in this crate is built from: one truncation error and one set of
//! checked field accessors over byte buffers.
//!
//! The shape follows smoltcp's `wire` module: each structure has a zero-copy view
//! (`Foo<T: AsRef<[u8]>>`) built by `new_checked`, which checks the length once with
//! [`check_len`] and fails with [`Truncated`]; its accessors read fixed fields (a field is a
//! `Range<usize>` of byte offsets, or one offset for a byte) with the functions here; a plain
//! `FooRepr` has `parse` (view → values) and `emit` (values → view).
//!
//! No function here panics, whatever the buffer: a getter whose field lies outside the buffer
//! returns zero and a setter does nothing. After `new_checked` that cannot happen for a fixed
//! field, so the fallback costs one compare and never changes an answer; for data whose length is
//! not checked up front (parameter lists, sense bytes), use [`array`](fn@array) or `slice::get`, which say
//! `None` instead of guessing.

use core::fmt;
use core::ops::Range;

/// A buffer too short for the wire structure it should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// Bytes needed.
    pub needed: usize,
    /// Bytes available.
    pub got: usize,
}

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "buffer of {} bytes, need {}", self.got, self.needed)
    }
}

impl core::error::Error for Truncated {}

/// Checks that `buf` holds at least `needed` bytes.
#[inline]
pub fn check_len(buf: &[u8], needed: usize) -> Result<(), Truncated> {
    if buf.len() < needed {
        return Err(Truncated {
            needed,
            got: buf.len(),
        });
    }
    Ok(())
}

/// The `N` bytes at `at..at + N`, or `None` if they are not all inside `buf`.
#[inline]
pub fn array<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    let end = at.checked_add(N)?;
    buf.get(at..end)?.try_into().ok()
}

/// The bytes of `field` as an array; zeros if the field is outside `buf` or not `N` bytes wide.
#[inline]
pub fn field<const N: usize>(buf: &[u8], field: Range<usize>) -> [u8; N] {
    buf.get(field)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .unwrap_or([0; N])
}

/// Byte `at`, or 0 outside `buf`.
#[inline]
pub fn byte(buf: &[u8], at: usize) -> u8 {
    buf.get(at).copied().unwrap_or(0)
}

/// The little-endian `u16` in `field` (0 outside `buf`).
#[inline]
pub fn le_u16(buf: &[u8], f: Range<usize>) -> u16 {
    u16::from_le_bytes(field(buf, f))
}

/// The little-endian `u32` in `field` (0 outside `buf`).
#[inline]
pub fn le_u32(buf: &[u8], f: Range<usize>) -> u32 {
    u32::from_le_bytes(field(buf, f))
}

/// The little-endian `u64` in `field` (0 outside `buf`).
#[inline]
pub fn le_u64(buf: &[u8], f: Range<usize>) -> u64 {
    u64::from_le_bytes(field(buf, f))
}

/// The big-endian `u16` in `field` (0 outside `buf`).
#[inline]
pub fn be_u16(buf: &[u8], f: Range<usize>) -> u16 {
    u16::from_be_bytes(field(buf, f))
}

/// The big-endian `u32` in `field` (0 outside `buf`).
#[inline]
pub fn be_u32(buf: &[u8], f: Range<usize>) -> u32 {
    u32::from_be_bytes(field(buf, f))
}

/// The big-endian `u64` in `field` (0 outside `buf`).
#[inline]
pub fn be_u64(buf: &[u8], f: Range<usize>) -> u64 {
    u64::from_be_bytes(field(buf, f))
}

/// The big-endian unsigned integer of any width in `field` (0 outside `buf`); a field wider than
/// 8 bytes keeps its last 8 bytes, as shifting them all in would. SCSI has 3-byte fields (the LBA
/// of READ(6)) next to 2-, 4- and 8-byte ones.
#[inline]
pub fn be_uint(buf: &[u8], f: Range<usize>) -> u64 {
    let Some(bytes) = buf.get(f) else { return 0 };
    // One byte-swapped load instead of a shift per byte (every READ/WRITE CDB decodes two).
    let tail = bytes.get(bytes.len().saturating_sub(8)..).unwrap_or(&[]);
    let mut word = [0u8; 8];
    if let Some(dst) = word.get_mut(8 - tail.len()..) {
        dst.copy_from_slice(tail);
    }
    u64::from_be_bytes(word)
}

/// Copies `value` into `field`; does nothing if the field is outside `buf` or not as wide as
/// `value`.
#[inline]
pub fn set(buf: &mut [u8], field: Range<usize>, value: &[u8]) {
    if let Some(dst) = buf.get_mut(field) {
        if dst.len() == value.len() {
            dst.copy_from_slice(value);
        }
    }
}

/// Sets byte `at`; does nothing outside `buf`.
#[inline]
pub fn set_byte(buf: &mut [u8], at: usize, value: u8) {
    if let Some(dst) = buf.get_mut(at) {
        *dst = value;
    }
}

/// Copies as much of `src` as fits into `dst` and returns how many bytes that was.
#[inline]
pub fn copy_prefix(dst: &mut [u8], src: &[u8]) -> usize {
    let n = dst.len().min(src.len());
    if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_read_their_field_and_never_panic() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le_u16(&b, 0..2), 0x0201);
        assert_eq!(be_u16(&b, 0..2), 0x0102);
        assert_eq!(le_u32(&b, 1..5), 0x0504_0302);
        assert_eq!(be_u32(&b, 1..5), 0x0203_0405);
        assert_eq!(le_u64(&b, 1..9), 0x0908_0706_0504_0302);
        assert_eq!(be_u64(&b, 0..8), 0x0102_0304_0506_0708);
        assert_eq!(be_uint(&b, 0..3), 0x01_0203);
        assert_eq!(
            be_uint(&b, 0..9),
            0x0203_0405_0607_0809,
            "last 8 bytes of a wide field"
        );
        assert_eq!(be_uint(&b, 3..3), 0);
        assert_eq!(byte(&b, 8), 9);
        // Outside the buffer, or the wrong width: zero, never a panic.
        assert_eq!(le_u32(&b, 7..11), 0);
        assert_eq!(le_u32(&b, 0..2), 0, "a 2-byte field is not a u32");
        assert_eq!(be_uint(&b, 5..20), 0);
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 5..2;
        assert_eq!(be_u16(&b, backwards), 0);
        assert_eq!(byte(&b, 9), 0);
        assert_eq!(byte(&b, usize::MAX), 0);
        assert_eq!(array::<4>(&b, 5), Some([6, 7, 8, 9]));
        assert_eq!(array::<4>(&b, 6), None);
        assert_eq!(array::<2>(&b, usize::MAX), None);
    }

    #[test]
    fn setters_write_their_field_and_never_panic() {
        let mut b = [0u8; 6];
        set(&mut b, 1..3, &0xbeefu16.to_le_bytes());
        set_byte(&mut b, 5, 0x55);
        assert_eq!(b, [0, 0xef, 0xbe, 0, 0, 0x55]);
        set(&mut b, 4..8, &[9; 4]);
        set(&mut b, 0..2, &[9; 3]);
        set_byte(&mut b, 6, 9);
        assert_eq!(
            b,
            [0, 0xef, 0xbe, 0, 0, 0x55],
            "out-of-range writes change nothing"
        );
        let mut small = [0u8; 2];
        assert_eq!(copy_prefix(&mut small, &[1, 2, 3]), 2);
        assert_eq!(small, [1, 2]);
        assert_eq!(copy_prefix(&mut b, &[7]), 1);
        assert_eq!(b[0], 7);
    }

    #[test]
    fn check_len_reports_what_is_missing() {
        assert_eq!(check_len(&[0; 4], 4), Ok(()));
        assert_eq!(check_len(&[0; 3], 4), Err(Truncated { needed: 4, got: 3 }));
    }
}
