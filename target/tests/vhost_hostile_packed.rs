//! Hostile packed rings (`VIRTIO_F_RING_PACKED`) from an in-process frontend: a list whose later
//! descriptor carries the wrong wrap counter, a list longer than the ring, indirect tables that
//! nest or chain, buffer IDs outside the queue. Each must fail only the request or the queue;
//! the target keeps serving the other controller on the same reactor, and this controller once
//! the frontend restarts the queue.

mod vhost_support;

use std::time::Duration;

use vhost::VhostBackend;
use vhost_support::*;

const SECTORS: u64 = 2048;
const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_PACKED
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_F_RING_INDIRECT_DESC;

/// A 512-byte read as three descriptors: header, data, status (no ring flags yet).
fn read_list(d: &mut Driver, sector: u64) -> Vec<Desc> {
    let q = &d.queues[0];
    let (hdr, buf, status) = (q.header_addr(), q.buffer_addr(), q.status_addr());
    d.ram.write(hdr, &blk_header(T_IN, sector));
    d.ram.write(status, &[0xff]);
    blk_descs(T_IN, hdr, buf, 512, status).to_vec()
}

/// Writes `descs` (flags as given, ring flags included) at ring positions `pos..`, the first
/// descriptor's flags last, and records the list with the buffer ID of its first descriptor as
/// outstanding (the driver state the next used descriptor is matched against).
fn write_raw(d: &mut Driver, pos: u16, descs: &[(Desc, u16)]) {
    if let Some((_, id)) = descs.first() {
        let state = d.queues[0].packed.as_mut().expect("packed");
        state.counts.insert(*id, descs.len() as u16);
    }
    let ring = d.queues[0].desc;
    for (i, (desc, id)) in descs.iter().enumerate().rev() {
        let at = ring + 16 * ((u64::from(pos) + i as u64) % u64::from(QUEUE_SIZE));
        let bytes = packed_desc_bytes(desc.addr, desc.len, *id, desc.flags);
        if i == 0 {
            d.ram.write(at, &bytes[..14]);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            d.ram.store_u16(at + 14, desc.flags);
        } else {
            d.ram.write(at, &bytes);
        }
    }
}

/// The driver's next position and wrap counter on queue 0.
fn next_avail(d: &Driver) -> (u16, bool) {
    let s = d.queues[0].packed.as_ref().expect("packed");
    (s.avail_pos, s.avail_wrap)
}

/// Nothing comes back on queue 0 for a while (the queue stopped or the list is not available).
fn assert_no_used(d: &mut Driver, what: &str) {
    assert!(
        d.wait_used_for(0, Duration::from_millis(400)).is_none(),
        "{what}: a used descriptor came back"
    );
}

/// The other controller still serves, and this one does once the queue is restarted.
fn assert_still_serving(d: &mut Driver, other: &mut Driver, what: &str) {
    let data = pattern(3, 4096);
    assert_eq!(
        other.write_blocks(0, 16, &data),
        S_OK,
        "{what}: other controller"
    );
    assert_eq!(other.read_blocks(0, 16, 4096), (S_OK, data.clone()));
    d.frontend
        .get_vring_base(0)
        .expect("GET_VRING_BASE stops the queue");
    d.setup_queue(0);
    assert_eq!(d.write_blocks(0, 24, &data), S_OK, "{what}: after restart");
    assert_eq!(d.read_blocks(0, 24, 4096), (S_OK, data));
}

fn rig(
    test: &str,
) -> (
    std::sync::Arc<rvhost_target::dataplane::Dataplane>,
    Driver,
    Driver,
) {
    let (dp, dir) = start(
        test,
        &[
            ("h0", malloc_bdev("H0", SECTORS, 512), false),
            ("h1", malloc_bdev("H1", SECTORS, 512), false),
        ],
    );
    let mut d = Driver::ready(&dir.join("h0"), FEATURES);
    let other = Driver::ready(&dir.join("h1"), FEATURES);
    assert!(d.is_packed() && other.is_packed());
    // One good request first, so the ring is not at its start.
    assert_eq!(d.write_blocks(0, 0, &pattern(1, 512)), S_OK);
    (dp, d, other)
}

#[test]
fn vhost_hostile_packed_wrong_wrap_counters() {
    let (_dp, mut d, mut other) = rig("hp-wrap");
    let (pos, wrap) = next_avail(&d);

    // A first descriptor marked for the other lap is simply not available: nothing happens, and
    // the same request marked right is served.
    let list = read_list(&mut d, 1);
    let wrong: Vec<(Desc, u16)> = list
        .iter()
        .enumerate()
        .map(|(i, desc)| {
            let next = if i + 1 < list.len() { F_NEXT } else { 0 };
            let flags = packed_avail_flags(desc.flags | next, !wrap);
            (Desc { flags, ..*desc }, 0)
        })
        .collect();
    write_raw(&mut d, pos, &wrong);
    assert_no_used(&mut d, "list of the other lap");
    d.post_packed(0, &list, 0);
    let (id, len) = d.wait_used(0);
    assert_eq!((id, len), (0, 513), "the same list marked for this lap");

    // A list whose second descriptor is of the other lap: the driver broke the queue.
    let (pos, wrap) = next_avail(&d);
    let list = read_list(&mut d, 2);
    let broken: Vec<(Desc, u16)> = list
        .iter()
        .enumerate()
        .map(|(i, desc)| {
            let next = if i + 1 < list.len() { F_NEXT } else { 0 };
            let lap = if i == 1 { !wrap } else { wrap };
            (
                Desc {
                    flags: packed_avail_flags(desc.flags | next, lap),
                    ..*desc
                },
                0,
            )
        })
        .collect();
    write_raw(&mut d, pos, &broken);
    assert_no_used(&mut d, "second descriptor of the other lap");
    assert_still_serving(&mut d, &mut other, "wrong wrap counter");
}

