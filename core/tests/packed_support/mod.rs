//! A guest-side driver for packed-ring tests: lays lists out in a [`ByteMemory`] the way the
//! spec's driver does (§2.8, "Supplying Buffers to The Device": each descriptor with the wrap bits
//! of its lap, the buffer ID in the last, the first descriptor's flags written last) and reaps used
//! descriptors the way it does (poll one position, skip the list's length).
#![allow(dead_code)]

use core::sync::atomic::Ordering;
use std::collections::HashMap;

use rvhost_core::mem::{ByteMemory, GuestMemory};
use rvhost_core::virtq::packed::{
    avail_bits, PackedDesc, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE,
};
use rvhost_core::virtq::QueueConfig;

/// Guest physical address of the first byte of test RAM (non-zero on purpose).
pub const BASE: u64 = 0x4000_0000;
/// "Host" address the first byte maps to.
pub const HOST: u64 = 0x7f00_0000_0000;
/// Test RAM size.
pub const RAM: usize = 0x8_0000;

/// The descriptor ring (room for 32768 descriptors).
pub const RING: u64 = BASE;
/// Driver event suppression structure (Driver Area).
pub const DRIVER_EVENT: u64 = BASE + 0x8_0000 - 0x100;
/// Device event suppression structure (Device Area).
pub const DEVICE_EVENT: u64 = BASE + 0x8_0000 - 0xfc;
/// Where indirect tables go.
pub const TABLES: u64 = BASE + 0x6_0000;
/// Where data buffers go.
pub const DATA: u64 = BASE + 0x7_0000;

pub const NEXT: u16 = VIRTQ_DESC_F_NEXT;
pub const WRITE: u16 = VIRTQ_DESC_F_WRITE;
pub const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;
pub const AVAIL: u16 = VIRTQ_DESC_F_AVAIL;
pub const USED: u16 = VIRTQ_DESC_F_USED;

pub fn ram() -> Vec<u8> {
    vec![0u8; RAM]
}

pub fn mem(ram: &mut [u8]) -> ByteMemory<'_> {
    ByteMemory::new(BASE, HOST, ram)
}

pub fn config(size: u16) -> QueueConfig {
    QueueConfig {
        size,
        desc_table: RING,
        avail_ring: DRIVER_EVENT,
        used_ring: DEVICE_EVENT,
    }
}

/// The host address a guest address maps to.
pub fn host(gpa: u64) -> u64 {
    gpa - BASE + HOST
}

/// Reads ring descriptor `pos`.
pub fn ring_desc(mem: &ByteMemory<'_>, pos: u16) -> PackedDesc {
    let mut b = [0u8; 16];
    mem.read(RING + 16 * u64::from(pos), &mut b).unwrap();
    PackedDesc::from_bytes(&b)
}

/// Writes ring descriptor `pos` (all 16 bytes at once).
pub fn put_ring_desc(mem: &ByteMemory<'_>, pos: u16, d: PackedDesc) {
    mem.write(RING + 16 * u64::from(pos), &d.to_bytes())
        .unwrap();
}

/// Writes the driver event suppression structure.
pub fn set_driver_event(mem: &ByteMemory<'_>, off_wrap: u16, flags: u16) {
    mem.store_u16(DRIVER_EVENT, off_wrap, Ordering::Release)
        .unwrap();
    mem.store_u16(DRIVER_EVENT + 2, flags, Ordering::Release)
        .unwrap();
}

/// The device event suppression structure as (off_wrap, flags).
pub fn device_event(mem: &ByteMemory<'_>) -> (u16, u16) {
    (
        mem.load_u16(DEVICE_EVENT, Ordering::Acquire).unwrap(),
        mem.load_u16(DEVICE_EVENT + 2, Ordering::Acquire).unwrap(),
    )
}

/// One buffer element a driver hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elem {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A used descriptor as the driver reaps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub id: u16,
    pub len: u32,
    pub flags: u16,
    /// Ring position it was found at.
    pub pos: u16,
    /// Ring descriptors the list occupied (what the driver skips).
    pub count: u16,
}

/// The driver side of one packed ring: wrap counters, free buffer IDs and the length of each
/// outstanding list, as the spec's example driver keeps them.
#[derive(Debug)]
pub struct Driver {
    pub size: u16,
    pub next_avail: u16,
    pub avail_wrap: bool,
    pub next_used: u16,
    pub used_wrap: bool,
    /// Ring descriptors not currently holding an outstanding list.
    pub free: u16,
    free_ids: Vec<u16>,
    /// Descriptors each outstanding buffer ID occupies.
    pub lists: HashMap<u16, u16>,
}

impl Driver {
    pub fn new(size: u16) -> Self {
        Driver {
            size,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            free: size,
            free_ids: (0..size).rev().collect(),
            lists: HashMap::new(),
        }
    }

