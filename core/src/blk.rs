//! virtio-blk (virtio 1.2 §5.2): request header, status, discard/write-zeroes ranges, the
//! configuration space, and decoding a walked descriptor chain into a [`BlkRequest`].
//!
//! Wire types follow the smoltcp `wire` pattern: a zero-copy view over bytes ([`BlkReqHeader`],
//! [`DiscardWriteZeroes`]) with field accessors, plus a plain `…Repr` with `parse`/`emit`.
//!
//! [`BlkRequest::decode`] reads everything a request needs out of guest memory exactly once (the
//! header and any discard/write-zeroes ranges), checks it against the device's limits, and leaves
//! the data buffers as a validated [`DataSegments`] range for zero-copy I/O. Its errors say whether a status
//! byte can still be written ([`BlkError::status_to_write`]).
//!
//! Serving one request, after [`crate::virtq::SplitQueue::walk_chain`] succeeded:
//!
//! ```
//! use core::sync::atomic::Ordering;
//! use rvhost_core::blk::{write_status, BlkLimits, BlkReqHeaderRepr, BlkRequest, BlkStatus};
//! use rvhost_core::mem::{ByteMemory, GuestMemory};
//! use rvhost_core::virtio::ring::VirtqDesc;
//! use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};
//!
//! let mut ram = vec![0u8; 0x1_0000];
//! let mem = ByteMemory::new(0, 0x7f00_0000_0000, &mut ram);
//! let config = QueueConfig { size: 16, desc_table: 0x0, avail_ring: 0x100, used_ring: 0x200 };
//! let mut queue = SplitQueue::new(config, 0)?;
//! // The driver: read sector 8 into 512 bytes at 0x2000; status byte at 0x3000.
//! let header = BlkReqHeaderRepr { request_type: 0, reserved: 0, sector: 8 };
//! mem.write(0x1000, &header.to_bytes())?;
//! mem.write(0x00, &VirtqDesc { addr: 0x1000, len: 16, flags: 1, next: 1 }.to_bytes())?;
//! mem.write(0x10, &VirtqDesc { addr: 0x2000, len: 512, flags: 3, next: 2 }.to_bytes())?;
//! mem.write(0x20, &VirtqDesc { addr: 0x3000, len: 1, flags: 2, next: 0 }.to_bytes())?;
//! mem.store_u16(0x102, 1, Ordering::Release)?; // avail.ring[0] is already head 0
//!
//! let limits = BlkLimits { capacity: 2048, read_only: false, discard: None, write_zeroes: None };
//! let mut chain: Chain<128> = Chain::new();
//! let head = queue.pop_head(&mem)?.expect("one request");
//! queue.walk_chain(&mem, head, &mut chain)?;
//! match BlkRequest::<16>::decode(&mem, &chain, &limits) {
//!     Ok(request) => {
//!         for segment in request.data.iter() {
//!             // Submit I/O for request.sector into segment.host_addr..+segment.len; on completion:
//!             let _ = segment;
//!         }
//!         write_status(&mem, request.status_addr, BlkStatus::Ok)?;
//!         queue.push_used(&mem, request.head, request.used_len_ok())?;
//!     }
//!     Err(error) => match error.status_to_write() {
//!         Some((status_addr, status)) => {
//!             write_status(&mem, status_addr, status)?;
//!             queue.push_used(&mem, chain.head(), 1)?;
//!         }
//!         None => { /* nowhere to report: set DEVICE_NEEDS_RESET */ }
//!     },
//! }
//! queue.publish_used(&mem)?;
//! assert_eq!(mem.load_u16(0x202, Ordering::Acquire)?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::ops::Range;

use heapless::Vec;

use crate::mem::{Direction, GuestMemory, MemError};
use crate::segments::{SegmentIoError, SegmentPieces, SegmentRange, SegmentReader};
use crate::virtio::has_feature;
use crate::virtq::Chain;
pub use crate::wire::Truncated;
use crate::wire::{check_len, copy_prefix, le_u32, le_u64, set};

/// Bytes per virtio-blk sector; `sector` fields always count 512-byte units, whatever `blk_size` is.
pub const SECTOR_SIZE: u32 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the `GET_ID` answer (a serial string, NUL-padded, not necessarily NUL-terminated).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// In a write-zeroes range: the device may deallocate the range instead of writing zeroes.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// virtio-blk feature bit numbers (virtio 1.2 §5.2.3); use with [`crate::virtio::bit`].
pub mod feature {
    /// `size_max` is valid: the largest single segment.
    pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
    /// `seg_max` is valid: the most data segments per request.
    pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
    /// `geometry` is valid.
    pub const VIRTIO_BLK_F_GEOMETRY: u32 = 4;
    /// The device is read-only.
    pub const VIRTIO_BLK_F_RO: u32 = 5;
    /// `blk_size` is valid.
    pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
    /// The FLUSH command is supported (legacy name: WCE).
    pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
    /// The topology fields are valid.
    pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
    /// The driver may toggle `writeback`.
    pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
    /// More than one request queue (`num_queues`).
    pub const VIRTIO_BLK_F_MQ: u32 = 12;
    /// The DISCARD command is supported.
    pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
    /// The WRITE_ZEROES command is supported.
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
    /// The GET_LIFETIME command is supported.
    pub const VIRTIO_BLK_F_LIFETIME: u32 = 15;
    /// The SECURE_ERASE command is supported.
    pub const VIRTIO_BLK_F_SECURE_ERASE: u32 = 16;
    /// The device is a zoned block device.
    pub const VIRTIO_BLK_F_ZONED: u32 = 17;
}

