//! Property test of the packed ring against a model: a driver (tests/packed_support) makes lists
//! of random lengths available, direct or indirect, over many laps of a ring of any size; the
//! device pops them (plain or pipelined batches), walks them, and uses them in a random order;
//! the driver reaps. The model checks what each side sees: the device pops exactly the lists
//! made available, in order, with their buffer IDs, lengths and elements; the driver reaps
//! exactly the used descriptors published, in the order they were pushed, with their lengths and
//! wrap bits, and nothing before it is published; notifications follow the driver's event
//! suppression structure.

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
                    let walked = q.walk_chain(&mem, *head, &mut chain);
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
