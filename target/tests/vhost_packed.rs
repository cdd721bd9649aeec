//! Packed virtqueues (`VIRTIO_F_RING_PACKED`) end to end through a vhost-user-blk controller:
//! negotiation, requests over many laps of the ring, the vring base with its wrap counter, a
//! restart at that base, and a session that switches between the split and the packed layout.

mod vhost_support;

use vhost::VhostBackend;
use vhost_support::*;

const SECTORS: u64 = 2048;
const PACKED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED | VIRTIO_F_RING_EVENT_IDX;

/// The driver's vring base of packed queue `index`: position, wrap counter in bit 15.
fn driver_base(d: &mut Driver, index: usize) -> u32 {
    let q = d.queues.iter().find(|q| q.index == index).expect("queue");
    let s = q.packed.as_ref().expect("packed");
    u32::from(s.avail_pos) | if s.avail_wrap { 0x8000 } else { 0 }
}

/// Writes and reads back `rounds` distinct 4 KiB blocks on queue `index`.
fn write_read(d: &mut Driver, index: usize, rounds: usize, seed: u8) {
    for i in 0..rounds {
        let data = pattern(seed.wrapping_add(i as u8), 4096);
        let sector = (i as u64 * 8) % SECTORS;
        assert_eq!(d.write_blocks(index, sector, &data), S_OK, "write {i}");
        let (status, back) = d.read_blocks(index, sector, 4096);
        assert_eq!(status, S_OK, "read {i}");
        assert!(back == data, "block {i} reads back what was written");
    }
}

#[test]
fn vhost_packed_blk_requests_wrap_the_ring_and_restart_at_the_base() {
    let (_dp, dir) = start("packed", &[("p0", malloc_bdev("P0", SECTORS, 512), false)]);
    let mut d = Driver::ready(&dir.join("p0"), PACKED);
    assert!(d.is_packed(), "packed rings negotiated: {:#x}", d.features);

    // 3 descriptors per request in a 64-entry ring: 100 writes and 100 reads are ~9 laps, so
    // both wrap counters flip many times.
    write_read(&mut d, 0, 100, 1);
    let (status, _) = d.request(0, T_FLUSH, 0, None);
    assert_eq!(status, S_OK, "flush");

    // GET_VRING_BASE stops the queue and reports the next position with the wrap counter (bits
    // 0..16) and the same for the used side (bits 16..32: drained, so equal).
    let expected = driver_base(&mut d, 0);
    let base = d.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, expected | expected << 16, "vring base {base:#x}");

    // Restart at that base, as QEMU does after a stop: requests continue where they left off.
    let q = d.queues.iter().find(|q| q.index == 0).expect("queue");
    let (desc, avail, used) = (q.desc, q.avail, q.used);
    let f = &d.frontend;
    f.set_vring_base(0, expected as u16)
        .expect("SET_VRING_BASE");
    let config = vhost::VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: FRONTEND_VA + desc,
        used_ring_addr: FRONTEND_VA + used,
        avail_ring_addr: FRONTEND_VA + avail,
        log_addr: None,
    };
    f.set_vring_addr(0, &config).expect("SET_VRING_ADDR");
    let kick = &d.queues[0].kick;
    f.set_vring_kick(0, kick).expect("SET_VRING_KICK");
    write_read(&mut d, 0, 30, 7);

    // A base whose position is outside the ring is refused when the queue starts.
    let _ = d.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    let f = &d.frontend;
    f.set_vring_base(0, 0x8000 | QUEUE_SIZE)
        .expect("SET_VRING_BASE");
    f.set_vring_addr(0, &config).expect("SET_VRING_ADDR");
    assert!(
        f.set_vring_kick(0, &d.queues[0].kick).is_err(),
        "queue start at position {QUEUE_SIZE} of a {QUEUE_SIZE}-entry ring refused"
    );
}

#[test]
fn vhost_packed_blk_multiqueue_and_switch_back_to_split() {
    let (_dp, dir) = start(
        "packed-mq",
        &[("p1", malloc_bdev("P1", SECTORS, 512), false)],
    );
    let mut d = Driver::ready(&dir.join("p1"), PACKED | VIRTIO_BLK_F_MQ);
    assert!(d.is_packed());
    for q in 1..4 {
        d.setup_queue(q);
    }
    for q in 0..4 {
        write_read(&mut d, q, 25, q as u8 * 40);
    }

    // Every queue stopped, then the same session renegotiates split rings (as a guest whose
    // driver is reloaded without packed support would): the device changes layout.
    for q in 0..4 {
        d.frontend.get_vring_base(q).expect("GET_VRING_BASE");
    }
    d.features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_BLK_F_MQ;
    d.frontend.set_features(d.features).expect("SET_FEATURES");
    d.setup_queue(0);
    d.setup_queue(1);
    assert!(!d.is_packed());
    write_read(&mut d, 0, 20, 3);
    write_read(&mut d, 1, 20, 5);

    // And back to packed.
    d.frontend.get_vring_base(0).expect("GET_VRING_BASE");
    d.frontend.get_vring_base(1).expect("GET_VRING_BASE");
    d.features = PACKED | VHOST_USER_F_PROTOCOL_FEATURES;
    d.frontend.set_features(d.features).expect("SET_FEATURES");
    d.setup_queue(0);
    write_read(&mut d, 0, 20, 9);
}

#[test]
fn vhost_packed_is_offered_and_split_stays_the_default() {
    let (_dp, dir) = start(
        "packed-offer",
        &[("p2", malloc_bdev("P2", SECTORS, 512), false)],
    );
    let d = Driver::connect(&dir.join("p2"), VIRTIO_F_VERSION_1);
    let offered = d.frontend.get_features().expect("GET_FEATURES");
    assert_ne!(offered & VIRTIO_F_RING_PACKED, 0, "packed rings offered");
    drop(d);
    // A driver that does not ask for packed rings gets split ones.
    let mut d = Driver::ready(&dir.join("p2"), VIRTIO_F_VERSION_1);
    assert!(!d.is_packed());
    write_read(&mut d, 0, 10, 11);
}
