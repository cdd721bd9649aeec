//! `DeviceRing`: one poll round, written once, serves a split ring, a packed ring and an
//! `AnyRing` holding either, with the same requests and the same answers.

mod packed_support;
mod virtq_support;

use rvhost_core::mem::{GuestMemory, Segment};
use rvhost_core::virtq::packed::{PackedHead, PackedQueue};
use rvhost_core::virtq::{
    AnyHead, AnyRing, AnyRingError, Chain, ChainErrorKind, DeviceRing, RingHead, SplitQueue,
};

/// What each request of a round carried: its ID and its segments, or why its walk failed.
type Seen = Vec<(u16, Result<Vec<Segment>, ChainErrorKind>)>;
/// The same with segments as (offset in the data area, length, device-writable).
type SeenRelative = Vec<(u16, Result<Vec<(u64, u32, bool)>, ChainErrorKind>)>;

/// One device round written against the trait alone: pops, walks, answers each request with
/// its writable length (0 for a rejected one), publishes. Returns what each request carried.
fn serve<R: DeviceRing, M: GuestMemory>(ring: &mut R, mem: &M, batch: usize) -> Seen {
    let mut heads = vec![R::Head::default(); batch];
    let mut chain = Chain::<8>::new();
    let popped = ring.pop_heads(mem, &mut heads).unwrap();
    ring.disable_kicks(mem).unwrap();
    ring.prefetch_chains(mem, &heads[..popped]);
    let mut seen = Vec::new();
    for &head in &heads[..popped] {
        let walked = ring.walk_chain(mem, head, &mut chain);
        let len = if walked.is_ok() {
            chain.writable_len()
        } else {
            0
        };
        seen.push((
            head.id(),
            walked
                .map(|()| chain.segments().to_vec())
                .map_err(|e| e.kind),
        ));
        ring.push_used(mem, head, len).unwrap();
    }
    ring.publish_used(mem).unwrap();
    seen
}

/// Guest-relative segments, so rings in different test memories compare.
fn relative(seen: Seen, base: u64) -> SeenRelative {
    seen.into_iter()
        .map(|(id, r)| {
            (
                id,
                r.map(|segs| {
                    segs.iter()
                        .map(|s| {
                            (
                                s.guest_addr - base,
                                s.len,
                                s.direction == rvhost_core::mem::Direction::DeviceWritable,
                            )
                        })
                        .collect()
                }),
            )
        })
        .collect()
}

/// The requests both rings carry: (offset from the data area, length, device-writable).
const REQUESTS: [&[(u64, u32, bool)]; 3] = [
    &[(0, 16, false), (0x100, 512, true), (0x400, 1, true)],
    &[(0x500, 16, false), (0x600, 1, true)],
    &[(0x700, 8, true)],
];

/// The split ring with REQUESTS at heads 0, 3, 5, and its memory.
fn split_ring(ram: &mut [u8]) -> (SplitQueue, rvhost_core::mem::ByteMemory<'_>) {
    use virtq_support as s;
    let mem = s::mem(ram);
    let mut heads = Vec::new();
    let mut next = 0u16;
    for request in REQUESTS {
        heads.push(next);
        for (i, &(off, len, write)) in request.iter().enumerate() {
            let last = i + 1 == request.len();
            let flags = if write { s::WRITE } else { 0 } | if last { 0 } else { s::NEXT };
            s::put_desc(
                &mem,
                s::DESC,
                next,
                s::desc(s::DATA + off, len, flags, next + 1),
            );
            next += 1;
        }
    }
    s::make_available(&mem, 8, &heads);
    (SplitQueue::new(s::config(8), 0).unwrap(), mem)
}

/// The packed ring with REQUESTS, and its memory and driver.
fn packed_ring(
    ram: &mut [u8],
) -> (
    PackedQueue,
    rvhost_core::mem::ByteMemory<'_>,
    packed_support::Driver,
) {
    use packed_support as p;
    let mem = p::mem(ram);
    let mut driver = p::Driver::new(8);
    for request in REQUESTS {
        let elems: Vec<p::Elem> = request
            .iter()
            .map(|&(off, len, write)| p::Elem {
                addr: p::DATA + off,
                len,
                write,
            })
            .collect();
        driver.add(&mem, &elems).unwrap();
    }
    (PackedQueue::new(p::config(8), 0).unwrap(), mem, driver)
}

