//! What a virtio-blk request is, as the vhost device shell ([`crate::vhost::device`]) hands it
//! over: decode the chain, submit bdev I/O (or answer at once: GET_ID, errors), and on the bdev's
//! completion write the status byte. The shell pops, walks, keeps the request's slot, puts the
//! head on the used ring and publishes; nothing here is allocated per request.

use crate::bdev::fanout::Fanout;
use crate::bdev::{Bdev, BdevChannel, BdevIo, IoKind, IoMemory, IoStatus, IoVec};
use crate::reactor::Reply;
use crate::vhost::device::{
    Disposition, NewRequest, RequestHandler, Requests, ShellRing, VhostDevice, CHAIN_CAPACITY,
};
use crate::vhost::memory::GuestMemoryTable;
use crate::vhost::{DeviceId, VirtioFeatures};
use rvhost_core::blk::{
    write_status, BlkLimits, BlkRequest, BlkRequestKind, BlkStatus, VirtioBlkConfig,
};

/// Ranges per DISCARD / WRITE_ZEROES request we accept (`max_discard_seg`); each becomes one bdev
/// I/O, and they are copied out of guest memory into a fixed-capacity list.
pub const MAX_RANGES: usize = 16;

/// Sector size of virtio-blk requests, whatever the device's block size.
const SECTOR: u64 = 512;

/// What a session needs to know about its bdev; fixed for the session's life but for its size
/// ([`BlkOp::Resize`]).
#[derive(Debug, Clone)]
pub struct DeviceGeometry {
    /// The bdev's name (the GET_ID answer, truncated to 20 bytes).
    pub bdev_name: String,
    /// Bytes per block (a power of two, at least 512).
    pub block_size: u32,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Writes, discards and write-zeroes fail with IOERR.
    pub readonly: bool,
    /// The bdev can flush.
    pub supports_flush: bool,
    /// The bdev can unmap (DISCARD).
    pub supports_unmap: bool,
    /// The bdev can write zeroes.
    pub supports_write_zeroes: bool,
}

impl DeviceGeometry {
    /// The geometry of `bdev`, exported read-only or not.
    pub fn of(bdev: &dyn Bdev, readonly: bool) -> Self {
        DeviceGeometry {
            bdev_name: bdev.name().to_string(),
            block_size: bdev.block_size().max(512),
            num_blocks: bdev.num_blocks(),
            readonly,
            supports_flush: bdev.supports(IoKind::Flush),
            supports_unmap: bdev.supports(IoKind::Unmap),
            supports_write_zeroes: bdev.supports(IoKind::WriteZeroes),
        }
    }

    /// Device capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.num_blocks
            .saturating_mul(u64::from(self.block_size) / SECTOR)
    }

    /// Converts a sector range to a block range, if it is block-aligned and inside the device.
    fn blocks(&self, sector: u64, sectors: u64) -> Option<(u64, u64)> {
        let per_block = u64::from(self.block_size) / SECTOR;
        if per_block == 0 || sector % per_block != 0 || sectors % per_block != 0 {
            return None;
        }
        let end = sector.checked_add(sectors)?;
        if end > self.capacity_sectors() {
            return None;
        }
        Some((sector / per_block, sectors / per_block))
    }
}

/// One request between submission and completion (the shell keeps its head and slot).
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkSlot {
    /// Guest address of the status byte.
    status_addr: u64,
    /// Used length to report on success (data written into the chain plus the status byte).
    used_len: u32,
    /// The request's bdev I/Os (DISCARD and WRITE_ZEROES fan out into one per range).
    fanout: Fanout,
}

/// The virtio-blk status of a request whose bdev I/Os ended with `status`.
#[inline]
fn blk_status(status: IoStatus) -> BlkStatus {
    if status == IoStatus::Success {
        BlkStatus::Ok
    } else {
        BlkStatus::IoErr
    }
}

/// The vhost-blk operations beyond the shell's [`crate::vhost::DeviceOp`]s.
#[derive(Debug)]
pub enum BlkOp {
    /// Hot-detaches the device's bdev: new requests fail; replies once in-flight I/O completed.
    DetachBdev {
        /// Acknowledged once drained.
        reply: Reply<()>,
    },
    /// The bdev changed size: requests are checked against `num_blocks` from now on (the
    /// controller then tells the frontend, which re-reads the config space).
    Resize {
        /// The new size in blocks.
        num_blocks: u64,
        /// Acknowledged once in effect.
        reply: Reply<()>,
    },
}

/// A vhost-blk session on its reactor: the shell with the blk request handler.
pub type BlkDevice = VhostDevice<BlkHandler>;

