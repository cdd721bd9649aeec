//! Inflight I/O tracking for packed virtqueues (`QueueRegionPacked` of vhost-user.rst) against
//! the in-process data plane: the region `GET_INFLIGHT_FD` hands out once packed rings are
//! negotiated and what the device writes into it per list (a copy of every descriptor, the
//! counter, the used position); and a region left by an earlier backend that died in the middle
//! of a publish, with the ring partly overwritten by used descriptors and the stale vring base
//! QEMU sends after a crash: the lists still in flight are resubmitted from the copies in counter
//! order, the published one is committed and not executed again, and the next list is popped
//! where the log says. Without the log that last test cannot pass (the base points at a used
//! descriptor, so nothing would ever complete).

mod vhost_support;

use std::os::unix::io::AsRawFd;
use std::time::Duration;

use rvhost_core::inflight::packed::{self as layout, PackedQueueRegion};
use rvhost_core::virtq::packed::PackedDesc;
use vhost::vhost_user::VhostUserFrontend;
use vhost_support::*;

const PACKED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED | VIRTIO_F_RING_EVENT_IDX;

/// The three descriptors of a 512-byte write of `data` to `sector` with buffer ID `id`, its
/// buffers in a window of their own; as the ring holds them in lap 1 (`AVAIL` set).
fn write_list(driver: &Driver, id: u16, sector: u64, data: &[u8]) -> [PackedDesc; 3] {
    let window = driver.queues[0].data + (u64::from(id) + 2) * 0x1000;
    let (hdr, status, buf) = (window, window + 0x100, window + 0x200);
    driver.ram.write(hdr, &blk_header(T_OUT, sector));
    driver.ram.write(buf, data);
    driver.ram.write(status, &[0xff]);
    let avail = F_AVAIL;
    [
        PackedDesc {
            addr: hdr,
            len: 16,
            id,
            flags: avail | F_NEXT,
        },
        PackedDesc {
            addr: buf,
            len: data.len() as u32,
            id,
            flags: avail | F_NEXT,
        },
        PackedDesc {
            addr: status,
            len: 1,
            id,
            flags: avail | F_WRITE,
        },
    ]
}

fn put_ring(driver: &Driver, pos: u16, d: &PackedDesc) {
    let ring = driver.queues[0].desc;
    driver.ram.write(
        ring + 16 * u64::from(pos),
        &packed_desc_bytes(d.addr, d.len, d.id, d.flags),
    );
}

