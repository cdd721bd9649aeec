//! The session device driven synchronously: a real memory table over a /dev/shm file, RAM
//! bdevs (or a bdev whose completions the test holds back), and `apply`/`poll`.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use rvhost_core::mem::GuestMemory;
use rvhost_core::virtio::{bit, feature};
use rvhost_core::virtio_scsi::{EventRepr, EVENT_LEN, TMF_REQ_LEN};

use super::*;
use crate::bdev::malloc::{MallocBdev, MemoryBudget};
use crate::bdev::testing::{HeldBdev, HeldIo as Held};
use crate::bdev::Bdev;
use crate::reactor::{ManualReactor, Task};
use crate::scsi::ScsiController;
use crate::vhost::memory::RegionSpec;
use crate::vhost::{ApplyDeviceOp, DeviceBackend, DeviceOp, EventNotifier, QueueSetup};

const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const REQ: u64 = 0x10000;
const RESP: u64 = 0x11000;
const DATA: u64 = 0x20000;
const CTRL_REQ: u64 = 0x12000;
const CTRL_RESP: u64 = 0x12100;
const EVENTS: u64 = 0x13000;

fn ring(q: u16) -> (u64, u64, u64) {
    let base = u64::from(q) * 0x3000;
    (base, base + 0x1000, base + 0x2000)
}

