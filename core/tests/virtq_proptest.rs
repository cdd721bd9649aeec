//! Property tests: whatever a guest writes into its rings and descriptor tables, the queue never
//! panics and never yields a segment outside guest memory.

mod virtq_support;

use proptest::prelude::*;
use rvhost_core::mem::{Direction, GuestMemory, Segment};
use rvhost_core::virtio::ring::VirtqDesc;
use rvhost_core::virtq::{Chain, SplitQueue};
use virtq_support::*;

const INDIRECT_DESC: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;

/// Addresses that hit guest memory, its edges, or nothing at all.
fn guest_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..RAM as u64).prop_map(|o| BASE + o),
        2 => (0u64..0x400).prop_map(|o| DATA + 16 * o),
        1 => (0u64..64).prop_map(|o| BASE + RAM as u64 - o),
        1 => (0u64..64).prop_map(|o| BASE.wrapping_sub(o)),
        1 => any::<u64>(),
        1 => (0u64..64).prop_map(|o| u64::MAX - o),
    ]
}

fn desc_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..4096,
        2 => (0u32..8).prop_map(|n| 16 * n),
        1 => Just(0),
        1 => any::<u32>(),
        1 => (0u32..16).prop_map(|o| u32::MAX - o),
    ]
}

fn descriptor(size: u16) -> impl Strategy<Value = VirtqDesc> {
    let next = prop_oneof![4 => 0..size, 1 => any::<u16>()];
    let flags = prop_oneof![8 => 0u16..8, 1 => any::<u16>()];
    (guest_addr(), desc_len(), flags, next).prop_map(|(addr, len, flags, next)| VirtqDesc {
        addr,
        len,
        flags,
        next,
    })
}

#[derive(Debug, Clone)]
struct Scenario {
    size: u16,
    features: u64,
    table: Vec<VirtqDesc>,
    /// Descriptors written into the data area, where indirect descriptors tend to point.
    indirect: Vec<VirtqDesc>,
    avail_idx: u16,
    last_avail: u16,
    ring: Vec<u16>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (0u32..=6, 0u64..4).prop_flat_map(|(shift, f)| {
        let size = 1u16 << shift;
        let features =
            (if f & 1 != 0 { INDIRECT_DESC } else { 0 }) | (if f & 2 != 0 { EVENT_IDX } else { 0 });
        (
            prop::collection::vec(descriptor(size), usize::from(size)),
            prop::collection::vec(descriptor(size), 0..64),
            any::<u16>(),
            any::<u16>(),
            prop::collection::vec(
                prop_oneof![4 => 0..size, 1 => any::<u16>()],
                usize::from(size),
            ),
        )
            .prop_map(
                move |(table, indirect, avail_idx, last_avail, ring)| Scenario {
                    size,
                    features,
                    table,
                    indirect,
                    avail_idx,
                    last_avail,
                    ring,
                },
            )
    })
}

fn inside_memory(s: &Segment) -> bool {
    let start = s.guest_addr;
    let Some(end) = start.checked_add(u64::from(s.len)) else {
        return false;
    };
    start >= BASE && end <= BASE + RAM as u64 && s.host_addr == host(start) && s.len > 0
}

