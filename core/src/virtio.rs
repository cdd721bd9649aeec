//! Feature bits, status bits and ring layouts shared by every virtio device (virtio 1.2 §2, §6).
//!
//! Feature constants are *bit numbers* (as in the spec and Linux's uapi headers), so they can be
//! listed in tables and printed; [`bit`] turns one into the mask used in a 64-bit feature word.
//! Every constant is cross-checked against `virtio-bindings` in the crate's tests.

/// The mask for feature bit number `n` in a 64-bit feature word (`0` for `n >= 64`).
pub const fn bit(n: u32) -> u64 {
    if n < 64 {
        1u64 << n
    } else {
        0
    }
}

/// Whether feature bit number `n` is set in `features`.
pub const fn has_feature(features: u64, n: u32) -> bool {
    features & bit(n) != 0
}

/// Device-independent feature bits (virtio 1.2 §6).
pub mod feature {
    /// The driver may put an indirect descriptor table behind one descriptor (§2.7.5.3).
    pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` replace the notification flags (§2.7.7, §2.7.10).
    pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
    /// The device conforms to virtio 1.x (little-endian, no legacy layout).
    pub const VIRTIO_F_VERSION_1: u32 = 32;
    /// The device is behind an IOMMU / has restricted DMA (§6).
    pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
    /// The packed virtqueue layout (§2.8, `virtq::packed`).
    pub const VIRTIO_F_RING_PACKED: u32 = 34;
    /// Buffers are used in the order they were made available.
    pub const VIRTIO_F_IN_ORDER: u32 = 35;
    /// Memory accesses need platform ordering (hardware devices).
    pub const VIRTIO_F_ORDER_PLATFORM: u32 = 36;
    /// The driver passes extra data in its available-buffer notifications.
    pub const VIRTIO_F_NOTIFICATION_DATA: u32 = 38;
    /// Individual queues can be reset.
    pub const VIRTIO_F_RING_RESET: u32 = 40;
    /// Legacy: notify even when the available ring is empty.
    pub const VIRTIO_F_NOTIFY_ON_EMPTY: u32 = 24;
    /// Legacy: the device does not assume a particular descriptor layout.
    pub const VIRTIO_F_ANY_LAYOUT: u32 = 27;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from; the driver must reset it.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Split-virtqueue layouts and flags (virtio 1.2 §2.7).
pub mod ring {
    /// The buffer continues via the `next` field.
    pub const VIRTQ_DESC_F_NEXT: u16 = 1;
    /// The buffer is device-writable (otherwise device-readable).
    pub const VIRTQ_DESC_F_WRITE: u16 = 2;
    /// The buffer holds a table of descriptors.
    pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
    /// In `used.flags`: the device asks the driver not to notify it (kick) after adding buffers.
    pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
    /// In `avail.flags`: the driver asks the device not to interrupt it after using buffers.
    pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

    /// Largest queue size of a split virtqueue (§2.7: "Queue Size ... maximum is 32768").
    pub const MAX_QUEUE_SIZE: u16 = 32768;
    /// Required alignment of the descriptor table in bytes (§2.7, table "Virtqueue Part Alignment").
    pub const DESC_TABLE_ALIGN: u64 = 16;
    /// Required alignment of the available ring in bytes.
    pub const AVAIL_RING_ALIGN: u64 = 2;
    /// Required alignment of the used ring in bytes.
    pub const USED_RING_ALIGN: u64 = 4;

    /// One descriptor-table entry, `struct virtq_desc`, in its little-endian wire layout.
    ///
    /// The backend never maps this over guest memory (see [`crate::mem`]); it copies 16 bytes out
    /// and decodes them with [`VirtqDesc::from_bytes`]. The `#[repr(C)]` layout documents the wire
    /// format and is checked against `virtio-bindings` in tests.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct VirtqDesc {
        /// Guest physical address of the buffer.
        pub addr: u64,
        /// Length of the buffer in bytes.
        pub len: u32,
        /// `VIRTQ_DESC_F_*` bits.
        pub flags: u16,
        /// Index of the next descriptor when `flags & VIRTQ_DESC_F_NEXT`.
        pub next: u16,
    }

    impl VirtqDesc {
        /// Size of a descriptor on the wire.
        pub const SIZE: usize = 16;

        /// Decodes a descriptor from its 16 wire bytes.
        pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
            VirtqDesc {
                addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
                flags: u16::from_le_bytes([b[12], b[13]]),
                next: u16::from_le_bytes([b[14], b[15]]),
            }
        }

        /// Encodes the descriptor into its 16 wire bytes.
        pub fn to_bytes(&self) -> [u8; Self::SIZE] {
            let mut b = [0u8; Self::SIZE];
            b[0..8].copy_from_slice(&self.addr.to_le_bytes());
            b[8..12].copy_from_slice(&self.len.to_le_bytes());
            b[12..14].copy_from_slice(&self.flags.to_le_bytes());
            b[14..16].copy_from_slice(&self.next.to_le_bytes());
            b
        }

        /// Whether the chain continues.
        pub fn has_next(&self) -> bool {
            self.flags & VIRTQ_DESC_F_NEXT != 0
        }

        /// Whether the device writes this buffer.
        pub fn is_write_only(&self) -> bool {
            self.flags & VIRTQ_DESC_F_WRITE != 0
        }

        /// Whether the buffer is an indirect descriptor table.
        pub fn is_indirect(&self) -> bool {
            self.flags & VIRTQ_DESC_F_INDIRECT != 0
        }
    }

    /// One used-ring element, `struct virtq_used_elem`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct VirtqUsedElem {
        /// Index of the head descriptor of the used chain (u32 for padding reasons, §2.7.8).
        pub id: u32,
        /// Bytes written into the device-writable part of the chain.
        pub len: u32,
    }

    impl VirtqUsedElem {
        /// Size of a used element on the wire.
        pub const SIZE: usize = 8;

        /// Encodes the element into its 8 wire bytes.
        pub fn to_bytes(&self) -> [u8; Self::SIZE] {
            let mut b = [0u8; Self::SIZE];
            b[0..4].copy_from_slice(&self.id.to_le_bytes());
            b[4..8].copy_from_slice(&self.len.to_le_bytes());
            b
        }

        /// Decodes an element from its 8 wire bytes.
        pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
            VirtqUsedElem {
                id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            }
        }
    }

    /// Offset of `flags` in the available and in the used ring.
    pub const RING_FLAGS_OFFSET: u64 = 0;
    /// Offset of `idx` in the available and in the used ring.
    pub const RING_IDX_OFFSET: u64 = 2;
    /// Offset of `ring[0]` in the available and in the used ring.
    pub const RING_ARRAY_OFFSET: u64 = 4;

    /// Bytes of the descriptor table for a queue of `size` entries.
    pub const fn desc_table_len(size: u16) -> u64 {
        16 * size as u64
    }

    /// Bytes of the available ring, including `used_event`, for a queue of `size` entries.
    pub const fn avail_ring_len(size: u16) -> u64 {
        6 + 2 * size as u64
    }

    /// Bytes of the used ring, including `avail_event`, for a queue of `size` entries.
    pub const fn used_ring_len(size: u16) -> u64 {
        6 + 8 * size as u64
    }

    /// The spec's `vring_need_event` (§2.7.10): whether moving an index from `old` to `new`
    /// crossed `event`, i.e. `event` lies in `[old, new)` modulo 2^16.
    pub const fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