#[test]
fn the_packed_region_keeps_each_list_until_its_used_descriptor_is_published() {
    let (_dp, mut driver) =
        slow_read_device("inflight-packed-track", "vhost.pinf", [0xd2; 16], PACKED);
    assert!(driver.is_packed());
    let (info, file) = get_inflight_region(&mut driver, 1);
    let part_len = layout::queue_region_len(QUEUE_SIZE);
    assert_eq!(
        (info.mmap_size, info.num_queues, info.queue_size),
        (part_len as u64, 1, QUEUE_SIZE),
        "the packed layout: 32-byte header and 32-byte entries"
    );
    attach_region(&mut driver, &info, &file);

    let bytes = read_region(&file, part_len);
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!((view.version(), view.desc_num()), (1, QUEUE_SIZE));
    assert_eq!(
        (view.free_head(), view.used_idx(), view.used_wrap()),
        (0, 0, 1)
    );
    assert_eq!(
        view.next(QUEUE_SIZE - 1),
        QUEUE_SIZE,
        "free list ends at desc_num"
    );

    // A write (fast) then a slow read, buffer IDs 5 and 9.
    let (hdr, status, buf) = {
        let q = &driver.queues[0];
        (q.header_addr(), q.status_addr(), q.buffer_addr())
    };
    driver.ram.write(buf, &pattern(3, 512));
    let request = BlkRequestAt {
        head: 5,
        req_type: T_OUT,
        sector: 8,
        hdr,
        buf,
        len: 512,
        status,
    };
    driver.post_blk_at(0, request);
    assert_eq!(driver.wait_used(0).0, 5);
    let bytes = wait_region(&file, part_len, SETTLE, |b| {
        PackedQueueRegion::new_checked(b, QUEUE_SIZE)
            .is_ok_and(|v| v.inflight(0) == 0 && v.used_idx() == 3)
    });
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!(
        view.inflight(0),
        0,
        "the write's list was published and cleared"
    );
    assert_eq!(
        (view.used_idx(), view.old_used_idx(), view.used_wrap()),
        (3, 3, 1),
        "used position after one list of three"
    );
    assert_eq!(view.free_head(), view.old_free_head());

    driver.post_blk_at(
        0,
        BlkRequestAt {
            head: 9,
            req_type: T_IN,
            ..request
        },
    );
    // The read takes 300 ms: once popped, it stays marked that long.
    let bytes = wait_region(&file, part_len, SETTLE, |b| {
        PackedQueueRegion::new_checked(b, QUEUE_SIZE).is_ok_and(|v| {
            let mut order = [0u16; QUEUE_SIZE as usize];
            v.resubmit_order(&mut order).is_ok_and(|o| !o.is_empty())
        })
    });
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    let mut order = [0u16; QUEUE_SIZE as usize];
    let heads = view.resubmit_order(&mut order).expect("order").to_vec();
    assert_eq!(heads.len(), 1, "the read is in flight");
    let head = heads[0];
    assert_eq!(
        (view.num(head), view.counter(head)),
        (3, 2),
        "3 descriptors, 2nd list"
    );
    let mut copies = [PackedDesc::default(); 3];
    let copies = view.list(head, &mut copies).expect("list");
    let want: Vec<(u64, u32, u16)> = vec![(hdr, 16, 9), (buf, 512, 9), (status, 1, 9)];
    let got: Vec<(u64, u32, u16)> = copies.iter().map(|d| (d.addr, d.len, d.id)).collect();
    assert_eq!(got, want, "every descriptor copied");
    assert_eq!(copies[1].flags & (F_WRITE | F_NEXT), F_WRITE | F_NEXT);

    assert_eq!(driver.wait_used(0).0, 9);
    assert_eq!(driver.ram.read(buf, 512), pattern(3, 512));
    let bytes = wait_region(&file, part_len, SETTLE, |b| {
        PackedQueueRegion::new_checked(b, QUEUE_SIZE)
            .is_ok_and(|v| v.inflight(head) == 0 && v.old_used_idx() == 6)
    });
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!(view.inflight(head), 0);
    assert_eq!((view.used_idx(), view.old_used_idx()), (6, 6));
}