fn check_chain<const N: usize>(c: &Chain<N>) -> Result<(), TestCaseError> {
    prop_assert!(c.segments().len() <= N);
    for s in c.segments() {
        prop_assert!(inside_memory(s), "segment outside guest memory: {:?}", s);
    }
    let readable: u64 = c.readable().iter().map(|s| u64::from(s.len)).sum();
    let writable: u64 = c.writable().iter().map(|s| u64::from(s.len)).sum();
    prop_assert_eq!(readable, u64::from(c.readable_len()));
    prop_assert_eq!(writable, u64::from(c.writable_len()));
    prop_assert!(c
        .readable()
        .iter()
        .all(|s| s.direction == Direction::DeviceReadable));
    prop_assert!(c
        .writable()
        .iter()
        .all(|s| s.direction == Direction::DeviceWritable));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_rings_never_escape_guest_memory(s in scenario()) {
        let mut ram = ram();
        let mem = mem(&mut ram);
        for (i, d) in s.table.iter().enumerate() {
            put_desc(&mem, DESC, i as u16, *d);
        }
        for (i, d) in s.indirect.iter().enumerate() {
            put_desc(&mem, DATA, i as u16, *d);
        }
        mem.write(AVAIL + 2, &s.avail_idx.to_le_bytes()).unwrap();
        for (i, h) in s.ring.iter().enumerate() {
            mem.write(AVAIL + 4 + 2 * i as u64, &h.to_le_bytes()).unwrap();
        }

        let mut q = SplitQueue::new(config(s.size), s.features).unwrap();
        q.set_last_avail_idx(s.last_avail);
        let mut heads = [0u16; 128];
        let mut chain = Chain::<8>::new();
        let mut big = Chain::<64>::new();
        match q.pop_heads(&mem, &mut heads) {
            Ok(n) => {
                prop_assert!(n <= usize::from(s.size));
                prop_assert_eq!(q.last_avail_idx(), s.last_avail.wrapping_add(n as u16));
                for &head in &heads[..n] {
                    let small = q.walk_chain(&mem, head, &mut chain);
                    check_chain(&chain)?;
                    let large = q.walk_chain(&mem, head, &mut big);
                    check_chain(&big)?;
                    for r in [small, large] {
                        if let Err(e) = r {
                            if let Some(seg) = e.last_segment {
                                prop_assert!(inside_memory(&seg));
                            }
                            if e.head_is_valid() {
                                prop_assert!(head < s.size);
                                q.push_used(&mem, e.head, 0).unwrap();
                            }
                        }
                    }
                    if big.head() < s.size {
                        let _ = q.push_used(&mem, big.head(), big.writable_len());
                    }
                }
                q.publish_used(&mem).unwrap();
                q.needs_notification(&mem).unwrap();
            }
            Err(_) => {
                prop_assert!(s.avail_idx.wrapping_sub(s.last_avail) > s.size);
                prop_assert_eq!(q.last_avail_idx(), s.last_avail);
            }
        }
        // Walking every index directly, valid or not, must be just as safe.
        for head in 0..s.size.saturating_add(2) {
            let _ = q.walk_chain(&mem, head, &mut chain);
            check_chain(&chain)?;
        }
    }

    #[test]
    fn raw_random_memory_never_panics(bytes in prop::collection::vec(any::<u8>(), 4096), head in any::<u16>(), shift in 0u32..=15) {
        let mut ram = ram();
        ram[..4096].copy_from_slice(&bytes);
        ram[0x2_0000..0x2_1000].copy_from_slice(&bytes);
        let mem = mem(&mut ram);
        let size = 1u16 << shift;
        let cfg = rvhost_core::virtq::QueueConfig { size, desc_table: DESC, avail_ring: AVAIL, used_ring: USED };
        let mut q = SplitQueue::new(cfg, INDIRECT_DESC | EVENT_IDX).unwrap();
        let mut chain = Chain::<32>::new();
        let _ = q.walk_chain(&mem, head, &mut chain);
        check_chain(&chain)?;
        let mut heads = [0u16; 16];
        if let Ok(n) = q.pop_heads(&mem, &mut heads) {
            q.prefetch_chains(&mem, &heads[..n]);
            for &h in &heads[..n] {
                let _ = q.walk_chain(&mem, h, &mut chain);
                check_chain(&chain)?;
            }
        }
        q.set_last_avail_idx(head);
        if let Ok(n) = q.pop_heads_pipelined(&mem, &mut heads) {
            prop_assert!(n <= heads.len());
            q.prefetch_chains(&mem, &heads[..n]);
        }
        let _ = q.disable_kicks(&mem);
        let _ = q.needs_notification(&mem);
    }
}
