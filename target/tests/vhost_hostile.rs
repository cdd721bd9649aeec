//! The data plane against a real vhost-user frontend (the `vhost` crate's `Frontend`) sharing
//! memory with the target: real I/O round trips, then a hostile frontend that sends malformed
//! messages, memory tables and descriptor chains. The target must fail just the offending request
//! or connection, and keep serving (this controller after a reconnect, and every other one).

mod vhost_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rvhost_target::ops::ControllerOps;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_support::*;

const BLK_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_INDIRECT_DESC
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES;

#[test]
fn vhost_blk_round_trip() {
    let bdev = malloc_bdev("Malloc0", 2048, 512);
    let (dp, dir) = start("round_trip", &[("vhost.0", bdev, false)]);
    let mut d = Driver::connect(&dir.join("vhost.0"), BLK_FEATURES);

    // Config space: capacity in sectors at 0, blk_size at 20, num_queues at 34.
    let config = d.config();
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(config[34..36].try_into().unwrap()), 64);
    assert_eq!(d.frontend.get_queue_num().unwrap(), 64);

    d.set_mem_table();
    d.setup_queue(0);

    let data = pattern(7, 4096);
    assert_eq!(d.write_blocks(0, 8, &data), S_OK);
    let (status, back) = d.read_blocks(0, 8, 4096);
    assert_eq!(status, S_OK);
    assert_eq!(back, data);
    // A neighbouring sector was not touched.
    let (status, before) = d.read_blocks(0, 7, 512);
    assert_eq!(status, S_OK);
    assert_eq!(before, vec![0u8; 512]);

    // GET_ID: the bdev name, NUL-padded to 20 bytes.
    let (status, len) = d.request(0, T_GET_ID, 0, Some((&[0xffu8; 20], true)));
    assert_eq!((status, len), (S_OK, 21));
    let buf = d.queues[0].buffer_addr();
    assert_eq!(
        &d.ram.read(buf, 20)[..],
        b"Malloc0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );

    assert_eq!(d.request(0, T_FLUSH, 0, None).0, S_OK);
    // Past the end of the device, and an unknown request type.
    assert_eq!(d.read_blocks(0, 2047, 1024).0, S_IOERR);
    assert_eq!(d.request(0, 0x42, 0, Some((&[0u8; 512], true))).0, S_UNSUPP);
    // Data not a multiple of 512 bytes.
    assert_eq!(d.request(0, T_IN, 0, Some((&[0u8; 100], true))).0, S_IOERR);

    // WRITE_ZEROES over the pattern, then DISCARD.
    let mut range = [0u8; 16];
    range[0..8].copy_from_slice(&8u64.to_le_bytes());
    range[8..12].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(
        d.request(0, T_WRITE_ZEROES, 0, Some((&range, false))).0,
        S_OK
    );
    let (status, back) = d.read_blocks(0, 8, 4096);
    assert_eq!(status, S_OK);
    assert_eq!(&back[..2048], &[0u8; 2048][..]);
    assert_eq!(&back[2048..], &data[2048..]);
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(d.request(0, T_DISCARD, 0, Some((&range, false))).0, S_OK);

    // GET_VRING_BASE stops the ring and reports how far it got: 11 requests so far.
    assert_eq!(d.frontend.get_vring_base(0).unwrap(), 11);

    let info = dp.controllers(Some("vhost.0")).unwrap();
    assert_eq!(info[0].sessions, 1);
    drop(d);
    wait_sessions(&dp, "vhost.0", 0);
    dp.shutdown();
}

#[test]
fn vhost_blk_readonly_and_block_size() {
    let ro = malloc_bdev("Ro0", 256, 4096);
    let (dp, dir) = start("readonly", &[("ro.0", ro, true)]);
    let mut d = Driver::connect(&dir.join("ro.0"), BLK_FEATURES | VIRTIO_BLK_F_RO);
    assert_ne!(d.features & VIRTIO_BLK_F_RO, 0, "RO offered");
    assert_eq!(
        d.features & VIRTIO_BLK_F_DISCARD,
        0,
        "no DISCARD on a read-only device"
    );
    let config = d.config();
    // 256 blocks of 4 KiB = 2048 sectors.
    assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 4096);
    d.set_mem_table();
    d.setup_queue(0);
    assert_eq!(d.write_blocks(0, 0, &[1u8; 4096]), S_IOERR);
    let (status, back) = d.read_blocks(0, 8, 4096);
    assert_eq!(status, S_OK);
    assert_eq!(back, vec![0u8; 4096]);
    // Sector 1 is not 4 KiB-aligned; 512 bytes is not a whole block.
    assert_eq!(d.read_blocks(0, 1, 4096).0, S_IOERR);
    assert_eq!(d.read_blocks(0, 0, 512).0, S_IOERR);
    dp.shutdown();
}

