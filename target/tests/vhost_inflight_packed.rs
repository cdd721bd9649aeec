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

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use rvhost_core::inflight::packed::{self as layout, PackedQueueRegion};
use rvhost_core::virtq::packed::PackedDesc;
use rvhost_target::bdev::delay::{DelayBdev, Latencies};
use rvhost_target::bdev::Bdev;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vhost_support::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PACKED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED | VIRTIO_F_RING_EVENT_IDX;

fn negotiate_inflight(driver: &mut Driver) {
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    driver
        .frontend
        .set_protocol_features(want)
        .expect("SET_PROTOCOL_FEATURES with INFLIGHT_SHMFD");
}

fn get_region(driver: &mut Driver) -> (VhostUserInflight, File) {
    driver
        .frontend
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
        })
        .expect("GET_INFLIGHT_FD")
}

fn read_part(file: &File, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).expect("read region");
    buf
}

fn write_part(file: &File, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, 0).expect("write region");
}

fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// The three descriptors of a 512-byte write of `data` to `sector` with buffer ID `id`, its
/// buffers in a window of their own; as the ring holds them in lap 1 (`AVAIL` set).
fn write_list(driver: &Driver, id: u16, sector: u64, data: &[u8]) -> [PackedDesc; 3] {
    let window = driver.queues[0].data + (u64::from(id) + 2) * 0x1000;
    let (hdr, status, buf) = (window, window + 0x100, window + 0x200);
    driver.ram.write(hdr, &header(T_OUT, sector));
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
    let base = malloc_bdev("Malloc0", 2048, 512);
    let latencies = Latencies {
        avg_read_us: 300_000,
        p99_read_us: 300_000,
        avg_write_us: 0,
        p99_write_us: 0,
    };
    let delay: Arc<dyn Bdev> = DelayBdev::new("Delay0", [0xd2; 16], base, latencies);
    let (_dp, dir) = start("inflight-packed-track", &[("vhost.pinf", delay, false)]);
    let mut driver = Driver::connect(&dir.join("vhost.pinf"), PACKED);
    assert!(driver.is_packed());
    negotiate_inflight(&mut driver);
    let (info, file) = get_region(&mut driver);
    let part_len = layout::queue_region_len(QUEUE_SIZE);
    assert_eq!(
        (info.mmap_size, info.num_queues, info.queue_size),
        (part_len as u64, 1, QUEUE_SIZE),
        "the packed layout: 32-byte header and 32-byte entries"
    );
    driver.set_mem_table();
    driver
        .frontend
        .set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    driver.setup_queue(0);

    let bytes = read_part(&file, part_len);
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
    driver.ram.write(hdr, &header(T_OUT, 8));
    driver.ram.write(buf, &pattern(3, 512));
    driver.ram.write(status, &[0xff]);
    let write = [
        Desc {
            addr: hdr,
            len: 16,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: buf,
            len: 512,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    driver.post_packed(0, &write, 5);
    assert_eq!(driver.wait_used(0).0, 5);
    std::thread::sleep(Duration::from_millis(20));
    let bytes = read_part(&file, part_len);
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

    driver.ram.write(hdr, &header(T_IN, 8));
    driver.ram.write(status, &[0xff]);
    let read = [
        Desc {
            addr: hdr,
            len: 16,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: buf,
            len: 512,
            flags: F_WRITE,
            next: 0,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    driver.post_packed(0, &read, 9);
    std::thread::sleep(Duration::from_millis(100));
    let bytes = read_part(&file, part_len);
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
    std::thread::sleep(Duration::from_millis(20));
    let bytes = read_part(&file, part_len);
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).expect("valid part");
    assert_eq!(view.inflight(head), 0);
    assert_eq!((view.used_idx(), view.old_used_idx()), (6, 6));
}

#[test]
fn a_restarted_packed_device_resubmits_from_the_copies_and_commits_the_seen_publish() {
    let bdev = malloc_bdev("Malloc0", 2048, 512);
    let (dp, dir) = start("inflight-packed-resubmit", &[("vhost.pres", bdev, false)]);
    let socket = dir.join("vhost.pres");

    // The region an earlier backend handed out (packed negotiated before GET_INFLIGHT_FD, as
    // QEMU does).
    let (info, file) = {
        let mut first = Driver::connect(&socket, PACKED);
        negotiate_inflight(&mut first);
        get_region(&mut first)
    };
    wait_sessions(&dp, "vhost.pres", 0);

    let mut driver = Driver::connect(&socket, PACKED);
    negotiate_inflight(&mut driver);
    driver.set_mem_table();
    driver.setup_queue_record(
        0,
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
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
    write_part(&file, &part);
    driver
        .frontend
        .set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");

    // QEMU's vring base after a packed backend crash is the one of the previous start (it has
    // no used index in guest memory to resync from): position 0, lap 1.
    let (call, kick, err) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    {
        let q = &driver.queues[0];
        let f = &driver.frontend;
        f.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        f.set_vring_base(0, 0x8000).expect("SET_VRING_BASE");
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: FRONTEND_VA + q.desc,
                used_ring_addr: FRONTEND_VA + q.used,
                avail_ring_addr: FRONTEND_VA + q.avail,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        f.set_vring_call(0, &call).expect("SET_VRING_CALL");
        f.set_vring_err(0, &err).expect("SET_VRING_ERR");
        f.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
    }
    driver
        .frontend
        .set_vring_enable(0, true)
        .expect("SET_VRING_ENABLE");
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
    let bytes = read_part(&file, part_len);
    let view = PackedQueueRegion::new_checked(&bytes[..], QUEUE_SIZE).unwrap();
    for entry in 0..QUEUE_SIZE {
        assert_eq!(view.inflight(entry), 0, "entry {entry} cleared");
    }
    assert_eq!(view.used_idx(), view.old_used_idx());
}
