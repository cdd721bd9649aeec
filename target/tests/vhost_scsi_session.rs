//! A vhost-scsi controller served by the real data plane, driven over its vhost-user socket: the
//! feature bits QEMU 7.2 acknowledges (CHANGE from its `param_change` default), commands on a
//! request queue, and a hot-attach posting a RESCAN event to a connected session.

mod vhost_support;

use std::time::Duration;

use rvhost_target::ops::{ControllerOps, ScsiControllerSpec};
use vhost_support::{malloc_bdev, start, wait_sessions, Desc, Driver, F_NEXT, F_WRITE};

const VIRTIO_SCSI_F_HOTPLUG: u64 = 1 << 1;
const VIRTIO_SCSI_F_CHANGE: u64 = 1 << 2;
const REQ_LEN: u32 = 51;
const RESP_LEN: u32 = 108;
const REQUEST_QUEUE: usize = 2;
const EVENT_QUEUE: usize = 1;

fn lun(target: u8) -> [u8; 8] {
    [1, target, 0x40, 0, 0, 0, 0, 0]
}

/// Posts a command with a data-in buffer on the request queue; returns (response, status,
/// used length, data-in).
fn command(driver: &mut Driver, target: u8, cdb: &[u8], data_in: u32) -> (u8, u8, u32, Vec<u8>) {
    let q = &driver.queues[REQUEST_QUEUE];
    let (req, resp, data) = (q.header_addr(), q.status_addr(), q.buffer_addr());
    let mut header = vec![0u8; REQ_LEN as usize];
    header[0..8].copy_from_slice(&lun(target));
    header[8..16].copy_from_slice(&7u64.to_le_bytes());
    header[19..19 + cdb.len()].copy_from_slice(cdb);
    driver.ram.write(req, &header);
    driver.ram.write(resp, &[0xee; RESP_LEN as usize]);
    driver.post(
        REQUEST_QUEUE,
        &[
            Desc {
                addr: req,
                len: REQ_LEN,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: resp,
                len: RESP_LEN,
                flags: F_NEXT | F_WRITE,
                next: 2,
            },
            Desc {
                addr: data,
                len: data_in,
                flags: F_WRITE,
                next: 0,
            },
        ],
    );
    let (_, len) = driver.wait_used(REQUEST_QUEUE);
    let r = driver.ram.read(resp, RESP_LEN as usize);
    (r[11], r[10], len, driver.ram.read(data, data_in as usize))
}

#[test]
fn qemu_feature_bits_commands_and_hot_attach_event() {
    let (dp, dir) = start("scsi-session", &[]);
    dp.create_scsi_controller(ScsiControllerSpec {
        name: "scsi.0".into(),
        cpumask: None,
    })
    .expect("scsi controller");
    dp.scsi_add_target("scsi.0", Some(0), malloc_bdev("Lun0", 2048, 512))
        .expect("target 0");

    // What QEMU 7.2 acknowledges for vhost-user-scsi-pci with its defaults.
    let wanted = vhost_support::VIRTIO_F_VERSION_1
        | vhost_support::VIRTIO_F_RING_EVENT_IDX
        | vhost_support::VIRTIO_F_RING_INDIRECT_DESC
        | VIRTIO_SCSI_F_HOTPLUG
        | VIRTIO_SCSI_F_CHANGE;
    let mut driver = Driver::connect(&dir.join("scsi.0"), wanted);
    assert_eq!(
        driver.features & wanted,
        wanted,
        "every bit QEMU sends is offered"
    );
    driver.set_mem_table();
    for q in 0..3 {
        driver.setup_queue(q);
    }
    wait_sessions(&dp, "scsi.0", 1);

    // INQUIRY to target 0: vendor and product from the bdev kind.
    let (response, status, len, data) = command(&mut driver, 0, &[0x12, 0, 0, 0, 96, 0], 96);
    assert_eq!((response, status), (0, 0));
    assert_eq!(len, RESP_LEN + 36);
    assert_eq!(&data[8..16], b"RVHOST  ");
    assert_eq!(&data[16..29], b"rvhost Malloc");
    // READ CAPACITY(10) matches the bdev.
    let (_, status, _, data) = command(&mut driver, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(status, 0);
    assert_eq!(u32::from_be_bytes(data[0..4].try_into().unwrap()), 2047);
    assert_eq!(u32::from_be_bytes(data[4..8].try_into().unwrap()), 512);
    // Target 1 does not exist yet.
    let (response, ..) = command(&mut driver, 1, &[0, 0, 0, 0, 0, 0], 0);
    assert_eq!(response, 3, "VIRTIO_SCSI_S_BAD_TARGET");

    // Hot-attach while the session runs: a RESCAN event for target 1, LUN 0.
    let event_buf = driver.queues[EVENT_QUEUE].buffer_addr();
    driver.ram.write(event_buf, &[0xee; 16]);
    driver.post(
        EVENT_QUEUE,
        &[Desc {
            addr: event_buf,
            len: 16,
            flags: F_WRITE,
            next: 0,
        }],
    );
    let t = dp
        .scsi_add_target("scsi.0", None, malloc_bdev("Lun1", 1024, 4096))
        .expect("hot-attach");
    assert_eq!(t, 1);
    let (_, len) = driver.wait_used(EVENT_QUEUE);
    assert_eq!(len, 16);
    let event = driver.ram.read(event_buf, 16);
    assert_eq!(
        u32::from_le_bytes(event[0..4].try_into().unwrap()),
        1,
        "TRANSPORT_RESET"
    );
    assert_eq!(&event[4..12], &[1, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        u32::from_le_bytes(event[12..16].try_into().unwrap()),
        1,
        "RESCAN"
    );
    let (response, status, ..) = command(&mut driver, 1, &[0, 0, 0, 0, 0, 0], 0);
    assert_eq!((response, status), (0, 0), "the new target answers");

    // Hot-detach: REMOVED, and the target is gone.
    driver.ram.write(event_buf, &[0xee; 16]);
    driver.post(
        EVENT_QUEUE,
        &[Desc {
            addr: event_buf,
            len: 16,
            flags: F_WRITE,
            next: 0,
        }],
    );
    dp.scsi_remove_target("scsi.0", 1).expect("hot-detach");
    driver
        .wait_used_for(EVENT_QUEUE, Duration::from_secs(10))
        .expect("REMOVED event");
    let event = driver.ram.read(event_buf, 16);
    assert_eq!(
        u32::from_le_bytes(event[12..16].try_into().unwrap()),
        2,
        "REMOVED"
    );
    let (response, ..) = command(&mut driver, 1, &[0, 0, 0, 0, 0, 0], 0);
    assert_eq!(response, 3);
    drop(driver);
    dp.shutdown();
}