/// Request type codes (the header's `type` field).
pub mod request_type {
    /// Read from the device.
    pub const VIRTIO_BLK_T_IN: u32 = 0;
    /// Write to the device.
    pub const VIRTIO_BLK_T_OUT: u32 = 1;
    /// Flush the volatile write cache.
    pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
    /// Read the device ID string.
    pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
    /// Read device lifetime information.
    pub const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
    /// Discard ranges.
    pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
    /// Write zeroes to ranges.
    pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
    /// Securely erase ranges.
    pub const VIRTIO_BLK_T_SECURE_ERASE: u32 = 14;
}

/// The status byte a device writes at the end of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlkStatus {
    /// Success.
    Ok = 0,
    /// Device or driver error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
}

impl BlkStatus {
    /// The byte written to the guest.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Writes `status` to the request's status byte at `status_addr`.
pub fn write_status<M: GuestMemory + ?Sized>(
    mem: &M,
    status_addr: u64,
    status: BlkStatus,
) -> Result<(), MemError> {
    mem.write_array(status_addr, &[status.as_u8()])
}

mod hdr_field {
    use core::ops::Range;
    pub const TYPE: Range<usize> = 0..4;
    pub const RESERVED: Range<usize> = 4..8;
    pub const SECTOR: Range<usize> = 8..16;
}

/// A zero-copy view of `struct virtio_blk_req`'s 16-byte header (`type`, `reserved`, `sector`).
#[derive(Debug, Clone, Copy)]
pub struct BlkReqHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> BlkReqHeader<T> {
    /// Size of the header on the wire.
    pub const LEN: usize = 16;

    /// A view over `buffer`, which must hold at least [`Self::LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        check_len(buffer.as_ref(), Self::LEN)?;
        Ok(BlkReqHeader { buffer })
    }

    /// The request type (`VIRTIO_BLK_T_*`).
    pub fn request_type(&self) -> u32 {
        le_u32(self.buffer.as_ref(), hdr_field::TYPE)
    }

    /// The reserved field (legacy `ioprio`).
    pub fn reserved(&self) -> u32 {
        le_u32(self.buffer.as_ref(), hdr_field::RESERVED)
    }

    /// The first 512-byte sector of the request.
    pub fn sector(&self) -> u64 {
        le_u64(self.buffer.as_ref(), hdr_field::SECTOR)
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> BlkReqHeader<T> {
    /// Sets the request type.
    pub fn set_request_type(&mut self, v: u32) {
        set(self.buffer.as_mut(), hdr_field::TYPE, &v.to_le_bytes());
    }

    /// Sets the reserved field.
    pub fn set_reserved(&mut self, v: u32) {
        set(self.buffer.as_mut(), hdr_field::RESERVED, &v.to_le_bytes());
    }

    /// Sets the sector.
    pub fn set_sector(&mut self, v: u64) {
        set(self.buffer.as_mut(), hdr_field::SECTOR, &v.to_le_bytes());
    }
}

/// The virtio-blk request header as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkReqHeaderRepr {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: u32,
    /// Reserved (legacy `ioprio`); ignored by the device.
    pub reserved: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

impl BlkReqHeaderRepr {
    /// Reads the header out of a view.
    pub fn parse<T: AsRef<[u8]>>(hdr: &BlkReqHeader<T>) -> Self {
        BlkReqHeaderRepr {
            request_type: hdr.request_type(),
            reserved: hdr.reserved(),
            sector: hdr.sector(),
        }
    }

    /// Writes the header into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, hdr: &mut BlkReqHeader<T>) {
        hdr.set_request_type(self.request_type);
        hdr.set_reserved(self.reserved);
        hdr.set_sector(self.sector);
    }

    /// The header's 16 wire bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let mut view = BlkReqHeader { buffer: &mut b[..] };
        self.emit(&mut view);
        b
    }
}

mod dwz_field {
    use core::ops::Range;
    pub const SECTOR: Range<usize> = 0..8;
    pub const NUM_SECTORS: Range<usize> = 8..12;
    pub const FLAGS: Range<usize> = 12..16;
}

