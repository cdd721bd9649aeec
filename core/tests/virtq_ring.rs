//! Available/used ring handling, indices and notification suppression of `SplitQueue`.

mod virtq_support;

use core::sync::atomic::Ordering;

use rvhost_core::mem::{GuestMemory, MemError};
use rvhost_core::virtio::{bit, feature};
use rvhost_core::virtq::{
    LateNotification, QueueConfig, QueueError, RingPart, SplitQueue, POP_SPLIT_ABOVE,
};
use virtq_support::*;

const EVENT_IDX: u64 = 1 << 29;

#[test]
fn queue_size_and_alignment_are_validated() {
    for bad in [0u16, 3, 100, 32767, 65535] {
        assert_eq!(
            SplitQueue::new(config(bad), 0).unwrap_err(),
            QueueError::InvalidSize(bad)
        );
    }
    for good in [1u16, 2, 256, 32768] {
        assert!(SplitQueue::new(config(good), 0).is_ok());
    }
    let misaligned = QueueConfig {
        desc_table: DESC + 8,
        ..config(8)
    };
    assert_eq!(
        SplitQueue::new(misaligned, 0).unwrap_err(),
        QueueError::Misaligned {
            part: RingPart::DescTable,
            addr: DESC + 8
        }
    );
    let misaligned = QueueConfig {
        avail_ring: AVAIL + 1,
        ..config(8)
    };
    assert!(matches!(
        SplitQueue::new(misaligned, 0),
        Err(QueueError::Misaligned {
            part: RingPart::Avail,
            ..
        })
    ));
    let misaligned = QueueConfig {
        used_ring: USED + 2,
        ..config(8)
    };
    assert!(matches!(
        SplitQueue::new(misaligned, 0),
        Err(QueueError::Misaligned {
            part: RingPart::Used,
            ..
        })
    ));
}

#[test]
fn check_rings_requires_every_part_mapped() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    assert_eq!(
        SplitQueue::new(config(256), 0).unwrap().check_rings(&mem),
        Ok(())
    );
    // A used ring whose tail (avail_event) hangs off the end of RAM.
    let end = BASE + RAM as u64;
    let cfg = QueueConfig {
        used_ring: end - 2052, // needs 6 + 8 * 256 = 2054 bytes
        ..config(256)
    };
    assert!(matches!(
        SplitQueue::new(cfg, 0).unwrap().check_rings(&mem),
        Err(QueueError::Memory {
            part: RingPart::Used,
            err: MemError::Unmapped { .. }
        })
    ));
}

#[test]
fn pop_heads_reads_the_spec_layout() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    // avail ring of a size-4 queue, literal bytes: flags 0, idx 3, ring [2, 0, 3, x].
    mem.write(AVAIL, &[0, 0, 3, 0, 2, 0, 0, 0, 3, 0, 0xaa, 0xaa])
        .unwrap();
    let mut q = SplitQueue::new(config(4), 0).unwrap();
    assert_eq!(q.pending(&mem), Ok(3));
    let mut heads = [0xffffu16; 2];
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(2));
    assert_eq!(heads, [2, 0]);
    assert_eq!(q.last_avail_idx(), 2);
    assert_eq!(q.pop_head(&mem), Ok(Some(3)));
    assert_eq!(q.pop_head(&mem), Ok(None));
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(0));
    assert_eq!(q.last_avail_idx(), 3);
}

#[test]
fn pipelined_pop_takes_half_of_what_is_pending_above_the_split_threshold() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(128), 0).unwrap();
    let mut heads = [0xffffu16; 32];
    assert_eq!(q.pop_heads_pipelined(&mem, &mut heads), Ok(0));
    make_available(&mem, 128, &[7]);
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Ok(1),
        "one pending: taken"
    );
    assert_eq!(heads[0], 7);
    let burst: Vec<u16> = (0..POP_SPLIT_ABOVE as u16).collect();
    make_available(&mem, 128, &burst);
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Ok(POP_SPLIT_ABOVE),
        "up to the threshold: all of it"
    );
    assert_eq!(&heads[..POP_SPLIT_ABOVE], &burst[..]);
    let burst: Vec<u16> = (0..32).collect();
    make_available(&mem, 128, &burst);
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Ok(16),
        "32 pending: half"
    );
    assert_eq!(&heads[..16], &burst[..16]);
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Ok(16),
        "16 pending: all"
    );
    assert_eq!(&heads[..16], &burst[16..]);
    make_available(&mem, 128, &[1; 17]);
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Ok(9),
        "17 pending: 9"
    );
    make_available(&mem, 128, &[2; 100]);
    assert_eq!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Ok(32),
        "108 pending: as many as fit"
    );
    assert_eq!(q.pop_heads_pipelined(&mem, &mut heads[..8]), Ok(8));
    assert_eq!(q.pending(&mem), Ok(68));
    // The driver's index is checked as by pop_heads.
    mem.store_u16(
        AVAIL + 2,
        q.last_avail_idx().wrapping_add(129),
        Ordering::Release,
    )
    .unwrap();
    assert!(matches!(
        q.pop_heads_pipelined(&mem, &mut heads),
        Err(QueueError::AvailIdxTooFarAhead { .. })
    ));
}

