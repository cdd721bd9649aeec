//! The packed virtqueue (virtio 1.2 §2.8): descriptor ring layouts as literal bytes, wrap
//! counters, lists, indirect tables, used descriptors, event suppression, and every rejection.

mod packed_support;

use core::sync::atomic::Ordering;

use packed_support::*;
use rvhost_core::mem::{Direction, GuestMemory, MemError, Segment};
use rvhost_core::virtq::packed::{
    avail_bits, EventSuppress, PackedDesc, PackedHead, PackedQueue, PackedQueueError,
    PackedRingPart, MAX_INDIRECT_ENTRIES,
};
use rvhost_core::virtq::{Chain, ChainError, ChainErrorKind, LateNotification, QueueConfig};

const INDIRECT_DESC: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;

fn seg(gpa: u64, len: u32, direction: Direction) -> Segment {
    Segment {
        guest_addr: gpa,
        host_addr: host(gpa),
        len,
        direction,
    }
}

fn r(addr: u64, len: u32) -> Elem {
    Elem {
        addr,
        len,
        write: false,
    }
}

fn w(addr: u64, len: u32) -> Elem {
    Elem {
        addr,
        len,
        write: true,
    }
}

fn walk<const N: usize>(
    q: &PackedQueue,
    mem: &impl GuestMemory,
    head: PackedHead,
) -> (Result<(), ChainError>, Chain<N>) {
    let mut chain = Chain::<N>::new();
    let result = q.walk_chain(mem, head, &mut chain);
    (result, chain)
}

fn pop_all(q: &mut PackedQueue, mem: &impl GuestMemory) -> Vec<PackedHead> {
    let mut heads = [PackedHead::default(); 64];
    let n = q.pop_heads(mem, &mut heads).unwrap();
    heads[..n].to_vec()
}

#[test]
fn three_descriptor_list_from_literal_ring() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    // The ring as a virtio-blk driver writes it for a 512-byte read, buffer ID 5, first lap
    // (wrap counter 1: AVAIL=1, USED=0), struct pvirtq_desc { le64 addr; le32 len; le16 id;
    // le16 flags }:
    // [0] header: addr DATA,        len 16,  id 0, flags AVAIL|NEXT       = 0x0081
    // [1] data:   addr DATA+0x1000, len 512, id 0, flags AVAIL|NEXT|WRITE = 0x0083
    // [2] status: addr DATA+0x2000, len 1,   id 5, flags AVAIL|WRITE      = 0x0082
    #[rustfmt::skip]
    let ring: [u8; 48] = [
        0x00, 0x00, 0x07, 0x40, 0, 0, 0, 0,  16, 0, 0, 0,  0, 0,  0x81, 0x00,
        0x00, 0x10, 0x07, 0x40, 0, 0, 0, 0,  0, 2, 0, 0,   0, 0,  0x83, 0x00,
        0x00, 0x20, 0x07, 0x40, 0, 0, 0, 0,  1, 0, 0, 0,   5, 0,  0x82, 0x00,
    ];
    mem.write(RING, &ring).unwrap();
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    q.check_rings(&mem).unwrap();
    let heads = pop_all(&mut q, &mem);
    assert_eq!(
        heads,
        [PackedHead {
            id: 5,
            pos: 0,
            count: 3,
            wrap: true
        }]
    );
    assert_eq!(q.outstanding(), 3);
    let (result, chain) = walk::<4>(&q, &mem, heads[0]);
    assert_eq!(result, Ok(()));
    assert_eq!(chain.head(), 5);
    assert_eq!(
        chain.segments(),
        &[
            seg(DATA, 16, Direction::DeviceReadable),
            seg(DATA + 0x1000, 512, Direction::DeviceWritable),
            seg(DATA + 0x2000, 1, Direction::DeviceWritable),
        ]
    );
    assert_eq!((chain.readable_len(), chain.writable_len()), (16, 513));
    assert_eq!(chain.descriptor_count(), 3);

    // The used descriptor goes over the list's first one: id 5, len 513, flags AVAIL|USED|WRITE.
    q.push_used(&mem, heads[0], 513).unwrap();
    let mut raw = [0u8; 16];
    mem.read(RING, &mut raw).unwrap();
    assert_eq!(
        &raw[8..16],
        &[0x01, 0x02, 0, 0, 5, 0, 0x81, 0x00],
        "len and id written, flags not yet (unpublished)"
    );
    q.publish_used(&mem).unwrap();
    mem.read(RING, &mut raw).unwrap();
    assert_eq!(
        raw,
        [0x00, 0x00, 0x07, 0x40, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 5, 0, 0x82, 0x80]
    );
    assert_eq!(q.outstanding(), 0);
    assert_eq!(q.used_idx(), 0x8003, "position 3, wrap counter 1");
    assert_eq!(q.last_avail_idx(), 0x8003);
}

#[test]
fn list_wraps_around_the_ring_with_the_next_laps_bits() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(4), 0).unwrap();
    let mut d = Driver::new(4);
    // Fill and drain three one-descriptor lists so the next list starts at position 3.
    for k in 0..3 {
        d.add(&mem, &[r(DATA + k, 1)]).unwrap();
    }
    for head in pop_all(&mut q, &mem) {
        q.push_used(&mem, head, 0).unwrap();
    }
    q.publish_used(&mem).unwrap();
    while d.reap(&mem).is_some() {}
    // Position 3 in lap 1 (AVAIL), positions 0 and 1 in lap 2 (USED bit, no AVAIL).
    let (id, first) = d
        .add(
            &mem,
            &[r(DATA, 16), w(DATA + 0x100, 64), w(DATA + 0x200, 1)],
        )
        .unwrap();
    assert_eq!(first, 3);
    assert_eq!(ring_desc(&mem, 3).flags, AVAIL | NEXT);
    assert_eq!(ring_desc(&mem, 0).flags, USED | NEXT | WRITE);
    assert_eq!(ring_desc(&mem, 1).flags, USED | WRITE);
    let heads = pop_all(&mut q, &mem);
    assert_eq!(
        heads,
        [PackedHead {
            id,
            pos: 3,
            count: 3,
            wrap: true
        }]
    );
    assert_eq!(q.last_avail_idx(), 2, "position 2, wrap counter 0");
    let (result, chain) = walk::<4>(&q, &mem, heads[0]);
    assert_eq!(result, Ok(()));
    assert_eq!(chain.segments().len(), 3);
    q.add_used(&mem, heads[0], 65).unwrap();
    // The used descriptor is at position 3, still in the device's first lap.
    assert_eq!(ring_desc(&mem, 3).flags, AVAIL | USED | WRITE);
    let reaped = d.reap(&mem).unwrap();
    assert_eq!((reaped.id, reaped.len, reaped.pos), (id, 65, 3));
    assert_eq!(q.used_idx(), 2, "two positions into the second lap");
    // The next used descriptor carries the second lap's bits (both zero).
    d.add(&mem, &[w(DATA, 4)]).unwrap();
    let heads = pop_all(&mut q, &mem);
    q.add_used(&mem, heads[0], 4).unwrap();
    let reaped = d.reap(&mem).unwrap();
    assert_eq!((reaped.len, reaped.flags, reaped.pos), (4, WRITE, 2));
}