fn table() -> Arc<GuestMemoryTable> {
    let path = format!(
        "/dev/shm/rvhost-scsi-unit-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(MEM).unwrap();
    let spec = RegionSpec {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: 0x7000_0000,
        mmap_offset: 0,
    };
    GuestMemoryTable::from_regions([(spec, OwnedFd::from(file))]).unwrap()
}

struct Rig {
    mem: Arc<GuestMemoryTable>,
    controller: Arc<ScsiController>,
    device: Box<dyn Task>,
    /// The device's reactor, driven by the test: target changes arrive through it.
    reactor: ManualReactor,
    avail: [u16; 3],
}

fn malloc(name: &str, blocks: u64, bs: u32) -> Arc<dyn Bdev> {
    let budget = MemoryBudget::new(1 << 30);
    MallocBdev::new(name, blocks, bs, [7; 16], &budget).unwrap()
}

impl Rig {
    fn new(targets: &[(u8, Arc<dyn Bdev>)]) -> Self {
        let controller = Arc::new(ScsiController::new("scsi-test"));
        for (t, bdev) in targets {
            controller.add_target(Some(*t), Arc::clone(bdev)).unwrap();
        }
        let (handle, reactor) = crate::reactor::manual(0);
        let mut device = controller.new_device(DeviceId(1), &handle).unwrap();
        let mem = table();
        let (tx, rx) = sync_channel(1);
        device.apply_op(DeviceOp::SetMemory {
            memory: Arc::clone(&mem),
            reply: tx,
        });
        rx.try_recv().unwrap();
        let features = bit(feature::VIRTIO_F_VERSION_1) | bit(scsi_feature::VIRTIO_SCSI_F_HOTPLUG);
        for q in 0..3u16 {
            let (desc, avail, used) = ring(q);
            let setup = QueueSetup {
                size: QSIZE,
                desc_gpa: desc,
                avail_gpa: avail,
                used_gpa: used,
                last_avail: 0,
                features: VirtioFeatures(features),
                call: None,
                kick: None,
                err: None,
                memory: Arc::clone(&mem),
                inflight: None,
                used_log_gpa: None,
            };
            let (tx, rx) = sync_channel(1);
            device.apply_op(DeviceOp::StartQueue {
                index: q,
                setup,
                reply: tx,
            });
            rx.try_recv().unwrap().unwrap();
        }
        Rig {
            mem,
            controller,
            device,
            reactor,
            avail: [0; 3],
        }
    }

    /// Posts a chain of (address, length, device-writable) on queue `q`.
    fn post(&mut self, q: u16, chain: &[(u64, u32, bool)]) {
        let (desc, avail, _) = ring(q);
        let n = self.avail[usize::from(q)];
        let first = (n * 4) % QSIZE;
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == chain.len();
            let flags = u16::from(!last) | if write { 2 } else { 0 };
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&(index + 1).to_le_bytes());
            self.mem.write(desc + 16 * u64::from(index), &b).unwrap();
        }
        let slot = u64::from(n % QSIZE);
        self.mem
            .store_u16(avail + 4 + 2 * slot, first, Ordering::Relaxed)
            .unwrap();
        self.avail[usize::from(q)] = n.wrapping_add(1);
        self.mem
            .store_u16(avail + 2, n.wrapping_add(1), Ordering::Release)
            .unwrap();
    }

    /// Posts a command to `target`/`lun` on request queue 2 with data-out or data-in.
    fn command(&mut self, target: u8, lun: u16, tag: u64, cdb: &[u8], out: &[u8], in_len: u32) {
        let mut req = [0u8; REQ_LEN];
        let addr = LunAddress { target, lun };
        req[0..8].copy_from_slice(&addr.emit());
        req[8..16].copy_from_slice(&tag.to_le_bytes());
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write(REQ, &req).unwrap();
        self.mem.write(RESP, &[0xee; RESP_LEN]).unwrap();
        let mut chain = vec![(REQ, REQ_LEN as u32, false)];
        if !out.is_empty() {
            self.mem.write(DATA, out).unwrap();
            chain.push((DATA, out.len() as u32, false));
        }
        chain.push((RESP, RESP_LEN as u32, true));
        if in_len > 0 {
            chain.push((DATA, in_len, true));
        }
        self.post(2, &chain);
    }

    fn used_idx(&self, q: u16) -> u16 {
        self.mem.load_u16(ring(q).2 + 2, Ordering::Acquire).unwrap()
    }

    /// (head, length) of used element `i` of queue `q`.
    fn used(&self, q: u16, i: u16) -> (u32, u32) {
        let mut e = [0u8; 8];
        self.mem
            .read(ring(q).2 + 4 + 8 * u64::from(i % QSIZE), &mut e)
            .unwrap();
        (
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
        )
    }

    /// (response, status, sense key) of the last command.
    fn response(&self) -> (u8, u8, u8) {
        let mut r = [0u8; RESP_LEN];
        self.mem.read(RESP, &mut r).unwrap();
        (r[11], r[10], r[12 + 2] & 0x0f)
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.mem.read(DATA, &mut d).unwrap();
        d
    }

    fn tmf(&mut self, subtype: u32, target: u8, tag: u64) {
        let mut req = [0u8; TMF_REQ_LEN];
        req[4..8].copy_from_slice(&subtype.to_le_bytes());
        req[8..16].copy_from_slice(&LunAddress { target, lun: 0 }.emit());
        req[16..24].copy_from_slice(&tag.to_le_bytes());
        self.mem.write(CTRL_REQ, &req).unwrap();
        self.mem.write(CTRL_RESP, &[0xee]).unwrap();
        self.post(
            0,
            &[(CTRL_REQ, TMF_REQ_LEN as u32, false), (CTRL_RESP, 1, true)],
        );
    }

    fn tmf_response(&self) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read(CTRL_RESP, &mut b).unwrap();
        b[0]
    }

    fn event_buffer(&mut self, i: u64) {
        self.mem
            .write(EVENTS + 0x20 * i, &[0xee; EVENT_LEN])
            .unwrap();
        self.post(1, &[(EVENTS + 0x20 * i, EVENT_LEN as u32, true)]);
    }

    fn event(&self, i: u64) -> EventRepr {
        let mut b = [0u8; EVENT_LEN];
        self.mem.read(EVENTS + 0x20 * i, &mut b).unwrap();
        EventRepr::parse(&rvhost_core::virtio_scsi::Event::new_checked(&b[..]).unwrap())
    }

    /// Runs `change` on another thread (it waits for the device) while polling.
    fn while_polling<T: Send + 'static>(
        &mut self,
        change: impl FnOnce(Arc<ScsiController>) -> T + Send + 'static,
    ) -> T {
        let controller = Arc::clone(&self.controller);
        let worker = std::thread::spawn(move || change(controller));
        while !worker.is_finished() {
            self.reactor.deliver(&mut *self.device);
            self.device.poll();
            std::thread::yield_now();
        }
        worker.join().unwrap()
    }
}

