//! Property test of the packed ring against a model: a driver (tests/packed_support) makes lists
//! of random lengths available, direct or indirect, over many laps of a ring of any size; the
//! device pops them (plain or pipelined batches), walks them, and uses them in a random order;
//! the driver reaps. The model checks what each side sees: the device pops exactly the lists
//! made available, in order, with their buffer IDs, lengths and elements; the driver reaps
//! exactly the used descriptors published, in the order they were pushed, with their lengths and
//! wrap bits, and nothing before it is published; notifications follow the driver's event
//! suppression structure. A second property writes hostile rings (wrap bits of the wrong lap,
//! used bits, stray flags, IDs out of range, buffers and indirect tables anywhere) and checks that
//! the device never panics, never yields a segment outside guest memory, and keeps its accounting.

mod packed_support;

use std::collections::VecDeque;

use packed_support::*;
use proptest::prelude::*;
use rvhost_core::mem::{Direction, Segment};
use rvhost_core::virtq::packed::{pack_off_wrap, PackedHead, PackedQueue};
use rvhost_core::virtq::{Chain, ChainErrorKind};

const INDIRECT_DESC: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;

#[derive(Debug, Clone)]
enum Op {
    /// The driver makes a list available: `(len, writable)` elements, readable ones first.
    Add {
        elems: Vec<(u32, bool)>,
        indirect: bool,
    },
    /// The device pops up to `max` lists (pipelined or not) and walks each.
    Pop { max: usize, pipelined: bool },
    /// The device uses the in-flight list `pick % in_flight`, writing `len % (writable + 1)`.
    Complete { pick: usize, len: u32 },
    /// The device publishes what it used, then decides whether to notify.
    Publish,
    /// The driver reaps every used descriptor it can see.
    Reap,
    /// The driver sets its event suppression structure: 0 ENABLE, 1 DISABLE, 2 DESC at its next
    /// used position.
    Event(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let elem = (prop_oneof![1 => Just(0u32), 6 => 1u32..64], any::<bool>());
    prop_oneof![
        6 => (prop::collection::vec(elem, 1..6), prop::bool::weighted(0.3)).prop_map(
            |(mut elems, indirect)| {
                elems.sort_by_key(|&(_, writable)| writable);
                Op::Add { elems, indirect }
            }
        ),
        3 => (1usize..40, any::<bool>()).prop_map(|(max, pipelined)| Op::Pop { max, pipelined }),
        5 => (any::<usize>(), any::<u32>()).prop_map(|(pick, len)| Op::Complete { pick, len }),
        2 => Just(Op::Publish),
        2 => Just(Op::Reap),
        1 => (0u8..3).prop_map(Op::Event),
    ]
}

/// A list as the driver made it available.
#[derive(Debug, Clone)]
struct Made {
    id: u16,
    pos: u16,
    /// Ring descriptors it occupies.
    count: u16,
    indirect: bool,
    elems: Vec<Elem>,
}

/// The event the driver asked for, with the cumulative used-descriptor index of a DESC event.
#[derive(Debug, Clone, Copy)]
enum Event {
    Enable,
    Disable,
    Desc(u64),
}

fn run(size: u16, features: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = PackedQueue::new(config(size), features).unwrap();
    q.check_rings(&mem).unwrap();
    let mut driver = Driver::new(size);
    let indirect_ok = features & INDIRECT_DESC != 0;
    let event_idx = features & EVENT_IDX != 0;

    let mut made: VecDeque<Made> = VecDeque::new();
    // Popped and walked, not yet used: the head and the bytes the device may write.
    let mut in_flight: Vec<(PackedHead, u32)> = Vec::new();
    let mut pushed: Vec<(u16, u32)> = Vec::new();
    let mut published: VecDeque<(u16, u32)> = VecDeque::new();
    let mut heads = vec![PackedHead::default(); 64];
    let mut chain = Chain::<8>::new();
    let mut ring_chain = Chain::<8>::new();
    let mut next_addr = 0u64;
    // Cumulative descriptor counts: used positions published, and published at the last
    // notification decision; descriptors the driver reaped.
    let mut used_total = 0u64;
    let mut signalled: Option<u64> = None;
    let mut pushed_descs = 0u64;
    let mut reaped_total = 0u64;
    let mut event = Event::Enable;

    for op in ops {
        match op {
            Op::Add { elems, indirect } => {
                let elems: Vec<Elem> = elems
                    .iter()
                    .map(|&(len, write)| {
                        let addr = DATA + next_addr % 0x8000;
                        next_addr += 64;
                        Elem { addr, len, write }
                    })
                    .collect();
                let added = if *indirect {
                    driver
                        .add_indirect(&mem, &elems)
                        .map(|(id, pos)| (id, pos, 1))
                } else {
                    driver
                        .add(&mem, &elems)
                        .map(|(id, pos)| (id, pos, elems.len() as u16))
                };
                if let Some((id, pos, count)) = added {
                    made.push_back(Made {
                        id,
                        pos,
                        count,
                        indirect: *indirect,
                        elems,
                    });
                }
            }
            Op::Pop { max, pipelined } => {
                let max = (*max).min(heads.len());
                let n = if *pipelined {
                    q.pop_heads_pipelined(&mem, &mut heads[..max]).unwrap()
                } else {
                    q.pop_heads(&mem, &mut heads[..max]).unwrap()
                };
                let pending = made.len().min(max);
                let expected = if *pipelined && pending > 16 {
                    pending.div_ceil(2)
                } else {
                    pending
                };
                prop_assert_eq!(n, expected, "popped lists");
                for head in &heads[..n] {
                    let m = made.pop_front().unwrap();
                    prop_assert_eq!(
                        (head.id, head.pos, head.count),
                        (m.id, m.pos, m.count),
                        "popped head"
                    );
                    // What the poll path does (the pop's copies) and a walk from the ring agree.
                    let walked = q.walk_popped(&mem, *head, &mut chain);
                    let from_ring = q.walk_chain(&mem, *head, &mut ring_chain);
                    prop_assert_eq!(&walked, &from_ring, "walk_popped against walk_chain");
                    prop_assert_eq!(chain.segments(), ring_chain.segments());
                    if m.indirect && !indirect_ok {
                        prop_assert_eq!(
                            walked.unwrap_err().kind,
                            ChainErrorKind::IndirectNotNegotiated
                        );
                        // Returned unused, as a device fails such a request.
                        in_flight.push((*head, 0));
                        continue;
                    }
                    prop_assert_eq!(walked, Ok(()));
                    let expected: Vec<Segment> = m
                        .elems
                        .iter()
                        .filter(|e| e.len > 0)
                        .map(|e| Segment {
                            guest_addr: e.addr,
                            host_addr: host(e.addr),
                            len: e.len,
                            direction: if e.write {
                                Direction::DeviceWritable
                            } else {
                                Direction::DeviceReadable
                            },
                        })
                        .collect();
                    prop_assert_eq!(chain.segments(), &expected[..]);
                    prop_assert_eq!(chain.head(), m.id);
                    in_flight.push((*head, chain.writable_len()));
                }
            }
            Op::Complete { pick, len } => {
                if in_flight.is_empty() {
                    continue;
                }
                let (head, writable) = in_flight.swap_remove(pick % in_flight.len());
                let len = len % (writable + 1);
                q.push_used(&mem, head, len).unwrap();
                pushed.push((head.id, len));
                pushed_descs += u64::from(head.count);
            }
            Op::Publish => {
                q.publish_used(&mem).unwrap();
                published.extend(pushed.drain(..));
                used_total += pushed_descs;
                pushed_descs = 0;
                let advanced = used_total - signalled.unwrap_or(used_total);
                let expected = if signalled.is_some() && advanced == 0 {
                    false
                } else {
                    match event {
                        Event::Disable => false,
                        Event::Enable => true,
                        Event::Desc(_) if !event_idx || signalled.is_none() => true,
                        Event::Desc(at) => {
                            // Was a used descriptor written at cumulative index `at` (modulo
                            // two laps: position and wrap counter) since the last decision?
                            let old = signalled.unwrap();
                            let twice = 2 * u64::from(size);
                            advanced >= u64::from(size)
                                || (at % twice + twice - old % twice) % twice < advanced
                        }
                    }
                };
                prop_assert_eq!(q.needs_notification(&mem).unwrap(), expected, "notify");
                signalled = Some(used_total);
            }
            Op::Reap => {
                while let Some(u) = driver.reap(&mem) {
                    let (id, len) = published.pop_front().ok_or_else(|| {
                        TestCaseError::fail(format!("reaped {u:?}, nothing published"))
                    })?;
                    prop_assert_eq!((u.id, u.len), (id, len));
                    prop_assert_eq!(u.flags & WRITE != 0, len > 0, "WRITE iff written");
                    reaped_total += u64::from(u.count);
                }
                prop_assert!(
                    published.is_empty(),
                    "published but not visible: {published:?}"
                );
                prop_assert_eq!(reaped_total, used_total);
                if pushed.is_empty() {
                    prop_assert_eq!(
                        pack_off_wrap(driver.next_used, driver.used_wrap),
                        q.used_idx(),
                        "driver and device agree on the used position and wrap counter"
                    );
                }
            }
            Op::Event(mode) => {
                event = match mode {
                    0 => {
                        set_driver_event(&mem, 0, 0);
                        Event::Enable
                    }
                    1 => {
                        set_driver_event(&mem, 0, 1);
                        Event::Disable
                    }
                    _ => {
                        let off_wrap = pack_off_wrap(driver.next_used, driver.used_wrap);
                        set_driver_event(&mem, off_wrap, 2);
                        // The driver waits at the position after everything it reaped: in
                        // cumulative terms, the descriptors reaped so far.
                        Event::Desc(reaped_total)
                    }
                };
            }
        }
        prop_assert!(u32::from(q.outstanding()) <= u32::from(size));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn packed_ring_matches_the_model(
        size in prop_oneof![1u16..=8, 9u16..=40],
        indirect in any::<bool>(),
        event_idx in any::<bool>(),
        ops in prop::collection::vec(op(), 1..400),
    ) {
        let features = (if indirect { INDIRECT_DESC } else { 0 })
            | (if event_idx { EVENT_IDX } else { 0 });
        run(size, features, &ops)?;
    }
}

/// Addresses that hit guest memory, its edges, or nothing at all.
fn guest_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..RAM as u64).prop_map(|o| BASE + o),
        2 => (0u64..0x400).prop_map(|o| TABLES + 16 * o),
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
        1 => any::<u32>(),
        1 => (0u32..16).prop_map(|o| u32::MAX - o),
    ]
}