#[test]
fn queue_size_need_not_be_a_power_of_two() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(5), 0).unwrap();
    let mut d = Driver::new(5);
    for lap in 0..7u64 {
        let (id, _) = d
            .add(&mem, &[r(DATA + lap, 2), w(DATA + 0x100, 3)])
            .unwrap();
        let heads = pop_all(&mut q, &mem);
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].id, id);
        let (result, _) = walk::<4>(&q, &mem, heads[0]);
        assert_eq!(result, Ok(()));
        q.add_used(&mem, heads[0], 3).unwrap();
        assert_eq!(d.reap(&mem).map(|u| (u.id, u.len)), Some((id, 3)));
    }
    assert_eq!(
        q.last_avail_idx(),
        0x8004,
        "14 descriptors: position 4 of the third lap (wrap counter 1 again)"
    );
}

#[test]
fn used_descriptors_skip_each_lists_length_out_of_order() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let mut d = Driver::new(8);
    let (a, _) = d.add(&mem, &[r(DATA, 1), w(DATA + 8, 1)]).unwrap();
    let (b, _) = d.add(&mem, &[w(DATA + 16, 7)]).unwrap();
    let (c, _) = d
        .add(&mem, &[r(DATA + 32, 1), r(DATA + 40, 1), w(DATA + 48, 2)])
        .unwrap();
    let heads = pop_all(&mut q, &mem);
    assert_eq!(
        heads
            .iter()
            .map(|h| (h.id, h.pos, h.count))
            .collect::<Vec<_>>(),
        [(a, 0, 2), (b, 2, 1), (c, 3, 3)]
    );
    // Completed C, A, B: used descriptors at 0 (C, skips 3), 3 (A, skips 2), 5 (B).
    for (head, len) in [(heads[2], 2), (heads[0], 1), (heads[1], 0)] {
        let (result, _) = walk::<4>(&q, &mem, head);
        assert_eq!(result, Ok(()));
        q.push_used(&mem, head, len).unwrap();
    }
    // Nothing is visible before the publish: the driver polls position 0, whose flags wait.
    assert_eq!(d.reap(&mem), None);
    q.publish_used(&mem).unwrap();
    let reaped: Vec<_> = std::iter::from_fn(|| d.reap(&mem))
        .map(|u| (u.id, u.len, u.pos, u.flags))
        .collect();
    assert_eq!(
        reaped,
        [
            (c, 2, 0, AVAIL | USED | WRITE),
            (a, 1, 3, AVAIL | USED | WRITE),
            (b, 0, 5, AVAIL | USED),
        ]
    );
    assert_eq!(q.outstanding(), 0);
    assert_eq!(q.used_idx(), 0x8006);
}

#[test]
fn indirect_table_from_literal_bytes() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    // Table of three packed descriptors; only WRITE counts in it: the header's stray NEXT, the
    // data entry's INDIRECT and the IDs are reserved and ignored (§2.8, "Indirect Flag").
    #[rustfmt::skip]
    let table: [u8; 48] = [
        0x00, 0x00, 0x07, 0x40, 0, 0, 0, 0,  16, 0, 0, 0,  9, 9,  0x01, 0x00,
        0x00, 0x10, 0x07, 0x40, 0, 0, 0, 0,  0, 2, 0, 0,   0, 0,  0x06, 0x00,
        0x00, 0x20, 0x07, 0x40, 0, 0, 0, 0,  1, 0, 0, 0,   0, 0,  0x02, 0x00,
    ];
    mem.write(TABLES, &table).unwrap();
    // Ring descriptor: addr TABLES, len 48, id 2, flags AVAIL|INDIRECT (WRITE is reserved here).
    put_ring_desc(
        &mem,
        0,
        PackedDesc {
            addr: TABLES,
            len: 48,
            id: 2,
            flags: AVAIL | INDIRECT | WRITE,
        },
    );
    let mut q = PackedQueue::new(config(4), INDIRECT_DESC).unwrap();
    let heads = pop_all(&mut q, &mem);
    assert_eq!(
        heads,
        [PackedHead {
            id: 2,
            pos: 0,
            count: 1,
            wrap: true
        }]
    );
    let (result, chain) = walk::<4>(&q, &mem, heads[0]);
    assert_eq!(result, Ok(()));
    assert_eq!(
        chain.segments(),
        &[
            seg(DATA, 16, Direction::DeviceReadable),
            seg(DATA + 0x1000, 512, Direction::DeviceWritable),
            seg(DATA + 0x2000, 1, Direction::DeviceWritable),
        ]
    );
    assert_eq!(
        chain.descriptor_count(),
        4,
        "the ring descriptor and three entries"
    );

    // Without VIRTIO_F_RING_INDIRECT_DESC the same list is refused (but can be returned).
    let q = PackedQueue::new(config(4), 0).unwrap();
    let (result, _) = walk::<4>(&q, &mem, heads[0]);
    let err = result.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::IndirectNotNegotiated);
    assert!(err.head_is_valid());
    assert_eq!(err.head, 2);
}

