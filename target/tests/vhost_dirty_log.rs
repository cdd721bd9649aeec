//! Dirty logging for live migration over a real vhost-user connection: `SET_LOG_BASE` maps the
//! frontend's log, `SET_FEATURES` with `VHOST_F_LOG_ALL` turns marking on and off under a
//! running queue, `SET_VRING_ADDR` with `VHOST_VRING_F_LOG` names where the used ring is logged,
//! and every page the device writes (read data, status byte, used ring) is marked, nothing else.

mod vhost_support;

use std::os::fd::AsRawFd;

use rvhost_platform_linux::InflightMemory;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVringAddrFlags};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vhost_support::*;

const LOG_ALL: u64 = 1 << 26;
const PAGE: u64 = 4096;
/// Bytes of log covering [`MEM_SIZE`]: one bit per page.
const LOG_BYTES: u64 = MEM_SIZE / PAGE / 8;

/// The frontend's log: a sealed memfd, as QEMU allocates it.
struct FrontendLog(InflightMemory);

impl FrontendLog {
    fn new(bytes: u64) -> Self {
        FrontendLog(InflightMemory::create(bytes as usize).expect("log memfd"))
    }

    fn region(&self, bytes: u64) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: bytes,
            mmap_offset: 0,
            mmap_handle: self.0.file().as_raw_fd(),
        }
    }

    /// The dirty pages, as page numbers; clears the log (as QEMU's sync does).
    fn take(&self) -> Vec<u64> {
        let mut bytes = vec![0u8; self.0.len()];
        assert!(self.0.read(0, &mut bytes));
        assert!(self.0.write(0, &vec![0u8; self.0.len()]));
        let mut pages = Vec::new();
        for (i, byte) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    pages.push(i as u64 * 8 + bit);
                }
            }
        }
        pages
    }
}

fn ring_config(q: &DriverQueue, log_used: bool) -> VringConfigData {
    VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: if log_used {
            VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
        } else {
            0
        },
        desc_table_addr: FRONTEND_VA + q.desc,
        used_ring_addr: FRONTEND_VA + q.used,
        avail_ring_addr: FRONTEND_VA + q.avail,
        log_addr: log_used.then_some(q.used),
    }
}

fn connect_with_log_shmfd(socket: &std::path::Path) -> Driver {
    let mut driver = Driver::connect(socket, VIRTIO_F_VERSION_1 | LOG_ALL);
    assert_ne!(driver.features & LOG_ALL, 0, "VHOST_F_LOG_ALL offered");
    let offered = driver.frontend.get_protocol_features().unwrap();
    assert!(offered.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    driver
        .frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::LOG_SHMFD,
        )
        .unwrap();
    // Negotiated with logging off, as QEMU does before a migration.
    driver.features &= !LOG_ALL;
    driver.frontend.set_features(driver.features).unwrap();
    driver.set_mem_table();
    driver.setup_queue(0);
    driver
}

#[test]
fn device_writes_are_logged_only_while_log_all_is_on() {
    let (dp, dir) = start(
        "dirty_log",
        &[("blk0", malloc_bdev("M0", 2048, 512), false)],
    );
    let socket = dir.join("blk0");
    let mut driver = connect_with_log_shmfd(&socket);
    let q = &driver.queues[0];
    let (used_page, data_page, buffer_page) = (
        q.used / PAGE,
        q.header_addr() / PAGE,
        q.buffer_addr() / PAGE,
    );
    let ring = ring_config(q, true);
    let ring_unlogged = ring_config(q, false);

    let log = FrontendLog::new(LOG_BYTES);
    driver
        .frontend
        .set_log_base(0, Some(log.region(LOG_BYTES)))
        .expect("SET_LOG_BASE");

    // Logging off: nothing is marked.
    assert_eq!(driver.write_blocks(0, 0, &pattern(1, 8192)), S_OK);
    let (status, data) = driver.read_blocks(0, 0, 8192);
    assert_eq!((status, data), (S_OK, pattern(1, 8192)));
    assert_eq!(log.take(), Vec::<u64>::new(), "logging is off");

    // Migration starts: LOG_ALL and the used ring's log address, under the running queue.
    driver
        .frontend
        .set_features(driver.features | LOG_ALL)
        .unwrap();
    driver.frontend.set_vring_addr(0, &ring).unwrap();
    // Turning logging on marks the used ring (its current contents may be newer than the copy).
    assert_eq!(log.take(), vec![used_page]);

    // A read writes its data buffer (two pages), its status byte and the used ring.
    let (status, data) = driver.read_blocks(0, 0, 8192);
    assert_eq!((status, data), (S_OK, pattern(1, 8192)));
    assert_eq!(
        log.take(),
        vec![used_page, data_page, buffer_page, buffer_page + 1]
    );

    // A write only reads its buffer: the status byte and used ring are marked, not the data.
    assert_eq!(driver.write_blocks(0, 16, &pattern(2, 8192)), S_OK);
    assert_eq!(log.take(), vec![used_page, data_page]);

    // A replaced log takes the marks from then on; the old one gets none.
    let second = FrontendLog::new(LOG_BYTES * 2);
    driver
        .frontend
        .set_log_base(0, Some(second.region(LOG_BYTES * 2)))
        .expect("SET_LOG_BASE again");
    let _ = second.take();
    let (status, _) = driver.read_blocks(0, 16, 4096);
    assert_eq!(status, S_OK);
    assert_eq!(log.take(), Vec::<u64>::new(), "old log untouched");
    assert_eq!(second.take(), vec![used_page, data_page, buffer_page]);

    // Migration ends (or is cancelled): logging off, I/O goes on unmarked.
    driver.frontend.set_features(driver.features).unwrap();
    driver.frontend.set_vring_addr(0, &ring_unlogged).unwrap();
    let (status, data) = driver.read_blocks(0, 16, 8192);
    assert_eq!((status, data), (S_OK, pattern(2, 8192)));
    assert_eq!(second.take(), Vec::<u64>::new(), "logging is off again");

    // Moving a running ring is still refused.
    let mut moved = ring;
    moved.used_ring_addr += 0x100;
    assert!(driver.frontend.set_vring_addr(0, &moved).is_err());
    let (status, _) = driver.read_blocks(0, 0, 512);
    assert_eq!(status, S_OK, "the queue still runs");

    drop(driver);
    dp.shutdown();
}

#[test]
fn a_log_too_small_for_guest_memory_is_refused() {
    let (dp, dir) = start(
        "dirty_log_small",
        &[("blk0", malloc_bdev("M1", 64, 512), false)],
    );
    let socket = dir.join("blk0");
    let driver = connect_with_log_shmfd(&socket);
    // Covers 64 pages x 8 = 2 MiB of the 4 MiB guest.
    let log = FrontendLog::new(LOG_BYTES / 2);
    assert!(driver
        .frontend
        .set_log_base(0, Some(log.region(LOG_BYTES / 2)))
        .is_err());
    assert!(driver.is_disconnected(), "a refused log closes the session");
    drop(driver);
    dp.shutdown();
}
