//! Wire layouts of the packed virtqueue (virtio 1.2 §2.8): the descriptor, its flags, and the
//! event suppression structure.

use crate::wire;

/// The buffer continues in the next descriptor of the ring (same bit as the split ring's).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable; in a used descriptor: the device wrote into the buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of packed descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available bit: equal to the driver's wrap counter (and `USED` its inverse) in an available
/// descriptor, equal to `USED` in a used one.
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// Used bit: see [`VIRTQ_DESC_F_AVAIL`].
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;

/// Event suppression flags: notify after every buffer.
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression flags: do not notify.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression flags: notify when the descriptor at the structure's offset and wrap counter
/// is made available / used (only with `VIRTIO_F_RING_EVENT_IDX`).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;
/// The bits of the event suppression `flags` field that carry the mode (the rest is reserved).
pub const RING_EVENT_FLAGS_MASK: u16 = 0b11;
/// Bit of the event suppression `off_wrap` field that holds the wrap counter (bits 0..15 are the
/// offset).
pub const RING_EVENT_WRAP_BIT: u16 = 1 << 15;

/// Largest queue size of a packed virtqueue (§2.8: "up to 2^15 entries"); need not be a power of
/// two.
pub const MAX_PACKED_QUEUE_SIZE: u16 = 1 << 15;
/// Required alignment of the descriptor ring in bytes (§2.8, "Structure Size and Alignment").
pub const DESC_RING_ALIGN: u64 = 16;
/// Required alignment of each event suppression structure in bytes.
pub const EVENT_SUPPRESS_ALIGN: u64 = 4;
/// Size of an event suppression structure in bytes.
pub const EVENT_SUPPRESS_SIZE: u64 = 4;

/// Offset of `addr` in a packed descriptor.
const ADDR: core::ops::Range<usize> = 0..8;
/// Offset of `len`.
const LEN: core::ops::Range<usize> = 8..12;
/// Offset of `id`.
const ID: core::ops::Range<usize> = 12..14;
/// Offset of `flags`.
const FLAGS: core::ops::Range<usize> = 14..16;

/// Offset of `len` in a packed descriptor, for the device's used-descriptor write.
pub(super) const LEN_OFFSET: u64 = 8;
/// Offset of `flags` in a packed descriptor (the field both sides poll).
pub(super) const FLAGS_OFFSET: u64 = 14;

/// One descriptor of the packed ring or of an indirect table, `struct pvirtq_desc`.
///
/// Copied out of guest memory (16 bytes) and decoded; never mapped over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackedDesc {
    /// Guest physical address of the buffer element (unused in a used descriptor).
    pub addr: u64,
    /// Length of the element; in a used descriptor, the bytes the device wrote.
    pub len: u32,
    /// Buffer ID (in the last descriptor of a list; reserved in indirect tables).
    pub id: u16,
    /// `VIRTQ_DESC_F_*` bits.
    pub flags: u16,
}

impl PackedDesc {
    /// Size of a descriptor on the wire.
    pub const SIZE: usize = 16;

    /// Decodes a descriptor from its 16 wire bytes.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        PackedDesc {
            addr: wire::le_u64(b, ADDR),
            len: wire::le_u32(b, LEN),
            id: wire::le_u16(b, ID),
            flags: wire::le_u16(b, FLAGS),
        }
    }

    /// Encodes the descriptor into its 16 wire bytes.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        wire::set(&mut b, ADDR, &self.addr.to_le_bytes());
        wire::set(&mut b, LEN, &self.len.to_le_bytes());
        wire::set(&mut b, ID, &self.id.to_le_bytes());
        wire::set(&mut b, FLAGS, &self.flags.to_le_bytes());
        b
    }

    /// Whether the list continues in the next ring descriptor.
    pub fn has_next(&self) -> bool {
        self.flags & VIRTQ_DESC_F_NEXT != 0
    }

    /// Whether the device writes this element.
    pub fn is_write_only(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    /// Whether the element is an indirect descriptor table.
    pub fn is_indirect(&self) -> bool {
        self.flags & VIRTQ_DESC_F_INDIRECT != 0
    }
}