/// Writes one ring descriptor at `pos` available in lap 1 with `flags`, and pops and walks it.
fn walk_single(
    features: u64,
    desc: PackedDesc,
    setup: impl Fn(&rvhost_core::mem::ByteMemory<'_>),
) -> Result<Vec<Segment>, ChainError> {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    setup(&mem);
    put_ring_desc(
        &mem,
        0,
        PackedDesc {
            flags: desc.flags | AVAIL,
            ..desc
        },
    );
    let mut q = PackedQueue::new(config(8), features).unwrap();
    let heads = pop_all(&mut q, &mem);
    assert_eq!(heads.len(), 1);
    let (result, chain) = walk::<8>(&q, &mem, heads[0]);
    result.map(|()| chain.segments().to_vec())
}

#[test]
fn indirect_tables_are_checked() {
    let ind = |addr, len| PackedDesc {
        addr,
        len,
        id: 1,
        flags: INDIRECT,
    };
    let kind = |d, f| walk_single(f, d, |_| {}).unwrap_err().kind;
    assert_eq!(
        kind(ind(TABLES, 0), INDIRECT_DESC),
        ChainErrorKind::IndirectTableLength { len: 0 }
    );
    assert_eq!(
        kind(ind(TABLES, 24), INDIRECT_DESC),
        ChainErrorKind::IndirectTableLength { len: 24 }
    );
    assert_eq!(
        kind(ind(BASE + RAM as u64 - 16, 32), INDIRECT_DESC),
        ChainErrorKind::IndirectTableUnmapped {
            addr: BASE + RAM as u64 - 16,
            len: 32,
            err: MemError::Unmapped {
                addr: BASE + RAM as u64 - 16,
                len: 32
            }
        }
    );
    assert_eq!(
        kind(ind(u64::MAX - 15, 32), INDIRECT_DESC),
        ChainErrorKind::IndirectTableUnmapped {
            addr: u64::MAX - 15,
            len: 32,
            err: MemError::Overflow
        }
    );
    assert_eq!(
        kind(ind(TABLES, 16 * (MAX_INDIRECT_ENTRIES + 1)), INDIRECT_DESC),
        ChainErrorKind::ChainTooLong {
            limit: MAX_INDIRECT_ENTRIES
        }
    );
    // A table of zero-length entries walks (reads every entry) and yields nothing.
    assert_eq!(
        walk_single(INDIRECT_DESC, ind(TABLES, 16 * 64), |_| {}),
        Ok(vec![])
    );
    // An entry whose buffer leaves guest memory: a content error, the walk reaches the end.
    let err = walk_single(INDIRECT_DESC, ind(TABLES, 32), |mem| {
        let bad = PackedDesc {
            addr: u64::MAX - 4,
            len: 8,
            id: 0,
            flags: 0,
        };
        let status = PackedDesc {
            addr: DATA,
            len: 1,
            id: 0,
            flags: WRITE,
        };
        mem.write(TABLES, &bad.to_bytes()).unwrap();
        mem.write(TABLES + 16, &status.to_bytes()).unwrap();
    })
    .unwrap_err();
    assert_eq!(
        err.kind,
        ChainErrorKind::BufferUnmapped {
            addr: u64::MAX - 4,
            len: 8,
            err: MemError::Overflow
        }
    );
    assert_eq!(
        err.status_segment(),
        Some(seg(DATA, 1, Direction::DeviceWritable))
    );
}

#[test]
fn indirect_descriptors_only_alone_in_a_list() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), INDIRECT_DESC).unwrap();
    // A direct descriptor chained to an indirect one (the spec forbids INDIRECT in a NEXT list).
    put_ring_desc(
        &mem,
        1,
        PackedDesc {
            addr: TABLES,
            len: 16,
            id: 4,
            flags: AVAIL | INDIRECT,
        },
    );
    put_ring_desc(
        &mem,
        0,
        PackedDesc {
            addr: DATA,
            len: 16,
            id: 0,
            flags: AVAIL | NEXT,
        },
    );
    let heads = pop_all(&mut q, &mem);
    assert_eq!(heads[0].count, 2);
    let err = walk::<4>(&q, &mem, heads[0]).0.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::IndirectInList);
    assert_eq!((err.head, err.last_segment), (4, None));
    assert!(
        err.head_is_valid(),
        "the buffer ID is known: return it unused"
    );

    // INDIRECT with NEXT.
    put_ring_desc(
        &mem,
        2,
        PackedDesc {
            addr: DATA,
            len: 1,
            id: 6,
            flags: AVAIL,
        },
    );
    put_ring_desc(
        &mem,
        1,
        PackedDesc {
            addr: TABLES,
            len: 16,
            id: 0,
            flags: AVAIL | INDIRECT | NEXT,
        },
    );
    let mut q = PackedQueue::new(config(8), INDIRECT_DESC).unwrap();
    let heads = pop_all(&mut q, &mem);
    let err = walk::<4>(&q, &mem, heads[0]).0.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::IndirectWithNext);
}

#[test]
fn content_errors_keep_the_status_segment() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let mut d = Driver::new(8);
    // Readable after writable, then a status byte.
    d.add(&mem, &[w(DATA, 8), r(DATA + 8, 8), w(DATA + 16, 1)])
        .unwrap();
    // Longer than 4 GiB.
    d.add(&mem, &[r(DATA, u32::MAX), r(DATA, 1), w(DATA + 16, 1)])
        .unwrap();
    let heads = pop_all(&mut q, &mem);
    let err = walk::<8>(&q, &mem, heads[0]).0.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::ReadableAfterWritable);
    assert_eq!(
        err.status_segment(),
        Some(seg(DATA + 16, 1, Direction::DeviceWritable))
    );
    let err = walk::<8>(&q, &mem, heads[1]).0.unwrap_err();
    assert_eq!(
        err.kind,
        ChainErrorKind::BufferUnmapped {
            addr: DATA,
            len: u32::MAX,
            err: MemError::Unmapped {
                addr: DATA,
                len: u64::from(u32::MAX)
            }
        }
    );
    // Capacity: three segments into a chain of two.
    let err = walk::<2>(&q, &mem, heads[0]).0.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::ReadableAfterWritable);
    let mut d2 = Driver::new(8);
    let mut ram2 = packed_support::ram();
    let mem2 = packed_support::mem(&mut ram2);
    d2.add(&mem2, &[r(DATA, 8), r(DATA + 8, 8), w(DATA + 16, 1)])
        .unwrap();
    let mut q2 = PackedQueue::new(config(8), 0).unwrap();
    let heads = pop_all(&mut q2, &mem2);
    let err = walk::<2>(&q2, &mem2, heads[0]).0.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::CapacityExceeded { capacity: 2 });
    assert_eq!(
        err.status_segment(),
        Some(seg(DATA + 16, 1, Direction::DeviceWritable))
    );
}