/// A zero-copy view of one 16-byte `struct virtio_blk_discard_write_zeroes` range.
#[derive(Debug, Clone, Copy)]
pub struct DiscardWriteZeroes<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> DiscardWriteZeroes<T> {
    /// Size of one range on the wire.
    pub const LEN: usize = 16;

    /// A view over `buffer`, which must hold at least [`Self::LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        check_len(buffer.as_ref(), Self::LEN)?;
        Ok(DiscardWriteZeroes { buffer })
    }

    /// First sector of the range.
    pub fn sector(&self) -> u64 {
        le_u64(self.buffer.as_ref(), dwz_field::SECTOR)
    }

    /// Number of 512-byte sectors.
    pub fn num_sectors(&self) -> u32 {
        le_u32(self.buffer.as_ref(), dwz_field::NUM_SECTORS)
    }

    /// Flags (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`; every other bit is reserved).
    pub fn flags(&self) -> u32 {
        le_u32(self.buffer.as_ref(), dwz_field::FLAGS)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> DiscardWriteZeroes<T> {
    /// Sets the first sector.
    pub fn set_sector(&mut self, v: u64) {
        set(self.buffer.as_mut(), dwz_field::SECTOR, &v.to_le_bytes());
    }

    /// Sets the sector count.
    pub fn set_num_sectors(&mut self, v: u32) {
        set(
            self.buffer.as_mut(),
            dwz_field::NUM_SECTORS,
            &v.to_le_bytes(),
        );
    }

    /// Sets the flags.
    pub fn set_flags(&mut self, v: u32) {
        set(self.buffer.as_mut(), dwz_field::FLAGS, &v.to_le_bytes());
    }
}

/// One discard / write-zeroes range as plain values (flags not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardWriteZeroesRepr {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Raw flags.
    pub flags: u32,
}

impl DiscardWriteZeroesRepr {
    /// Reads a range out of a view.
    pub fn parse<T: AsRef<[u8]>>(v: &DiscardWriteZeroes<T>) -> Self {
        DiscardWriteZeroesRepr {
            sector: v.sector(),
            num_sectors: v.num_sectors(),
            flags: v.flags(),
        }
    }

    /// Writes the range into a view.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut DiscardWriteZeroes<T>) {
        v.set_sector(self.sector);
        v.set_num_sectors(self.num_sectors);
        v.set_flags(self.flags);
    }

    /// The range's 16 wire bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let mut view = DiscardWriteZeroes { buffer: &mut b[..] };
        self.emit(&mut view);
        b
    }
}

/// `struct virtio_blk_geometry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkGeometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// `struct virtio_blk_zoned_characteristics` (virtio 1.2; all zero for a non-zoned device).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkZonedCharacteristics {
    /// Zone size in sectors.
    pub zone_sectors: u32,
    /// Maximum open zones.
    pub max_open_zones: u32,
    /// Maximum active zones.
    pub max_active_zones: u32,
    /// Maximum sectors of a ZONE_APPEND.
    pub max_append_sectors: u32,
    /// Write granularity in bytes.
    pub write_granularity: u32,
    /// Zoned model (`VIRTIO_BLK_Z_*`).
    pub model: u8,
    /// Padding.
    pub unused2: [u8; 3],
}

/// The virtio-blk configuration space, `struct virtio_blk_config` (virtio 1.2 §5.2.4).
///
/// The `#[repr(C)]` layout is the wire layout (every field is naturally aligned, so it has no
/// padding); [`VirtioBlkConfig::emit`] writes each field little-endian at its `offset_of!`, so the
/// layout and the encoding cannot disagree. Tests check the offsets against the spec and against
/// `virtio-bindings`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioBlkConfig {
    /// Device size in 512-byte sectors.
    pub capacity: u64,
    /// Largest single segment in bytes (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: u32,
    /// Most data segments per request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: u32,
    /// Legacy disk geometry (`VIRTIO_BLK_F_GEOMETRY`).
    pub geometry: BlkGeometry,
    /// Logical block size in bytes (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: u32,
    /// log2(physical blocks per logical block) (`VIRTIO_BLK_F_TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size in blocks.
    pub opt_io_size: u32,
    /// 1 = write-back cache, 0 = write-through (`VIRTIO_BLK_F_CONFIG_WCE`).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Most sectors per discard range (`VIRTIO_BLK_F_DISCARD`).
    pub max_discard_sectors: u32,
    /// Most ranges per discard request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes range (`VIRTIO_BLK_F_WRITE_ZEROES`).
    pub max_write_zeroes_sectors: u32,
    /// Most ranges per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 if write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
    /// Most sectors per secure-erase range (`VIRTIO_BLK_F_SECURE_ERASE`).
    pub max_secure_erase_sectors: u32,
    /// Most ranges per secure-erase request.
    pub max_secure_erase_seg: u32,
    /// Secure-erase alignment in sectors.
    pub secure_erase_sector_alignment: u32,
    /// Zoned characteristics (`VIRTIO_BLK_F_ZONED`).
    pub zoned: BlkZonedCharacteristics,
}