#[test]
fn prefetching_chains_never_fails_or_changes_anything() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let q = SplitQueue::new(config(4), 0).unwrap();
    // Descriptor 0 points outside memory; heads beyond the queue are ignored.
    mem.write(DESC, &u64::MAX.to_le_bytes()).unwrap();
    let before = ram_snapshot(&mem);
    q.prefetch_chains(&mem, &[0, 1, 3, 4, 0xffff]);
    assert_eq!(ram_snapshot(&mem), before);
    assert_eq!(q.last_avail_idx(), 0);
}

fn ram_snapshot<M: GuestMemory>(mem: &M) -> Vec<u8> {
    let mut bytes = vec![0u8; 0x1000];
    mem.read(DESC, &mut bytes).unwrap();
    bytes
}

#[test]
fn pop_wraps_around_the_ring_and_the_index() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(4), 0).unwrap();
    q.set_last_avail_idx(0xfffe);
    mem.store_u16(AVAIL + 2, 0xfffe, Ordering::Release).unwrap();
    make_available(&mem, 4, &[1, 2, 3]);
    assert_eq!(mem.load_u16(AVAIL + 2, Ordering::Acquire), Ok(1));
    let mut heads = [0u16; 8];
    assert_eq!(q.pop_heads(&mem, &mut heads), Ok(3));
    assert_eq!(&heads[..3], &[1, 2, 3]);
    assert_eq!(q.last_avail_idx(), 1);
}

#[test]
fn avail_idx_more_than_size_ahead_is_an_error() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(4), 0).unwrap();
    mem.store_u16(AVAIL + 2, 4, Ordering::Release).unwrap();
    assert_eq!(q.pending(&mem), Ok(4));
    mem.store_u16(AVAIL + 2, 5, Ordering::Release).unwrap();
    let mut heads = [0u16; 8];
    assert_eq!(
        q.pop_heads(&mem, &mut heads),
        Err(QueueError::AvailIdxTooFarAhead {
            avail_idx: 5,
            last_avail_idx: 0
        })
    );
    // A driver moving idx backwards looks like 65535 pending.
    mem.store_u16(AVAIL + 2, 0xffff, Ordering::Release).unwrap();
    assert!(q.pending(&mem).is_err());
    assert_eq!(q.last_avail_idx(), 0, "nothing consumed on error");
}

#[test]
fn used_elements_are_published_once_per_batch() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(4), 0).unwrap();
    q.push_used(&mem, 2, 0x201).unwrap();
    q.push_used(&mem, 0, 1).unwrap();
    assert_eq!(used_idx(&mem), 0, "not visible before publish");
    assert_eq!(q.used_idx(), 2);
    q.publish_used(&mem).unwrap();
    let mut bytes = [0u8; 20];
    mem.read(USED, &mut bytes).unwrap();
    // flags 0, idx 2, {id 2, len 0x201}, {id 0, len 1} (§2.7.8, little-endian).
    assert_eq!(
        bytes,
        [0, 0, 2, 0, 2, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    );
    assert_eq!(
        q.push_used(&mem, 4, 0),
        Err(QueueError::UsedIdOutOfRange { id: 4 })
    );
}

#[test]
fn used_ring_wraps() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(2), 0).unwrap();
    q.set_used_idx(0xffff);
    q.add_used(&mem, 1, 7).unwrap();
    assert_eq!(used_idx(&mem), 0);
    assert_eq!(used_elem(&mem, 1), (1, 7), "0xffff % 2 == 1");
    q.add_used(&mem, 0, 8).unwrap();
    assert_eq!(used_elem(&mem, 0), (0, 8));
    assert_eq!(used_idx(&mem), 1);
}

#[test]
fn indices_can_be_saved_and_restored() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(8), 0).unwrap();
    q.set_last_avail_idx(300);
    assert_eq!(q.last_avail_idx(), 300);
    mem.store_u16(USED + 2, 297, Ordering::Release).unwrap();
    assert_eq!(q.sync_used_idx_from_ring(&mem), Ok(297));
    assert_eq!(q.used_idx(), 297);
    q.add_used(&mem, 3, 0).unwrap();
    assert_eq!(used_idx(&mem), 298);
    assert_eq!(used_elem(&mem, 297 % 8), (3, 0));
}