/// Guest memory where every buffer translates (to its own address), for lengths no test RAM
/// holds; descriptors and rings still live in the byte RAM.
struct EverythingMapped<'a>(rvhost_core::mem::ByteMemory<'a>);

impl GuestMemory for EverythingMapped<'_> {
    fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError> {
        addr.checked_add(len)
            .map(|_| addr)
            .ok_or(MemError::Overflow)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.0.write(addr, buf)
    }
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemError> {
        self.0.load_u16(addr, order)
    }
    fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemError> {
        self.0.store_u16(addr, val, order)
    }
}

#[test]
fn total_length_over_4_gib_is_refused() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    d.add(
        &mem,
        &[
            r(0x1_0000_0000, 0xc000_0000),
            r(0x2_0000_0000, 0x4000_0000),
            w(DATA, 1),
        ],
    )
    .unwrap();
    let flat = EverythingMapped(mem);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let heads = pop_all(&mut q, &flat);
    let err = walk::<8>(&q, &flat, heads[0]).0.unwrap_err();
    assert_eq!(err.kind, ChainErrorKind::TotalLengthOverflow);
    assert_eq!(
        err.status_segment(),
        Some(Segment {
            guest_addr: DATA,
            host_addr: DATA,
            len: 1,
            direction: Direction::DeviceWritable
        })
    );
    // Exactly 4 GiB - 1 is fine.
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    d.add(&mem, &[r(0x1_0000_0000, 0xffff_fffe), w(DATA, 1)])
        .unwrap();
    let flat = EverythingMapped(mem);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let heads = pop_all(&mut q, &flat);
    assert_eq!(walk::<8>(&q, &flat, heads[0]).0, Ok(()));
}

/// A driver racing the device: the flags of ring position 0 read as lap-1 available on even
/// loads and lap-2 available on odd ones, so a list of `NEXT`s can run around the ring forever.
struct FlickeringFlags<M> {
    mem: M,
    loads: std::cell::Cell<u32>,
}

impl<M: GuestMemory> GuestMemory for FlickeringFlags<M> {
    fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError> {
        self.mem.translate(addr, len)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(addr, buf)?;
        // A device that reads the descriptor whole sees the flickering flags too.
        let flags = RING + 14;
        if addr <= flags && flags + 2 <= addr + buf.len() as u64 {
            let at = (flags - addr) as usize;
            let n = self.loads.get();
            buf[at..at + 2].copy_from_slice(&(NEXT | avail_bits(n % 2 == 0)).to_le_bytes());
        }
        Ok(())
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem.write(addr, buf)
    }
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemError> {
        if addr == RING + 14 {
            let n = self.loads.get();
            self.loads.set(n + 1);
            return Ok(NEXT | avail_bits(n % 2 == 0));
        }
        self.mem.load_u16(addr, order)
    }
    fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemError> {
        self.mem.store_u16(addr, val, order)
    }
}

#[test]
fn list_longer_than_the_ring_is_refused() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    for size in [1u16, 2, 5] {
        for pos in 1..size {
            put_ring_desc(
                &mem,
                pos,
                PackedDesc {
                    addr: DATA,
                    len: 1,
                    id: 0,
                    flags: AVAIL | NEXT,
                },
            );
        }
        let racing = FlickeringFlags {
            mem: &mem,
            loads: std::cell::Cell::new(0),
        };
        let mut q = PackedQueue::new(config(size), 0).unwrap();
        assert_eq!(
            q.pop_head(&racing),
            Err(PackedQueueError::ListTooLong { pos: 0 }),
            "size {size}"
        );
    }
}

#[test]
fn descriptors_changed_after_the_pop_are_caught() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let mut d = Driver::new(8);
    d.add(&mem, &[r(DATA, 16), w(DATA + 16, 1)]).unwrap();
    let heads = pop_all(&mut q, &mem);
    let changed = |q: &PackedQueue, mem: &_| walk::<4>(q, mem, heads[0]).0.unwrap_err().kind;
    // The driver drops NEXT from the first descriptor.
    let mut first = ring_desc(&mem, 0);
    first.flags &= !NEXT;
    put_ring_desc(&mem, 0, first);
    assert_eq!(
        changed(&q, &mem),
        ChainErrorKind::PackedDescriptorChanged { pos: 0 }
    );
    first.flags |= NEXT;
    put_ring_desc(&mem, 0, first);
    // The driver changes the buffer ID.
    let mut last = ring_desc(&mem, 1);
    last.id += 1;
    put_ring_desc(&mem, 1, last);
    assert_eq!(
        changed(&q, &mem),
        ChainErrorKind::PackedDescriptorChanged { pos: 1 }
    );
    last.id -= 1;
    // The second descriptor is marked used (e.g. a used descriptor written over it).
    last.flags = AVAIL | USED;
    put_ring_desc(&mem, 1, last);
    assert_eq!(
        changed(&q, &mem),
        ChainErrorKind::PackedDescriptorChanged { pos: 1 }
    );
}