/// Size of [`VirtioBlkConfig`] on the wire.
pub const CONFIG_LEN: usize = core::mem::size_of::<VirtioBlkConfig>();
const _: () = assert!(CONFIG_LEN == 96);

/// The largest configuration space a vhost-user frontend may ask for
/// (`VHOST_USER_MAX_CONFIG_SIZE`).
pub const MAX_CONFIG_ACCESS: usize = 256;

/// A configuration-space access outside what the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// `offset + len` overflows or exceeds [`MAX_CONFIG_ACCESS`].
    OutOfRange {
        /// First byte of the access.
        offset: u32,
        /// Length of the access.
        len: usize,
    },
    /// A write to a field the driver may not change.
    ReadOnlyField {
        /// First byte of the write.
        offset: u32,
    },
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ConfigError::OutOfRange { offset, len } => {
                write!(f, "config access {offset:#x}+{len:#x} is out of range")
            }
            ConfigError::ReadOnlyField { offset } => {
                write!(f, "config byte {offset:#x} is read-only")
            }
        }
    }
}

impl core::error::Error for ConfigError {}

macro_rules! cfg_put {
    ($buf:expr, $self:ident, $($field:ident).+) => {{
        let off = core::mem::offset_of!(VirtioBlkConfig, $($field).+);
        let bytes = $self.$($field).+.to_le_bytes();
        set($buf, off..off + bytes.len(), &bytes);
    }};
}

macro_rules! cfg_get {
    ($buf:expr, $ty:ty, $($field:ident).+) => {{
        let off = core::mem::offset_of!(VirtioBlkConfig, $($field).+);
        <$ty>::from_le_bytes($crate::wire::field($buf, off..off + core::mem::size_of::<$ty>()))
    }};
}

impl VirtioBlkConfig {
    /// Offset of the only driver-writable field, `writeback`.
    pub const WRITEBACK_OFFSET: usize = core::mem::offset_of!(VirtioBlkConfig, writeback);

    /// The configuration space's wire bytes.
    pub fn emit(&self, buf: &mut [u8; CONFIG_LEN]) {
        let b = &mut buf[..];
        b.fill(0);
        cfg_put!(b, self, capacity);
        cfg_put!(b, self, size_max);
        cfg_put!(b, self, seg_max);
        cfg_put!(b, self, geometry.cylinders);
        cfg_put!(b, self, geometry.heads);
        cfg_put!(b, self, geometry.sectors);
        cfg_put!(b, self, blk_size);
        cfg_put!(b, self, physical_block_exp);
        cfg_put!(b, self, alignment_offset);
        cfg_put!(b, self, min_io_size);
        cfg_put!(b, self, opt_io_size);
        cfg_put!(b, self, writeback);
        cfg_put!(b, self, num_queues);
        cfg_put!(b, self, max_discard_sectors);
        cfg_put!(b, self, max_discard_seg);
        cfg_put!(b, self, discard_sector_alignment);
        cfg_put!(b, self, max_write_zeroes_sectors);
        cfg_put!(b, self, max_write_zeroes_seg);
        cfg_put!(b, self, write_zeroes_may_unmap);
        cfg_put!(b, self, max_secure_erase_sectors);
        cfg_put!(b, self, max_secure_erase_seg);
        cfg_put!(b, self, secure_erase_sector_alignment);
        cfg_put!(b, self, zoned.zone_sectors);
        cfg_put!(b, self, zoned.max_open_zones);
        cfg_put!(b, self, zoned.max_active_zones);
        cfg_put!(b, self, zoned.max_append_sectors);
        cfg_put!(b, self, zoned.write_granularity);
        cfg_put!(b, self, zoned.model);
    }

