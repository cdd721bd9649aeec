//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) against the in-process data
//! plane, with the `vhost` crate's frontend: the region `GET_INFLIGHT_FD` hands out and what the
//! device writes into it per request; a region left by an earlier backend (heads popped and never
//! completed, a batch published and not cleared) resubmitted in counter order and repaired; and
//! hostile regions failing only their own device.

mod vhost_support;

use std::os::unix::io::AsRawFd;
use std::time::Duration;

use rvhost_core::inflight;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost_support::*;

#[test]
fn the_region_tracks_each_request_until_its_used_entry_is_published() {
    let (_dp, mut driver) = slow_read_device(
        "inflight-track",
        "vhost.inf",
        [0xd1; 16],
        VIRTIO_F_VERSION_1,
    );
    let (info, file) = get_inflight_region(&mut driver, 1);
    let part_len = inflight::queue_region_len(QUEUE_SIZE);
    assert_eq!(
        (
            info.mmap_size,
            info.mmap_offset,
            info.num_queues,
            info.queue_size
        ),
        (part_len as u64, 0, 1, QUEUE_SIZE)
    );
    assert_eq!(read_region(&file, part_len), vec![0u8; part_len], "zeroed");
    attach_region(&mut driver, &info, &file);

    let bytes = read_region(&file, part_len);
    let view = inflight::QueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!(
        (view.version(), view.desc_num(), view.used_idx()),
        (1, QUEUE_SIZE, 0)
    );
    assert_eq!(view.features() & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);

    assert_eq!(driver.write_blocks(0, 8, &pattern(1, 512)), S_OK);
    // A slow read: while it is in flight its head (0) is marked, with the next counter.
    let (hdr, status, buf) = {
        let q = &driver.queues[0];
        (q.header_addr(), q.status_addr(), q.buffer_addr())
    };
    driver.post_blk_at(
        0,
        BlkRequestAt {
            head: 0,
            req_type: T_IN,
            sector: 8,
            hdr,
            buf,
            len: 512,
            status,
        },
    );
    // The read takes 300 ms: once popped, it stays marked that long.
    let bytes = wait_region(&file, part_len, SETTLE, |b| {
        inflight::QueueRegion::new_checked(b, QUEUE_SIZE).is_ok_and(|v| v.inflight(0) == 1)
    });
    let view = inflight::QueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!(view.inflight(0), 1, "the read is marked inflight");
    assert_eq!(view.counter(0), 2, "the write had counter 1");
    assert_eq!(
        (view.used_idx(), view.last_batch_head()),
        (1, 0),
        "the write's batch was published and cleared"
    );
    let (id, _) = driver.wait_used(0);
    assert_eq!(id, 0);
    assert_eq!(driver.ram.read(buf, 512), pattern(1, 512));
    let bytes = wait_region(&file, part_len, SETTLE, |b| {
        inflight::QueueRegion::new_checked(b, QUEUE_SIZE)
            .is_ok_and(|v| (v.inflight(0), v.used_idx()) == (0, 2))
    });
    let view = inflight::QueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!((view.inflight(0), view.used_idx()), (0, 2));
}

#[test]
fn a_restarted_device_resubmits_in_counter_order_and_repairs_the_last_batch() {
    let bdev = malloc_bdev("Malloc0", 2048, 512);
    let (dp, dir) = start("inflight-resubmit", &[("vhost.res", bdev, false)]);
    let (mut driver, info, file) =
        reconnect_with_region(&dp, &dir.join("vhost.res"), "vhost.res", VIRTIO_F_VERSION_1);
    // What the earlier backend left: heads 0, 3, 6, 9 popped (avail 0..4) with counters
    // 11, 10, 13, 12; 9 completed and published (used.idx 1) but its batch not cleared
    // (used_idx 0); 0, 3 and 6 still inflight. Head 12 was made available and never popped.
    let writes: [(u16, u64, u8); 5] = [(0, 0, 1), (3, 8, 2), (6, 16, 3), (9, 24, 4), (12, 32, 5)];
    let data = driver.queues[0].data;
    for (head, sector, seed) in writes {
        // Each request's buffers in a window of its own.
        let window = data + u64::from(head) * 0x1000;
        driver.ram.write(window + 0x200, &pattern(seed, 512));
        driver.post_blk_at(
            0,
            BlkRequestAt {
                head,
                req_type: T_OUT,
                sector,
                hdr: window,
                buf: window + 0x200,
                len: 512,
                status: window + 0x100,
            },
        );
    }
    let used = driver.queues[0].used;
    driver.ram.write(used + 4, &[9, 0, 0, 0, 1, 0, 0, 0]);
    driver.ram.store_u16(used + 2, 1);
    let mut part = vec![0u8; inflight::queue_region_len(QUEUE_SIZE)];
    {
        let mut view = inflight::QueueRegion::new_checked(&mut part[..], QUEUE_SIZE).unwrap();
        view.set_version(1);
        view.set_desc_num(QUEUE_SIZE);
        view.set_last_batch_head(9);
        view.set_used_idx(0);
        for (head, counter) in [(0u16, 11u64), (3, 10), (6, 13), (9, 12)] {
            view.set_inflight(head, 1);
            view.set_counter(head, counter);
        }
    }
    write_region(&file, 0, &part);
    driver
        .frontend
        .set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    // QEMU sends the used index as the base after a backend crash.
    driver.start_queue_as_is(0, 1).expect("queue starts");
    driver.queues[0].used_seen = 1;
    driver.queues[0].avail_idx = 5;

    let order: Vec<u32> = (0..4).map(|_| driver.wait_used(0).0).collect();
    assert_eq!(
        order,
        [3, 0, 6, 12],
        "counter order, then the new head; 9 not again"
    );
    assert_eq!(driver.wait_used_for(0, Duration::from_millis(200)), None);
    for (head, sector, seed) in writes {
        let (status, back) = driver.read_blocks(0, sector, 512);
        assert_eq!(status, S_OK);
        // 9 was "completed" by the earlier backend without writing: it must not be re-executed.
        let want = if head == 9 {
            vec![0u8; 512]
        } else {
            pattern(seed, 512)
        };
        assert_eq!(back, want, "head {head}");
    }
    let bytes = read_region(&file, part.len());
    let view = inflight::QueueRegion::new_checked(&bytes[..], QUEUE_SIZE).unwrap();
    for head in [0u16, 3, 6, 9, 12] {
        assert_eq!(view.inflight(head), 0, "head {head} cleared");
    }
}