#[test]
fn heads_that_do_not_come_from_the_ring_are_refused() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let mut d = Driver::new(8);
    d.add(&mem, &[w(DATA, 1)]).unwrap();
    let head = pop_all(&mut q, &mem)[0];
    let kind = |h| walk::<4>(&q, &mem, h).0.unwrap_err().kind;
    assert_eq!(
        kind(PackedHead { id: 8, ..head }),
        ChainErrorKind::HeadOutOfRange { head: 8, size: 8 }
    );
    assert_eq!(
        kind(PackedHead { pos: 8, ..head }),
        ChainErrorKind::NextOutOfRange {
            next: 8,
            table_len: 8
        }
    );
    assert_eq!(
        kind(PackedHead { count: 0, ..head }),
        ChainErrorKind::ChainTooLong { limit: 8 }
    );
    assert_eq!(
        kind(PackedHead { count: 9, ..head }),
        ChainErrorKind::ChainTooLong { limit: 8 }
    );
    assert_eq!(
        kind(PackedHead {
            wrap: false,
            ..head
        }),
        ChainErrorKind::PackedDescriptorChanged { pos: 0 }
    );
    assert!(!walk::<4>(&q, &mem, PackedHead { id: 8, ..head })
        .0
        .unwrap_err()
        .head_is_valid());
    // push_used: an ID outside the queue, more descriptors than outstanding.
    assert_eq!(
        q.push_used(&mem, PackedHead { id: 8, ..head }, 0),
        Err(PackedQueueError::UsedIdOutOfRange { id: 8 })
    );
    assert_eq!(
        q.push_used(&mem, PackedHead { count: 2, ..head }, 0),
        Err(PackedQueueError::UsedCountInvalid {
            count: 2,
            outstanding: 1
        })
    );
    q.push_used(&mem, head, 1).unwrap();
    assert_eq!(
        q.push_used(&mem, head, 1),
        Err(PackedQueueError::UsedCountInvalid {
            count: 1,
            outstanding: 0
        })
    );
}

#[test]
fn a_buffer_id_outside_the_queue_fails_the_request_as_a_bad_head() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    put_ring_desc(
        &mem,
        0,
        PackedDesc {
            addr: DATA,
            len: 1,
            id: 0xffff,
            flags: AVAIL | WRITE,
        },
    );
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let heads = pop_all(&mut q, &mem);
    assert_eq!(heads[0].id, 0xffff);
    let err = walk::<4>(&q, &mem, heads[0]).0.unwrap_err();
    assert_eq!(
        err.kind,
        ChainErrorKind::HeadOutOfRange {
            head: 0xffff,
            size: 8
        }
    );
    assert!(!err.head_is_valid());
}

#[test]
fn malformed_lists_fail_the_queue_at_the_pop() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    let (good, _) = d.add(&mem, &[w(DATA, 1)]).unwrap();
    // Position 1: NEXT, but position 2 is not available (the driver exposed a partial list).
    put_ring_desc(
        &mem,
        1,
        PackedDesc {
            addr: DATA,
            len: 1,
            id: 0,
            flags: AVAIL | NEXT,
        },
    );
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    let mut heads = [PackedHead::default(); 8];
    // The good list comes out; the batch stops before the bad one, which fails the next pop.
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(1));
    assert_eq!(heads[0].id, good);
    assert_eq!(
        q.pop_heads(&mem, &mut heads),
        Err(PackedQueueError::NotAvailable { pos: 2 })
    );
    assert_eq!(q.last_avail_idx(), 0x8001, "still at the bad list");

    // A list with NEXT on every descriptor of the ring.
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    for pos in 0..8 {
        put_ring_desc(
            &mem,
            pos,
            PackedDesc {
                addr: DATA,
                len: 1,
                id: 0,
                flags: AVAIL | NEXT,
            },
        );
    }
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    assert_eq!(
        q.pop_head(&mem),
        Err(PackedQueueError::NotAvailable { pos: 0 }),
        "after 8 descriptors the list is back at 0, in the next lap, where 0 is not available"
    );
    // The same in a ring of one descriptor.
    let mut q = PackedQueue::new(config(1), 0).unwrap();
    assert_eq!(
        q.pop_head(&mem),
        Err(PackedQueueError::NotAvailable { pos: 0 })
    );
}

/// A batch's first list is read four descriptors at a time when they do not pass the ring's end,
/// one by one otherwise and past the fourth: lists of one to six descriptors at every position of
/// a ring of eight (some across its end) pop and walk the same, and a descriptor of the list that
/// is not available fails the pop at its own position, whichever way it was read.
#[test]
fn first_lists_of_every_length_at_every_position() {
    for n in 1..=6u16 {
        for start in 0..8u16 {
            for hole in 0..=n {
                let mut ram = packed_support::ram();
                let mem = packed_support::mem(&mut ram);
                for k in 0..n {
                    let (pos, wrap) = ((start + k) % 8, start + k < 8);
                    let last = k + 1 == n;
                    // `hole` (1..n): that descriptor is left in the previous lap.
                    let flags = if k == hole { 0 } else { avail_bits(wrap) }
                        | if last { WRITE } else { NEXT };
                    let id = if last { 7 } else { 0 };
                    let desc = PackedDesc {
                        addr: DATA + u64::from(k),
                        len: 1,
                        id,
                        flags,
                    };
                    put_ring_desc(&mem, pos, desc);
                }
                let mut q = PackedQueue::new(config(8), 0).unwrap();
                q.set_last_avail_idx(0x8000 | start).unwrap();
                let mut heads = [PackedHead::default(); 4];
                let popped = q.pop_heads(&mem, &mut heads);
                if hole == 0 {
                    // The first descriptor not available: nothing to pop.
                    assert_eq!(popped, Ok(0), "n {n} start {start}");
                    continue;
                }
                if hole < n {
                    let pos = (start + hole) % 8;
                    assert_eq!(
                        popped,
                        Err(PackedQueueError::NotAvailable { pos }),
                        "n {n} start {start} hole {hole}"
                    );
                    continue;
                }
                assert_eq!(popped, Ok(1), "n {n} start {start}");
                let head = PackedHead {
                    id: 7,
                    pos: start,
                    count: n,
                    wrap: true,
                };
                assert_eq!(heads[0], head);
                let mut copied = Chain::<8>::new();
                let mut ringed = Chain::<8>::new();
                q.walk_popped(&mem, head, &mut copied).unwrap();
                q.walk_chain(&mem, head, &mut ringed).unwrap();
                assert_eq!(copied.segments(), ringed.segments());
                assert_eq!(copied.segments().len(), usize::from(n));
                assert_eq!(q.pop_heads(&mem, &mut heads), Ok(0));
            }
        }
    }
}