#[test]
fn inquiry_and_read_capacity_describe_the_bdev() {
    let mut rig = Rig::new(&[(0, malloc("M0", 2048, 4096))]);
    rig.command(0, 0, 1, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    rig.device.poll();
    assert_eq!(rig.used_idx(2), 1);
    assert_eq!(rig.response(), (0, 0, 0));
    let d = rig.data(36);
    assert_eq!(&d[8..16], b"RVHOST  ");
    assert_eq!(&d[16..32], b"rvhost Malloc   ");
    assert_eq!(rig.used(2, 0).1, RESP_LEN as u32 + 36);
    // READ CAPACITY(16): last LBA 2047, block size 4096, LBPME set (the bdev can unmap).
    rig.command(
        0,
        0,
        2,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    );
    rig.device.poll();
    let d = rig.data(32);
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 2047);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 4096);
    assert_ne!(d[14] & 0x80, 0, "LBPME");
    // VPD 0x80: the serial is the UUID in hex.
    rig.command(0, 0, 3, &[0x12, 1, 0x80, 0, 64, 0], &[], 64);
    rig.device.poll();
    let d = rig.data(36);
    assert_eq!(&d[4..36], "07".repeat(16).as_bytes());
}

#[test]
fn a_call_eventfd_handed_over_after_a_completion_is_signalled_at_once() {
    use std::os::fd::AsFd;
    let mut rig = Rig::new(&[(0, malloc("M0", 64, 512))]);
    // Completed while the queue has no call eventfd yet (QEMU sends it on MSI-X unmask).
    rig.command(0, 0, 1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.used_idx(2), 1);
    let efd = rvhost_platform_linux::EventFd::new().unwrap();
    let file = std::fs::File::from(efd.as_fd().try_clone_to_owned().unwrap());
    let call = Arc::new(EventNotifier::from_file(file).unwrap());
    let (tx, rx) = sync_channel(1);
    rig.device.apply_op(DeviceOp::SetCall {
        index: 2,
        call: Some(call),
        reply: tx,
    });
    rx.try_recv().unwrap();
    assert_eq!(
        efd.consume().unwrap(),
        1,
        "the driver is told to look at its ring"
    );
}

#[test]
fn absent_target_is_bad_target_and_absent_lun_is_check_condition() {
    let mut rig = Rig::new(&[(0, malloc("M0", 64, 512))]);
    rig.command(5, 0, 1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.response().0, Response::BadTarget.code());
    // Target numbers past the 8 targets are absent too.
    rig.command(200, 0, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.response().0, Response::BadTarget.code());
    // LUN 1 of an existing target: LOGICAL UNIT NOT SUPPORTED (ILLEGAL REQUEST).
    rig.command(0, 1, 3, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.response(), (0, 2, 5));
    assert_eq!(rig.used_idx(2), 3);
}