#[test]
fn one_round_serves_both_layouts_alike() {
    let mut split_ram = virtq_support::ram();
    let (mut split, split_mem) = split_ring(&mut split_ram);
    let split_seen = relative(serve(&mut split, &split_mem, 32), virtq_support::DATA);
    assert_eq!(
        split_seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 3, 5]
    );
    assert_eq!(virtq_support::used_idx(&split_mem), 3);
    assert_eq!(virtq_support::used_elem(&split_mem, 0), (0, 513));
    assert_eq!(virtq_support::used_elem(&split_mem, 1), (3, 1));
    assert_eq!(virtq_support::used_elem(&split_mem, 2), (5, 8));

    let mut packed_ram = packed_support::ram();
    let (mut packed, packed_mem, mut driver) = packed_ring(&mut packed_ram);
    let packed_seen = relative(serve(&mut packed, &packed_mem, 32), packed_support::DATA);
    // Buffer IDs are the driver's (it hands out 0, 1, 2); the requests are the same.
    assert_eq!(
        packed_seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(
        split_seen.into_iter().map(|s| s.1).collect::<Vec<_>>(),
        packed_seen.into_iter().map(|s| s.1).collect::<Vec<_>>()
    );
    let reaped: Vec<_> = std::iter::from_fn(|| driver.reap(&packed_mem))
        .map(|u| (u.id, u.len))
        .collect();
    assert_eq!(reaped, [(0, 513), (1, 1), (2, 8)]);
}

#[test]
fn any_ring_serves_either_layout() {
    let mut split_ram = virtq_support::ram();
    let (split, split_mem) = split_ring(&mut split_ram);
    let mut any = AnyRing::Split(split);
    let seen = serve(&mut any, &split_mem, 32);
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.1.is_ok()));
    assert_eq!(virtq_support::used_elem(&split_mem, 2), (5, 8));
    assert_eq!(any.size(), 8);
    assert_eq!(any.last_avail_idx(), 3);

    let mut packed_ram = packed_support::ram();
    let (packed, packed_mem, mut driver) = packed_ring(&mut packed_ram);
    let mut any = AnyRing::Packed(packed);
    let seen = serve(&mut any, &packed_mem, 32);
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.1.is_ok()));
    assert_eq!(
        driver.reap(&packed_mem).map(|u| (u.id, u.len)),
        Some((0, 513))
    );
    assert_eq!(any.last_avail_idx(), 0x8006);
    assert!(any.needs_notification(&packed_mem).unwrap());

    // A head of the other layout is refused, never misread.
    let foreign = AnyHead::Split(0);
    let mut chain = Chain::<4>::new();
    let err = any
        .walk_chain(&packed_mem, foreign, &mut chain)
        .unwrap_err();
    assert_eq!(
        err.kind,
        ChainErrorKind::HeadOutOfRange { head: 0, size: 8 }
    );
    assert_eq!(
        any.push_used(&packed_mem, foreign, 0),
        Err(AnyRingError::HeadLayout)
    );
    assert_eq!(
        AnyRing::Split(SplitQueue::new(virtq_support::config(8), 0).unwrap()).push_used(
            &packed_mem,
            AnyHead::Packed(PackedHead::default()),
            0
        ),
        Err(AnyRingError::HeadLayout)
    );
    // Ring errors come through typed.
    assert!(matches!(
        any.set_last_avail_idx(8),
        Err(AnyRingError::Packed(_))
    ));
}

#[test]
fn any_ring_pops_batches_larger_than_its_chunk() {
    use virtq_support as s;
    let mut ram = s::ram();
    let mem = s::mem(&mut ram);
    for i in 0..40 {
        s::put_desc(
            &mem,
            s::DESC,
            i,
            s::desc(s::DATA + u64::from(i), 1, s::WRITE, 0),
        );
    }
    let heads: Vec<u16> = (0..40).collect();
    s::make_available(&mem, 64, &heads);
    let mut any = AnyRing::Split(SplitQueue::new(s::config(64), 0).unwrap());
    let mut out = [AnyHead::default(); 48];
    assert_eq!(any.pop_heads(&mem, &mut out), Ok(40));
    assert_eq!(out[..40].iter().map(|h| h.id()).collect::<Vec<_>>(), heads);

    // Pipelined: half of the 40 pending, as the split ring itself takes.
    let mut ram = s::ram();
    let mem = s::mem(&mut ram);
    s::make_available(&mem, 64, &heads);
    let mut any = AnyRing::Split(SplitQueue::new(s::config(64), 0).unwrap());
    assert_eq!(any.pop_heads_pipelined(&mem, &mut out), Ok(20));
}