/// Sends raw bytes as a vhost-user message on a fresh connection and reports whether the target
/// closed it (EOF or reset) within a second.
fn raw_message_closes_connection(socket: &std::path::Path, bytes: &[u8]) -> bool {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    if stream.write_all(bytes).is_err() {
        return true;
    }
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

#[test]
fn vhost_hostile_frontend() {
    let victim = malloc_bdev("Victim", 2048, 512);
    let bystander = malloc_bdev("Bystander", 2048, 512);
    let (dp, dir) = start(
        "hostile",
        &[("victim", victim, false), ("bystander", bystander, false)],
    );
    let victim_sock = dir.join("victim");
    let bystander_sock = dir.join("bystander");

    // A frontend that connects and never says anything must not block anyone.
    let silent = UnixStream::connect(&victim_sock).expect("connect");

    // The bystander is connected and doing I/O throughout.
    let mut b = Driver::ready(&bystander_sock, BLK_FEATURES);
    let good = pattern(3, 4096);
    assert_eq!(b.write_blocks(0, 0, &good), S_OK);

    // --- Malformed messages: each drops its connection, nothing else. ---
    // Unknown request code.
    assert!(raw_message_closes_connection(
        &victim_sock,
        &header(9999, 1, 0)
    ));
    // Wrong version bits.
    assert!(raw_message_closes_connection(
        &victim_sock,
        &header(1, 0x2, 0)
    ));
    // Size over the protocol maximum.
    assert!(raw_message_closes_connection(
        &victim_sock,
        &header(2, 1, 0x10_0000)
    ));
    // SET_FEATURES (2) with a 4-byte body instead of 8.
    let mut short = header(2, 1, 4);
    short.extend_from_slice(&[0, 0, 0, 0]);
    assert!(raw_message_closes_connection(&victim_sock, &short));
    // SET_MEM_TABLE (5) claiming one region but carrying no fd.
    let mut table = header(5, 1, 8 + 32);
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, 0x1000, FRONTEND_VA, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    assert!(raw_message_closes_connection(&victim_sock, &table));
    // GET_CONFIG (24) past the config space: answered with an empty payload (the spec's error
    // reply), and the connection stays up. CONFIG must be negotiated first (SET_PROTOCOL_FEATURES).
    {
        let mut s = UnixStream::connect(&victim_sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut msg = header(16, 1, 8);
        msg.extend_from_slice(&0x200u64.to_le_bytes());
        msg.extend_from_slice(&header(24, 1, 12 + 8));
        for v in [0x200u32, 8, 0] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        msg.extend_from_slice(&[0u8; 8]);
        s.write_all(&msg).unwrap();
        let mut reply = [0u8; 24];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[0..4].try_into().unwrap()),
            24,
            "GET_CONFIG reply"
        );
        assert_eq!(
            u32::from_le_bytes(reply[8..12].try_into().unwrap()),
            12,
            "no payload"
        );
        assert_eq!(
            u32::from_le_bytes(reply[16..20].try_into().unwrap()),
            0,
            "size 0 = error"
        );
        // Still serving: GET_FEATURES (1) is answered.
        s.write_all(&header(1, 1, 0)).unwrap();
        let mut features = [0u8; 20];
        s.read_exact(&mut features).unwrap();
        assert_eq!(u32::from_le_bytes(features[0..4].try_into().unwrap()), 1);
    }
    // Truncated: a header announcing 8 bytes, then hang up mid-body.
    {
        let mut s = UnixStream::connect(&victim_sock).unwrap();
        let mut msg = header(2, 1, 8);
        msg.extend_from_slice(&[1, 2]);
        s.write_all(&msg).unwrap();
    }

    // --- Malformed memory tables. ---
    {
        let d = Driver::connect(&victim_sock, BLK_FEATURES);
        let mut overlapping = d.ram.region(MEM_SIZE);
        overlapping.guest_phys_addr = 0x1000;
        overlapping.userspace_addr = FRONTEND_VA + 0x10_0000_0000;
        let result = d
            .frontend
            .set_mem_table(&[d.ram.region(MEM_SIZE), overlapping]);
        assert!(result.is_err(), "overlapping regions refused");
        assert!(
            d.is_disconnected(),
            "connection dropped after a bad memory table"
        );
    }
    {
        let d = Driver::connect(&victim_sock, BLK_FEATURES);
        // Past the end of the backing file.
        let result = d.frontend.set_mem_table(&[d.ram.region(MEM_SIZE * 2)]);
        assert!(result.is_err(), "region past the end of its fd refused");
        assert!(d.is_disconnected());
    }
    {
        let d = Driver::connect(&victim_sock, BLK_FEATURES);
        // A size whose end overflows the address space.
        let mut huge = d.ram.region(MEM_SIZE);
        huge.memory_size = u64::MAX - 0x1000;
        assert!(d.frontend.set_mem_table(&[huge]).is_err());
        assert!(d.is_disconnected());
    }
    {
        let d = Driver::connect(&victim_sock, BLK_FEATURES);
        // mmap_offset not page aligned.
        let mut odd = d.ram.region(MEM_SIZE / 2);
        odd.mmap_offset = 12;
        assert!(d.frontend.set_mem_table(&[odd]).is_err());
        assert!(d.is_disconnected());
    }
    {
        // Ring addresses outside the memory table are refused, and the session survives that.
        let d = Driver::connect(&victim_sock, BLK_FEATURES);
        d.set_mem_table();
        d.frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        let config = vhost::VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: 0x1000,
            used_ring_addr: 0x2000,
            avail_ring_addr: 0x3000,
            log_addr: None,
        };
        assert!(d.frontend.set_vring_addr(0, &config).is_err());
        // Queue sizes beyond what we accept, and not powers of two.
        assert!(d.frontend.set_vring_num(0, 2048).is_err());
        assert!(d.frontend.set_vring_num(0, 100).is_err());
        // A queue the driver never set up can be configured and enabled without effect.
        assert!(d.frontend.set_vring_base(15, 0).is_ok());
        assert!(
            vhost::vhost_user::Frontend::set_vring_enable(&mut d.frontend.clone(), 15, true)
                .is_ok()
        );
        // Config writes: nothing is writable.
        assert!(d
            .frontend
            .clone()
            .set_config(0, VhostUserConfigFlags::WRITABLE, &[1u8; 8])
            .is_err());
        // Removing a region that is not there.
        let mut absent = d.ram.region(0x1000);
        absent.guest_phys_addr = 1 << 40;
        assert!(d.frontend.clone().remove_mem_region(&absent).is_err());
        assert!(!d.is_disconnected(), "refused requests keep the session");
        // Adding a region that overlaps the table is fatal, like a bad SET_MEM_TABLE.
        let overlap = d.ram.region(0x1000);
        assert!(d.frontend.clone().add_mem_region(&overlap).is_err());
        assert!(d.is_disconnected());
    }
    assert_eq!(
        b.read_blocks(0, 0, 4096),
        (S_OK, good.clone()),
        "bystander unaffected"
    );

    // --- Malformed descriptor chains. ---
    let mut d = Driver::ready(&victim_sock, BLK_FEATURES);
    let (hdr, status, buf) = (
        d.queues[0].header_addr(),
        d.queues[0].status_addr(),
        d.queues[0].buffer_addr(),
    );
    let mut read_hdr = [0u8; 16];
    read_hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
    d.ram.write(hdr, &read_hdr);

    // A data buffer outside guest memory: the request fails with IOERR, the queue goes on.
    d.ram.write(status, &[0xff]);
    d.post(
        0,
        &[
            Desc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: MEM_SIZE + 0x1000,
                len: 512,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            Desc {
                addr: status,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    assert_eq!(d.wait_used(0), (0, 1));
    assert_eq!(d.ram.read(status, 1)[0], S_IOERR);
    // A buffer straddling the end of guest memory.
    d.ram.write(status, &[0xff]);
    d.post(
        0,
        &[
            Desc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: MEM_SIZE - 256,
                len: 512,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            Desc {
                addr: status,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    assert_eq!(d.wait_used(0), (0, 1));
    assert_eq!(d.ram.read(status, 1)[0], S_IOERR);
    // Header too short (8 readable bytes): IOERR, as SPDK answers.
    d.ram.write(status, &[0xff]);
    d.post(
        0,
        &[
            Desc {
                addr: hdr,
                len: 8,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: status,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    assert_eq!(d.wait_used(0), (0, 1));
    assert_eq!(d.ram.read(status, 1)[0], S_IOERR);
    // The queue still works.
    assert_eq!(d.read_blocks(0, 0, 512).0, S_OK);

    // A descriptor loop: no status byte can be found, so the queue is stopped and the frontend's
    // error eventfd signalled; the target does not spin or crash.
    d.post(
        0,
        &[
            Desc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: buf,
                len: 512,
                flags: F_NEXT | F_WRITE,
                next: 0,
            },
        ],
    );
    assert_eq!(
        d.wait_used_for(0, Duration::from_millis(300)),
        None,
        "a loop is never completed"
    );
    assert_eq!(d.queues[0].err.read().expect("error eventfd signalled"), 1);
    // The frontend can still stop the queue and learn where it is (4 done + the loop).
    assert_eq!(d.frontend.get_vring_base(0).unwrap(), 5);
    // ...and restart it afresh.
    d.setup_queue(0);
    assert_eq!(d.read_blocks(0, 0, 512).0, S_OK);

    // An indirect table of length 0.
    d.post(
        0,
        &[Desc {
            addr: buf,
            len: 0,
            flags: F_INDIRECT,
            next: 0,
        }],
    );
    assert_eq!(d.wait_used_for(0, Duration::from_millis(300)), None);
    assert_eq!(d.queues[0].err.read().expect("error eventfd signalled"), 1);
    // One read on the restarted queue, then the bad request.
    assert_eq!(d.frontend.get_vring_base(0).unwrap(), 2);
    d.setup_queue(0);

    // A head index beyond the queue size.
    d.post_head(0, &[], QUEUE_SIZE + 3);
    assert_eq!(d.wait_used_for(0, Duration::from_millis(300)), None);
    assert_eq!(d.frontend.get_vring_base(0).unwrap(), 1);
    d.setup_queue(0);

    // avail.idx far ahead of what the queue can hold.
    let avail = d.queues[0].avail;
    d.ram.store_u16(avail + 2, QUEUE_SIZE * 4);
    assert_eq!(d.wait_used_for(0, Duration::from_millis(300)), None);
    assert_eq!(
        d.frontend.get_vring_base(0).unwrap(),
        0,
        "nothing was consumed"
    );
    d.setup_queue(0);

    // A proper indirect request works on the restarted queue.
    let table = buf + 0x2000;
    let mut write_hdr = [0u8; 16];
    write_hdr[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    write_hdr[8..16].copy_from_slice(&16u64.to_le_bytes());
    d.ram.write(hdr, &write_hdr);
    let payload = pattern(9, 1024);
    d.ram.write(buf, &payload);
    d.ram.write(status, &[0xff]);
    for (i, desc) in [
        Desc {
            addr: hdr,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: buf,
            len: 512,
            flags: F_NEXT,
            next: 2,
        },
        Desc {
            addr: buf + 512,
            len: 512,
            flags: F_NEXT,
            next: 3,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ]
    .iter()
    .enumerate()
    {
        d.ram.write(table + 16 * i as u64, &desc.bytes());
    }
    d.post(
        0,
        &[Desc {
            addr: table,
            len: 64,
            flags: F_INDIRECT,
            next: 0,
        }],
    );
    assert_eq!(d.wait_used(0), (0, 1));
    assert_eq!(d.ram.read(status, 1)[0], S_OK);
    assert_eq!(d.read_blocks(0, 16, 1024), (S_OK, payload));

    // Disconnect in the middle of everything; reconnect and serve again.
    drop(d);
    drop(silent);
    wait_sessions(&dp, "victim", 0);
    let mut d = Driver::ready(&victim_sock, BLK_FEATURES);
    assert_eq!(d.read_blocks(0, 16, 1024).0, S_OK);

    // The other controller kept serving the whole time.
    assert_eq!(b.read_blocks(0, 0, 4096), (S_OK, good));
    dp.shutdown();
}

#[test]
fn vhost_multiqueue_event_idx_and_memory_hotplug() {
    let bdev = malloc_bdev("Mq0", 4096, 512);
    let (dp, dir) = start("mq", &[("mq.0", bdev, false)]);
    let mut d = Driver::ready(&dir.join("mq.0"), BLK_FEATURES);
    assert_ne!(d.features & VIRTIO_F_RING_EVENT_IDX, 0);
    for q in 1..4 {
        d.setup_queue(q);
    }
    // Each queue writes its own sectors; every queue reads every other queue's data.
    for q in 0..4 {
        assert_eq!(
            d.write_blocks(q, q as u64 * 64, &pattern(q as u8, 2048)),
            S_OK
        );
    }
    for q in 0..4 {
        let other = (q + 1) % 4;
        assert_eq!(
            d.read_blocks(q, other as u64 * 64, 2048),
            (S_OK, pattern(other as u8, 2048))
        );
    }
    // With EVENT_IDX the device parks avail_event behind its position, where the driver's next
    // avail.idx moves cannot cross it, so the driver never kicks: queue 0 has taken 2 heads, and
    // avail_event (after the used ring) trails last_avail - 1 = 1 by less than 2^15 - size.
    let used = d.queues[0].used;
    let avail_event = d.ram.load_u16(used + 4 + 8 * u64::from(QUEUE_SIZE));
    let trail = 1u16.wrapping_sub(avail_event);
    assert!(
        trail < 0x8000 - QUEUE_SIZE,
        "avail_event {avail_event} with 2 heads taken: a driver could cross it and kick"
    );
    assert!(
        !rvhost_core::virtio::ring::vring_need_event(avail_event, 3, 2),
        "the next avail.idx move (2 -> 3) would kick past avail_event {avail_event}"
    );

    // A driver that sets used_event far ahead gets no interrupt for the next completion.
    let _ = d.queues[1].call.read();
    let avail = d.queues[1].avail;
    d.ram.store_u16(avail + 4 + 2 * u64::from(QUEUE_SIZE), 100);
    assert_eq!(d.read_blocks(1, 0, 512).0, S_OK);
    assert!(
        d.queues[1].call.read().is_err(),
        "no call before used_event is reached"
    );
    // ... and one when it asks for exactly the next.
    let next = d.ram.load_u16(d.queues[1].used + 2);
    d.ram.store_u16(avail + 4 + 2 * u64::from(QUEUE_SIZE), next);
    assert_eq!(d.read_blocks(1, 0, 512).0, S_OK);
    assert_eq!(d.queues[1].call.read().expect("call signalled"), 1);

    // A driver that re-arms behind what was published, without a notification for it, is told
    // late: what a frontend sees when its store of used_event and its load of used.idx pass the
    // device's store of used.idx and load of used_event (a vCPU whose barrier QEMU elides). It
    // processed up to `seen`, the device published past it while used_event was still far
    // ahead, and it re-arms at `seen` without seeing the new used.idx: the device's idle rounds
    // find it and call.
    let late_of = |dp: &rvhost_target::dataplane::Dataplane| {
        let stats = dp.queue_stats(Some("mq.0")).expect("queue stats");
        stats[0].sessions[0].queues[1].late_notifications
    };
    assert_eq!(late_of(&dp), 0);
    let used_event = avail + 4 + 2 * u64::from(QUEUE_SIZE);
    let seen = d.ram.load_u16(d.queues[1].used + 2);
    d.ram.store_u16(used_event, seen.wrapping_add(100));
    assert_eq!(d.read_blocks(1, 0, 512).0, S_OK);
    assert!(
        d.queues[1].call.read().is_err(),
        "used_event ahead: no call"
    );
    d.ram.store_u16(used_event, seen);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while d.queues[1].call.read().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "a driver waiting at {seen} with used.idx {} was never called",
            d.ram.load_u16(d.queues[1].used + 2)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(late_of(&dp), 1);
    // The negative control: a driver that saw everything re-arms at the published index and is
    // not called, however long the device idles.
    let published = d.ram.load_u16(d.queues[1].used + 2);
    d.ram.store_u16(used_event, published.wrapping_add(100));
    assert_eq!(d.read_blocks(1, 0, 512).0, S_OK);
    d.ram
        .store_u16(used_event, d.ram.load_u16(d.queues[1].used + 2));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.queues[1].call.read().is_err(),
        "a driver that saw everything was called"
    );
    assert_eq!(late_of(&dp), 1);

    // Memory hot-plug: add a second region, use it for a data buffer, remove it again.
    let extra = GuestRam::new(1 << 20);
    let extra_gpa = 1u64 << 32;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa,
        memory_size: 1 << 20,
        userspace_addr: FRONTEND_VA + (1 << 36),
        mmap_offset: 0,
        mmap_handle: std::os::unix::io::AsRawFd::as_raw_fd(&extra.file),
    };
    d.frontend.add_mem_region(&region).expect("ADD_MEM_REG");
    let (hdr, status) = (d.queues[0].header_addr(), d.queues[0].status_addr());
    let mut write_hdr = [0u8; 16];
    write_hdr[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    write_hdr[8..16].copy_from_slice(&512u64.to_le_bytes());
    d.ram.write(hdr, &write_hdr);
    extra.write(0x800, &pattern(42, 512));
    // A write whose data lies in the hot-added region; posted again after the region is removed.
    let write_from_extra = [
        Desc {
            addr: hdr,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: extra_gpa + 0x800,
            len: 512,
            flags: F_NEXT,
            next: 2,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    d.post(0, &write_from_extra);
    assert_eq!(d.wait_used(0), (0, 1));
    assert_eq!(d.ram.read(status, 1)[0], S_OK);
    assert_eq!(d.read_blocks(0, 512, 512), (S_OK, pattern(42, 512)));
    d.frontend.remove_mem_region(&region).expect("REM_MEM_REG");
    // The removed region is gone for the data path too.
    d.post(0, &write_from_extra);
    assert_eq!(d.wait_used(0), (0, 1));
    assert_eq!(d.ram.read(status, 1)[0], S_IOERR);
    dp.shutdown();
}

#[test]
fn vhost_hot_detach_and_delete() {
    let bdev = malloc_bdev("Gone0", 1024, 512);
    let (dp, dir) = start("detach", &[("det.0", bdev, false)]);
    let mut d = Driver::ready(&dir.join("det.0"), BLK_FEATURES);
    assert_eq!(d.write_blocks(0, 0, &[7u8; 512]), S_OK);
    assert!(dp.bdev_in_use("Gone0"));
    dp.detach_bdev("Gone0");
    assert!(!dp.bdev_in_use("Gone0"));
    assert_eq!(
        d.read_blocks(0, 0, 512).0,
        S_IOERR,
        "I/O after hot-detach fails"
    );
    assert_eq!(d.write_blocks(0, 0, &[7u8; 512]), S_IOERR);
    let info = dp.controllers(Some("det.0")).unwrap();
    assert_eq!(
        info[0].backend_specific["block"]["bdev"],
        serde_json::Value::Null
    );

    // A new session on the detached controller fails I/O too.
    drop(d);
    wait_sessions(&dp, "det.0", 0);
    let mut d = Driver::ready(&dir.join("det.0"), BLK_FEATURES);
    assert_eq!(d.read_blocks(0, 0, 512).0, S_IOERR);

    // Deleting the controller closes the connection and removes the socket.
    dp.delete_controller("det.0").unwrap();
    assert!(d.is_disconnected());
    assert!(!dir.join("det.0").exists());
    assert!(matches!(
        dp.delete_controller("det.0"),
        Err(rvhost_target::ops::OpsError::NotFound(_))
    ));
    dp.shutdown();
}

#[test]
fn vhost_two_frontends_share_a_controller() {
    let bdev = malloc_bdev("Shared0", 1024, 512);
    let (dp, dir) = start("shared", &[("shared.0", bdev, false)]);
    let mut first = Driver::ready(&dir.join("shared.0"), BLK_FEATURES);
    let mut second = Driver::ready(&dir.join("shared.0"), BLK_FEATURES);
    wait_sessions(&dp, "shared.0", 2);
    assert_eq!(first.write_blocks(0, 4, &pattern(1, 1024)), S_OK);
    assert_eq!(second.read_blocks(0, 4, 1024), (S_OK, pattern(1, 1024)));
    assert_eq!(second.write_blocks(0, 6, &pattern(2, 512)), S_OK);
    assert_eq!(first.read_blocks(0, 6, 512), (S_OK, pattern(2, 512)));
    drop(first);
    wait_sessions(&dp, "shared.0", 1);
    assert_eq!(second.read_blocks(0, 4, 512).0, S_OK);
    dp.shutdown();
    assert!(second.is_disconnected(), "shutdown closes every session");
}

#[test]
fn vhost_legacy_frontend_enable_cycle_and_reset() {
    let bdev = malloc_bdev("Legacy0", 1024, 512);
    let (dp, dir) = start("legacy", &[("legacy.0", bdev, false)]);
    let socket = dir.join("legacy.0");

    // Without VHOST_USER_F_PROTOCOL_FEATURES a ring runs as soon as it has a kick fd.
    {
        let frontend = vhost::vhost_user::Frontend::connect(&socket, 16).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        frontend.set_features(offered & VIRTIO_F_VERSION_1).unwrap();
        let mut d = Driver {
            frontend,
            ram: GuestRam::new(MEM_SIZE),
            features: VIRTIO_F_VERSION_1,
            queues: Vec::new(),
        };
        d.set_mem_table();
        // `setup_queue` ends with SET_VRING_ENABLE, which needs protocol features: set up by hand.
        let q = d.queues.len();
        assert_eq!(q, 0);
        d.ram.write(0, &vec![0u8; 0x3000]);
        let call = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        d.frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        d.frontend.set_vring_base(0, 0).unwrap();
        d.frontend
            .set_vring_addr(
                0,
                &vhost::VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: FRONTEND_VA,
                    used_ring_addr: FRONTEND_VA + 0x2000,
                    avail_ring_addr: FRONTEND_VA + 0x1000,
                    log_addr: None,
                },
            )
            .unwrap();
        d.frontend.set_vring_call(0, &call).unwrap();
        d.frontend.set_vring_kick(0, &kick).unwrap();
        // Adopt the queue the helper would have made (same layout as queue 0).
        d.setup_queue_record(0, call, kick);
        assert_eq!(d.write_blocks(0, 2, &pattern(5, 512)), S_OK);
        assert_eq!(d.read_blocks(0, 2, 512), (S_OK, pattern(5, 512)));
    }

    // With protocol features: a disabled ring is not served; enabling it serves what waited.
    let mut d = Driver::ready(&socket, BLK_FEATURES);
    d.frontend.set_vring_enable(0, false).unwrap();
    let (hdr, status, buf) = (
        d.queues[0].header_addr(),
        d.queues[0].status_addr(),
        d.queues[0].buffer_addr(),
    );
    let mut read_hdr = [0u8; 16];
    read_hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
    read_hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
    d.ram.write(hdr, &read_hdr);
    d.post(
        0,
        &[
            Desc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: buf,
                len: 512,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            Desc {
                addr: status,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    assert_eq!(
        d.wait_used_for(0, Duration::from_millis(200)),
        None,
        "disabled ring is idle"
    );
    d.frontend.set_vring_enable(0, true).unwrap();
    assert_eq!(d.wait_used(0), (0, 513));
    assert_eq!(d.ram.read(buf, 512), pattern(5, 512));

    // RESET_DEVICE stops the rings and forgets the features; the driver starts over.
    d.frontend.reset_device().unwrap();
    assert_eq!(d.wait_used_for(0, Duration::from_millis(100)), None);
    d.frontend.set_features(d.features).unwrap();
    d.setup_queue(0);
    assert_eq!(d.read_blocks(0, 2, 512), (S_OK, pattern(5, 512)));
    dp.shutdown();
}

#[test]
fn vhost_connection_flood_is_bounded() {
    let bdev = malloc_bdev("Flood0", 256, 512);
    let (dp, dir) = start("flood", &[("flood.0", bdev, false)]);
    let socket = dir.join("flood.0");
    let limit = rvhost_target::vhost::MAX_SESSIONS;
    let idle: Vec<UnixStream> = (0..limit)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    wait_sessions(&dp, "flood.0", limit as u32);
    // One more is closed at once...
    let mut extra = UnixStream::connect(&socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        extra.read(&mut buf).unwrap(),
        0,
        "connection over the limit is closed"
    );
    // ...and once the idle ones go, a real frontend is served.
    drop(idle);
    wait_sessions(&dp, "flood.0", 0);
    let mut d = Driver::ready(&socket, BLK_FEATURES);
    assert_eq!(d.read_blocks(0, 0, 512).0, S_OK);
    dp.shutdown();
}