    /// The configuration space's wire bytes as an array.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        self.emit(&mut b);
        b
    }

    /// Decodes a configuration space (padding is ignored).
    pub fn parse(buf: &[u8; CONFIG_LEN]) -> Self {
        let b = &buf[..];
        VirtioBlkConfig {
            capacity: cfg_get!(b, u64, capacity),
            size_max: cfg_get!(b, u32, size_max),
            seg_max: cfg_get!(b, u32, seg_max),
            geometry: BlkGeometry {
                cylinders: cfg_get!(b, u16, geometry.cylinders),
                heads: cfg_get!(b, u8, geometry.heads),
                sectors: cfg_get!(b, u8, geometry.sectors),
            },
            blk_size: cfg_get!(b, u32, blk_size),
            physical_block_exp: cfg_get!(b, u8, physical_block_exp),
            alignment_offset: cfg_get!(b, u8, alignment_offset),
            min_io_size: cfg_get!(b, u16, min_io_size),
            opt_io_size: cfg_get!(b, u32, opt_io_size),
            writeback: cfg_get!(b, u8, writeback),
            unused0: 0,
            num_queues: cfg_get!(b, u16, num_queues),
            max_discard_sectors: cfg_get!(b, u32, max_discard_sectors),
            max_discard_seg: cfg_get!(b, u32, max_discard_seg),
            discard_sector_alignment: cfg_get!(b, u32, discard_sector_alignment),
            max_write_zeroes_sectors: cfg_get!(b, u32, max_write_zeroes_sectors),
            max_write_zeroes_seg: cfg_get!(b, u32, max_write_zeroes_seg),
            write_zeroes_may_unmap: cfg_get!(b, u8, write_zeroes_may_unmap),
            unused1: [0; 3],
            max_secure_erase_sectors: cfg_get!(b, u32, max_secure_erase_sectors),
            max_secure_erase_seg: cfg_get!(b, u32, max_secure_erase_seg),
            secure_erase_sector_alignment: cfg_get!(b, u32, secure_erase_sector_alignment),
            zoned: BlkZonedCharacteristics {
                zone_sectors: cfg_get!(b, u32, zoned.zone_sectors),
                max_open_zones: cfg_get!(b, u32, zoned.max_open_zones),
                max_active_zones: cfg_get!(b, u32, zoned.max_active_zones),
                max_append_sectors: cfg_get!(b, u32, zoned.max_append_sectors),
                write_granularity: cfg_get!(b, u32, zoned.write_granularity),
                model: cfg_get!(b, u8, zoned.model),
                unused2: [0; 3],
            },
        }
    }

    /// Answers a configuration read of `out.len()` bytes at `offset` (vhost-user `GET_CONFIG`).
    ///
    /// Bytes past the end of this layout (a newer frontend's fields) read as zero, which every
    /// virtio-blk field defines as "not offered"; accesses past [`MAX_CONFIG_ACCESS`] fail.
    pub fn read(&self, offset: u32, out: &mut [u8]) -> Result<(), ConfigError> {
        let range = config_range(offset, out.len())?;
        let bytes = self.to_bytes();
        for (i, dst) in range.zip(out.iter_mut()) {
            *dst = bytes.get(i).copied().unwrap_or(0);
        }
        Ok(())
    }

    /// Applies a driver write (vhost-user `SET_CONFIG`): only `writeback` may change, and only if
    /// `VIRTIO_BLK_F_CONFIG_WCE` was negotiated (`wce_negotiated`).
    pub fn write(
        &mut self,
        offset: u32,
        data: &[u8],
        wce_negotiated: bool,
    ) -> Result<(), ConfigError> {
        let range = config_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if !wce_negotiated || range != (Self::WRITEBACK_OFFSET..Self::WRITEBACK_OFFSET + 1) {
            return Err(ConfigError::ReadOnlyField { offset });
        }
        if let Some(&v) = data.first() {
            self.writeback = u8::from(v != 0);
        }
        Ok(())
    }
}

fn config_range(offset: u32, len: usize) -> Result<Range<usize>, ConfigError> {
    let err = ConfigError::OutOfRange { offset, len };
    let start = usize::try_from(offset).map_err(|_| err)?;
    let end = start.checked_add(len).ok_or(err)?;
    if end > MAX_CONFIG_ACCESS {
        return Err(err);
    }
    Ok(start..end)
}

/// The limits one discard-like command is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLimits {
    /// Most sectors in one range.
    pub max_sectors: u32,
    /// Most ranges in one request.
    pub max_segments: u32,
}

/// What [`BlkRequest::decode`] checks requests against: the device as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkLimits {
    /// Device size in 512-byte sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes fail with IOERR.
    pub read_only: bool,
    /// DISCARD limits, `None` if `VIRTIO_BLK_F_DISCARD` was not negotiated.
    pub discard: Option<RangeLimits>,
    /// WRITE_ZEROES limits, `None` if `VIRTIO_BLK_F_WRITE_ZEROES` was not negotiated.
    pub write_zeroes: Option<RangeLimits>,
}

impl BlkLimits {
    /// The limits a driver that negotiated `features` was promised by `config`.
    pub fn from_config(config: &VirtioBlkConfig, features: u64) -> Self {
        BlkLimits {
            capacity: config.capacity,
            read_only: has_feature(features, feature::VIRTIO_BLK_F_RO),
            discard: has_feature(features, feature::VIRTIO_BLK_F_DISCARD).then_some(RangeLimits {
                max_sectors: config.max_discard_sectors,
                max_segments: config.max_discard_seg,
            }),
            write_zeroes: has_feature(features, feature::VIRTIO_BLK_F_WRITE_ZEROES).then_some(
                RangeLimits {
                    max_sectors: config.max_write_zeroes_sectors,
                    max_segments: config.max_write_zeroes_seg,
                },
            ),
        }
    }
}

