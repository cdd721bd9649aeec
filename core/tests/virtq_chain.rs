//! Descriptor-chain walking (virtio 1.2 §2.7.5): direct, indirect, and every rejection.

mod virtq_support;

use core::sync::atomic::Ordering;

use rvhost_core::mem::{Direction, GuestMemory, MemError, Segment};
use rvhost_core::virtq::{Chain, ChainError, ChainErrorKind, SplitQueue};
use virtq_support::*;

const INDIRECT_DESC: u64 = 1 << 28;

fn seg(gpa: u64, len: u32, direction: Direction) -> Segment {
    Segment {
        guest_addr: gpa,
        host_addr: host(gpa),
        len,
        direction,
    }
}

fn walk<const N: usize>(
    q: &SplitQueue,
    mem: &impl GuestMemory,
    head: u16,
) -> (Result<(), ChainError>, Chain<N>) {
    let mut chain = Chain::<N>::new();
    let r = q.walk_chain(mem, head, &mut chain);
    (r, chain)
}

#[test]
fn three_descriptor_chain_from_literal_table() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    // Descriptor table bytes as a virtio-blk driver writes them for a 512-byte read (§2.7.5):
    // [0] header: addr DATA, len 16, NEXT, next 1
    // [1] data:   addr DATA+0x1000, len 512, NEXT|WRITE, next 2
    // [2] status: addr DATA+0x2000, len 1, WRITE
    #[rustfmt::skip]
    let table: [u8; 48] = [
        0x00, 0x00, 0x03, 0x40, 0, 0, 0, 0,  16, 0, 0, 0,  1, 0,  1, 0,
        0x00, 0x10, 0x03, 0x40, 0, 0, 0, 0,  0, 2, 0, 0,   3, 0,  2, 0,
        0x00, 0x20, 0x03, 0x40, 0, 0, 0, 0,  1, 0, 0, 0,   2, 0,  0, 0,
    ];
    mem.write(DESC, &table).unwrap();
    let q = SplitQueue::new(config(8), 0).unwrap();
    let (r, chain) = walk::<4>(&q, &mem, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(chain.head(), 0);
    assert_eq!(
        chain.segments(),
        &[
            seg(DATA, 16, Direction::DeviceReadable),
            seg(DATA + 0x1000, 512, Direction::DeviceWritable),
            seg(DATA + 0x2000, 1, Direction::DeviceWritable),
        ]
    );
    assert_eq!(chain.readable().len(), 1);
    assert_eq!(chain.writable().len(), 2);
    assert_eq!((chain.readable_len(), chain.writable_len()), (16, 513));
    assert_eq!(chain.descriptor_count(), 3);
}

#[test]
fn chain_is_reused_between_walks() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    put_desc(&mem, DESC, 0, desc(DATA, 8, NEXT, 1));
    put_desc(&mem, DESC, 1, desc(DATA + 8, 8, WRITE, 0));
    put_desc(&mem, DESC, 2, desc(DATA + 64, 4, 0, 0));
    let q = SplitQueue::new(config(4), 0).unwrap();
    let mut chain = Chain::<4>::new();
    q.walk_chain(&mem, 0, &mut chain).unwrap();
    assert_eq!(chain.segments().len(), 2);
    q.walk_chain(&mem, 2, &mut chain).unwrap();
    assert_eq!(chain.head(), 2);
    assert_eq!(
        chain.segments(),
        &[seg(DATA + 64, 4, Direction::DeviceReadable)]
    );
    assert_eq!(chain.writable_len(), 0);
}

#[test]
fn indirect_table_is_followed() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let table = DATA + 0x8000;
    put_desc(&mem, table, 0, desc(DATA, 16, NEXT, 2)); // entries out of order on purpose
    put_desc(&mem, table, 2, desc(DATA + 0x100, 4096, NEXT | WRITE, 1));
    put_desc(&mem, table, 1, desc(DATA + 0x2000, 1, WRITE, 0));
    put_desc(&mem, DESC, 5, desc(table, 48, INDIRECT, 0));
    let q = SplitQueue::new(config(8), INDIRECT_DESC).unwrap();
    let (r, chain) = walk::<8>(&q, &mem, 5);
    assert_eq!(r, Ok(()));
    assert_eq!(chain.head(), 5);
    assert_eq!(chain.readable_len(), 16);
    assert_eq!(chain.writable_len(), 4097);
    assert_eq!(
        chain.segments()[1],
        seg(DATA + 0x100, 4096, Direction::DeviceWritable)
    );
    assert_eq!(chain.descriptor_count(), 4);
}