#[cfg(test)]
mod tests {
    use super::ring::*;
    use super::*;

    #[test]
    fn descriptor_decodes_spec_layout() {
        // addr 0x1122334455667788, len 0x200, flags NEXT|WRITE, next 7 (little-endian, §2.7.5).
        let wire = [
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0x02, 0x00, 0x00, 0x03, 0x00,
            0x07, 0x00,
        ];
        let d = VirtqDesc::from_bytes(&wire);
        assert_eq!(
            d,
            VirtqDesc {
                addr: 0x1122_3344_5566_7788,
                len: 0x200,
                flags: 3,
                next: 7
            }
        );
        assert!(d.has_next() && d.is_write_only() && !d.is_indirect());
        assert_eq!(d.to_bytes(), wire);
    }

    #[test]
    fn used_elem_layout() {
        let e = VirtqUsedElem { id: 5, len: 0x1001 };
        assert_eq!(e.to_bytes(), [5, 0, 0, 0, 0x01, 0x10, 0, 0]);
        assert_eq!(VirtqUsedElem::from_bytes(&e.to_bytes()), e);
    }

    #[test]
    fn need_event_handles_wraparound() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(0, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
        assert!(!vring_need_event(5, 5, 5));
        assert_eq!(bit(32), 1 << 32);
        assert_eq!(bit(64), 0);
        assert!(has_feature(bit(29) | 1, 29));
    }
}
