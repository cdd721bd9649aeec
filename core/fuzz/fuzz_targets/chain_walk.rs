//! Fuzzes the split virtqueue: the input is the guest's memory (descriptor table, available ring,
//! indirect tables, all of it). Pops every available head, walks each chain, returns it to the used
//! ring, and checks that nothing escapes guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::mem::ByteMemory;
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};

#[path = "common/chain_check.rs"]
mod chain_check;

use chain_check::{check, inside, BASE, HOST, SIZE};

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