#[test]
fn vhost_hostile_packed_list_past_the_ring() {
    let (_dp, mut d, mut other) = rig("hp-long");
    let (pos, wrap) = next_avail(&d);
    // Every position of the ring, each with NEXT, each available in its lap: a list that never
    // ends.
    let buf = d.queues[0].buffer_addr();
    let mut lap = wrap;
    let mut raw = Vec::new();
    for i in 0..QUEUE_SIZE {
        if u32::from(pos) + u32::from(i) == u32::from(QUEUE_SIZE) {
            lap = !lap;
        }
        let flags = packed_avail_flags(F_NEXT | F_WRITE, lap);
        raw.push((
            Desc {
                addr: buf,
                len: 512,
                flags,
                next: 0,
            },
            0,
        ));
    }
    write_raw(&mut d, pos, &raw);
    assert_no_used(&mut d, "list longer than the ring");
    assert_still_serving(&mut d, &mut other, "list past the ring");
}

#[test]
fn vhost_hostile_packed_indirect_tables() {
    let (_dp, mut d, mut other) = rig("hp-indirect");
    let table = d.queues[0].data + 0x4_0000;
    let list = read_list(&mut d, 3);

    // An indirect table whose entry is itself indirect (and points back at the table): a loop
    // the spec forbids. The request or the queue fails.
    let mut entries = Vec::new();
    for desc in &list {
        entries.extend_from_slice(&packed_desc_bytes(desc.addr, desc.len, 0, desc.flags));
    }
    entries[16..32].copy_from_slice(&packed_desc_bytes(table, 48, 0, F_INDIRECT));
    d.ram.write(table, &entries);
    let (pos, wrap) = next_avail(&d);
    let flags = packed_avail_flags(F_INDIRECT, wrap);
    write_raw(
        &mut d,
        pos,
        &[(
            Desc {
                addr: table,
                len: 48,
                flags,
                next: 0,
            },
            0,
        )],
    );
    match d.wait_used_for(0, Duration::from_millis(400)) {
        // Answered: with an error status, never with data.
        Some((id, _)) => {
            assert_eq!(id, 0);
            assert_eq!(d.ram.read(d.queues[0].status_addr(), 1)[0], S_IOERR);
        }
        None => assert!(
            d.queues[0].err.read().is_ok(),
            "queue failed through its error fd"
        ),
    }
    assert_still_serving(&mut d, &mut other, "nested indirect table");

    // An indirect descriptor that also has NEXT, and a table whose length is no multiple of 16.
    for (flags, len) in [(F_INDIRECT | F_NEXT, 48), (F_INDIRECT, 40)] {
        let list = read_list(&mut d, 4);
        let mut entries = Vec::new();
        for desc in &list {
            entries.extend_from_slice(&packed_desc_bytes(desc.addr, desc.len, 0, desc.flags));
        }
        d.ram.write(table, &entries);
        let (pos, wrap) = next_avail(&d);
        let status = d.queues[0].status_addr();
        let mut raw = vec![(
            Desc {
                addr: table,
                len,
                flags: packed_avail_flags(flags, wrap),
                next: 0,
            },
            0,
        )];
        if flags & F_NEXT != 0 {
            raw.push((
                Desc {
                    addr: status,
                    len: 1,
                    flags: packed_avail_flags(F_WRITE, wrap),
                    next: 0,
                },
                0,
            ));
        }
        write_raw(&mut d, pos, &raw);
        if let Some((id, _)) = d.wait_used_for(0, Duration::from_millis(400)) {
            assert_eq!(id, 0);
            assert_ne!(d.ram.read(status, 1)[0], S_OK, "flags {flags:#x} len {len}");
        }
        assert_still_serving(&mut d, &mut other, "bad indirect descriptor");
    }
}

#[test]
fn vhost_hostile_packed_buffer_id_out_of_range() {
    let (_dp, mut d, mut other) = rig("hp-id");
    for id in [QUEUE_SIZE, u16::MAX] {
        let list = read_list(&mut d, 5);
        let (pos, wrap) = next_avail(&d);
        let raw: Vec<(Desc, u16)> = list
            .iter()
            .enumerate()
            .map(|(i, desc)| {
                let next = if i + 1 < list.len() { F_NEXT } else { 0 };
                (
                    Desc {
                        flags: packed_avail_flags(desc.flags | next, wrap),
                        ..*desc
                    },
                    id,
                )
            })
            .collect();
        write_raw(&mut d, pos, &raw);
        // No used descriptor may carry an ID outside the queue.
        assert_no_used(&mut d, "buffer id out of range");
        assert_still_serving(&mut d, &mut other, "buffer id out of range");
    }
}