#[test]
fn notification_without_event_idx_follows_no_interrupt() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(4), 0).unwrap();
    assert_eq!(
        q.needs_notification(&mem),
        Ok(true),
        "first decision always notifies"
    );
    assert_eq!(
        q.needs_notification(&mem),
        Ok(false),
        "nothing new published"
    );
    q.add_used(&mem, 0, 1).unwrap();
    mem.store_u16(AVAIL, 1, Ordering::Release).unwrap(); // VIRTQ_AVAIL_F_NO_INTERRUPT
    assert_eq!(q.needs_notification(&mem), Ok(false));
    q.add_used(&mem, 1, 1).unwrap();
    mem.store_u16(AVAIL, 0, Ordering::Release).unwrap();
    assert_eq!(q.needs_notification(&mem), Ok(true));
    assert_eq!(q.needs_notification(&mem), Ok(false));
}

#[test]
fn notification_with_event_idx_uses_used_event() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let size = 4u16;
    let used_event = AVAIL + 4 + 2 * u64::from(size);
    let mut q = SplitQueue::new(config(size), EVENT_IDX).unwrap();
    assert!(q.event_idx_enabled());
    // The flag must be ignored with EVENT_IDX.
    mem.store_u16(AVAIL, 1, Ordering::Release).unwrap();
    mem.store_u16(used_event, 0, Ordering::Release).unwrap();
    q.add_used(&mem, 0, 1).unwrap();
    assert_eq!(
        q.needs_notification(&mem),
        Ok(true),
        "first decision always notifies"
    );

    // Driver wants an interrupt when used.idx passes 2 (i.e. after entry 2 is used).
    mem.store_u16(used_event, 2, Ordering::Release).unwrap();
    q.add_used(&mem, 1, 1).unwrap(); // used.idx 1 -> 2: event 2 not in [1, 2)
    assert_eq!(q.needs_notification(&mem), Ok(false));
    q.push_used(&mem, 2, 1).unwrap();
    q.push_used(&mem, 3, 1).unwrap();
    q.publish_used(&mem).unwrap(); // 2 -> 4: event 2 in [2, 4)
    assert_eq!(q.needs_notification(&mem), Ok(true));
    assert_eq!(q.needs_notification(&mem), Ok(false));
}

/// The lost wake-up a late look recovers: the device publishes while the driver re-arms, the
/// two sides' store→load orderings fail, the device reads the stale `used_event` (no
/// notification) and the driver the stale `used.idx` (sleeps). `used_event` then names an index
/// the device passed since its last notification.
#[test]
fn late_notification_finds_a_driver_that_re_armed_behind_what_was_published() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let size = 8u16;
    let used_event = AVAIL + 4 + 2 * u64::from(size);
    let mut q = SplitQueue::new(config(size), EVENT_IDX).unwrap();
    assert_eq!(
        q.late_notification(&mem),
        Ok(LateNotification::Settled),
        "nothing notified yet"
    );
    q.add_used(&mem, 0, 1).unwrap();
    assert_eq!(q.needs_notification(&mem), Ok(true), "used.idx 0 -> 1");
    assert_eq!(
        q.late_notification(&mem),
        Ok(LateNotification::Settled),
        "nothing published since the notification"
    );
    // The driver processes entry 0 with the old used_event (0) in place; the device publishes
    // entries 1 and 2 meanwhile: 0 is not in [1, 3), no notification.
    q.add_used(&mem, 1, 1).unwrap();
    q.add_used(&mem, 2, 1).unwrap();
    assert_eq!(q.needs_notification(&mem), Ok(false));
    assert_eq!(
        q.late_notification(&mem),
        Ok(LateNotification::Wait),
        "used_event still behind the last notification: the driver is processing"
    );
    // It re-arms at 1 (its last seen used index) and, its barrier elided, misses used.idx 3.
    mem.store_u16(used_event, 1, Ordering::Release).unwrap();
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Notify));
    assert_eq!(
        q.late_notification(&mem),
        Ok(LateNotification::Settled),
        "one late notification covers what was published"
    );
    assert_eq!(
        q.needs_notification(&mem),
        Ok(false),
        "and the next decision does not repeat it"
    );
    // A driver that saw everything re-arms at the published index: settled, no notification.
    q.add_used(&mem, 3, 1).unwrap();
    mem.store_u16(used_event, 0, Ordering::Release).unwrap();
    assert_eq!(q.needs_notification(&mem), Ok(false));
    mem.store_u16(used_event, 4, Ordering::Release).unwrap();
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Settled));
}