#[test]
fn direct_descriptors_may_precede_an_indirect_one() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let table = DATA + 0x8000;
    put_desc(&mem, table, 0, desc(DATA + 0x100, 512, NEXT | WRITE, 1));
    put_desc(&mem, table, 1, desc(DATA + 0x2000, 1, WRITE, 0));
    put_desc(&mem, DESC, 0, desc(DATA, 16, NEXT, 1));
    put_desc(&mem, DESC, 1, desc(table, 32, INDIRECT | WRITE, 0)); // WRITE is ignored here
    let q = SplitQueue::new(config(4), INDIRECT_DESC).unwrap();
    let (r, chain) = walk::<8>(&q, &mem, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(chain.segments().len(), 3);
    assert_eq!((chain.readable_len(), chain.writable_len()), (16, 513));
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    put_desc(&mem, DESC, 0, desc(DATA, 16, NEXT, 1));
    // Zero-length, even at an unmapped address and in the "wrong" direction: carries nothing.
    put_desc(&mem, DESC, 1, desc(0xdead_0000, 0, NEXT | WRITE, 2));
    put_desc(&mem, DESC, 2, desc(DATA + 16, 16, NEXT, 3));
    put_desc(&mem, DESC, 3, desc(DATA + 0x100, 1, WRITE, 0));
    let q = SplitQueue::new(config(4), 0).unwrap();
    let (r, chain) = walk::<4>(&q, &mem, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(chain.segments().len(), 3);
    assert_eq!(chain.descriptor_count(), 4);
    assert_eq!(chain.readable_len(), 32);
}

#[test]
fn a_chain_of_queue_size_descriptors_works() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let size = 256u16;
    for i in 0..size {
        let last = i == size - 1;
        let flags = if last {
            WRITE
        } else {
            NEXT | if i > 0 { WRITE } else { 0 }
        };
        put_desc(
            &mem,
            DESC,
            i,
            desc(DATA + 16 * u64::from(i), 16, flags, i + 1),
        );
    }
    let q = SplitQueue::new(config(size), 0).unwrap();
    let (r, chain) = walk::<256>(&q, &mem, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(chain.segments().len(), 256);
    assert_eq!(chain.writable_len(), 255 * 16);
}

#[test]
fn head_out_of_range() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let q = SplitQueue::new(config(4), 0).unwrap();
    let (r, _) = walk::<4>(&q, &mem, 4);
    let e = r.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::HeadOutOfRange { head: 4, size: 4 });
    assert!(!e.head_is_valid());
    assert!(e.kind.is_structural());
    assert_eq!(e.status_segment(), None);
}

#[test]
fn next_out_of_range() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    put_desc(&mem, DESC, 0, desc(DATA, 16, NEXT, 4));
    let q = SplitQueue::new(config(4), 0).unwrap();
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(
        e.kind,
        ChainErrorKind::NextOutOfRange {
            next: 4,
            table_len: 4
        }
    );
    assert!(e.head_is_valid());
    assert_eq!(e.last_segment, None);
}

#[test]
fn loops_are_caught() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    put_desc(&mem, DESC, 0, desc(DATA, 16, NEXT, 1));
    put_desc(&mem, DESC, 1, desc(DATA, 16, NEXT, 0));
    let q = SplitQueue::new(config(4), 0).unwrap();
    let e = walk::<64>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::ChainTooLong { limit: 4 });
    // A self-loop of zero-length descriptors, too.
    put_desc(&mem, DESC, 2, desc(0, 0, NEXT, 2));
    let e = walk::<64>(&q, &mem, 2).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::ChainTooLong { limit: 4 });
    // And inside an indirect table.
    let table = DATA + 0x8000;
    put_desc(&mem, table, 0, desc(DATA, 16, NEXT, 1));
    put_desc(&mem, table, 1, desc(DATA, 16, NEXT, 0));
    put_desc(&mem, DESC, 3, desc(table, 32, INDIRECT, 0));
    let q = SplitQueue::new(config(4), INDIRECT_DESC).unwrap();
    let e = walk::<64>(&q, &mem, 3).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::ChainTooLong { limit: 2 });
}

