//! Guest memory as a device backend sees it.
//!
//! The backend never holds a Rust reference into guest memory: the guest owns it and may write it
//! concurrently, so a `&[u8]` into it would be a data race and an invitation to
//! time-of-check/time-of-use bugs. Instead, headers are *copied out* through [`GuestMemory::read`]
//! and data buffers are handed on as validated [`Segment`]s: a guest address, the host address it
//! maps to, and a length, for a backend to DMA into or copy through code that is allowed `unsafe`.

use core::cell::Cell;
use core::sync::atomic::Ordering;

/// An error translating or accessing a guest address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemError {
    /// Part of `[addr, addr + len)` lies outside every mapped region, or the range straddles two
    /// regions (a backend must be able to treat every segment as one contiguous host range).
    Unmapped {
        /// First guest address of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: u64,
    },
    /// `addr + len` overflows the 64-bit guest address space.
    Overflow,
    /// An atomic access was not naturally aligned.
    Misaligned {
        /// The offending guest address.
        addr: u64,
    },
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            MemError::Unmapped { addr, len } => {
                write!(
                    f,
                    "guest range {addr:#x}+{len:#x} is not inside one mapped region"
                )
            }
            MemError::Overflow => f.write_str("guest address range overflows"),
            MemError::Misaligned { addr } => write!(f, "atomic access at {addr:#x} is misaligned"),
        }
    }
}

impl core::error::Error for MemError {}

/// Whether the device reads a buffer (driver → device) or writes it (device → driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device only reads this buffer (descriptor without `VIRTQ_DESC_F_WRITE`).
    DeviceReadable,
    /// The device writes this buffer (descriptor with `VIRTQ_DESC_F_WRITE`).
    DeviceWritable,
}

/// A validated, contiguous piece of a guest buffer.
///
/// `host_addr..host_addr + len` is guaranteed (by the [`GuestMemory`] that produced it) to lie inside
/// one mapping that is valid for as long as that memory table is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Host virtual address of the first byte, for zero-copy I/O.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Who writes this buffer.
    pub direction: Direction,
}

impl Segment {
    /// The guest address one past the last byte (cannot overflow: it was checked at translation).
    pub fn guest_end(&self) -> u64 {
        self.guest_addr.saturating_add(u64::from(self.len))
    }
}

/// Access to a guest's memory, by guest physical address.
///
/// Every method checks that the whole range lies inside *one* mapped region, using checked
/// arithmetic (an unchecked `addr + len` was CVE-2018-1059). Implementations: the Linux target maps
/// vhost-user memory tables; [`ByteMemory`] serves tests, fuzzing and benchmarks.
pub trait GuestMemory {
    /// Translates `[addr, addr + len)` to the host address of its first byte.
    ///
    /// A zero-length range is valid if `addr` itself is mapped or is the end of a region.
    fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError>;

    /// Copies `buf.len()` bytes starting at `addr` out of guest memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Copies `buf` into guest memory at `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError>;

    /// Copies the `N` bytes starting at `addr` out of guest memory: [`GuestMemory::read`] for a
    /// size known at compile time (a request header), which an implementation can do with a few
    /// inlined moves instead of a call and a `memcpy`.
    #[inline]
    fn read_array<const N: usize>(&self, addr: u64) -> Result<[u8; N], MemError> {
        let mut buf = [0u8; N];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    /// Copies `bytes` into guest memory at `addr`: [`GuestMemory::write`] for a size known at
    /// compile time (a status byte, a used element, a response), inlinable as `read_array` is.
    #[inline]
    fn write_array<const N: usize>(&self, addr: u64, bytes: &[u8; N]) -> Result<(), MemError> {
        self.write(addr, bytes)
    }

    /// Loads the naturally aligned little-endian `u16` at `addr` as one atomic access.
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemError>;

    /// Stores `val` as little-endian to the naturally aligned `u16` at `addr` as one atomic access.
    fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemError>;

    /// A hint that the byte at `addr` will soon be read (or, with `write`, written): an
    /// implementation may start moving its cache line towards this core. It never fails and has
    /// no visible effect; an unmapped `addr` is ignored. The default does nothing.
    #[inline]
    fn prefetch(&self, addr: u64, write: bool) {
        let _ = (addr, write);
    }
}

impl<M: GuestMemory + ?Sized> GuestMemory for &M {
    fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError> {
        (**self).translate(addr, len)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        (**self).write(addr, buf)
    }
    #[inline]
    fn read_array<const N: usize>(&self, addr: u64) -> Result<[u8; N], MemError> {
        (**self).read_array(addr)
    }
    #[inline]
    fn write_array<const N: usize>(&self, addr: u64, bytes: &[u8; N]) -> Result<(), MemError> {
        (**self).write_array(addr, bytes)
    }
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemError> {
        (**self).load_u16(addr, order)
    }
    fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemError> {
        (**self).store_u16(addr, val, order)
    }
    #[inline]
    fn prefetch(&self, addr: u64, write: bool) {
        (**self).prefetch(addr, write)
    }
}

/// One region of guest memory backed by a byte slice, for tests, fuzzing and benchmarks.
///
/// Guest addresses `base..base + len` map to "host addresses" `host_base..host_base + len`, which
/// are plain numbers here (offsets for a test to check), not pointers.
#[derive(Debug)]
pub struct ByteMemory<'a> {
    base: u64,
    host_base: u64,
    bytes: &'a [Cell<u8>],
}