    fn advance(&self, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
        let next = u32::from(pos) + u32::from(n);
        if next >= u32::from(self.size) {
            ((next - u32::from(self.size)) as u16, !wrap)
        } else {
            (next as u16, wrap)
        }
    }

    /// Makes `elems` available as one list of direct descriptors; `None` if the ring has no room.
    pub fn add(&mut self, mem: &ByteMemory<'_>, elems: &[Elem]) -> Option<(u16, u16)> {
        let count = u16::try_from(elems.len()).ok()?;
        if count == 0 || count > self.free {
            return None;
        }
        let id = self.free_ids.pop()?;
        let first = self.next_avail;
        let mut head_flags = 0;
        let (mut pos, mut wrap) = (self.next_avail, self.avail_wrap);
        for (i, e) in elems.iter().enumerate() {
            let last = i + 1 == elems.len();
            let flags =
                avail_bits(wrap) | if e.write { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let d = PackedDesc {
                addr: e.addr,
                len: e.len,
                id: if last { id } else { 0 },
                flags: if i == 0 { 0 } else { flags },
            };
            if i == 0 {
                head_flags = flags;
                // Everything but the flags now; the flags (which expose the list) last.
                let mut b = d.to_bytes();
                b[14..16].copy_from_slice(&ring_desc(mem, pos).flags.to_le_bytes());
                mem.write(RING + 16 * u64::from(pos), &b).unwrap();
            } else {
                put_ring_desc(mem, pos, d);
            }
            (pos, wrap) = self.advance(pos, wrap, 1);
        }
        (self.next_avail, self.avail_wrap) = (pos, wrap);
        self.free -= count;
        self.lists.insert(id, count);
        mem.store_u16(
            RING + 16 * u64::from(first) + 14,
            head_flags,
            Ordering::Release,
        )
        .unwrap();
        Some((id, first))
    }

    /// Makes `elems` (at most 16) available through one indirect descriptor; the table goes to
    /// the buffer ID's own 256-byte slot at [`TABLES`].
    pub fn add_indirect(&mut self, mem: &ByteMemory<'_>, elems: &[Elem]) -> Option<(u16, u16)> {
        if self.free == 0 || elems.len() > 16 {
            return None;
        }
        let table = TABLES + 0x100 * u64::from(*self.free_ids.last()?);
        for (k, e) in elems.iter().enumerate() {
            let d = PackedDesc {
                addr: e.addr,
                len: e.len,
                id: 0,
                flags: if e.write { WRITE } else { 0 },
            };
            mem.write(table + 16 * k as u64, &d.to_bytes()).unwrap();
        }
        let id = self.free_ids.pop()?;
        let pos = self.next_avail;
        let d = PackedDesc {
            addr: table,
            len: 16 * elems.len() as u32,
            id,
            flags: 0,
        };
        let mut b = d.to_bytes();
        b[14..16].copy_from_slice(&ring_desc(mem, pos).flags.to_le_bytes());
        mem.write(RING + 16 * u64::from(pos), &b).unwrap();
        let flags = avail_bits(self.avail_wrap) | INDIRECT;
        (self.next_avail, self.avail_wrap) = self.advance(pos, self.avail_wrap, 1);
        self.free -= 1;
        self.lists.insert(id, 1);
        mem.store_u16(RING + 16 * u64::from(pos) + 14, flags, Ordering::Release)
            .unwrap();
        Some((id, pos))
    }

    /// Reaps the used descriptor at the driver's next used position, if the device wrote one.
    /// Panics if what it finds breaks the protocol (an unknown ID, wrong wrap bits).
    pub fn reap(&mut self, mem: &ByteMemory<'_>) -> Option<Reaped> {
        let pos = self.next_used;
        let flags = mem
            .load_u16(RING + 16 * u64::from(pos) + 14, Ordering::Acquire)
            .unwrap();
        // Used in this lap: USED equal to the wrap counter, and AVAIL equal to USED. The second
        // test matters: a position the device skipped (inside a longer list it used) still holds
        // the driver's available descriptor from the previous lap, whose USED bit is this lap's
        // wrap counter (Linux's driver tests both bits for this reason).
        let used = flags & USED != 0;
        let avail = flags & AVAIL != 0;
        if used != self.used_wrap || avail != used {
            return None;
        }
        let d = ring_desc(mem, pos);
        let count = self
            .lists
            .remove(&d.id)
            .unwrap_or_else(|| panic!("used id {} at {pos} is not outstanding", d.id));
        self.free_ids.push(d.id);
        self.free += count;
        (self.next_used, self.used_wrap) = self.advance(pos, self.used_wrap, count);
        Some(Reaped {
            id: d.id,
            len: d.len,
            flags,
            pos,
            count,
        })
    }
}