/// The `flags` of a descriptor's 16 wire bytes.
#[inline(always)]
pub(super) const fn desc_flags(b: &[u8; PackedDesc::SIZE]) -> u16 {
    u16::from_le_bytes([b[FLAGS.start], b[FLAGS.start + 1]])
}

/// The buffer ID of a descriptor's 16 wire bytes.
#[inline(always)]
pub(super) const fn desc_id(b: &[u8; PackedDesc::SIZE]) -> u16 {
    u16::from_le_bytes([b[ID.start], b[ID.start + 1]])
}

/// The two wrap bits of `flags` that [`is_available`] compares.
pub(super) const AVAIL_USED: u16 = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED;

/// Whether `flags` mark a descriptor available in the ring lap whose wrap counter is `wrap`:
/// `AVAIL` equal to the counter and `USED` its inverse (§2.8, "Driver and Device Ring Wrap
/// Counters").
#[inline]
pub const fn is_available(flags: u16, wrap: bool) -> bool {
    // `AVAIL == wrap && USED != wrap` as one masked compare (the pop tests every descriptor).
    flags & AVAIL_USED == avail_bits(wrap)
}

/// The `AVAIL` and `USED` bits a device writes into a used descriptor in the lap whose wrap
/// counter is `wrap`: both equal to it.
#[inline]
pub const fn used_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    } else {
        0
    }
}

/// The `AVAIL` and `USED` bits a driver writes into an available descriptor in the lap whose
/// wrap counter is `wrap` (for drivers written in tests).
#[inline]
pub const fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL
    } else {
        VIRTQ_DESC_F_USED
    }
}

/// What an event suppression structure (`struct pvirtq_event_suppress`) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSuppress {
    /// Notify after every buffer (`RING_EVENT_FLAGS_ENABLE`).
    Enable,
    /// Do not notify (`RING_EVENT_FLAGS_DISABLE`).
    Disable,
    /// Notify when the descriptor at `offset` is made available / used in the lap whose wrap
    /// counter is `wrap` (`RING_EVENT_FLAGS_DESC`).
    Desc {
        /// Ring position (15 bits).
        offset: u16,
        /// Wrap counter of that lap.
        wrap: bool,
    },
    /// The reserved mode 3.
    Reserved,
}

impl EventSuppress {
    /// Decodes the structure's 4 wire bytes (`off_wrap`, then `flags`).
    pub fn from_bytes(b: &[u8; EVENT_SUPPRESS_SIZE as usize]) -> Self {
        Self::from_fields(wire::le_u16(b, 0..2), wire::le_u16(b, 2..4))
    }

    /// Decodes the structure from its two fields as loaded (`off_wrap` matters only in `DESC`
    /// mode).
    #[inline]
    pub fn from_fields(off_wrap: u16, flags: u16) -> Self {
        match flags & RING_EVENT_FLAGS_MASK {
            RING_EVENT_FLAGS_ENABLE => EventSuppress::Enable,
            RING_EVENT_FLAGS_DISABLE => EventSuppress::Disable,
            RING_EVENT_FLAGS_DESC => EventSuppress::Desc {
                offset: off_wrap & !RING_EVENT_WRAP_BIT,
                wrap: off_wrap & RING_EVENT_WRAP_BIT != 0,
            },
            _ => EventSuppress::Reserved,
        }
    }

    /// Encodes the structure into its 4 wire bytes (`off_wrap` is zero unless `Desc`).
    pub fn to_bytes(&self) -> [u8; EVENT_SUPPRESS_SIZE as usize] {
        let (off_wrap, flags) = match *self {
            EventSuppress::Enable => (0, RING_EVENT_FLAGS_ENABLE),
            EventSuppress::Disable => (0, RING_EVENT_FLAGS_DISABLE),
            EventSuppress::Desc { offset, wrap } => {
                (pack_off_wrap(offset, wrap), RING_EVENT_FLAGS_DESC)
            }
            EventSuppress::Reserved => (0, RING_EVENT_FLAGS_MASK),
        };
        let mut b = [0u8; EVENT_SUPPRESS_SIZE as usize];
        wire::set(&mut b, 0..2, &off_wrap.to_le_bytes());
        wire::set(&mut b, 2..4, &flags.to_le_bytes());
        b
    }
}