#[test]
fn reavailable_descriptors_the_device_still_owns_fail_the_queue() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(4), 0).unwrap();
    let mut d = Driver::new(4);
    for k in 0..4 {
        d.add(&mem, &[w(DATA + k, 1)]).unwrap();
    }
    assert_eq!(pop_all(&mut q, &mem).len(), 4);
    assert_eq!(q.outstanding(), 4);
    // The device returned nothing, yet the driver marks position 0 available for lap 2.
    put_ring_desc(
        &mem,
        0,
        PackedDesc {
            addr: DATA,
            len: 1,
            id: 0,
            flags: avail_bits(false),
        },
    );
    assert_eq!(
        q.pop_head(&mem),
        Err(PackedQueueError::Overcommitted { pos: 0 })
    );
}

#[test]
fn reavailable_lists_read_ahead_fail_the_queue_when_popped_from_the_copies() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(4), 0).unwrap();
    let mut d = Driver::new(4);
    for k in 0..4 {
        d.add(&mem, &[w(DATA + k, 1)]).unwrap();
    }
    // Two popped, the two behind them read ahead into the copies.
    let mut heads = [PackedHead::default(); 2];
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(2));
    assert_eq!(q.outstanding(), 2);
    // Nothing returned, yet positions 0 and 1 are made available again for lap 2.
    for pos in 0..2 {
        put_ring_desc(
            &mem,
            pos,
            PackedDesc {
                addr: DATA,
                len: 1,
                id: pos,
                flags: 2 | avail_bits(false), // WRITE
            },
        );
    }
    // The two read ahead fill the ring; the batch stops before the first that overcommits it ...
    let mut heads = [PackedHead::default(); 4];
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(2));
    assert_eq!((heads[0].pos, heads[1].pos), (2, 3));
    assert_eq!(q.outstanding(), 4);
    // ... which the next pop reports, from the copies as from the ring.
    assert_eq!(
        q.pop_heads(&mem, &mut heads),
        Err(PackedQueueError::Overcommitted { pos: 0 })
    );
    let mut heads = [PackedHead::default(); 32];
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Err(PackedQueueError::Overcommitted { pos: 0 })
    );
    assert_eq!(q.outstanding(), 4);
}

#[test]
fn pipelined_pop_takes_half_above_sixteen() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(64), 0).unwrap();
    let mut d = Driver::new(64);
    let ids: Vec<u16> = (0..20)
        .map(|k| d.add(&mem, &[r(DATA + k, 1), w(DATA + 64, 1)]).unwrap().0)
        .collect();
    let mut heads = [PackedHead::default(); 32];
    assert_eq!(q.pop_heads_pipelined(&mem, &mut heads), Ok(10));
    assert_eq!(q.outstanding(), 20);
    assert_eq!(q.last_avail_idx(), 0x8000 | 20);
    assert_eq!(q.pop_heads_pipelined(&mem, &mut heads), Ok(10));
    assert_eq!(
        heads[..10].iter().map(|h| h.id).collect::<Vec<_>>(),
        ids[10..]
    );
    assert_eq!(q.outstanding(), 40);
    assert_eq!(q.pop_heads_pipelined(&mem, &mut heads), Ok(0));
    // Up to sixteen are taken at once.
    for k in 0..12 {
        d.add(&mem, &[w(DATA + k, 1)]).unwrap();
    }
    assert_eq!(q.pop_heads_pipelined(&mem, &mut heads), Ok(12));
}

/// Lists of every length against how the pop reads the ring (a batch's first list descriptor by
/// descriptor, then runs of 16, 32 and 64 descriptors; 128 kept at most): a list longer than a run
/// is read by a longer one or starts the next batch, a list longer than the copies is popped from
/// the ring on its own, and each list is walked from the pop's copies exactly as from the ring.
#[test]
fn lists_longer_than_a_run_are_popped_whole() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(512), 0).unwrap();
    let mut d = Driver::new(512);
    let lens = [3usize, 20, 1, 40, 2, 70, 3, 150, 5, 100, 1];
    let ids: Vec<u16> = lens
        .iter()
        .map(|&n| {
            let elems: Vec<Elem> = (0..n as u64)
                .map(|k| {
                    if k + 1 == n as u64 {
                        w(DATA + k, 1)
                    } else {
                        r(DATA + k, 1)
                    }
                })
                .collect();
            d.add(&mem, &elems).unwrap().0
        })
        .collect();
    let mut heads = [PackedHead::default(); 32];
    let mut popped = Vec::new();
    while popped.len() < lens.len() {
        let n = q.pop_heads(&mem, &mut heads).unwrap();
        assert!(n > 0, "every list was made available");
        for &head in &heads[..n] {
            let mut copied = Chain::<256>::new();
            let mut ringed = Chain::<256>::new();
            q.walk_popped(&mem, head, &mut copied).unwrap();
            q.walk_chain(&mem, head, &mut ringed).unwrap();
            assert_eq!(copied.segments(), ringed.segments());
            popped.push((head.id, copied.segments().len()));
        }
    }
    assert_eq!(
        popped,
        ids.iter().copied().zip(lens).collect::<Vec<_>>(),
        "in order, whole"
    );
    assert_eq!(q.outstanding(), lens.iter().sum::<usize>() as u16);
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(0));
}

