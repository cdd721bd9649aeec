//! Fuzzes the packed virtqueue: the input is the guest's memory (descriptor ring, event
//! suppression structures, indirect tables, all of it). Pops every available list, walks each,
//! returns them all (in an order the input picks), publishes and decides on notification, and
//! checks that nothing escapes guest memory and the ring's bookkeeping stays consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvhost_core::mem::ByteMemory;
use rvhost_core::virtq::packed::{PackedHead, PackedQueue};
use rvhost_core::virtq::{Chain, ChainErrorKind, QueueConfig};

#[path = "common/chain_check.rs"]
mod chain_check;

use chain_check::{check, inside, BASE, HOST, SIZE};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, image) = data.split_at(4);
    // 1..=128 descriptors (any size: a packed ring need not be a power of two), so the ring and
    // both event structures fit in the first 4 KiB, as far as libFuzzer's default input length
    // reaches; bigger rings are covered by unit tests.
    let size = u16::from(ctl[0] % 128) + 1;
    let features = u64::from(ctl[1] & 0b11) << 28; // INDIRECT_DESC, EVENT_IDX
    let order = (ctl[1] >> 2) & 0b11; // the order the device returns lists in
    let pipelined = ctl[1] & 0x10 != 0;
    let interrupt_mode = ctl[1] & 0x20 != 0;
    let start = u16::from_le_bytes([ctl[2], ctl[3]]);

    let mut ram = vec![0u8; SIZE];
    let n = image.len().min(SIZE);
    ram[..n].copy_from_slice(&image[..n]);
    let mem = ByteMemory::new(BASE, HOST, &mut ram);

    // Descriptor ring at the start, then the driver and device event suppression structures;
    // everything after is data for buffers and indirect tables.
    let config = QueueConfig {
        size,
        desc_table: BASE,
        avail_ring: BASE + 0x800,
        used_ring: BASE + 0x804,
    };
    let Ok(mut q) = PackedQueue::new(config, features) else {
        return;
    };
    if q.check_rings(&mem).is_err() {
        return;
    }
    // Start anywhere in the ring, in either lap (as after SET_VRING_BASE).
    if q.set_last_avail_idx(start).is_err() {
        assert!(start & 0x7fff >= size);
        return;
    }
    let mut heads = [PackedHead::default(); 64];
    let mut chain = Chain::<16>::new();
    let mut ring_chain = Chain::<16>::new();
    // Descriptors of lists that could not be returned (a buffer ID outside the queue).
    let mut stuck: u32 = 0;
    // A few rounds: a malformed list stops a batch and fails the next pop.
    for _ in 0..3 {
        let popped = if pipelined {
            q.pop_heads_pipelined(&mem, &mut heads)
        } else {
            q.pop_heads(&mem, &mut heads)
        };
        let Ok(popped) = popped else {
            break;
        };
        if popped == 0 {
            break;
        }
        let _ = q.disable_kicks(&mem);
        let heads = &mut heads[..popped];
        let mut descriptors: u32 = 0;
        for h in heads.iter() {
            assert!(h.count >= 1 && h.count <= size && h.pos < size);
            descriptors += u32::from(h.count);
        }
        assert!(descriptors + stuck <= u32::from(size));
        assert_eq!(u32::from(q.outstanding()), descriptors + stuck);
        q.prefetch_chains(&mem, heads);

        // Walk every list (in pop order) before returning any: a used descriptor overwrites the
        // ring position it goes to.
        let mut lens = [0u32; 64];
        let mut returnable = [true; 64];
        for (i, &head) in heads.iter().enumerate() {
            // The poll path walks from the pop's copies; a walk from the ring must agree.
            let from_ring = q.walk_chain(&mem, head, &mut ring_chain);
            let walked = q.walk_popped(&mem, head, &mut chain);
            assert_eq!(walked, from_ring);
            assert_eq!(chain.segments(), ring_chain.segments());
            match walked {
                Ok(()) => {
                    check(&chain);
                    assert_eq!(chain.head(), head.id);
                    lens[i] = chain.writable_len();
                }
                Err(e) => {
                    check(&chain);
                    assert_eq!(e.head, head.id);
                    if let Some(s) = e.last_segment {
                        assert!(inside(&s));
                    }
                    if !e.head_is_valid() {
                        assert_eq!(
                            e.kind,
                            ChainErrorKind::HeadOutOfRange {
                                head: head.id,
                                size
                            }
                        );
                        returnable[i] = false;
                    }
                }
            }
        }
        let mut indices: Vec<usize> = (0..popped).collect();
        match order {
            0 => {}
            1 => indices.reverse(),
            2 => indices.sort_by_key(|&i| (i % 2, i)),
            _ => indices.sort_by_key(|&i| heads[i].id),
        }
        for i in indices {
            let head = heads[i];
            let result = q.push_used(&mem, head, lens[i]);
            assert_eq!(result.is_ok(), returnable[i], "{result:?}");
            if result.is_err() {
                stuck += u32::from(head.count);
            }
        }
        assert!(q.publish_used(&mem).is_ok());
        let _ = q.needs_notification(&mem);
        if interrupt_mode {
            let _ = q.enable_kicks(&mem);
        }
    }
});