/// What a decoded request asks the device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkRequestKind {
    /// Read `data_len` bytes at `sector` into the (device-writable) data segments.
    Read,
    /// Write the (device-readable) data segments at `sector`.
    Write,
    /// Flush the write cache.
    Flush,
    /// Write the device ID (up to [`VIRTIO_BLK_ID_BYTES`]) into the data segments.
    GetId,
    /// Discard the ranges.
    Discard,
    /// Write zeroes to the ranges.
    WriteZeroes,
}

/// One validated discard / write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors (within the device's per-range limit).
    pub num_sectors: u32,
    /// Write-zeroes only: the device may deallocate instead of writing zeroes.
    pub unmap: bool,
}

/// Why a request that still has a status byte was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkReject {
    /// The request type is unknown or not supported (UNSUPP).
    UnsupportedType(u32),
    /// DISCARD / WRITE_ZEROES without the feature negotiated (UNSUPP).
    NotNegotiated(u32),
    /// A write-like request on a read-only device (IOERR).
    ReadOnly,
    /// The data length is not a multiple of 512 (IOERR).
    UnalignedLength(u32),
    /// The request reaches past the device's capacity (IOERR).
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// Data in the wrong direction: a read carrying device-readable data after the header, or a
    /// write with device-writable buffers besides the status byte (IOERR).
    WrongDirection,
    /// The range list is empty or not a multiple of 16 bytes (IOERR).
    BadRangeList {
        /// Its length in bytes.
        len: u32,
    },
    /// More ranges than the device allows (IOERR).
    TooManyRanges {
        /// Ranges in the request.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// A range longer than the device allows per range (IOERR).
    RangeTooLong {
        /// The range's sector count.
        num_sectors: u32,
        /// The limit.
        max: u32,
    },
    /// Reserved range flag bits, or UNMAP on a discard (UNSUPP, §5.2.6.2).
    UnsupportedFlags(u32),
    /// Guest memory could not be read while decoding (IOERR).
    Memory(MemError),
}

impl BlkReject {
    /// The status the device answers with.
    pub fn status(&self) -> BlkStatus {
        match self {
            BlkReject::UnsupportedType(_)
            | BlkReject::NotNegotiated(_)
            | BlkReject::UnsupportedFlags(_) => BlkStatus::Unsupp,
            _ => BlkStatus::IoErr,
        }
    }
}

/// Why a chain could not be decoded as a virtio-blk request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkError {
    /// The request is refused; write `status` to `status_addr` and complete it with used length 1.
    Rejected {
        /// Guest address of the status byte.
        status_addr: u64,
        /// Why.
        reason: BlkReject,
    },
    /// The chain has no device-writable byte for the status, or its last non-empty buffer is
    /// device-readable. Nothing can be reported to the driver: mark the device `NEEDS_RESET`.
    NoStatus,
    /// Fewer than 16 device-readable bytes for the header. A status byte exists, so the caller may
    /// answer IOERR there (SPDK does) or treat it as a broken driver (QEMU does).
    HeaderTooShort {
        /// Device-readable bytes in the chain.
        readable_len: u32,
        /// Guest address of the status byte.
        status_addr: u64,
    },
}

impl BlkError {
    /// Where to write which status, if the request can be failed on its own.
    pub fn status_to_write(&self) -> Option<(u64, BlkStatus)> {
        match *self {
            BlkError::Rejected {
                status_addr,
                reason,
            } => Some((status_addr, reason.status())),
            BlkError::HeaderTooShort { status_addr, .. } => Some((status_addr, BlkStatus::IoErr)),
            BlkError::NoStatus => None,
        }
    }
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BlkError::Rejected { reason, .. } => {
                write!(f, "virtio-blk request refused: {reason:?}")
            }
            BlkError::NoStatus => f.write_str("virtio-blk request has no writable status byte"),
            BlkError::HeaderTooShort { readable_len, .. } => {
                write!(
                    f,
                    "virtio-blk header needs 16 readable bytes, chain has {readable_len}"
                )
            }
        }
    }
}

impl core::error::Error for BlkError {}

/// The data buffers of a request: a window of a chain's segments with the header (front) and
/// status byte (back) cut off. `iter()` yields them trimmed and non-empty.
pub type DataSegments<'c> = SegmentRange<'c>;

/// Iterator over [`DataSegments`].
pub type DataIter<'c> = SegmentPieces<'c>;