impl<'a> ByteMemory<'a> {
    /// Guest memory `[base, base + bytes.len())` over `bytes`; host addresses start at `host_base`.
    pub fn new(base: u64, host_base: u64, bytes: &'a mut [u8]) -> Self {
        ByteMemory {
            base,
            host_base,
            bytes: Cell::from_mut(bytes).as_slice_of_cells(),
        }
    }

    /// The guest address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The size of the region in bytes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The cells backing `[addr, addr + len)`, or why that range is not mapped.
    fn range(&self, addr: u64, len: u64) -> Result<&'a [Cell<u8>], MemError> {
        let end = addr.checked_add(len).ok_or(MemError::Overflow)?;
        let unmapped = MemError::Unmapped { addr, len };
        let start = addr.checked_sub(self.base).ok_or(unmapped)?;
        let stop = end.checked_sub(self.base).ok_or(unmapped)?;
        if stop > self.len() {
            return Err(unmapped);
        }
        let start = usize::try_from(start).map_err(|_| unmapped)?;
        let stop = usize::try_from(stop).map_err(|_| unmapped)?;
        self.bytes.get(start..stop).ok_or(unmapped)
    }
}

impl GuestMemory for ByteMemory<'_> {
    fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError> {
        self.range(addr, len)?;
        // `addr >= base` and `addr - base <= len()` were checked by `range`.
        let offset = addr - self.base;
        self.host_base.checked_add(offset).ok_or(MemError::Overflow)
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let cells = self.range(addr, buf.len() as u64)?;
        for (dst, src) in buf.iter_mut().zip(cells) {
            *dst = src.get();
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        let cells = self.range(addr, buf.len() as u64)?;
        for (dst, src) in cells.iter().zip(buf) {
            dst.set(*src);
        }
        Ok(())
    }

    fn load_u16(&self, addr: u64, _order: Ordering) -> Result<u16, MemError> {
        if addr % 2 != 0 {
            return Err(MemError::Misaligned { addr });
        }
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn store_u16(&self, addr: u64, val: u16, _order: Ordering) -> Result<(), MemError> {
        if addr % 2 != 0 {
            return Err(MemError::Misaligned { addr });
        }
        self.write(addr, &val.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_memory_checks_every_range() {
        let mut buf = [0u8; 64];
        let mem = ByteMemory::new(0x1000, 0x7f00_0000, &mut buf);
        assert_eq!(mem.translate(0x1000, 64), Ok(0x7f00_0000));
        assert_eq!(mem.translate(0x1010, 0), Ok(0x7f00_0010));
        assert_eq!(mem.translate(0x1040, 0), Ok(0x7f00_0040));
        assert_eq!(
            mem.translate(0x1001, 64),
            Err(MemError::Unmapped {
                addr: 0x1001,
                len: 64
            })
        );
        assert_eq!(
            mem.translate(0xfff, 1),
            Err(MemError::Unmapped {
                addr: 0xfff,
                len: 1
            })
        );
        assert_eq!(mem.translate(u64::MAX, 2), Err(MemError::Overflow));
        mem.write(0x1002, &[1, 2, 3]).unwrap();
        let mut out = [0u8; 4];
        mem.read(0x1001, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3]);
        assert_eq!(mem.load_u16(0x1002, Ordering::Acquire), Ok(0x0201));
        assert_eq!(
            mem.load_u16(0x1003, Ordering::Acquire),
            Err(MemError::Misaligned { addr: 0x1003 })
        );
        mem.store_u16(0x103e, 0xbeef, Ordering::Release).unwrap();
        assert_eq!(
            mem.store_u16(0x1040, 0, Ordering::Release),
            Err(MemError::Unmapped {
                addr: 0x1040,
                len: 2
            })
        );
    }
}