/// A ring position and wrap counter in the one-`u16` form of `off_wrap` (and of the vhost-user
/// vring base of a packed ring): position in bits 0..15, wrap counter in bit 15.
#[inline]
pub const fn pack_off_wrap(offset: u16, wrap: bool) -> u16 {
    (offset & !RING_EVENT_WRAP_BIT) | if wrap { RING_EVENT_WRAP_BIT } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_decodes_spec_layout() {
        // addr 0x1122334455667788, len 0x200, id 0x0105, flags AVAIL|NEXT|WRITE (§2.8,
        // "The Virtqueue Descriptor Format": le64 addr, le32 len, le16 id, le16 flags).
        let wire = [
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0x02, 0x00, 0x00, 0x05, 0x01,
            0x83, 0x00,
        ];
        let d = PackedDesc::from_bytes(&wire);
        assert_eq!(
            d,
            PackedDesc {
                addr: 0x1122_3344_5566_7788,
                len: 0x200,
                id: 0x0105,
                flags: VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            }
        );
        assert!(d.has_next() && d.is_write_only() && !d.is_indirect());
        assert_eq!(d.to_bytes(), wire);
    }

    #[test]
    fn wrap_bits_mark_available_and_used() {
        // First lap (wrap counter 1): available is AVAIL=1 USED=0, used is both 1.
        assert!(is_available(0x0080, true));
        assert!(!is_available(0x8080, true));
        assert!(
            !is_available(0x0000, true),
            "the zero-initialised ring is not available"
        );
        // Second lap (wrap counter 0): available is AVAIL=0 USED=1, used is both 0.
        assert!(is_available(0x8000, false));
        assert!(!is_available(0x0000, false));
        assert!(
            !is_available(0x0080, false),
            "last lap's available is not this lap's"
        );
        assert_eq!(used_bits(true), 0x8080);
        assert_eq!(used_bits(false), 0);
        assert_eq!(avail_bits(true), 0x0080);
        assert_eq!(avail_bits(false), 0x8000);
        for wrap in [false, true] {
            assert!(is_available(avail_bits(wrap), wrap));
            assert!(!is_available(used_bits(wrap), wrap));
        }
    }

    #[test]
    fn event_suppression_decodes_spec_layout() {
        // le16 { off : 15, wrap : 1 }, le16 { flags : 2, reserved : 14 }.
        assert_eq!(
            EventSuppress::from_bytes(&[0x05, 0x80, 0x02, 0x00]),
            EventSuppress::Desc {
                offset: 5,
                wrap: true
            }
        );
        assert_eq!(
            EventSuppress::from_bytes(&[0xff, 0x7f, 0x02, 0x00]),
            EventSuppress::Desc {
                offset: 0x7fff,
                wrap: false
            }
        );
        assert_eq!(
            EventSuppress::from_bytes(&[0x05, 0x80, 0x00, 0x00]),
            EventSuppress::Enable
        );
        assert_eq!(
            EventSuppress::from_bytes(&[0, 0, 0x01, 0xfc]),
            EventSuppress::Disable,
            "reserved bits are ignored"
        );
        assert_eq!(
            EventSuppress::from_bytes(&[0, 0, 0x03, 0]),
            EventSuppress::Reserved
        );
        for e in [
            EventSuppress::Enable,
            EventSuppress::Disable,
            EventSuppress::Desc {
                offset: 0x1234,
                wrap: true,
            },
            EventSuppress::Reserved,
        ] {
            assert_eq!(EventSuppress::from_bytes(&e.to_bytes()), e);
        }
        assert_eq!(
            EventSuppress::Desc {
                offset: 3,
                wrap: false
            }
            .to_bytes(),
            [3, 0, 2, 0]
        );
        assert_eq!(pack_off_wrap(0xffff, false), 0x7fff);
        assert_eq!(pack_off_wrap(7, true), 0x8007);
    }
}