#[test]
fn capacity_exceeded_still_reports_the_status_segment() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    for i in 0..5u16 {
        let flags = if i == 4 { WRITE } else { NEXT };
        put_desc(
            &mem,
            DESC,
            i,
            desc(DATA + 16 * u64::from(i), 16, flags, i + 1),
        );
    }
    let q = SplitQueue::new(config(8), 0).unwrap();
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::CapacityExceeded { capacity: 4 });
    assert!(!e.kind.is_structural());
    assert_eq!(
        e.status_segment(),
        Some(seg(DATA + 64, 16, Direction::DeviceWritable))
    );
}

#[test]
fn readable_after_writable_is_rejected() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    put_desc(&mem, DESC, 0, desc(DATA, 16, NEXT | WRITE, 1));
    put_desc(&mem, DESC, 1, desc(DATA + 16, 16, NEXT, 2));
    put_desc(&mem, DESC, 2, desc(DATA + 32, 1, WRITE, 0));
    let q = SplitQueue::new(config(4), 0).unwrap();
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::ReadableAfterWritable);
    assert_eq!(
        e.status_segment(),
        Some(seg(DATA + 32, 1, Direction::DeviceWritable))
    );
}

#[test]
fn unmapped_buffers_are_rejected() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let end = BASE + RAM as u64;
    // A data buffer straddling the end of memory; the status byte is fine.
    put_desc(&mem, DESC, 0, desc(DATA, 16, NEXT, 1));
    put_desc(&mem, DESC, 1, desc(end - 8, 16, NEXT | WRITE, 2));
    put_desc(&mem, DESC, 2, desc(DATA + 32, 1, WRITE, 0));
    let q = SplitQueue::new(config(8), 0).unwrap();
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(
        e.kind,
        ChainErrorKind::BufferUnmapped {
            addr: end - 8,
            len: 16,
            err: MemError::Unmapped {
                addr: end - 8,
                len: 16
            }
        }
    );
    assert_eq!(
        e.status_segment(),
        Some(seg(DATA + 32, 1, Direction::DeviceWritable))
    );

    // The status byte itself unmapped: nowhere to report.
    put_desc(&mem, DESC, 2, desc(0x10, 1, WRITE, 0));
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert!(matches!(e.kind, ChainErrorKind::BufferUnmapped { addr, .. } if addr == end - 8));
    assert_eq!(e.last_segment, None);

    // Address arithmetic that overflows.
    put_desc(&mem, DESC, 3, desc(u64::MAX - 4, 16, WRITE, 0));
    let e = walk::<4>(&q, &mem, 3).0.unwrap_err();
    assert!(matches!(
        e.kind,
        ChainErrorKind::BufferUnmapped {
            err: MemError::Overflow,
            ..
        }
    ));
}

#[test]
fn descriptor_table_outside_memory() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let cfg = rvhost_core::virtq::QueueConfig {
        desc_table: BASE + RAM as u64 - 32,
        ..config(4)
    };
    let q = SplitQueue::new(cfg, 0).unwrap();
    assert!(
        walk::<4>(&q, &mem, 1).0.is_ok(),
        "descriptor 1 is the last mapped one"
    );
    let e = walk::<4>(&q, &mem, 2).0.unwrap_err();
    assert!(matches!(
        e.kind,
        ChainErrorKind::DescriptorUnreadable { .. }
    ));
}

#[test]
fn indirect_rules() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let table = DATA + 0x8000;
    put_desc(&mem, table, 0, desc(DATA, 16, 0, 0));
    let with = SplitQueue::new(config(8), INDIRECT_DESC).unwrap();
    let without = SplitQueue::new(config(8), 0).unwrap();
    let kind = |q: &SplitQueue, mem: &_| walk::<8>(q, mem, 0).0.unwrap_err().kind;

    put_desc(&mem, DESC, 0, desc(table, 16, INDIRECT, 0));
    assert_eq!(kind(&without, &mem), ChainErrorKind::IndirectNotNegotiated);
    assert!(walk::<8>(&with, &mem, 0).0.is_ok());

    put_desc(&mem, DESC, 0, desc(table, 16, INDIRECT | NEXT, 1));
    assert_eq!(kind(&with, &mem), ChainErrorKind::IndirectWithNext);

    put_desc(&mem, DESC, 0, desc(table, 0, INDIRECT, 0));
    assert_eq!(
        kind(&with, &mem),
        ChainErrorKind::IndirectTableLength { len: 0 }
    );
    put_desc(&mem, DESC, 0, desc(table, 17, INDIRECT, 0));
    assert_eq!(
        kind(&with, &mem),
        ChainErrorKind::IndirectTableLength { len: 17 }
    );

    put_desc(&mem, DESC, 0, desc(BASE + RAM as u64 - 16, 32, INDIRECT, 0));
    assert!(matches!(
        kind(&with, &mem),
        ChainErrorKind::IndirectTableUnmapped { len: 32, .. }
    ));

    // Nested indirect.
    put_desc(&mem, table, 0, desc(table + 0x100, 16, INDIRECT, 0));
    put_desc(&mem, DESC, 0, desc(table, 16, INDIRECT, 0));
    assert_eq!(kind(&with, &mem), ChainErrorKind::NestedIndirect);

    // `next` inside the table is bounded by the table, not the queue.
    put_desc(&mem, table, 0, desc(DATA, 16, NEXT, 1));
    assert_eq!(
        kind(&with, &mem),
        ChainErrorKind::NextOutOfRange {
            next: 1,
            table_len: 1
        }
    );
}