/// A decoded virtio-blk request, ready to execute without reading guest memory again.
#[derive(Debug, Clone)]
pub struct BlkRequest<'c, const R: usize> {
    /// The chain's head index (what goes into the used ring).
    pub head: u16,
    /// What to do.
    pub kind: BlkRequestKind,
    /// The header as read (raw type and sector, for logging).
    pub header: BlkReqHeaderRepr,
    /// First 512-byte sector (Read/Write; 0 otherwise).
    pub sector: u64,
    /// The data buffers: device-writable for Read/GetId, device-readable for Write, empty
    /// otherwise.
    pub data: DataSegments<'c>,
    /// Guest address of the status byte.
    pub status_addr: u64,
    /// Discard / write-zeroes ranges, validated and copied out.
    pub ranges: Vec<BlkRange, R>,
}

impl<'c, const R: usize> BlkRequest<'c, R> {
    /// Bytes of data to transfer (Read/Write/GetId).
    pub fn data_len(&self) -> u32 {
        // A chain's lengths are below 2^32 (checked when it was walked).
        u32::try_from(self.data.len()).unwrap_or(u32::MAX)
    }

    /// The used-ring length when the request succeeds: data written to the driver plus the status
    /// byte.
    pub fn used_len_ok(&self) -> u32 {
        let written = match self.kind {
            BlkRequestKind::Read => self.data_len(),
            BlkRequestKind::GetId => self.data_len().min(VIRTIO_BLK_ID_BYTES as u32),
            _ => 0,
        };
        written.saturating_add(1)
    }

    /// Answers GET_ID: writes `id` (the device's serial), cut to [`VIRTIO_BLK_ID_BYTES`] and
    /// NUL-padded to it, into the request's data buffers, as much of it as they hold (§5.2.6.1:
    /// the string is not necessarily NUL-terminated). Returns how many bytes were written, which
    /// is what [`BlkRequest::used_len_ok`] counts for GET_ID.
    pub fn write_id<M: GuestMemory + ?Sized>(&self, mem: &M, id: &[u8]) -> Result<u32, MemError> {
        let mut padded = [0u8; VIRTIO_BLK_ID_BYTES];
        copy_prefix(&mut padded, id);
        let written = self.data.writer().write(mem, &padded)?;
        // written <= VIRTIO_BLK_ID_BYTES.
        Ok(written as u32)
    }