#[test]
fn write_read_back_unmap_and_write_same_reach_the_bdev() {
    let mut rig = Rig::new(&[(1, malloc("M1", 256, 512))]);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    // WRITE(10) of 2 blocks at LBA 10.
    rig.command(1, 0, 1, &[0x2a, 0, 0, 0, 0, 10, 0, 0, 2, 0], &pattern, 0);
    rig.device.poll();
    rig.device.poll();
    assert_eq!(rig.response(), (0, 0, 0));
    rig.mem.write(DATA, &[0u8; 1024]).unwrap();
    rig.command(1, 0, 2, &[0x28, 0, 0, 0, 0, 10, 0, 0, 2, 0], &[], 1024);
    rig.device.poll();
    rig.device.poll();
    assert_eq!(rig.response(), (0, 0, 0));
    assert_eq!(rig.data(1024), pattern);
    assert_eq!(rig.used(2, 1).1, RESP_LEN as u32 + 1024);
    // UNMAP block 11: it reads back as zeros, block 10 is intact.
    let mut list = [0u8; 24];
    list[0..2].copy_from_slice(&22u16.to_be_bytes());
    list[2..4].copy_from_slice(&16u16.to_be_bytes());
    list[8..16].copy_from_slice(&11u64.to_be_bytes());
    list[16..20].copy_from_slice(&1u32.to_be_bytes());
    rig.command(1, 0, 3, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
    rig.device.poll();
    rig.device.poll();
    assert_eq!(rig.response(), (0, 0, 0));
    rig.command(1, 0, 4, &[0x28, 0, 0, 0, 0, 10, 0, 0, 2, 0], &[], 1024);
    rig.device.poll();
    rig.device.poll();
    let d = rig.data(1024);
    assert_eq!(&d[..512], &pattern[..512]);
    assert!(d[512..].iter().all(|&b| b == 0));
    // WRITE SAME(10) of a non-zero block over LBAs 20..120 (two bdev writes).
    let block = [0x5au8; 512];
    rig.command(1, 0, 5, &[0x41, 0, 0, 0, 0, 20, 0, 0, 100, 0], &block, 0);
    rig.device.poll();
    rig.device.poll();
    assert_eq!(rig.response(), (0, 0, 0));
    rig.command(1, 0, 6, &[0x28, 0, 0, 0, 0, 119, 0, 0, 2, 0], &[], 1024);
    rig.device.poll();
    rig.device.poll();
    let d = rig.data(1024);
    assert!(d[..512].iter().all(|&b| b == 0x5a), "LBA 119 written");
    assert!(d[512..].iter().all(|&b| b == 0), "LBA 120 untouched");
}

#[test]
fn lun_reset_waits_for_in_flight_io_and_query_task_sees_it() {
    let held = Arc::new(Held::default());
    let bdev: Arc<dyn Bdev> = Arc::new(HeldBdev(Arc::clone(&held)));
    let mut rig = Rig::new(&[(0, bdev)]);
    rig.command(0, 0, 77, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);
    rig.device.poll();
    assert_eq!(held.pending.lock().unwrap().len(), 1);
    // QUERY TASK for the in-flight tag: FUNCTION SUCCEEDED; for another: FUNCTION COMPLETE.
    rig.tmf(6, 0, 77);
    rig.device.poll();
    assert_eq!(rig.tmf_response(), Response::FunctionSucceeded.code());
    rig.tmf(6, 0, 78);
    rig.device.poll();
    assert_eq!(rig.tmf_response(), Response::FUNCTION_COMPLETE.code());
    // LOGICAL UNIT RESET is answered only once the read completed.
    rig.tmf(5, 0, 0);
    rig.device.poll();
    assert_eq!(rig.used_idx(0), 2);
    assert_eq!(rig.tmf_response(), 0xee);
    held.release.store(true, Ordering::Relaxed);
    rig.device.poll();
    rig.device.poll();
    assert_eq!(rig.used_idx(2), 1, "the read completed");
    assert_eq!(rig.used_idx(0), 3);
    assert_eq!(rig.tmf_response(), Response::FUNCTION_COMPLETE.code());
    // The reset left a unit attention for the next command.
    rig.command(0, 0, 79, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.response(), (0, 2, 6));
    // A TMF for an absent target: BAD_TARGET at once.
    rig.tmf(5, 3, 0);
    rig.device.poll();
    assert_eq!(rig.tmf_response(), Response::BadTarget.code());
}

#[test]
fn a_tmf_completed_while_its_queue_stops_is_published_before_the_stop_is_answered() {
    let held = Arc::new(Held::default());
    let bdev: Arc<dyn Bdev> = Arc::new(HeldBdev(Arc::clone(&held)));
    let mut rig = Rig::new(&[(0, bdev)]);
    rig.command(0, 0, 77, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[], 512);
    rig.device.poll();
    // LOGICAL UNIT RESET waits for the read, so the control queue has one request in flight.
    rig.tmf(5, 0, 0);
    rig.device.poll();
    assert_eq!(rig.used_idx(0), 0);
    // The frontend stops the control queue (GET_VRING_BASE): the stop waits for the TMF.
    let (tx, rx) = sync_channel(1);
    rig.device.apply_op(DeviceOp::StopQueue {
        index: 0,
        reply: tx,
    });
    assert!(
        rx.try_recv().is_err(),
        "the stop waits for the TMF in flight"
    );
    // The read completes; the TMF completes with it, as the device settles.
    held.release.store(true, Ordering::Relaxed);
    let mut answered = None;
    for _ in 0..4 {
        rig.device.poll();
        if let Ok(next_avail) = rx.try_recv() {
            answered = Some(next_avail);
            break;
        }
    }
    assert_eq!(
        answered,
        Some(Some(1)),
        "the stop is answered with the next avail index"
    );
    assert_eq!(rig.tmf_response(), Response::FUNCTION_COMPLETE.code());
    assert_eq!(
        rig.used_idx(0),
        1,
        "the TMF's used element is published before the queue's stop is answered"
    );
}

#[test]
fn hot_attach_and_detach_post_events_queued_until_buffers_arrive() {
    let mut rig = Rig::new(&[(0, malloc("M0", 64, 512))]);
    let t = rig.while_polling(|c| c.add_target(None, malloc("M1", 64, 512)).unwrap());
    assert_eq!(t, 1);
    // No event buffer yet: the event waits.
    rig.device.poll();
    assert_eq!(rig.used_idx(1), 0);
    rig.event_buffer(0);
    rig.device.poll();
    assert_eq!(rig.used_idx(1), 1);
    let e = rig.event(0);
    assert_eq!(e.event, event::VIRTIO_SCSI_T_TRANSPORT_RESET);
    assert_eq!(e.reason, event::VIRTIO_SCSI_EVT_RESET_RESCAN);
    assert_eq!(e.lun, [1, 1, 0, 0, 0, 0, 0, 0]);
    assert!(!e.events_missed);
    // The new target answers.
    rig.command(1, 0, 1, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.response(), (0, 0, 0));

    rig.event_buffer(1);
    rig.while_polling(|c| c.remove_target(1).unwrap());
    rig.device.poll();
    assert_eq!(rig.used_idx(1), 2);
    let e = rig.event(1);
    assert_eq!(e.reason, event::VIRTIO_SCSI_EVT_RESET_REMOVED);
    assert_eq!(e.lun[1], 1);
    rig.command(1, 0, 2, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    rig.device.poll();
    assert_eq!(rig.response().0, Response::BadTarget.code());
}

#[test]
fn event_overflow_is_reported_as_events_missed() {
    let mut rig = Rig::new(&[]);
    for _ in 0..(MAX_PENDING_EVENTS / 2 + 1) {
        rig.while_polling(|c| {
            c.add_target(Some(0), malloc("M0", 64, 512)).unwrap();
            c.remove_target(0).unwrap();
        });
    }
    // 2 * 33 events for 64 places: two were dropped, and the next event delivered says so.
    rig.event_buffer(0);
    rig.device.poll();
    let e = rig.event(0);
    assert!(e.events_missed, "{e:?}");
    assert_eq!(e.event, event::VIRTIO_SCSI_T_TRANSPORT_RESET);
    assert_eq!(e.reason, event::VIRTIO_SCSI_EVT_RESET_RESCAN);
    for i in 1..MAX_PENDING_EVENTS as u64 {
        rig.event_buffer(i % 8);
        rig.device.poll();
        let e = rig.event(i % 8);
        assert!(!e.events_missed, "event {i}: {e:?}");
        let reason = if i % 2 == 0 {
            event::VIRTIO_SCSI_EVT_RESET_RESCAN
        } else {
            event::VIRTIO_SCSI_EVT_RESET_REMOVED
        };
        assert_eq!(e.reason, reason, "event {i} in order");
    }
    assert_eq!(usize::from(rig.used_idx(1)), MAX_PENDING_EVENTS);
    // Nothing more to report: a new buffer stays with the device.
    rig.event_buffer(1);
    rig.device.poll();
    assert_eq!(usize::from(rig.used_idx(1)), MAX_PENDING_EVENTS);
}

#[test]
fn missed_events_without_a_pending_one_are_reported_as_no_event() {
    let mut backlog = EventBacklog::default();
    for t in 0..=MAX_PENDING_EVENTS {
        backlog.push(transport_reset(
            t as u8,
            event::VIRTIO_SCSI_EVT_RESET_RESCAN,
        ));
    }
    backlog.pending.clear();
    let e = backlog.next().unwrap();
    assert_eq!(
        (e.event, e.events_missed),
        (event::VIRTIO_SCSI_T_NO_EVENT, true)
    );
    assert!(backlog.next().is_none());
    // An event that could not be written goes back, flag included.
    backlog.push(transport_reset(1, event::VIRTIO_SCSI_EVT_RESET_REMOVED));
    backlog.missed = true;
    let e = backlog.next().unwrap();
    backlog.unpop(e);
    let again = backlog.next().unwrap();
    assert_eq!(again, e);
}
