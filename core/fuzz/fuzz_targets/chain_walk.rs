//! Fuzzes the split virtqueue: the input is the guest's memory (descriptor table, available ring,
//! indirect tables, all of it). Pops every available head, walks each chain, returns it to the used
//! ring, and checks that nothing escapes guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::mem::{ByteMemory, Direction, Segment};
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};

/// Guest memory: 64 KiB at guest address 0x1_0000 (so address 0 and the top of memory are holes).
const BASE: u64 = 0x1_0000;
const SIZE: usize = 0x1_0000;
const HOST: u64 = 0x7f00_0000_0000;

fn inside(s: &Segment) -> bool {
    let end = s.guest_addr.checked_add(u64::from(s.len));
    s.len > 0
        && s.guest_addr >= BASE
        && end.is_some_and(|e| e <= BASE + SIZE as u64)
        && s.host_addr == HOST + (s.guest_addr - BASE)
}

fn check<const N: usize>(c: &Chain<N>) {
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

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, image) = data.split_at(4);
    // Up to 128 entries, so that the table and both rings fit in the first 4 KiB, which is as far
    // as libFuzzer's default input length reaches; bigger queues are covered by unit tests.
    let size = 1u16 << (ctl[0] % 8);
    let features = u64::from(ctl[1] & 0b11) << 28; // INDIRECT_DESC, EVENT_IDX
    let last_avail = u16::from_le_bytes([ctl[2], ctl[3]]);

    let mut ram = vec![0u8; SIZE];
    let n = image.len().min(SIZE);
    ram[..n].copy_from_slice(&image[..n]);
    let mem = ByteMemory::new(BASE, HOST, &mut ram);

    // Descriptor table at the start, then the avail ring, then the used ring, as a driver lays
    // them out; everything after is data for buffers and indirect tables.
    let config = QueueConfig {
        size,
        desc_table: BASE,
        avail_ring: BASE + 0x800,
        used_ring: BASE + 0xa00,
    };
    let Ok(mut q) = SplitQueue::new(config, features) else {
        return;
    };
    if q.check_rings(&mem).is_err() {
        return;
    }
    q.set_last_avail_idx(last_avail);
    let mut heads = [0u16; 256];
    let mut chain = Chain::<16>::new();
    let Ok(popped) = q.pop_heads(&mem, &mut heads) else {
        return;
    };
    let _ = q.disable_kicks(&mem);
    for &head in &heads[..popped] {
        match q.walk_chain(&mem, head, &mut chain) {
            Ok(()) => {
                check(&chain);
                assert!(q
                    .push_used(&mem, chain.head(), chain.writable_len())
                    .is_ok());
            }
            Err(e) => {
                check(&chain);
                if let Some(s) = e.last_segment {
                    assert!(inside(&s));
                }
                if e.head_is_valid() {
                    assert!(q.push_used(&mem, e.head, 0).is_ok());
                } else {
                    assert!(head >= size);
                }
            }
        }
    }
    assert!(q.publish_used(&mem).is_ok());
    let _ = q.needs_notification(&mem);
});