/// A session device with `channel` (`None`: the bdev is detached and all I/O fails).
pub fn new_device(
    id: DeviceId,
    geometry: DeviceGeometry,
    config: VirtioBlkConfig,
    channel: Option<Box<dyn BdevChannel>>,
) -> BlkDevice {
    VhostDevice::new(
        id,
        super::MAX_QUEUES,
        BlkHandler::new(geometry, config, channel),
    )
}

/// What a vhost-blk session adds to the shell: the bdev channel and what requests are checked
/// against.
pub struct BlkHandler {
    geometry: DeviceGeometry,
    config: VirtioBlkConfig,
    channel: Option<Box<dyn BdevChannel>>,
    /// Hot-detach requested: new requests fail, in-flight ones still complete on `channel`.
    detached: bool,
    /// I/O vectors of the request being submitted (capacity reserved once).
    iovs: Vec<IoVec>,
    detach_reply: Option<Reply<()>>,
    /// Capacity in sectors after a resize; the queues' limits were fixed when they started.
    resized_capacity: Option<u64>,
}

impl std::fmt::Debug for BlkHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkHandler")
            .field("geometry", &self.geometry)
            .field("attached", &self.channel.is_some())
            .finish_non_exhaustive()
    }
}

impl BlkHandler {
    /// A handler submitting to `channel` (`None`: the bdev is detached and all I/O fails).
    pub fn new(
        geometry: DeviceGeometry,
        config: VirtioBlkConfig,
        channel: Option<Box<dyn BdevChannel>>,
    ) -> Self {
        BlkHandler {
            geometry,
            config,
            detached: channel.is_none(),
            channel,
            iovs: Vec::with_capacity(CHAIN_CAPACITY),
            detach_reply: None,
            resized_capacity: None,
        }
    }

    /// Writes `status` for `slot` and returns the used length to report.
    #[inline]
    fn finish(mem: &GuestMemoryTable, slot: &BlkSlot, status: BlkStatus, device: DeviceId) -> u32 {
        if let Err(err) = write_status(mem, slot.status_addr, status) {
            // The status byte was validated at decode; only a memory-table change that removed it
            // can get here. The request still has to be returned.
            tracing::warn!(device = device.0, %err, "status byte no longer mapped");
        }
        if status == BlkStatus::Ok {
            slot.used_len
        } else {
            1
        }
    }