    /// Decodes a walked chain as a virtio-blk request (§5.2.6).
    ///
    /// The header may be split across descriptors, and so may every range of a discard or
    /// write-zeroes request. The status byte is the last byte of the chain's device-writable part.
    /// At most `R` ranges fit (and at most the negotiated `max_*_seg`).
    pub fn decode<M: GuestMemory + ?Sized, const N: usize>(
        mem: &M,
        chain: &'c Chain<N>,
        limits: &BlkLimits,
    ) -> Result<Self, BlkError> {
        // The status byte: last byte of the last buffer, which must be device-writable.
        let last = chain.segments().last().ok_or(BlkError::NoStatus)?;
        if last.direction != Direction::DeviceWritable || last.len == 0 {
            return Err(BlkError::NoStatus);
        }
        let status_addr = last
            .guest_addr
            .checked_add(u64::from(last.len) - 1)
            .ok_or(BlkError::NoStatus)?;

        let readable_len = chain.readable_len();
        let header_len = BlkReqHeader::<&[u8]>::LEN as u32;
        if readable_len < header_len {
            return Err(BlkError::HeaderTooShort {
                readable_len,
                status_addr,
            });
        }
        let reject = |reason| BlkError::Rejected {
            status_addr,
            reason,
        };

        let readable = chain.readable_range();
        let mut reader = readable.reader();
        let mut raw = [0u8; 16];
        read_exact(&mut reader, mem, &mut raw).map_err(reject)?;
        let header = BlkReqHeaderRepr::parse(&BlkReqHeader { buffer: &raw[..] });

        // The chain's own lengths, so no re-checking: readable_len >= header_len (checked
        // above), and the status segment is writable and non-empty, so writable_len >= 1.
        let readable_payload_len = readable_len - header_len;
        let writable_payload_len = chain.writable_len().saturating_sub(1);
        let readable_payload = SegmentRange::new_unchecked(
            chain.readable(),
            u64::from(header_len),
            u64::from(readable_payload_len),
        );
        let writable_payload =
            SegmentRange::new_unchecked(chain.writable(), 0, u64::from(writable_payload_len));

        // Each arm returns its request as one struct expression, so it is built in the caller's
        // `Result` in place: a request assembled in a local and returned moved the whole range
        // array (16 entries) with a `memcpy` on every read and write (65 instructions).
        let simple = |kind, sector, data| BlkRequest {
            head: chain.head(),
            kind,
            header,
            sector,
            data,
            status_addr,
            ranges: Vec::new(),
        };

        use request_type::*;
        match header.request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let (kind, data, data_len, other_len) = if header.request_type == VIRTIO_BLK_T_IN {
                    (
                        BlkRequestKind::Read,
                        writable_payload,
                        writable_payload_len,
                        readable_payload_len,
                    )
                } else {
                    (
                        BlkRequestKind::Write,
                        readable_payload,
                        readable_payload_len,
                        writable_payload_len,
                    )
                };
                if kind == BlkRequestKind::Write && limits.read_only {
                    return Err(reject(BlkReject::ReadOnly));
                }
                if other_len != 0 {
                    return Err(reject(BlkReject::WrongDirection));
                }
                if data_len % SECTOR_SIZE != 0 {
                    return Err(reject(BlkReject::UnalignedLength(data_len)));
                }
                let sectors = u64::from(data_len >> SECTOR_SHIFT);
                check_range(header.sector, sectors, limits.capacity).map_err(reject)?;
                Ok(simple(kind, header.sector, data))
            }
            VIRTIO_BLK_T_FLUSH => Ok(simple(BlkRequestKind::Flush, 0, DataSegments::EMPTY)),
            VIRTIO_BLK_T_GET_ID => Ok(simple(BlkRequestKind::GetId, 0, writable_payload)),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let is_discard = header.request_type == VIRTIO_BLK_T_DISCARD;
                let range_limits = if is_discard {
                    limits.discard
                } else {
                    limits.write_zeroes
                };
                let range_limits =
                    range_limits.ok_or(reject(BlkReject::NotNegotiated(header.request_type)))?;
                if limits.read_only {
                    return Err(reject(BlkReject::ReadOnly));
                }
                if writable_payload_len != 0 {
                    return Err(reject(BlkReject::WrongDirection));
                }
                let list_len = readable_payload_len;
                let entry_len = DiscardWriteZeroes::<&[u8]>::LEN as u32;
                if list_len == 0 || list_len % entry_len != 0 {
                    return Err(reject(BlkReject::BadRangeList { len: list_len }));
                }
                let count = list_len / entry_len;
                let max = range_limits
                    .max_segments
                    .min(u32::try_from(R).unwrap_or(u32::MAX));
                if count > max {
                    return Err(reject(BlkReject::TooManyRanges { count, max }));
                }
                let mut request = simple(BlkRequestKind::Discard, 0, DataSegments::EMPTY);
                for _ in 0..count {
                    let mut raw = [0u8; 16];
                    read_exact(&mut reader, mem, &mut raw).map_err(reject)?;
                    let repr =
                        DiscardWriteZeroesRepr::parse(&DiscardWriteZeroes { buffer: &raw[..] });
                    let range = check_dwz_range(&repr, is_discard, range_limits, limits.capacity)
                        .map_err(reject)?;
                    request.ranges.push(range).map_err(|_| {
                        reject(BlkReject::TooManyRanges {
                            count,
                            max: u32::try_from(R).unwrap_or(0),
                        })
                    })?;
                }
                if !is_discard {
                    request.kind = BlkRequestKind::WriteZeroes;
                }
                Ok(request)
            }
            other => Err(reject(BlkReject::UnsupportedType(other))),
        }
    }
}

/// Reads the next wire structure out of the request's readable bytes, whose length the caller
/// checked (a shortfall is reported as unreadable memory, which it then is).
fn read_exact<M: GuestMemory + ?Sized>(
    reader: &mut SegmentReader<'_>,
    mem: &M,
    buf: &mut [u8],
) -> Result<(), BlkReject> {
    reader.read_exact(mem, buf).map_err(|e| {
        BlkReject::Memory(match e {
            SegmentIoError::Memory(e) => e,
            SegmentIoError::Truncated(_) => MemError::Overflow,
        })
    })
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), BlkReject> {
    let out = BlkReject::OutOfRange { sector, sectors };
    let end = sector.checked_add(sectors).ok_or(out)?;
    // Byte offsets must also fit in u64 for the backend (`sector * 512 + len`).
    end.checked_mul(u64::from(SECTOR_SIZE)).ok_or(out)?;
    if end > capacity {
        return Err(out);
    }
    Ok(())
}

fn check_dwz_range(
    repr: &DiscardWriteZeroesRepr,
    is_discard: bool,
    limits: RangeLimits,
    capacity: u64,
) -> Result<BlkRange, BlkReject> {
    if repr.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(BlkReject::UnsupportedFlags(repr.flags));
    }
    let unmap = repr.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    if is_discard && unmap {
        return Err(BlkReject::UnsupportedFlags(repr.flags));
    }
    if repr.num_sectors > limits.max_sectors {
        return Err(BlkReject::RangeTooLong {
            num_sectors: repr.num_sectors,
            max: limits.max_sectors,
        });
    }
    check_range(repr.sector, u64::from(repr.num_sectors), capacity)?;
    Ok(BlkRange {
        sector: repr.sector,
        num_sectors: repr.num_sectors,
        unmap,
    })
}