#[test]
fn a_restarted_packed_device_resubmits_from_the_copies_and_commits_the_seen_publish() {
    let bdev = malloc_bdev("Malloc0", 2048, 512);
    let (dp, dir) = start("inflight-packed-resubmit", &[("vhost.pres", bdev, false)]);
    // The region an earlier backend handed out (packed negotiated before GET_INFLIGHT_FD, as
    // QEMU does).
    let (mut driver, info, file) =
        reconnect_with_region(&dp, &dir.join("vhost.pres"), "vhost.pres", PACKED);
    let ring = driver.queues[0].desc;
    driver
        .ram
        .write(ring, &vec![0u8; 16 * usize::from(QUEUE_SIZE)]);

    // What the earlier backend left. Lists of three writes, all made available in lap 1:
    //   X (ID 4, ring 0..3, counter 10): popped, in flight;
    //   Y (ID 9, ring 3..6, counter 11): popped, completed, its used descriptor written at ring
    //     position 0 (over X's first descriptor) and made visible, and then the backend died
    //     before it recorded the publish as done (`old_*` still before it, Y still inflight);
    //   Z (ID 1, ring 6..9, counter 12): popped, in flight;
    //   W (ID 6, ring 9..12): made available, never popped.
    let x = write_list(&driver, 4, 0, &pattern(1, 512));
    let y = write_list(&driver, 9, 8, &pattern(2, 512));
    let z = write_list(&driver, 1, 16, &pattern(3, 512));
    let w = write_list(&driver, 6, 24, &pattern(4, 512));
    for (k, d) in x.iter().chain(&y).chain(&z).chain(&w).enumerate() {
        put_ring(&driver, k as u16, d);
    }
    put_ring(
        &driver,
        0,
        &PackedDesc {
            addr: 0,
            len: 0,
            id: 9,
            flags: F_AVAIL | F_USED,
        },
    );
    let part_len = layout::queue_region_len(QUEUE_SIZE);
    let mut part = vec![0u8; part_len];
    {
        let mut view = PackedQueueRegion::new_checked(&mut part[..], QUEUE_SIZE).unwrap();
        view.set_version(1);
        view.set_desc_num(QUEUE_SIZE);
        for e in 0..QUEUE_SIZE {
            view.set_next(e, e + 1);
        }
        // Entries 0..3 hold X, 3..6 Y, 6..9 Z; the free list starts at 9.
        for (first, list, counter) in [(0u16, &x, 10u64), (3, &y, 11), (6, &z, 12)] {
            for (i, d) in list.iter().enumerate() {
                view.set_desc(first + i as u16, d);
            }
            view.set_head(first, 3, first + 2, counter);
            view.set_inflight(first, 1);
        }
        // The publish of Y: its entries back on the free list (5 -> 9), used_idx 3; the old
        // fields still from before it.
        view.set_next(5, 9);
        view.set_free_heads(3, 9);
        view.set_used(0x8000 | 3, 0x8000);
    }
    write_region(&file, 0, &part);
    driver
        .frontend
        .set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");

    // QEMU's vring base after a packed backend crash is the one of the previous start (it has
    // no used index in guest memory to resync from): position 0, lap 1.
    driver.start_queue_as_is(0, 0x8000).expect("queue starts");
    // The driver saw Y's used descriptor at position 0 and waits at 3.
    let mut state = PackedDriverState {
        avail_pos: 12,
        used_pos: 3,
        ..Default::default()
    };
    for id in [4u16, 1, 6] {
        state.counts.insert(id, 3);
    }
    driver.queues[0].packed = Some(state);

    let order: Vec<u32> = (0..3)
        .map(|_| {
            driver
                .wait_used_for(0, Duration::from_secs(5))
                .expect("a list completes after the restart")
                .0
        })
        .collect();
    assert_eq!(
        order,
        [4, 1, 6],
        "X and Z in counter order, then W; Y not again"
    );
    assert_eq!(driver.wait_used_for(0, Duration::from_millis(200)), None);
    for (id, status) in [(4u16, S_OK), (9, 0xff), (1, S_OK), (6, S_OK)] {
        let window = driver.queues[0].data + (u64::from(id) + 2) * 0x1000;
        assert_eq!(
            driver.ram.read(window + 0x100, 1),
            [status],
            "status of list {id}"
        );
    }
    for (id, sector, seed) in [(4u16, 0u64, 1u8), (9, 8, 2), (1, 16, 3), (6, 24, 4)] {
        let (status, back) = driver.read_blocks(0, sector, 512);
        assert_eq!(status, S_OK);
        // Y was completed by the earlier backend (without writing): not executed again.
        let want = if id == 9 {
            vec![0u8; 512]
        } else {
            pattern(seed, 512)
        };
        assert_eq!(back, want, "data of list {id}");
    }
    let bytes = read_region(&file, part_len);
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).unwrap();
    for entry in 0..QUEUE_SIZE {
        assert_eq!(view.inflight(entry), 0, "entry {entry} cleared");
    }
    assert_eq!(view.used_idx(), view.old_used_idx());
}