    /// Submits `request`'s bdev I/O; returns a status when the request completes at once.
    fn submit(
        &mut self,
        slot: &mut BlkSlot,
        io_tag: u64,
        request: &BlkRequest<'_, MAX_RANGES>,
        mem: &GuestMemoryTable,
        io_mem: &IoMemory,
    ) -> Option<BlkStatus> {
        let geometry = &self.geometry;
        let iovs = &mut self.iovs;
        if request.kind == BlkRequestKind::GetId {
            // As much of the NUL-padded name as the buffers hold; used_len_ok counts the same.
            return Some(match request.write_id(mem, geometry.bdev_name.as_bytes()) {
                Ok(_) => BlkStatus::Ok,
                Err(_) => BlkStatus::IoErr,
            });
        }
        // Hot-detached: every I/O fails.
        let channel = match self.channel.as_deref_mut() {
            Some(channel) if !self.detached => channel,
            _ => return Some(BlkStatus::IoErr),
        };
        let writes = matches!(
            request.kind,
            BlkRequestKind::Write | BlkRequestKind::Discard | BlkRequestKind::WriteZeroes
        );
        if writes && geometry.readonly {
            return Some(BlkStatus::IoErr);
        }
        match request.kind {
            BlkRequestKind::Read | BlkRequestKind::Write => {
                let data_len = u64::from(request.data_len());
                // Sectors are 512 bytes; the bdev's blocks may be larger: misaligned is an error.
                if data_len % u64::from(geometry.block_size) != 0 {
                    return Some(BlkStatus::IoErr);
                }
                let Some((offset_blocks, num_blocks)) =
                    geometry.blocks(request.sector, data_len / SECTOR)
                else {
                    return Some(BlkStatus::IoErr);
                };
                if num_blocks == 0 {
                    return Some(BlkStatus::Ok);
                }
                iovs.clear();
                iovs.extend(request.data.iter().map(|seg| IoVec {
                    addr: seg.host_addr,
                    len: seg.len,
                }));
                let kind = if request.kind == BlkRequestKind::Read {
                    IoKind::Read
                } else {
                    IoKind::Write
                };
                let io = BdevIo {
                    kind,
                    offset_blocks,
                    num_blocks,
                    iovs,
                    tag: io_tag,
                    mem: io_mem,
                };
                Self::submit_one(channel, slot, &io)
            }
            BlkRequestKind::Flush => {
                if !geometry.supports_flush {
                    // Nothing is cached above a bdev that cannot flush.
                    return Some(BlkStatus::Ok);
                }
                let io = BdevIo {
                    kind: IoKind::Flush,
                    offset_blocks: 0,
                    num_blocks: 0,
                    iovs: &[],
                    tag: io_tag,
                    mem: io_mem,
                };
                Self::submit_one(channel, slot, &io)
            }
            BlkRequestKind::Discard | BlkRequestKind::WriteZeroes => {
                let (io_kind, supported) = if request.kind == BlkRequestKind::Discard {
                    (IoKind::Unmap, geometry.supports_unmap)
                } else {
                    (IoKind::WriteZeroes, geometry.supports_write_zeroes)
                };
                if !supported {
                    return Some(BlkStatus::Unsupp);
                }
                // Check every range before submitting any, so a bad range fails the request
                // without having changed the device.
                if request.ranges.iter().any(|r| {
                    geometry
                        .blocks(r.sector, u64::from(r.num_sectors))
                        .is_none()
                }) {
                    return Some(BlkStatus::IoErr);
                }
                for range in &request.ranges {
                    let Some((offset_blocks, num_blocks)) =
                        geometry.blocks(range.sector, u64::from(range.num_sectors))
                    else {
                        continue;
                    };
                    if num_blocks == 0 {
                        continue;
                    }
                    let io = BdevIo {
                        kind: io_kind,
                        offset_blocks,
                        num_blocks,
                        iovs: &[],
                        tag: io_tag,
                        mem: io_mem,
                    };
                    let submitted = channel.submit(&io);
                    if let Err(err) = &submitted {
                        tracing::debug!(%err, "bdev refused a range");
                    }
                    // A refused range fails the request; the ranges already submitted complete.
                    if !slot.fanout.issued(submitted) {
                        break;
                    }
                }
                if slot.fanout.is_done() {
                    // Nothing went to the bdev (empty ranges), or it refused the first range.
                    return Some(blk_status(slot.fanout.status()));
                }
                None
            }
            BlkRequestKind::GetId => Some(BlkStatus::Ok),
        }
    }

    fn submit_one(
        channel: &mut dyn BdevChannel,
        slot: &mut BlkSlot,
        io: &BdevIo<'_>,
    ) -> Option<BlkStatus> {
        let submitted = channel.submit(io);
        if let Err(err) = &submitted {
            tracing::debug!(%err, "bdev refused I/O");
        }
        if slot.fanout.issued(submitted) {
            None
        } else {
            Some(BlkStatus::IoErr)
        }
    }
}

impl RequestHandler for BlkHandler {
    type Request = BlkSlot;
    /// What requests on the queue are checked against (capacity, read-only, discard limits as
    /// negotiated).
    type Queue = BlkLimits;
    type Op = BlkOp;

    fn start_queue(&mut self, _index: u16, features: VirtioFeatures) -> Result<BlkLimits, String> {
        Ok(BlkLimits::from_config(&self.config, features.0))
    }

    #[inline]
    fn start(&mut self, r: NewRequest<'_, Self>) -> Disposition {
        let NewRequest {
            device,
            queue,
            tag,
            chain,
            request: slot,
            data,
            queue_state: limits,
            mem,
            io_mem,
            ..
        } = r;
        let chain = match chain {
            Ok(chain) => chain,
            Err(err) => {
                return match err.status_segment() {
                    Some(status) => {
                        tracing::debug!(device = device.0, queue, %err, "malformed request failed");
                        slot.status_addr = status.guest_end().saturating_sub(1);
                        Disposition::Complete(Self::finish(mem, slot, BlkStatus::IoErr, device))
                    }
                    None => {
                        tracing::error!(device = device.0, queue, %err, "malformed chain without a status byte; queue stopped (device needs reset)");
                        Disposition::Abandon
                    }
                };
            }
        };
        slot.used_len = 1;
        let resized;
        let limits = match self.resized_capacity {
            None => limits,
            Some(capacity) => {
                resized = BlkLimits {
                    capacity,
                    ..*limits
                };
                &resized
            }
        };
        // Matched by reference: moving the decoded request out of the `Result` copies it.
        let decoded = BlkRequest::<'_, MAX_RANGES>::decode(mem, chain, limits);
        let outcome = match &decoded {
            Ok(request) => {
                slot.status_addr = request.status_addr;
                slot.used_len = request.used_len_ok();
                match request.kind {
                    BlkRequestKind::Read => data.read = request.data_len(),
                    BlkRequestKind::Write => data.written = request.data_len(),
                    _ => {}
                }
                self.submit(slot, tag, request, mem, io_mem)
            }
            Err(err) => match err.status_to_write() {
                Some((status_addr, status)) => {
                    tracing::debug!(device = device.0, queue, %err, "request refused");
                    slot.status_addr = status_addr;
                    Some(status)
                }
                None => {
                    tracing::error!(device = device.0, queue, %err, "request without a usable status byte; queue stopped (device needs reset)");
                    return Disposition::Abandon;
                }
            },
        };
        match outcome {
            Some(status) => Disposition::Complete(Self::finish(mem, slot, status, device)),
            None => Disposition::Pending,
        }
    }

