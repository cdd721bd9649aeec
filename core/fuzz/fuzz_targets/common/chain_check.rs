//! What the virtqueue fuzz targets share: the guest memory they map the input into, and the
//! checks every walked chain must pass whatever the ring layout.

use rvhost_core::mem::{Direction, Segment};
use rvhost_core::virtq::Chain;

/// Guest memory: 64 KiB at guest address 0x1_0000 (so address 0 and the top of memory are holes).
pub const BASE: u64 = 0x1_0000;
pub const SIZE: usize = 0x1_0000;
pub const HOST: u64 = 0x7f00_0000_0000;

pub fn inside(s: &Segment) -> bool {
    let end = s.guest_addr.checked_add(u64::from(s.len));
    s.len > 0
        && s.guest_addr >= BASE
        && end.is_some_and(|e| e <= BASE + SIZE as u64)
        && s.host_addr == HOST + (s.guest_addr - BASE)
}

pub fn check<const N: usize>(c: &Chain<N>) {
    assert!(c.segments().len() <= N);
    for s in c.segments() {
        assert!(inside(s), "segment escapes guest memory: {s:?}");
    }
    assert!(c
        .readable()
        .iter()
        .all(|s| s.direction == Direction::DeviceReadable));
    assert!(c
        .writable()
        .iter()
        .all(|s| s.direction == Direction::DeviceWritable));
    let r: u64 = c.readable().iter().map(|s| u64::from(s.len)).sum();
    let w: u64 = c.writable().iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(r, u64::from(c.readable_len()));
    assert_eq!(w, u64::from(c.writable_len()));
    assert!(r + w <= u64::from(u32::MAX));
}