#[test]
fn driver_event_suppression_decides_notifications() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    let mut q = PackedQueue::new(config(8), EVENT_IDX).unwrap();
    let mut round = |q: &mut PackedQueue, n: usize| {
        for k in 0..n {
            d.add(&mem, &[w(DATA + k as u64, 1)]).unwrap();
        }
        for h in pop_all(q, &mem) {
            q.push_used(&mem, h, 1).unwrap();
        }
        q.publish_used(&mem).unwrap();
        while d.reap(&mem).is_some() {}
        q.needs_notification(&mem).unwrap()
    };
    // ENABLE (the zero-initialised structure).
    assert!(round(&mut q, 1));
    assert!(
        !q.needs_notification(&mem).unwrap(),
        "nothing new published"
    );
    // DISABLE.
    set_driver_event(&mem, 0, 1);
    assert!(!round(&mut q, 2));
    // DESC at position 5 of lap 1: used positions 3, 4 are written: not yet.
    set_driver_event(&mem, 0x8005, 2);
    assert!(!round(&mut q, 2), "used 3..5 does not reach 5");
    assert!(round(&mut q, 1), "used 5");
    // DESC at position 1 of lap 2 (wrap 0); used now at 6: 6, 7 (lap 1), 0 (lap 2): no;
    // then 1: yes.
    set_driver_event(&mem, 0x0001, 2);
    assert!(!round(&mut q, 3));
    assert!(round(&mut q, 1));
    // DESC at position 1 of lap 1 (a lap ago): no.
    set_driver_event(&mem, 0x8001, 2);
    assert!(!round(&mut q, 4));
    // Reserved mode 3: notify.
    set_driver_event(&mem, 0, 3);
    assert!(round(&mut q, 1));
    // A round that wrote a whole ring's worth of descriptors passes every position: yes.
    set_driver_event(&mem, 0x7fff, 2);
    assert!(round(&mut q, 8));

    // Without EVENT_IDX, DESC counts as ENABLE.
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    set_driver_event(&mem, 0x8007, 2);
    for _ in 0..3 {
        d.add(&mem, &[w(DATA, 1)]).unwrap();
        let h = pop_all(&mut q, &mem)[0];
        q.add_used(&mem, h, 1).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
        d.reap(&mem).unwrap();
    }
}

/// The packed ring's lost wake-up, as the split ring's
/// (`late_notification_finds_a_driver_that_re_armed_behind_what_was_published`): the driver
/// re-arms in DESC mode at a position the device passed since its last notification.
#[test]
fn late_notification_finds_a_driver_that_re_armed_behind_what_was_published() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    let mut q = PackedQueue::new(config(8), EVENT_IDX).unwrap();
    let mut complete = |q: &mut PackedQueue, n: usize| {
        for k in 0..n {
            d.add(&mem, &[w(DATA + k as u64, 1)]).unwrap();
        }
        for h in pop_all(q, &mem) {
            q.push_used(&mem, h, 1).unwrap();
        }
        q.publish_used(&mem).unwrap();
    };
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Settled));
    complete(&mut q, 1);
    assert!(
        q.needs_notification(&mem).unwrap(),
        "used 0: first decision"
    );
    // The driver processes with notifications off; the device publishes positions 1 and 2.
    set_driver_event(&mem, 0, 1);
    complete(&mut q, 2);
    assert!(!q.needs_notification(&mem).unwrap());
    assert_eq!(
        q.late_notification(&mem),
        Ok(LateNotification::Settled),
        "DISABLE: the driver asks for nothing"
    );
    // Re-armed at position 1 of lap 1 (it saw used 0 only): it waits for what it was not shown.
    set_driver_event(&mem, 0x8001, 2);
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Notify));
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Settled));
    assert!(!q.needs_notification(&mem).unwrap(), "not repeated");
    // Still processing (the offset a lap behind the last notification): wait; then it re-arms at
    // the published position (4 of lap 1): settled.
    complete(&mut q, 1);
    set_driver_event(&mem, 0x0003, 2);
    assert!(!q.needs_notification(&mem).unwrap());
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Wait));
    set_driver_event(&mem, 0x8004, 2);
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Settled));
}

#[test]
fn first_notification_is_unconditional_with_event_idx() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut d = Driver::new(8);
    let mut q = PackedQueue::new(config(8), EVENT_IDX).unwrap();
    set_driver_event(&mem, 0x8007, 2);
    d.add(&mem, &[w(DATA, 1)]).unwrap();
    let h = pop_all(&mut q, &mem)[0];
    q.add_used(&mem, h, 1).unwrap();
    assert!(q.needs_notification(&mem).unwrap());
    assert!(!q.needs_notification(&mem).unwrap());
}

#[test]
fn device_event_suppression_asks_for_kicks() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), EVENT_IDX).unwrap();
    q.disable_kicks(&mem).unwrap();
    let mut raw = [0u8; 4];
    mem.read(DEVICE_EVENT, &mut raw).unwrap();
    assert_eq!(raw, [0, 0, 1, 0], "flags RING_EVENT_FLAGS_DISABLE");
    let mut d = Driver::new(8);
    d.add(&mem, &[w(DATA, 1), w(DATA + 1, 1)]).unwrap();
    assert_eq!(pop_all(&mut q, &mem).len(), 1);
    // Interrupt mode with EVENT_IDX: DESC at the next position to pop (2, wrap 1).
    assert!(!q.enable_kicks(&mem).unwrap());
    mem.read(DEVICE_EVENT, &mut raw).unwrap();
    assert_eq!(raw, [2, 0x80, 2, 0]);
    assert_eq!(
        EventSuppress::from_bytes(&raw),
        EventSuppress::Desc {
            offset: 2,
            wrap: true
        }
    );
    d.add(&mem, &[w(DATA, 1)]).unwrap();
    assert!(q.enable_kicks(&mem).unwrap(), "a list is already available");
    q.disable_kicks(&mem).unwrap();
    assert_eq!(device_event(&mem), (0, 1));
    // Without EVENT_IDX: ENABLE.
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    q.enable_kicks(&mem).unwrap();
    assert_eq!(device_event(&mem), (0, 0));
    // disable_kicks writes once: a value the driver (wrongly) scribbles over stays.
    q.disable_kicks(&mem).unwrap();
    mem.store_u16(DEVICE_EVENT + 2, 0, Ordering::Release)
        .unwrap();
    q.disable_kicks(&mem).unwrap();
    assert_eq!(device_event(&mem), (0, 0));
}