    fn poll_completions<V: ShellRing>(&mut self, requests: &mut Requests<'_, Self, V>) -> usize {
        let Some(channel) = self.channel.as_mut() else {
            return 0;
        };
        if channel.in_flight() == 0 {
            return 0;
        }
        let device = requests.device();
        channel.poll(&mut |io_tag, status| {
            requests.update(io_tag, |slot, mem| {
                let status = slot.fanout.completed(status)?;
                Some(Self::finish(mem, slot, blk_status(status), device))
            });
        })
    }

    fn control<V: ShellRing>(&mut self, op: BlkOp, requests: &mut Requests<'_, Self, V>) -> bool {
        match op {
            BlkOp::Resize { num_blocks, reply } => {
                self.geometry.num_blocks = num_blocks;
                let capacity = self.geometry.capacity_sectors();
                self.config.capacity = capacity;
                self.resized_capacity = Some(capacity);
                tracing::info!(
                    device = requests.device().0,
                    num_blocks,
                    "blk device resized"
                );
                let _ = reply.send(());
                false
            }
            BlkOp::DetachBdev { reply } => {
                // From now on new requests see no channel; in-flight ones still complete through it.
                self.detached = true;
                self.detach_reply = Some(reply);
                true
            }
        }
    }

    fn settle<V: ShellRing>(&mut self, requests: &mut Requests<'_, Self, V>) -> bool {
        if self.detach_reply.is_some() && requests.in_flight() == 0 {
            self.channel = None;
            if let Some(reply) = self.detach_reply.take() {
                let _ = reply.send(());
            }
        }
        self.detach_reply.is_some()
    }

    fn remove(&mut self) {
        self.channel = None;
    }
}

#[cfg(test)]
mod tests {
    //! The request path driven synchronously (no threads): a real memory table over a /dev/shm
    //! file, a bdev whose completions the test releases, and the device's `apply`/`poll`.

    use std::os::fd::OwnedFd;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::{sync_channel, Receiver};
    use std::sync::Arc;

    use rvhost_core::mem::GuestMemory;
    use rvhost_core::virtio::{bit, feature};

    use super::*;
    use crate::bdev::testing::{HeldBdev, HeldIo as Held};
    use crate::reactor::Task;
    use crate::vhost::memory::RegionSpec;
    use crate::vhost::{DeviceOp, QueueSetup};

    const MEM: u64 = 1 << 20;
    const QSIZE: u16 = 16;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const HDR: u64 = 0x10000;
    const STATUS: u64 = 0x10100;
    const BUF: u64 = 0x11000;

    struct Rig {
        /// The file behind guest memory, for building more tables over the same memory.
        file: std::fs::File,
        mem: Arc<GuestMemoryTable>,
        device: BlkDevice,
        held: Arc<Held>,
        avail_idx: u16,
        /// The kick eventfd the queue starts with.
        kick: Option<Arc<crate::vhost::EventNotifier>>,
    }

    fn table_over(file: &std::fs::File) -> Arc<GuestMemoryTable> {
        let spec = RegionSpec {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: 0x7000_0000,
            mmap_offset: 0,
        };
        GuestMemoryTable::from_regions([(spec, OwnedFd::from(file.try_clone().unwrap()))]).unwrap()
    }