/// Guest memory with a 1 TiB address space whose contents are zero except for a small RAM window,
/// for lengths no real test buffer can have.
struct HugeMemory<'a> {
    low: rvhost_core::mem::ByteMemory<'a>,
    reads: core::cell::Cell<u64>,
}

impl GuestMemory for HugeMemory<'_> {
    fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError> {
        let end = addr.checked_add(len).ok_or(MemError::Overflow)?;
        if end > 1 << 40 {
            return Err(MemError::Unmapped { addr, len });
        }
        Ok(addr)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.reads.set(self.reads.get() + 1);
        self.low.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.low.write(addr, buf)
    }
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemError> {
        self.low.load_u16(addr, order)
    }
    fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemError> {
        self.low.store_u16(addr, val, order)
    }
}

#[test]
fn total_length_over_4_gib_is_rejected() {
    let mut ram = ram();
    let mem = HugeMemory {
        low: mem(&mut ram),
        reads: Default::default(),
    };
    put_desc(&mem.low, DESC, 0, desc(1 << 33, 0x8000_0000, NEXT, 1));
    put_desc(
        &mem.low,
        DESC,
        1,
        desc(1 << 34, 0x7fff_fffe, NEXT | WRITE, 2),
    );
    put_desc(&mem.low, DESC, 2, desc(1 << 35, 1, WRITE, 0));
    let q = SplitQueue::new(config(4), 0).unwrap();
    let (r, chain) = walk::<4>(&q, &mem, 0);
    assert_eq!(r, Ok(()), "exactly u32::MAX bytes is fine");
    assert_eq!(chain.writable_len(), 0x7fff_ffff);
    put_desc(&mem.low, DESC, 2, desc(1 << 35, 2, WRITE, 0));
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::TotalLengthOverflow);
    assert_eq!(e.last_segment.map(|s| s.len), Some(2));
}

#[test]
fn huge_indirect_table_costs_at_most_64k_reads() {
    let mut ram = ram();
    let mem = HugeMemory {
        low: mem(&mut ram),
        reads: Default::default(),
    };
    // A 4 GiB - 16 byte "table" of zeroes (all readable, len 0 => each entry loops to 0 via no
    // NEXT: the chain ends at entry 0). Then make entry 0 point at itself.
    put_desc(&mem.low, DESC, 0, desc(DATA, 0xffff_fff0, INDIRECT, 0));
    put_desc(&mem.low, DATA, 0, desc(0, 0, NEXT, 0));
    let q = SplitQueue::new(config(4), INDIRECT_DESC).unwrap();
    let e = walk::<4>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::ChainTooLong { limit: 0x0fff_ffff });
    assert_eq!(
        mem.reads.get(),
        1 + 65536,
        "head descriptor + every reachable table entry once"
    );
}

#[test]
fn a_chain_exactly_at_capacity_fits() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    for i in 0..4u16 {
        let flags = if i == 3 { WRITE } else { NEXT };
        put_desc(
            &mem,
            DESC,
            i,
            desc(DATA + 16 * u64::from(i), 16, flags, i + 1),
        );
    }
    let q = SplitQueue::new(config(8), 0).unwrap();
    let (r, chain) = walk::<4>(&q, &mem, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(chain.segments().len(), 4);
    assert_eq!(chain.capacity(), 4);
    let e = walk::<3>(&q, &mem, 0).0.unwrap_err();
    assert_eq!(e.kind, ChainErrorKind::CapacityExceeded { capacity: 3 });
}
