//! Helpers every bdev module shares: the block sizes rvhost exports and the checks of an I/O
//! against its device.

use super::{BdevError, BdevIo, IoVec};

/// Smallest logical block size a bdev exports.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest logical block size accepted (64 KiB: Linux guests need a block no larger than a page).
pub const MAX_BLOCK_SIZE: u32 = 65536;

/// Checks that `block_size` is a power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
pub fn check_block_size(block_size: u32) -> Result<(), BdevError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(BdevError::InvalidParams(format!(
            "block_size {block_size} must be a power of two from {MIN_BLOCK_SIZE} to \
             {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// The byte range `(start, len)` of the device an I/O touches, after checking it against the
/// device's `num_blocks` of `block_size` bytes.
pub fn byte_range(
    io: &BdevIo<'_>,
    num_blocks: u64,
    block_size: u32,
) -> Result<(u64, u64), BdevError> {
    let out_of_range = || BdevError::OutOfRange {
        offset: io.offset_blocks,
        count: io.num_blocks,
        capacity: num_blocks,
    };
    let end = io
        .offset_blocks
        .checked_add(io.num_blocks)
        .ok_or_else(out_of_range)?;
    if end > num_blocks {
        return Err(out_of_range());
    }
    let bs = u64::from(block_size);
    let start = io.offset_blocks.checked_mul(bs).ok_or_else(out_of_range)?;
    let len = io.num_blocks.checked_mul(bs).ok_or_else(out_of_range)?;
    Ok((start, len))
}

/// Checks that the data buffers of a read or write add up to exactly `len` bytes.
pub fn check_iovs(io: &BdevIo<'_>, len: u64, capacity: u64) -> Result<(), BdevError> {
    let total = io
        .iovs
        .iter()
        .try_fold(0u64, |sum, iov: &IoVec| sum.checked_add(u64::from(iov.len)));
    if total == Some(len) {
        Ok(())
    } else {
        Err(BdevError::OutOfRange {
            offset: io.offset_blocks,
            count: io.num_blocks,
            capacity,
        })
    }
}