#[test]
fn vring_base_round_trips_and_is_checked() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    assert_eq!(q.last_avail_idx(), 0x8000, "position 0, wrap counter 1");
    q.set_last_avail_idx(0x0005).unwrap();
    assert_eq!(
        (q.last_avail_idx(), q.used_idx(), q.outstanding()),
        (5, 5, 0)
    );
    assert_eq!(
        q.set_last_avail_idx(0x8008),
        Err(PackedQueueError::InvalidRingState { value: 0x8008 })
    );
    // Lists in flight: used at 3 of the same lap, avail at 5: two outstanding.
    q.set_used_idx(0x0003).unwrap();
    assert_eq!(q.outstanding(), 2);
    // Used at 6 of the previous lap (wrap 1), avail at 5 of this one (wrap 0): seven.
    q.set_used_idx(0x8006).unwrap();
    assert_eq!(q.outstanding(), 7);
    // Used ahead of avail in the same lap: more than a ring outstanding.
    assert_eq!(
        q.set_used_idx(0x0006),
        Err(PackedQueueError::InvalidRingState { value: 6 })
    );
    // A driver resuming at position 5 of lap 2 (wrap 0).
    let mut d = Driver::new(8);
    d.next_avail = 5;
    d.avail_wrap = false;
    d.next_used = 5;
    d.used_wrap = false;
    let mut q = PackedQueue::new(config(8), 0).unwrap();
    q.set_last_avail_idx(5).unwrap();
    let (id, _) = d.add(&mem, &[w(DATA, 2)]).unwrap();
    let heads = pop_all(&mut q, &mem);
    assert_eq!(heads.len(), 1);
    q.add_used(&mem, heads[0], 2).unwrap();
    assert_eq!(d.reap(&mem).map(|u| (u.id, u.pos)), Some((id, 5)));
}

#[test]
fn queue_configuration_is_checked() {
    let mut ram = packed_support::ram();
    let mem = packed_support::mem(&mut ram);
    assert_eq!(
        PackedQueue::new(config(0), 0).unwrap_err(),
        PackedQueueError::InvalidSize(0)
    );
    assert_eq!(
        PackedQueue::new(config(32769), 0).unwrap_err(),
        PackedQueueError::InvalidSize(32769)
    );
    assert!(PackedQueue::new(config(32768), 0).is_ok());
    assert!(PackedQueue::new(config(3), 0).is_ok());
    for (cfg, part, addr) in [
        (
            QueueConfig {
                desc_table: RING + 8,
                ..config(8)
            },
            PackedRingPart::DescRing,
            RING + 8,
        ),
        (
            QueueConfig {
                avail_ring: DRIVER_EVENT + 2,
                ..config(8)
            },
            PackedRingPart::DriverEvent,
            DRIVER_EVENT + 2,
        ),
        (
            QueueConfig {
                used_ring: DEVICE_EVENT + 2,
                ..config(8)
            },
            PackedRingPart::DeviceEvent,
            DEVICE_EVENT + 2,
        ),
    ] {
        assert_eq!(
            PackedQueue::new(cfg, 0).unwrap_err(),
            PackedQueueError::Misaligned { part, addr }
        );
    }
    // A ring running off the end of guest memory.
    let q = PackedQueue::new(
        QueueConfig {
            desc_table: BASE + RAM as u64 - 0x70,
            ..config(8)
        },
        0,
    )
    .unwrap();
    assert!(matches!(
        q.check_rings(&mem),
        Err(PackedQueueError::Memory {
            part: PackedRingPart::DescRing,
            ..
        })
    ));
    let mut q = PackedQueue::new(
        QueueConfig {
            avail_ring: BASE + RAM as u64,
            ..config(8)
        },
        0,
    )
    .unwrap();
    assert!(q.check_rings(&mem).is_err());
    // Accesses to an unmapped part are errors, not panics.
    assert!(matches!(
        q.needs_notification(&mem),
        Err(PackedQueueError::Memory {
            part: PackedRingPart::DriverEvent,
            ..
        })
    ));
    let mut q = PackedQueue::new(
        QueueConfig {
            desc_table: u64::MAX - 15,
            ..config(8)
        },
        0,
    )
    .unwrap();
    assert!(q.pop_head(&mem).is_err());
}

#[test]
fn layout_constants_match_virtio_bindings() {
    use rvhost_core::virtq::packed::*;
    use virtio_bindings::virtio_ring as vr;
    assert_eq!(VIRTQ_DESC_F_AVAIL, 1 << vr::VRING_PACKED_DESC_F_AVAIL);
    assert_eq!(VIRTQ_DESC_F_USED, 1 << vr::VRING_PACKED_DESC_F_USED);
    assert_eq!(
        u32::from(RING_EVENT_FLAGS_ENABLE),
        vr::VRING_PACKED_EVENT_FLAG_ENABLE
    );
    assert_eq!(
        u32::from(RING_EVENT_FLAGS_DISABLE),
        vr::VRING_PACKED_EVENT_FLAG_DISABLE
    );
    assert_eq!(
        u32::from(RING_EVENT_FLAGS_DESC),
        vr::VRING_PACKED_EVENT_FLAG_DESC
    );
    assert_eq!(RING_EVENT_WRAP_BIT, 1 << vr::VRING_PACKED_EVENT_F_WRAP_CTR);
    assert_eq!(
        PackedDesc::SIZE,
        core::mem::size_of::<vr::vring_packed_desc>()
    );
    assert_eq!(
        EVENT_SUPPRESS_SIZE as usize,
        core::mem::size_of::<vr::vring_packed_desc_event>()
    );
    // Field order: addr, len, id, flags.
    let d = vr::vring_packed_desc {
        addr: 0x1122_3344_5566_7788,
        len: 0x99aa_bbcc,
        id: 0xddee,
        flags: 0x0ff0,
    };
    let ours = PackedDesc {
        addr: d.addr,
        len: d.len,
        id: d.id,
        flags: d.flags,
    }
    .to_bytes();
    let mut theirs = [0u8; 16];
    theirs[..8].copy_from_slice(&{ d.addr }.to_le_bytes());
    theirs[8..12].copy_from_slice(&{ d.len }.to_le_bytes());
    theirs[12..14].copy_from_slice(&{ d.id }.to_le_bytes());
    theirs[14..].copy_from_slice(&{ d.flags }.to_le_bytes());
    assert_eq!(ours, theirs);
    assert_eq!(core::mem::offset_of!(vr::vring_packed_desc, len), 8);
    assert_eq!(core::mem::offset_of!(vr::vring_packed_desc, id), 12);
    assert_eq!(core::mem::offset_of!(vr::vring_packed_desc, flags), 14);
    assert_eq!(core::mem::offset_of!(vr::vring_packed_desc_event, flags), 2);
    let _ = Ordering::Relaxed;
}