/// A region a hostile frontend hands over: how to spoil a valid one.
struct Spoiled {
    what: &'static str,
    spoil: fn(&mut Vec<u8>, &mut VhostUserInflight),
}

#[test]
fn hostile_regions_fail_their_device_and_no_other() {
    let (_dp, dir) = start(
        "inflight-hostile",
        &[
            ("vhost.bad", malloc_bdev("Malloc0", 2048, 512), false),
            ("vhost.good", malloc_bdev("Malloc1", 2048, 512), false),
        ],
    );
    let mut good = Driver::ready(&dir.join("vhost.good"), VIRTIO_F_VERSION_1);
    let cases = [
        Spoiled {
            what: "bad version",
            spoil: |p, _| p[8..10].copy_from_slice(&7u16.to_le_bytes()),
        },
        Spoiled {
            what: "desc_num larger than the queue",
            spoil: |p, _| {
                p[8..10].copy_from_slice(&1u16.to_le_bytes());
                p[10..12].copy_from_slice(&(QUEUE_SIZE * 2).to_le_bytes());
            },
        },
        Spoiled {
            what: "garbage inflight flag",
            spoil: |p, _| {
                p[8..10].copy_from_slice(&1u16.to_le_bytes());
                p[10..12].copy_from_slice(&QUEUE_SIZE.to_le_bytes());
                p[inflight::inflight_offset(5)] = 0x7f;
            },
        },
        Spoiled {
            what: "garbage counter",
            spoil: |p, _| {
                p[8..10].copy_from_slice(&1u16.to_le_bytes());
                p[10..12].copy_from_slice(&QUEUE_SIZE.to_le_bytes());
                p[inflight::inflight_offset(5)] = 1;
                let at = inflight::counter_offset(5);
                p[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            },
        },
        Spoiled {
            what: "duplicate counters",
            spoil: |p, _| {
                p[8..10].copy_from_slice(&1u16.to_le_bytes());
                p[10..12].copy_from_slice(&QUEUE_SIZE.to_le_bytes());
                for head in [2u16, 4] {
                    p[inflight::inflight_offset(head)] = 1;
                    let at = inflight::counter_offset(head);
                    p[at..at + 8].copy_from_slice(&7u64.to_le_bytes());
                }
            },
        },
        Spoiled {
            what: "batch larger than the queue",
            spoil: |p, _| {
                p[8..10].copy_from_slice(&1u16.to_le_bytes());
                p[10..12].copy_from_slice(&QUEUE_SIZE.to_le_bytes());
                p[14..16].copy_from_slice(&0x8000u16.to_le_bytes());
            },
        },
        Spoiled {
            what: "size too small for its queues",
            spoil: |_, info| info.mmap_size = 64,
        },
        Spoiled {
            what: "size past the end of the file",
            spoil: |_, info| info.mmap_size *= 4,
        },
        Spoiled {
            what: "more queues than the device",
            spoil: |_, info| info.num_queues = 200,
        },
        Spoiled {
            what: "queue size that is not a power of two",
            spoil: |_, info| info.queue_size = 48,
        },
        Spoiled {
            what: "unaligned offset",
            spoil: |_, info| info.mmap_offset = 8,
        },
    ];
    let socket = dir.join("vhost.bad");
    for case in cases {
        let mut driver = Driver::connect(&socket, VIRTIO_F_VERSION_1);
        negotiate_inflight(&mut driver);
        let (mut info, file) = get_inflight_region(&mut driver, 1);
        let mut part = read_region(&file, info.mmap_size as usize);
        (case.spoil)(&mut part, &mut info);
        write_region(&file, 0, &part);
        driver.set_mem_table();
        let refused = driver
            .frontend
            .set_inflight_fd(&info, file.as_raw_fd())
            .is_err()
            || driver.start_queue_as_is(0, 0).is_err();
        assert!(refused, "{}: accepted", case.what);
        // Nothing was started on the bad device; the good one serves on.
        let data = pattern(case.what.len() as u8, 512);
        assert_eq!(good.write_blocks(0, 0, &data), S_OK, "{}", case.what);
        assert_eq!(good.read_blocks(0, 0, 512), (S_OK, data), "{}", case.what);
    }
    // An unsealed file (one this target did not make) is refused outright.
    let mut driver = Driver::connect(&socket, VIRTIO_F_VERSION_1);
    negotiate_inflight(&mut driver);
    let (info, _) = get_inflight_region(&mut driver, 1);
    let plain = GuestRam::new(info.mmap_size.max(4096));
    assert!(driver
        .frontend
        .set_inflight_fd(&info, plain.file.as_raw_fd())
        .is_err());
    // And a correct region on the same controller afterwards works.
    let mut driver = Driver::connect(&socket, VIRTIO_F_VERSION_1);
    negotiate_inflight(&mut driver);
    let (info, file) = get_inflight_region(&mut driver, 1);
    attach_region(&mut driver, &info, &file);
    assert_eq!(driver.write_blocks(0, 0, &pattern(3, 512)), S_OK);
}