    fn table() -> (Arc<GuestMemoryTable>, std::fs::File) {
        let path = format!(
            "/dev/shm/rvhost-unit-{}-{:?}",
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
        (table_over(&file), file)
    }

    fn reply<T>() -> (Reply<T>, Receiver<T>) {
        sync_channel(1)
    }

    impl Rig {
        fn new(readonly: bool) -> Self {
            let held = Arc::new(Held::default());
            let bdev: Arc<dyn Bdev> = Arc::new(HeldBdev(Arc::clone(&held)));
            let controller = super::super::BlkController::new("test", Arc::clone(&bdev), readonly);
            let geometry = DeviceGeometry::of(bdev.as_ref(), readonly);
            let channel = bdev.open_channel().unwrap();
            let mut device = new_device(DeviceId(1), geometry, controller.config(), Some(channel));
            let (mem, file) = table();
            let (tx, rx) = reply();
            device.apply(DeviceOp::SetMemory {
                memory: Arc::clone(&mem),
                reply: tx,
            });
            rx.try_recv().unwrap();
            let mut rig = Rig {
                file,
                mem,
                device,
                held,
                avail_idx: 0,
                kick: None,
            };
            let mut features = bit(feature::VIRTIO_F_VERSION_1);
            if readonly {
                features |= bit(rvhost_core::blk::feature::VIRTIO_BLK_F_RO);
            }
            rig.start(features);
            rig
        }

        fn start(&mut self, features: u64) {
            let setup = QueueSetup {
                size: QSIZE,
                desc_gpa: DESC,
                avail_gpa: AVAIL,
                used_gpa: USED,
                last_avail: self.avail_idx,
                features: VirtioFeatures(features),
                call: None,
                kick: self.kick.clone(),
                err: None,
                memory: Arc::clone(&self.mem),
                inflight: None,
                used_log_gpa: None,
            };
            let (tx, rx) = reply();
            self.device.apply(DeviceOp::StartQueue {
                index: 0,
                setup,
                reply: tx,
            });
            rx.try_recv().unwrap().unwrap();
        }

        fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(DESC + 16 * i, &b).unwrap();
        }

        /// Posts header + 512-byte buffer + status as head 0.
        fn post(&mut self, req_type: u32, sector: u64) {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write(HDR, &hdr).unwrap();
            self.mem.write(STATUS, &[0xff]).unwrap();
            let data_flags = if req_type == 0 { 3 } else { 1 };
            self.desc(0, HDR, 16, 1, 1);
            self.desc(1, BUF, 512, data_flags, 2);
            self.desc(2, STATUS, 1, 2, 0);
            let slot = u64::from(self.avail_idx % QSIZE);
            self.mem
                .store_u16(AVAIL + 4 + 2 * slot, 0, Ordering::Relaxed)
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .store_u16(AVAIL + 2, self.avail_idx, Ordering::Release)
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem.load_u16(USED + 2, Ordering::Acquire).unwrap()
        }

        fn status(&self) -> u8 {
            let mut b = [0u8; 1];
            self.mem.read(STATUS, &mut b).unwrap();
            b[0]
        }

        fn release(&self) {
            self.held.release.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn completion_waits_for_the_bdev_and_is_published_once() {
        let mut rig = Rig::new(false);
        rig.post(0, 4);
        rig.device.poll();
        assert_eq!(rig.held.submitted.load(Ordering::Relaxed), 1);
        assert_eq!(rig.used_idx(), 0, "nothing used before the bdev completes");
        rig.release();
        rig.device.poll();
        assert_eq!(rig.used_idx(), 1);
        assert_eq!(rig.status(), 0);
        let mut elem = [0u8; 8];
        rig.mem.read(USED + 4, &mut elem).unwrap();
        assert_eq!(
            u32::from_le_bytes(elem[4..8].try_into().unwrap()),
            513,
            "read: data + status"
        );
        let mut data = [0u8; 512];
        rig.mem.read(BUF, &mut data).unwrap();
        assert!(data.iter().all(|&b| b == 0xab));
        // Poll mode: the driver is told not to kick.
        assert_eq!(rig.mem.load_u16(USED, Ordering::Acquire).unwrap(), 1);
    }

    #[test]
    fn the_queue_counts_the_requests_it_completed() {
        let mut rig = Rig::new(false);
        assert_eq!(rig.device.completed(0), Some(0));
        assert_eq!(rig.device.completed(1), None, "not started");
        rig.release();
        for n in 1..=3u64 {
            rig.post(0, 4);
            rig.device.poll();
            rig.device.poll();
            assert_eq!(rig.device.completed(0), Some(n));
        }
        // An answer given at once (a request past the end fails without reaching the bdev)
        // counts too: the counter follows the used ring.
        rig.post(0, u64::MAX / 2);
        rig.device.poll();
        assert_eq!(rig.used_idx(), 4);
        assert_eq!(rig.device.completed(0), Some(4));
    }

    #[test]
    fn a_call_eventfd_handed_over_after_a_completion_is_signalled_at_once() {
        use std::os::fd::AsFd;
        let mut rig = Rig::new(false);
        // Completed while the queue has no call eventfd yet (QEMU sends it on MSI-X unmask).
        rig.post(0, 4);
        rig.release();
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.used_idx(), 1);
        let efd = rvhost_platform_linux::EventFd::new().unwrap();
        let file = std::fs::File::from(efd.as_fd().try_clone_to_owned().unwrap());
        let call = Arc::new(crate::vhost::EventNotifier::from_file(file).unwrap());
        let (tx, rx) = reply();
        rig.device.apply(DeviceOp::SetCall {
            index: 0,
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
    fn stop_queue_waits_for_in_flight_requests() {
        let mut rig = Rig::new(false);
        rig.post(1, 0);
        rig.device.poll();
        let (tx, rx) = reply();
        rig.device.apply(DeviceOp::StopQueue {
            index: 0,
            reply: tx,
        });
        rig.device.poll();
        assert!(
            rx.try_recv().is_err(),
            "no reply while a request is in flight"
        );
        // A request made available while stopping is not started.
        rig.post(1, 1);
        rig.device.poll();
        assert_eq!(rig.held.submitted.load(Ordering::Relaxed), 1);
        rig.release();
        rig.device.poll();
        assert_eq!(
            rx.try_recv().unwrap(),
            Some(1),
            "last_avail after the one consumed request"
        );
        assert_eq!(rig.used_idx(), 1);
        // Restarting at that base picks up the waiting request.
        rig.avail_idx = 1;
        rig.start(bit(feature::VIRTIO_F_VERSION_1));
        rig.avail_idx = 2;
        rig.device.poll();
        rig.device.poll();
        assert_eq!(rig.used_idx(), 2);
    }

    #[test]
    fn a_device_waits_for_kicks_only_with_nothing_in_flight_and_turns_them_off_after() {
        use crate::reactor::BlockReadiness;
        use std::os::fd::AsFd;
        let no_notify = |rig: &Rig| rig.mem.load_u16(USED, Ordering::Acquire).unwrap() & 1;
        let mut rig = Rig::new(false);
        // Negative control: a queue without a kick eventfd cannot wake its reactor.
        let mut fds = Vec::new();
        assert_eq!(rig.device.prepare_block(&mut fds), BlockReadiness::Refused);
        rig.device.end_block(&fds);
        assert_eq!(no_notify(&rig), 1);

        let (tx, rx) = reply();
        rig.device.apply(DeviceOp::StopQueue {
            index: 0,
            reply: tx,
        });
        rx.try_recv().unwrap();
        let efd = rvhost_platform_linux::EventFd::new().unwrap();
        let file = std::fs::File::from(efd.as_fd().try_clone_to_owned().unwrap());
        rig.kick = Some(Arc::new(
            crate::vhost::EventNotifier::from_file(file).unwrap(),
        ));
        rig.start(bit(feature::VIRTIO_F_VERSION_1));

        // Idle: kicks on while it waits, its eventfd in the list; off again after.
        let mut fds = Vec::new();
        assert_eq!(rig.device.prepare_block(&mut fds), BlockReadiness::Ready);
        assert_eq!(fds.len(), 1);
        assert_eq!(no_notify(&rig), 0, "kicks on");
        rig.device.end_block(&fds);
        assert_eq!(no_notify(&rig), 1, "kicks off");

        // A kick during the wait is consumed, so the next wait does not end at once.
        let mut fds = Vec::new();
        assert_eq!(rig.device.prepare_block(&mut fds), BlockReadiness::Ready);
        efd.signal().unwrap();
        fds[0].revents = libc::POLLIN;
        rig.device.end_block(&fds);
        assert_eq!(efd.consume().unwrap(), 0, "the kick was consumed");

        // A request made available before the kicks were on is found by the re-check.
        rig.post(0, 4);
        let mut fds = Vec::new();
        assert_eq!(rig.device.prepare_block(&mut fds), BlockReadiness::Work);
        rig.device.end_block(&fds);
        assert_eq!(no_notify(&rig), 1);

        // In flight on a bdev that does not wake the reactor: it must be polled.
        rig.device.poll();
        assert_eq!(rig.held.submitted.load(Ordering::Relaxed), 1);
        let mut fds = Vec::new();
        assert_eq!(rig.device.prepare_block(&mut fds), BlockReadiness::Refused);
        rig.device.end_block(&fds);
        rig.release();
        rig.device.poll();
        assert_eq!(rig.used_idx(), 1);
        let mut fds = Vec::new();
        assert_eq!(rig.device.prepare_block(&mut fds), BlockReadiness::Ready);
        rig.device.end_block(&fds);
    }

    #[test]
    fn detach_fails_new_io_and_waits_for_old() {
        let mut rig = Rig::new(false);
        rig.post(0, 0);
        rig.device.poll();
        let (tx, rx) = reply();
        rig.device.apply_handler_op(BlkOp::DetachBdev { reply: tx });
        assert!(
            rx.try_recv().is_err(),
            "detach waits for the in-flight read"
        );
        rig.release();
        rig.device.poll();
        rx.try_recv().unwrap();
        assert_eq!(rig.used_idx(), 1);
        assert_eq!(rig.status(), 0, "the in-flight read completed normally");
        rig.post(0, 0);
        rig.device.poll();
        assert_eq!(rig.used_idx(), 2);
        assert_eq!(rig.status(), 1, "IOERR after detach");
        assert_eq!(rig.held.submitted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn remove_drains_then_finishes() {
        let mut rig = Rig::new(false);
        rig.post(1, 0);
        rig.device.poll();
        let (tx, rx) = reply();
        rig.device.apply(DeviceOp::Remove { reply: tx });
        assert!(!rig.device.is_finished());
        assert!(rx.try_recv().is_err());
        rig.release();
        rig.device.poll();
        rx.try_recv().unwrap();
        assert!(rig.device.is_finished());
    }

    #[test]
    fn retired_memory_tables_are_dropped_by_generation() {
        let mut rig = Rig::new(false);
        let swap = |rig: &mut Rig| {
            let (tx, rx) = reply();
            let memory = table_over(&rig.file);
            rig.device.apply(DeviceOp::SetMemory { memory, reply: tx });
            rx.try_recv().unwrap();
        };
        // No request in flight: the old table goes at once.
        swap(&mut rig);
        assert!((rig.device.retired_tables() == 0));
        // Request 1 uses table 1; swap; request 2 uses table 2; swap.
        rig.post(0, 0);
        rig.device.poll();
        swap(&mut rig);
        // (The test reuses head 0 for both; the device keys requests by slot, not head.)
        rig.post(0, 1);
        rig.device.poll();
        swap(&mut rig);
        assert_eq!(rig.device.retired_tables(), 2);
        // Request 1 completes: its table goes, request 2's stays.
        rig.held.allow.store(1, Ordering::Relaxed);
        rig.device.poll();
        assert_eq!(rig.used_idx(), 1);
        assert_eq!(rig.device.retired_tables(), 1);
        rig.release();
        rig.device.poll();
        assert_eq!(rig.used_idx(), 2);
        assert!((rig.device.retired_tables() == 0));
    }

    #[test]
    fn readonly_refuses_writes_without_touching_the_bdev() {
        let mut rig = Rig::new(true);
        rig.post(1, 0);
        rig.device.poll();
        assert_eq!(rig.status(), 1);
        assert_eq!(rig.held.submitted.load(Ordering::Relaxed), 0);
        rig.post(0, 0);
        rig.device.poll();
        assert_eq!(rig.held.submitted.load(Ordering::Relaxed), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever the driver writes into the descriptor table, the avail ring and the request
        /// buffers, the device neither panics nor puts anything but a popped head on the used
        /// ring, and never more used entries than heads it popped.
        #[test]
        fn arbitrary_rings_never_break_the_device(
            descs in proptest::collection::vec(proptest::prelude::any::<(u64, u32, u16, u16)>(), 16),
            heads in proptest::collection::vec(0u16..24, 1..8),
            header in proptest::collection::vec(proptest::prelude::any::<u8>(), 16),
            near in proptest::prelude::any::<bool>(),
        ) {
            let mut rig = Rig::new(false);
            rig.release();
            rig.mem.write(HDR, &header).unwrap();
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                // Half the runs keep addresses and lengths inside guest memory, to get past the
                // chain walk into decoding and I/O.
                let (addr, len) = if near { (addr % MEM, len % 0x3000) } else { (*addr, *len) };
                rig.desc(i as u64, addr, len, flags & 7, next % 20);
            }
            for &head in &heads {
                let slot = u64::from(rig.avail_idx % QSIZE);
                rig.mem.store_u16(AVAIL + 4 + 2 * slot, head, Ordering::Relaxed).unwrap();
                rig.avail_idx = rig.avail_idx.wrapping_add(1);
            }
            rig.mem.store_u16(AVAIL + 2, rig.avail_idx, Ordering::Release).unwrap();
            for _ in 0..4 {
                rig.device.poll();
            }
            let used = rig.used_idx();
            proptest::prop_assert!(usize::from(used) <= heads.len());
            for i in 0..used {
                let mut elem = [0u8; 8];
                rig.mem.read(USED + 4 + 8 * u64::from(i), &mut elem).unwrap();
                let id = u32::from_le_bytes(elem[0..4].try_into().unwrap());
                proptest::prop_assert!(heads.iter().any(|&h| u32::from(h) == id), "used id {} never popped", id);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Plausible requests (header, data segments, status) of every type with one field of one
        /// descriptor possibly corrupted: every request that still has a status byte completes
        /// with a valid status, and the device survives the rest.
        #[test]
        fn plausible_requests_complete_or_fail_cleanly(
            kind in proptest::prop_oneof![
                proptest::prelude::Just(0u32), proptest::prelude::Just(1u32), proptest::prelude::Just(4u32),
                proptest::prelude::Just(8u32), proptest::prelude::Just(11u32), proptest::prelude::Just(13u32),
                proptest::prelude::any::<u32>(),
            ],
            sector in proptest::prop_oneof![0u64..80, proptest::prelude::any::<u64>()],
            segments in proptest::collection::vec((0u32..4, proptest::prelude::any::<bool>()), 0..4),
            range in proptest::prelude::any::<[u8; 16]>(),
            corrupt in proptest::option::of((0usize..6, 0u8..4, proptest::prelude::any::<u64>())),
            repeat in 1usize..4,
        ) {
            let mut rig = Rig::new(false);
            rig.release();
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            rig.mem.write(HDR, &hdr).unwrap();
            rig.mem.write(BUF, &range).unwrap();
            let mut chain: Vec<(u64, u32, u16)> = vec![(HDR, 16, 0)];
            for (k, &(units, write)) in segments.iter().enumerate() {
                let len = if units == 0 { 16 } else { units * 512 };
                chain.push((BUF + 0x1000 * k as u64, len, if write { 2 } else { 0 }));
            }
            chain.push((STATUS, 1, 2));
            let mut descs: Vec<(u64, u32, u16, u16)> = chain
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i + 1 == chain.len();
                    (addr, len, if last { flags } else { flags | 1 }, (i + 1) as u16)
                })
                .collect();
            if let Some((index, field, value)) = corrupt {
                if let Some(d) = descs.get_mut(index) {
                    match field {
                        0 => d.0 = value,
                        1 => d.1 = value as u32,
                        2 => d.2 = value as u16 & 7,
                        _ => d.3 = value as u16,
                    }
                }
            }
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                rig.desc(i as u64, addr, len, flags, next);
            }
            rig.mem.write(STATUS, &[0xff]).unwrap();
            for _ in 0..repeat {
                let slot = u64::from(rig.avail_idx % QSIZE);
                rig.mem.store_u16(AVAIL + 4 + 2 * slot, 0, Ordering::Relaxed).unwrap();
                rig.avail_idx = rig.avail_idx.wrapping_add(1);
            }
            rig.mem.store_u16(AVAIL + 2, rig.avail_idx, Ordering::Release).unwrap();
            for _ in 0..4 {
                rig.device.poll();
            }
            let used = rig.used_idx();
            proptest::prop_assert!(usize::from(used) <= repeat);
            if corrupt.is_none() {
                proptest::prop_assert_eq!(usize::from(used), repeat, "intact requests all complete");
            }
            if used > 0 && corrupt.is_none() {
                proptest::prop_assert!(rig.status() <= 2, "status {}", rig.status());
            }
            if corrupt.is_none() && matches!(kind, 0 | 1) && sector.saturating_add(segments.first().map_or(0, |s| u64::from(s.0))) <= 64 && segments.len() == 1 && segments[0].0 > 0 {
                let data_ok = (kind == 0) == segments[0].1;
                proptest::prop_assert_eq!(rig.status() == 0, data_ok, "read/write status");
            }
        }
    }

    #[test]
    fn sector_ranges_convert_to_blocks() {
        let g = DeviceGeometry {
            bdev_name: "x".into(),
            block_size: 4096,
            num_blocks: 10,
            readonly: false,
            supports_flush: true,
            supports_unmap: true,
            supports_write_zeroes: true,
        };
        assert_eq!(g.capacity_sectors(), 80);
        assert_eq!(g.blocks(8, 16), Some((1, 2)));
        assert_eq!(g.blocks(72, 8), Some((9, 1)));
        assert_eq!(g.blocks(72, 16), None, "past the end");
        assert_eq!(g.blocks(1, 8), None, "misaligned start");
        assert_eq!(g.blocks(8, 1), None, "partial block");
        assert_eq!(g.blocks(u64::MAX - 7, 8), None, "overflow");
    }
}