/// A descriptor (flags: NEXT/WRITE/INDIRECT only, or anything) with how its wrap bits are to be
/// set once its lap is known: 0 available in its lap (most of the time), 1 used in its lap, 2
/// available in the other lap, 3 as generated. IDs in range or not.
fn hostile_desc(size: u16) -> impl Strategy<Value = (rvhost_core::virtq::packed::PackedDesc, u8)> {
    let flags = prop_oneof![12 => 0u16..4, 3 => 4u16..8, 1 => any::<u16>()];
    let mode = prop_oneof![12 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)];
    let id = prop_oneof![8 => 0..size, 1 => any::<u16>()];
    (guest_addr(), desc_len(), id, flags, mode).prop_map(|(addr, len, id, flags, mode)| {
        (
            rvhost_core::virtq::packed::PackedDesc {
                addr,
                len,
                id,
                flags,
            },
            mode,
        )
    })
}

fn inside_memory(s: &Segment) -> bool {
    let Some(end) = s.guest_addr.checked_add(u64::from(s.len)) else {
        return false;
    };
    s.guest_addr >= BASE
        && end <= BASE + RAM as u64
        && s.host_addr == host(s.guest_addr)
        && s.len > 0
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
    prop_assert!(readable + writable <= u64::from(u32::MAX));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Whatever the guest writes into the ring, its indirect tables and its event structure, the
    /// device never panics, never yields a segment outside guest memory, keeps its descriptor
    /// accounting, and returns every list whose buffer ID is in range.
    #[test]
    fn hostile_rings_never_escape_guest_memory(
        (size, ring, tables, start) in (1u16..=64).prop_flat_map(|size| (
            Just(size),
            prop::collection::vec(hostile_desc(size), usize::from(size)),
            prop::collection::vec(hostile_desc(size), 0..64),
            // A position in the ring with either wrap counter, now and then one outside it.
            prop_oneof![8 => (0..size, any::<bool>()).prop_map(|(p, w)| p | u16::from(w) << 15),
                        1 => any::<u16>()],
        )),
        features in 0u64..4,
        event in any::<[u8; 4]>(),
        pipelined in any::<bool>(),
        reverse in any::<bool>(),
    ) {
        let mut ram = ram();
        let mem = mem(&mut ram);
        let (start_pos, start_wrap) = (start & 0x7fff, start & 0x8000 != 0);
        for (pos, (d, mode)) in ring.iter().enumerate() {
            let pos = pos as u16;
            // The lap the device meets this position in first.
            let lap = if pos >= start_pos { start_wrap } else { !start_wrap };
            let bits = match mode {
                0 => rvhost_core::virtq::packed::avail_bits(lap),
                1 => rvhost_core::virtq::packed::used_bits(lap),
                2 => rvhost_core::virtq::packed::avail_bits(!lap),
                _ => 0,
            };
            put_ring_desc(&mem, pos, rvhost_core::virtq::packed::PackedDesc { flags: d.flags | bits, ..*d });
        }
        for (k, (d, _)) in tables.iter().enumerate() {
            rvhost_core::mem::GuestMemory::write(&mem, TABLES + 16 * k as u64, &d.to_bytes()).unwrap();
        }
        rvhost_core::mem::GuestMemory::write(&mem, DRIVER_EVENT, &event).unwrap();
        let features = (features & 1) << 28 | (features >> 1) << 29;
        let mut q = PackedQueue::new(config(size), features).unwrap();
        if q.set_last_avail_idx(start).is_err() {
            prop_assert!(start & 0x7fff >= size);
            return Ok(());
        }
        let mut heads = [PackedHead::default(); 80];
        let mut small = Chain::<4>::new();
        let mut big = Chain::<64>::new();
        let mut big_from_ring = Chain::<64>::new();
        let mut stuck = 0u32;
        for _ in 0..3 {
            let popped = if pipelined {
                q.pop_heads_pipelined(&mem, &mut heads)
            } else {
                q.pop_heads(&mem, &mut heads)
            };
            let Ok(popped) = popped else { break };
            if popped == 0 {
                break;
            }
            let popped_descs: u32 = heads[..popped].iter().map(|h| u32::from(h.count)).sum();
            prop_assert_eq!(u32::from(q.outstanding()), popped_descs + stuck);
            let mut lens = Vec::new();
            for head in &heads[..popped] {
                prop_assert!(head.pos < size && head.count >= 1 && head.count <= size);
                let r = q.walk_chain(&mem, *head, &mut small);
                check_chain(&small)?;
                let r2 = q.walk_popped(&mem, *head, &mut big);
                check_chain(&big)?;
                let r3 = q.walk_chain(&mem, *head, &mut big_from_ring);
                prop_assert_eq!(&r2, &r3, "walk_popped against walk_chain");
                prop_assert_eq!(big.segments(), big_from_ring.segments());
                for e in [r.err(), r2.err()].into_iter().flatten() {
                    prop_assert_eq!(e.head, head.id);
                    if let Some(s) = e.last_segment {
                        prop_assert!(inside_memory(&s));
                    }
                    prop_assert_eq!(e.head_is_valid(), head.id < size);
                }
                lens.push(if r2.is_ok() { big.writable_len() } else { 0 });
            }
            let mut order: Vec<usize> = (0..popped).collect();
            if reverse {
                order.reverse();
            }
            for i in order {
                let result = q.push_used(&mem, heads[i], lens[i]);
                prop_assert_eq!(result.is_ok(), heads[i].id < size);
                if result.is_err() {
                    stuck += u32::from(heads[i].count);
                }
            }
            q.publish_used(&mem).unwrap();
            q.needs_notification(&mem).unwrap();
            q.enable_kicks(&mem).unwrap();
        }
    }
}
