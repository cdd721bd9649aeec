//! A guest-side driver for tests: lays out a split virtqueue in a [`ByteMemory`] the way a virtio
//! driver would, byte by byte, so the device code under test sees exactly what a guest writes.
#![allow(dead_code)]

use core::sync::atomic::Ordering;

use rvhost_core::mem::{ByteMemory, GuestMemory};
use rvhost_core::virtio::ring::VirtqDesc;
use rvhost_core::virtq::QueueConfig;

/// Guest physical address of the first byte of test RAM (non-zero on purpose).
pub const BASE: u64 = 0x4000_0000;
/// "Host" address the first byte maps to.
pub const HOST: u64 = 0x7f00_0000_0000;
/// Test RAM size.
pub const RAM: usize = 0x4_0000;

pub const DESC: u64 = BASE;
pub const AVAIL: u64 = BASE + 0x2_0000;
pub const USED: u64 = BASE + 0x2_2000;
/// Where data buffers go.
pub const DATA: u64 = BASE + 0x3_0000;

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

pub fn ram() -> Vec<u8> {
    vec![0u8; RAM]
}

pub fn mem(ram: &mut [u8]) -> ByteMemory<'_> {
    ByteMemory::new(BASE, HOST, ram)
}

pub fn config(size: u16) -> QueueConfig {
    QueueConfig {
        size,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
    }
}

/// The host address a guest address maps to.
pub fn host(gpa: u64) -> u64 {
    gpa - BASE + HOST
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> VirtqDesc {
    VirtqDesc {
        addr,
        len,
        flags,
        next,
    }
}

/// Writes descriptor `index` of the table at `table`.
pub fn put_desc(mem: &ByteMemory<'_>, table: u64, index: u16, d: VirtqDesc) {
    mem.write(table + 16 * u64::from(index), &d.to_bytes())
        .unwrap();
}

/// Makes `heads` available (after the current `avail.idx`) and publishes the new index.
pub fn make_available(mem: &ByteMemory<'_>, size: u16, heads: &[u16]) {
    let mut idx = mem.load_u16(AVAIL + 2, Ordering::Acquire).unwrap();
    for &h in heads {
        let slot = u64::from(idx % size);
        mem.write(AVAIL + 4 + 2 * slot, &h.to_le_bytes()).unwrap();
        idx = idx.wrapping_add(1);
    }
    mem.store_u16(AVAIL + 2, idx, Ordering::Release).unwrap();
}

pub fn used_idx(mem: &ByteMemory<'_>) -> u16 {
    mem.load_u16(USED + 2, Ordering::Acquire).unwrap()
}

/// Used element `slot` as (id, len).
pub fn used_elem(mem: &ByteMemory<'_>, slot: u16) -> (u32, u32) {
    let mut b = [0u8; 8];
    mem.read(USED + 4 + 8 * u64::from(slot), &mut b).unwrap();
    (
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    )
}