/// Without EVENT_IDX the flags cannot tell a driver that saw everything from one that did not:
/// a late look never notifies (it would call after every suppressed batch).
#[test]
fn late_notification_without_event_idx_is_settled() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let mut q = SplitQueue::new(config(4), 0).unwrap();
    assert_eq!(q.needs_notification(&mem), Ok(true));
    q.add_used(&mem, 0, 1).unwrap();
    mem.store_u16(AVAIL, 1, Ordering::Release).unwrap(); // VIRTQ_AVAIL_F_NO_INTERRUPT
    assert_eq!(q.needs_notification(&mem), Ok(false));
    mem.store_u16(AVAIL, 0, Ordering::Release).unwrap();
    assert_eq!(q.late_notification(&mem), Ok(LateNotification::Settled));
}

#[test]
fn event_idx_notification_across_the_16_bit_wrap() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let size = 8u16;
    let used_event = AVAIL + 4 + 2 * u64::from(size);
    let mut q = SplitQueue::new(config(size), EVENT_IDX).unwrap();
    q.set_used_idx(0xfffd);
    q.add_used(&mem, 0, 0).unwrap(); // 0xfffe
    q.needs_notification(&mem).unwrap();
    mem.store_u16(used_event, 0xffff, Ordering::Release)
        .unwrap();
    q.push_used(&mem, 1, 0).unwrap();
    q.push_used(&mem, 2, 0).unwrap();
    q.publish_used(&mem).unwrap(); // 0xfffe -> 0x0000 crosses 0xffff
    assert_eq!(used_idx(&mem), 0);
    assert_eq!(q.needs_notification(&mem), Ok(true));
    mem.store_u16(used_event, 0x0005, Ordering::Release)
        .unwrap();
    q.add_used(&mem, 3, 0).unwrap(); // 0 -> 1
    assert_eq!(q.needs_notification(&mem), Ok(false));
}

#[test]
fn poll_mode_suppresses_kicks() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let size = 4u16;
    let avail_event = USED + 4 + 8 * u64::from(size);

    let mut q = SplitQueue::new(config(size), 0).unwrap();
    q.disable_kicks(&mem).unwrap();
    assert_eq!(
        mem.load_u16(USED, Ordering::Acquire),
        Ok(1),
        "VIRTQ_USED_F_NO_NOTIFY"
    );

    let mut q = SplitQueue::new(config(size), bit(feature::VIRTIO_F_RING_EVENT_IDX)).unwrap();
    q.set_last_avail_idx(10);
    q.disable_kicks(&mem).unwrap();
    assert_eq!(mem.load_u16(avail_event, Ordering::Acquire), Ok(9));
    // A driver adding buffers 10, 11, 12 (old idx 10 -> new 13) must not kick.
    assert!(!rvhost_core::virtio::ring::vring_need_event(9, 13, 10));

    // Interrupt mode again: the driver kicks for the next buffer, and pending work is reported.
    mem.store_u16(AVAIL + 2, 10, Ordering::Release).unwrap();
    assert_eq!(q.enable_kicks(&mem), Ok(false));
    assert_eq!(mem.load_u16(USED, Ordering::Acquire), Ok(0));
    assert_eq!(mem.load_u16(avail_event, Ordering::Acquire), Ok(10));
    assert!(rvhost_core::virtio::ring::vring_need_event(10, 11, 10));
    mem.store_u16(AVAIL + 2, 11, Ordering::Release).unwrap();
    assert_eq!(q.enable_kicks(&mem), Ok(true));
}

#[test]
fn ring_accesses_outside_memory_are_errors_not_panics() {
    let mut ram = ram();
    let mem = mem(&mut ram);
    let cfg = QueueConfig {
        size: 4,
        desc_table: 0,
        avail_ring: u64::MAX - 1,
        used_ring: 0x1000,
    };
    let mut q = SplitQueue::new(cfg, EVENT_IDX).unwrap();
    assert!(matches!(
        q.pending(&mem),
        Err(QueueError::Memory {
            part: RingPart::Avail,
            ..
        })
    ));
    assert!(matches!(
        q.add_used(&mem, 0, 0),
        Err(QueueError::Memory {
            part: RingPart::Used,
            ..
        })
    ));
    assert!(matches!(
        q.needs_notification(&mem),
        Err(QueueError::Memory { .. })
    ));
    assert!(q.disable_kicks(&mem).is_err());
}
