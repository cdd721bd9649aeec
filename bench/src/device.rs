//! Connecting to a vhost-user-blk or vhost-user-scsi target, handing it the shared memory and
//! the virtqueues, and the two request formats.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rvhost_core::blk::{feature as blk_feature, request_type, VirtioBlkConfig, CONFIG_LEN};
use rvhost_core::virtio::feature::{self, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
use rvhost_core::virtio::ring::{
    VirtqDesc, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use rvhost_core::virtio::{bit, has_feature};
use rvhost_core::virtio_scsi::{cmd_req_len, CmdReq, LunAddress, VIRTIO_SCSI_CDB_DEFAULT_SIZE};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dirty_log::{DirtyLogMemory, DirtyLogMode};
use crate::shm::{QueueLayout, SharedMemory, META_IN_OFFSET};
use crate::vring::{DriverRing, Shared};
use crate::workload::{DeviceType, Dir};
use crate::PerfError;

/// `VHOST_USER_F_PROTOCOL_FEATURES` in the virtio feature word.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Descriptors per request: header, data, status (blk) or request, response, data (scsi). With
/// indirect tables the ring's share is the first of them only, and the table holds the three.
pub const DESCS_PER_REQUEST: u16 = 3;
/// Largest queue size asked for (QEMU's and libvhost-user's limit).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Size of the virtio-scsi control and event queues, which this initiator never uses.
const SCSI_SIDE_QUEUE_SIZE: u16 = 16;
/// Offset of the virtio-scsi response's `status` and `response` bytes.
const SCSI_RESP_STATUS: usize = 10;
const SCSI_RESP_RESPONSE: usize = 11;
/// Bytes of `virtio_scsi_cmd_resp` with the default 96-byte sense area.
const SCSI_RESP_LEN: u32 = 12 + 96;
const SCSI_CHECK_CONDITION: u8 = 0x02;
/// Bytes of a request's indirect table: its three descriptors.
const INDIRECT_TABLE_LEN: u32 = DESCS_PER_REQUEST as u32 * VirtqDesc::SIZE as u32;

/// Queue size for `queue_depth` requests of [`DESCS_PER_REQUEST`] descriptors each.
pub fn queue_size_for(queue_depth: u16) -> Result<u16, PerfError> {
    let descs = u32::from(queue_depth) * u32::from(DESCS_PER_REQUEST);
    let size = descs.next_power_of_two().max(8);
    if queue_depth == 0 || size > u32::from(MAX_QUEUE_SIZE) {
        return Err(PerfError::Options(format!(
            "--qd {queue_depth}: must be 1..={}",
            MAX_QUEUE_SIZE / DESCS_PER_REQUEST
        )));
    }
    Ok(size as u16)
}

fn vu(step: &'static str) -> impl FnOnce(vhost::Error) -> PerfError {
    move |source| PerfError::VhostUser { step, source }
}

/// What the target told us about the disk.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DiskInfo {
    /// Bytes addressable.
    pub capacity: u64,
    /// Logical block size (requests must be multiples of it and aligned to it).
    pub block_size: u32,
    /// Whether the device refuses writes.
    pub read_only: bool,
}

/// A negotiated vhost-user connection.
pub struct Connection {
    frontend: Frontend,
    device: DeviceType,
    /// Negotiated virtio features.
    pub features: u64,
    /// Number of vrings to set up (request queues plus, for scsi, control and event).
    pub vrings: usize,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
    /// blk: from the config space; scsi: filled in by READ CAPACITY(16) after set-up.
    pub disk: Option<DiskInfo>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Frontend` has no Debug; the negotiated state is what matters.
        f.debug_struct("Connection")
            .field("device", &self.device)
            .field("features", &format_args!("{:#x}", self.features))
            .field("vrings", &self.vrings)
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `socket` and negotiates features for `queues` request queues (with `indirect`,
    /// `VIRTIO_F_RING_INDIRECT_DESC`, which the target must offer; with `dirty_log`, what a
    /// migrating frontend needs: `VHOST_F_LOG_ALL` offered and
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        socket: &Path,
        device: DeviceType,
        queues: u16,
        event_idx: bool,
        packed: bool,
        indirect: bool,
        dirty_log: bool,
    ) -> Result<Self, PerfError> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| PerfError::Target(format!("connecting to {}: {e}", socket.display())))?;
        // A target that stops answering fails the run instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| PerfError::Target(format!("socket timeout: {e}")))?;
        let vrings = match device {
            DeviceType::Blk => usize::from(queues),
            DeviceType::Scsi => usize::from(queues) + 2,
        };
        let mut frontend = Frontend::from_stream(stream, vrings as u64);
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(PerfError::Target(
                "no VHOST_USER_F_PROTOCOL_FEATURES: cannot enable rings explicitly".into(),
            ));
        }
        if !has_feature(offered, VIRTIO_F_VERSION_1) {
            return Err(PerfError::Target("not a virtio 1.x device".into()));
        }
        let mut wanted = bit(VIRTIO_F_VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES;
        if event_idx {
            wanted |= bit(VIRTIO_F_RING_EVENT_IDX);
        }
        if packed {
            if !has_feature(offered, feature::VIRTIO_F_RING_PACKED) {
                return Err(PerfError::Target(
                    "--packed: the target does not offer VIRTIO_F_RING_PACKED".into(),
                ));
            }
            wanted |= bit(feature::VIRTIO_F_RING_PACKED);
        }
        if indirect {
            if !has_feature(offered, feature::VIRTIO_F_RING_INDIRECT_DESC) {
                return Err(PerfError::Target(
                    "--indirect: the target does not offer VIRTIO_RING_F_INDIRECT_DESC".into(),
                ));
            }
            wanted |= bit(feature::VIRTIO_F_RING_INDIRECT_DESC);
        }
        if device == DeviceType::Blk {
            wanted |= bit(blk_feature::VIRTIO_BLK_F_BLK_SIZE)
                | bit(blk_feature::VIRTIO_BLK_F_SIZE_MAX)
                | bit(blk_feature::VIRTIO_BLK_F_SEG_MAX)
                | bit(blk_feature::VIRTIO_BLK_F_RO)
                | bit(blk_feature::VIRTIO_BLK_F_FLUSH);
            if queues > 1 {
                wanted |= bit(blk_feature::VIRTIO_BLK_F_MQ);
            }
        }
        if dirty_log && offered & VhostUserVirtioFeatures::LOG_ALL.bits() == 0 {
            return Err(PerfError::Target(
                "--dirty-log: the target does not offer VHOST_F_LOG_ALL".into(),
            ));
        }
        let features = offered & wanted;
        frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        let proto_offered = frontend
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let mut proto = proto_offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        if dirty_log {
            if !proto_offered.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
                return Err(PerfError::Target(
                    "--dirty-log: the target does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD".into(),
                ));
            }
            proto |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        frontend
            .set_protocol_features(proto)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every set-up message then waits for the target's verdict, so a refusal names
            // the message instead of surfacing later as a stuck queue.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let available = if proto.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if (vrings as u64) > available {
            return Err(PerfError::Target(format!(
                "{vrings} virtqueues needed, the target has {available}"
            )));
        }
        let disk = if device == DeviceType::Blk {
            Some(Self::blk_disk(&mut frontend, features, proto)?)
        } else {
            None
        };
        let fds = || -> Result<Vec<EventFd>, PerfError> {
            (0..vrings)
                .map(|_| EventFd::new(EFD_NONBLOCK).map_err(PerfError::EventFd))
                .collect()
        };
        Ok(Connection {
            kicks: fds()?,
            calls: fds()?,
            errs: fds()?,
            frontend,
            device,
            features,
            vrings,
            disk,
        })
    }

    fn blk_disk(
        frontend: &mut Frontend,
        features: u64,
        proto: VhostUserProtocolFeatures,
    ) -> Result<DiskInfo, PerfError> {
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(PerfError::Target(
                "no VHOST_USER_PROTOCOL_F_CONFIG: cannot read the disk's capacity".into(),
            ));
        }
        // capacity, size_max, seg_max, geometry, blk_size: the first 24 bytes, which every
        // implementation's config struct has.
        const WANTED: usize = 24;
        let (_, bytes) = frontend
            .get_config(
                0,
                WANTED as u32,
                VhostUserConfigFlags::WRITABLE,
                &[0u8; WANTED],
            )
            .map_err(vu("GET_CONFIG"))?;
        let mut full = [0u8; CONFIG_LEN];
        let n = bytes.len().min(CONFIG_LEN);
        full[..n].copy_from_slice(&bytes[..n]);
        let config = VirtioBlkConfig::parse(&full);
        let block_size = if has_feature(features, blk_feature::VIRTIO_BLK_F_BLK_SIZE) {
            config.blk_size
        } else {
            512
        };
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(PerfError::Target(format!("block size {block_size}")));
        }
        let capacity = config
            .capacity
            .checked_mul(512)
            .ok_or_else(|| PerfError::Target("capacity overflows".into()))?;
        Ok(DiskInfo {
            capacity,
            block_size,
            read_only: has_feature(features, blk_feature::VIRTIO_BLK_F_RO),
        })
    }

    /// Whether packed rings were negotiated.
    pub fn packed(&self) -> bool {
        has_feature(self.features, feature::VIRTIO_F_RING_PACKED)
    }

    /// Whether indirect descriptors were negotiated.
    pub fn indirect(&self) -> bool {
        has_feature(self.features, feature::VIRTIO_F_RING_INDIRECT_DESC)
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        has_feature(self.features, VIRTIO_F_RING_EVENT_IDX)
    }

    /// Index of the first request queue among the vrings.
    pub fn first_request_queue(&self) -> usize {
        match self.device {
            DeviceType::Blk => 0,
            DeviceType::Scsi => 2,
        }
    }

    /// Queue sizes for every vring, request queues sized for `queue_depth`.
    pub fn queue_sizes(&self, queue_depth: u16) -> Result<Vec<u16>, PerfError> {
        let size = queue_size_for(queue_depth)?;
        Ok((0..self.vrings)
            .map(|i| {
                if i < self.first_request_queue() {
                    SCSI_SIDE_QUEUE_SIZE
                } else {
                    size
                }
            })
            .collect())
    }

    /// Passes the memory and every vring (zeroed rings at `layouts`) to the target and enables
    /// them.
    pub fn start(&mut self, mem: &SharedMemory, layouts: &[QueueLayout]) -> Result<(), PerfError> {
        self.frontend
            .set_mem_table(&[mem.vhost_region()])
            .map_err(vu("SET_MEM_TABLE"))?;
        let base = mem.user_addr();
        // Packed: position 0 with the driver's wrap counter 1 (bit 15).
        let vring_base = if self.packed() { 0x8000 } else { 0 };
        for (i, l) in layouts.iter().enumerate() {
            let f = &mut self.frontend;
            f.set_vring_num(i, l.size).map_err(vu("SET_VRING_NUM"))?;
            f.set_vring_base(i, vring_base)
                .map_err(vu("SET_VRING_BASE"))?;
            f.set_vring_addr(i, &vring_config(base, l, false))
                .map_err(vu("SET_VRING_ADDR"))?;
            let (call, err, kick) = (&self.calls[i], &self.errs[i], &self.kicks[i]);
            f.set_vring_call(i, call).map_err(vu("SET_VRING_CALL"))?;
            f.set_vring_err(i, err).map_err(vu("SET_VRING_ERR"))?;
            f.set_vring_kick(i, kick).map_err(vu("SET_VRING_KICK"))?;
            f.set_vring_enable(i, true)
                .map_err(vu("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Starts dirty logging on the running vrings as QEMU does when a migration starts:
    /// `SET_LOG_BASE` with `log`, then (`DirtyLogMode::On`) `SET_FEATURES` with
    /// `VHOST_F_LOG_ALL` added and `SET_VRING_ADDR` with the same addresses plus
    /// `VHOST_VRING_F_LOG` and the used ring's guest address for every vring. `connect` must have
    /// been told `dirty_log`.
    pub fn start_dirty_log(
        &mut self,
        mem: &SharedMemory,
        layouts: &[QueueLayout],
        log: &DirtyLogMemory,
        mode: DirtyLogMode,
    ) -> Result<(), PerfError> {
        self.frontend
            .set_log_base(0, Some(log.region_info()))
            .map_err(vu("SET_LOG_BASE"))?;
        if mode == DirtyLogMode::Idle {
            return Ok(());
        }
        let features = self.features | VhostUserVirtioFeatures::LOG_ALL.bits();
        self.frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES (LOG_ALL)"))?;
        self.features = features;
        let base = mem.user_addr();
        for (i, l) in layouts.iter().enumerate() {
            self.frontend
                .set_vring_addr(i, &vring_config(base, l, true))
                .map_err(vu("SET_VRING_ADDR (LOG)"))?;
        }
        Ok(())
    }

    /// The kick eventfd of vring `index`.
    pub fn kick(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index)
    }

    /// scsi: learns the LUN's size with READ CAPACITY(16) on the first request queue, retrying
    /// through the unit attentions a fresh I_T nexus reports.
    pub fn scsi_read_capacity(
        &mut self,
        mem: Shared<'_>,
        ring: &mut DriverRing<'_>,
    ) -> Result<DiskInfo, PerfError> {
        let kick = self
            .kicks
            .get(self.first_request_queue())
            .ok_or_else(|| PerfError::Target("no request queue".into()))?;
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e; // SERVICE ACTION IN(16)
        cdb[1] = 0x10; // READ CAPACITY(16)
        cdb[10..14].copy_from_slice(&32u32.to_be_bytes());
        let l = *ring.layout();
        let format = RequestFormat::Scsi;
        for attempt in 0..8 {
            format.prepare_slot(ring, 0, Dir::Read, 32)?;
            format.write_scsi_cdb(mem, &l, 0, attempt, &cdb)?;
            ring.offer(0)?;
            if ring.publish()? {
                kick.write(1).map_err(PerfError::EventFd)?;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while ring.used_pending()? == 0 {
                if Instant::now() > deadline {
                    return Err(PerfError::Target("READ CAPACITY(16) timed out".into()));
                }
                std::thread::yield_now();
            }
            let used = ring.take_used()?;
            ring.suppress_interrupts()?;
            if used.id != 0 {
                return Err(PerfError::Protocol {
                    queue: 0,
                    what: format!("used id {} for head 0", used.id),
                });
            }
            let meta = l.meta_at(0);
            let response = mem
                .u8_at(meta + META_IN_OFFSET + SCSI_RESP_RESPONSE)?
                .load(std::sync::atomic::Ordering::Relaxed);
            let status = mem
                .u8_at(meta + META_IN_OFFSET + SCSI_RESP_STATUS)?
                .load(std::sync::atomic::Ordering::Relaxed);
            if response != 0 {
                return Err(PerfError::Target(format!(
                    "READ CAPACITY(16): virtio-scsi response {response} (no LUN 0 on target 0?)"
                )));
            }
            if status == SCSI_CHECK_CONDITION {
                continue;
            }
            if status != 0 {
                return Err(PerfError::Target(format!(
                    "READ CAPACITY(16): SCSI status {status:#x}"
                )));
            }
            let mut data = [0u8; 32];
            mem.read(l.data_at(0), &mut data)?;
            let last_lba = u64::from_be_bytes([
                data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
            ]);
            let block_size = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
            if block_size == 0 || !block_size.is_power_of_two() {
                return Err(PerfError::Target(format!("LUN block size {block_size}")));
            }
            let capacity = last_lba
                .checked_add(1)
                .and_then(|n| n.checked_mul(u64::from(block_size)))
                .ok_or_else(|| PerfError::Target("LUN capacity overflows".into()))?;
            let info = DiskInfo {
                capacity,
                block_size,
                read_only: false,
            };
            self.disk = Some(info);
            return Ok(info);
        }
        Err(PerfError::Target(
            "READ CAPACITY(16) kept reporting CHECK CONDITION".into(),
        ))
    }
}

/// `SET_VRING_ADDR`'s payload for the queue at `l` in memory mapped at `base`: ring addresses
/// are this process's, the used ring's log address (`logged`) is its guest physical address.
fn vring_config(base: u64, l: &QueueLayout, logged: bool) -> VringConfigData {
    VringConfigData {
        queue_max_size: l.size,
        queue_size: l.size,
        flags: if logged {
            VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
        } else {
            0
        },
        desc_table_addr: base + l.desc as u64,
        used_ring_addr: base + l.used as u64,
        avail_ring_addr: base + l.avail as u64,
        log_addr: logged.then_some(l.used as u64),
    }
}

/// How a request is laid out in its three descriptors and metadata slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFormat {
    /// `virtio_blk_req`: header (R), data, status (W).
    Blk,
    /// `virtio_scsi_cmd_req` (R), [data-out (R)], `virtio_scsi_cmd_resp` (W), [data-in (W)].
    Scsi,
}

/// The result of one request as the device reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Success.
    Ok,
    /// The device reported an error (blk status, or scsi response / SCSI status).
    Failed(u16),
}

impl RequestFormat {
    /// The format for `device`.
    pub fn for_device(device: DeviceType) -> Self {
        match device {
            DeviceType::Blk => RequestFormat::Blk,
            DeviceType::Scsi => RequestFormat::Scsi,
        }
    }

    /// Head descriptor of request slot `slot`.
    pub fn head(slot: usize) -> u16 {
        (slot as u16).wrapping_mul(DESCS_PER_REQUEST)
    }

    /// Writes slot `slot`'s three descriptors for a request in direction `dir` moving `len`
    /// bytes, and the parts of its metadata that never change. With indirect tables
    /// ([`DriverRing::indirect_tables`]) the three go into the slot's table and the ring's
    /// descriptor at the slot's head points at it (`INDIRECT`, 48 bytes).
    pub fn prepare_slot(
        &self,
        ring: &DriverRing<'_>,
        slot: usize,
        dir: Dir,
        len: u32,
    ) -> Result<(), PerfError> {
        let l = *ring.layout();
        let h = Self::head(slot);
        let meta = l.meta_at(slot) as u64;
        let data = l.data_at(slot) as u64;
        let status = meta + META_IN_OFFSET as u64;
        let descs = match (self, dir) {
            (RequestFormat::Blk, dir) => [
                (meta, 16, 0),
                (
                    data,
                    len,
                    if dir == Dir::Read {
                        VIRTQ_DESC_F_WRITE
                    } else {
                        0
                    },
                ),
                (status, 1, VIRTQ_DESC_F_WRITE),
            ],
            (RequestFormat::Scsi, Dir::Read) => [
                (meta, cmd_req_len(VIRTIO_SCSI_CDB_DEFAULT_SIZE) as u32, 0),
                (status, SCSI_RESP_LEN, VIRTQ_DESC_F_WRITE),
                (data, len, VIRTQ_DESC_F_WRITE),
            ],
            (RequestFormat::Scsi, Dir::Write) => [
                (meta, cmd_req_len(VIRTIO_SCSI_CDB_DEFAULT_SIZE) as u32, 0),
                (data, len, 0),
                (status, SCSI_RESP_LEN, VIRTQ_DESC_F_WRITE),
            ],
        };
        // Chained from `first`: the slot's descriptors in the ring, or the table's from 0.
        let chain = |first: u16, i: usize, (addr, len, flags): (u64, u32, u16)| {
            let last = i + 1 == descs.len();
            VirtqDesc {
                addr,
                len,
                flags: if last {
                    flags
                } else {
                    flags | VIRTQ_DESC_F_NEXT
                },
                next: if last { 0 } else { first + i as u16 + 1 },
            }
        };
        if ring.indirect_tables() {
            let table = l.table_at(slot);
            for (i, d) in descs.into_iter().enumerate() {
                ring.write_table_entry(table, i as u16, chain(0, i, d))?;
            }
            ring.write_desc(
                h,
                VirtqDesc {
                    addr: table as u64,
                    len: INDIRECT_TABLE_LEN,
                    flags: VIRTQ_DESC_F_INDIRECT,
                    next: 0,
                },
            )?;
        } else {
            for (i, d) in descs.into_iter().enumerate() {
                ring.write_desc(h + i as u16, chain(h, i, d))?;
            }
        }
        if *self == RequestFormat::Scsi {
            let mut req = [0u8; 51];
            if let Ok(mut view) = CmdReq::new_checked(&mut req[..], VIRTIO_SCSI_CDB_DEFAULT_SIZE) {
                view.set_lun(LunAddress { target: 0, lun: 0 }.emit());
            }
            ring_mem(ring).write(l.meta_at(slot), &req)?;
        }
        Ok(())
    }

    /// Switches slot `slot`'s chain to direction `dir` (only what differs is rewritten).
    #[inline]
    pub fn set_direction(
        &self,
        ring: &DriverRing<'_>,
        slot: usize,
        dir: Dir,
        len: u32,
    ) -> Result<(), PerfError> {
        let data_flags = VIRTQ_DESC_F_NEXT
            | if dir == Dir::Read {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
        match self {
            RequestFormat::Blk if ring.indirect_tables() => {
                ring.set_table_entry_flags(ring.layout().table_at(slot), 1, data_flags)
            }
            RequestFormat::Blk => ring.set_desc_flags(Self::head(slot) + 1, data_flags),
            // Readable parts must precede writable ones, so the data descriptor moves.
            RequestFormat::Scsi => self.prepare_slot(ring, slot, dir, len),
        }
    }

    /// Fills in slot `slot`'s command: `dir`, byte `offset`, `len` bytes, logical blocks of
    /// `block_size`; and resets the status so a device that never writes it is caught.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn write_command(
        &self,
        mem: Shared<'_>,
        l: &QueueLayout,
        slot: usize,
        tag: u64,
        dir: Dir,
        offset: u64,
        len: u32,
        block_size: u32,
    ) -> Result<(), PerfError> {
        use std::sync::atomic::Ordering::Relaxed;
        let meta = l.meta_at(slot);
        match self {
            RequestFormat::Blk => {
                let kind = match dir {
                    Dir::Read => request_type::VIRTIO_BLK_T_IN,
                    Dir::Write => request_type::VIRTIO_BLK_T_OUT,
                };
                mem.u32_at(meta)?.store(kind.to_le(), Relaxed);
                mem.u64_at(meta + 8)?.store((offset >> 9).to_le(), Relaxed);
                mem.u8_at(meta + META_IN_OFFSET)?.store(0xff, Relaxed);
            }
            RequestFormat::Scsi => {
                let lba = offset / u64::from(block_size);
                let blocks = len / block_size;
                let mut cdb = [0u8; 16];
                cdb[0] = match dir {
                    Dir::Read => 0x88,
                    Dir::Write => 0x8a,
                };
                cdb[2..10].copy_from_slice(&lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
                self.write_scsi_cdb(mem, l, slot, tag, &cdb)?;
            }
        }
        Ok(())
    }

    fn write_scsi_cdb(
        &self,
        mem: Shared<'_>,
        l: &QueueLayout,
        slot: usize,
        tag: u64,
        cdb: &[u8; 16],
    ) -> Result<(), PerfError> {
        use std::sync::atomic::Ordering::Relaxed;
        let meta = l.meta_at(slot);
        mem.u64_at(meta + 8)?.store(tag.to_le(), Relaxed);
        mem.write(meta + 19, cdb)?;
        mem.u8_at(meta + META_IN_OFFSET + SCSI_RESP_RESPONSE)?
            .store(0xff, Relaxed);
        Ok(())
    }

    /// How the device completed slot `slot`.
    #[inline]
    pub fn completion(
        &self,
        mem: Shared<'_>,
        l: &QueueLayout,
        slot: usize,
    ) -> Result<Completion, PerfError> {
        use std::sync::atomic::Ordering::Relaxed;
        let at = l.meta_at(slot) + META_IN_OFFSET;
        Ok(match self {
            RequestFormat::Blk => match mem.u8_at(at)?.load(Relaxed) {
                0 => Completion::Ok,
                s => Completion::Failed(u16::from(s)),
            },
            RequestFormat::Scsi => {
                let response = mem.u8_at(at + SCSI_RESP_RESPONSE)?.load(Relaxed);
                let status = mem.u8_at(at + SCSI_RESP_STATUS)?.load(Relaxed);
                if response == 0 && status == 0 {
                    Completion::Ok
                } else {
                    Completion::Failed(u16::from(response) << 8 | u16::from(status))
                }
            }
        })
    }
}

fn ring_mem<'m>(ring: &DriverRing<'m>) -> Shared<'m> {
    ring.shared()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use rvhost_core::mem::{Direction, GuestMemory, MemError};
    use rvhost_core::virtq::packed::{PackedHead, PackedQueue};
    use rvhost_core::virtq::{
        Chain, ChainErrorKind, DeviceRing, QueueConfig, RingHead, SplitQueue,
    };

    use super::*;
    use crate::shm::layout;
    use crate::vring::Notification;

    #[test]
    fn queue_sizes_fit_three_descriptors_per_request() {
        assert_eq!(queue_size_for(1).unwrap(), 8);
        assert_eq!(queue_size_for(32).unwrap(), 128);
        assert_eq!(queue_size_for(128).unwrap(), 512);
        assert_eq!(queue_size_for(341).unwrap(), 1024);
        assert!(queue_size_for(342).is_err());
        assert!(queue_size_for(0).is_err());
    }

    /// The core's device side reading this initiator's shared memory (guest address = offset).
    struct ShmGuest<'m> {
        mem: Shared<'m>,
        len: u64,
    }

    impl GuestMemory for ShmGuest<'_> {
        fn translate(&self, addr: u64, len: u64) -> Result<u64, MemError> {
            let end = addr.checked_add(len).ok_or(MemError::Overflow)?;
            if end > self.len {
                return Err(MemError::Unmapped { addr, len });
            }
            Ok(addr)
        }

        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.translate(addr, buf.len() as u64)?;
            self.mem
                .read(addr as usize, buf)
                .map_err(|_| MemError::Unmapped {
                    addr,
                    len: buf.len() as u64,
                })
        }

        fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
            self.translate(addr, buf.len() as u64)?;
            self.mem
                .write(addr as usize, buf)
                .map_err(|_| MemError::Unmapped {
                    addr,
                    len: buf.len() as u64,
                })
        }

        fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemError> {
            self.translate(addr, 2)?;
            let a = self
                .mem
                .u16_at(addr as usize)
                .map_err(|_| MemError::Misaligned { addr })?;
            Ok(u16::from_le(a.load(order)))
        }

        fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemError> {
            self.translate(addr, 2)?;
            let a = self
                .mem
                .u16_at(addr as usize)
                .map_err(|_| MemError::Misaligned { addr })?;
            a.store(val.to_le(), order);
            Ok(())
        }
    }

    /// What the device found in one request: its ID, its buffers (guest address, length,
    /// direction) and how many descriptors it read.
    type Found = (u16, Vec<(u64, u32, Direction)>, u32);

    /// Plays the device with the core's queue: pops everything available, walks it and returns
    /// each request used (`len` 1), in pop order.
    fn device_serve<R: DeviceRing>(ring: &mut R, mem: &ShmGuest<'_>) -> Vec<Found> {
        let mut heads = [R::Head::default(); 8];
        let n = ring.pop_heads(mem, &mut heads).unwrap();
        let mut found = Vec::new();
        for head in &heads[..n] {
            let mut chain = Chain::<4>::new();
            ring.walk_popped(mem, *head, &mut chain).unwrap();
            let bufs = chain
                .segments()
                .iter()
                .map(|s| (s.guest_addr, s.len, s.direction))
                .collect();
            found.push((head.id(), bufs, chain.descriptor_count()));
        }
        for head in &heads[..n] {
            ring.push_used(mem, *head, 1).unwrap();
        }
        ring.publish_used(mem).unwrap();
        found
    }

    /// The buffers a request of `format` in direction `dir` on slot `slot` must show the device.
    fn expected(
        format: RequestFormat,
        l: &QueueLayout,
        slot: usize,
        dir: Dir,
    ) -> Vec<(u64, u32, Direction)> {
        use Direction::{DeviceReadable as R, DeviceWritable as W};
        let (meta, data) = (l.meta_at(slot) as u64, l.data_at(slot) as u64);
        let status = meta + META_IN_OFFSET as u64;
        match (format, dir) {
            (RequestFormat::Blk, Dir::Read) => vec![(meta, 16, R), (data, 4096, W), (status, 1, W)],
            (RequestFormat::Blk, Dir::Write) => {
                vec![(meta, 16, R), (data, 4096, R), (status, 1, W)]
            }
            (RequestFormat::Scsi, Dir::Read) => {
                vec![(meta, 51, R), (status, 108, W), (data, 4096, W)]
            }
            (RequestFormat::Scsi, Dir::Write) => {
                vec![(meta, 51, R), (data, 4096, R), (status, 108, W)]
            }
        }
    }

    /// A fresh driver ring of either layout, with or without indirect tables.
    fn driver<'m>(mem: Shared<'m>, l: QueueLayout, packed: bool, indirect: bool) -> DriverRing<'m> {
        let ring = if packed {
            DriverRing::new_packed(mem, l, Notification::Flags).unwrap()
        } else {
            DriverRing::new(mem, l, Notification::Flags).unwrap()
        };
        if indirect {
            ring.with_indirect_tables()
        } else {
            ring
        }
    }

    /// Offers two requests a round on an 8-descriptor ring for 12 rounds (the packed ring's
    /// positions wrap several times with indirect tables, more with chains), switching
    /// direction every round, and has the core's device side pop, walk and return them.
    fn round_trip<R: DeviceRing>(
        format: RequestFormat,
        packed: bool,
        indirect: bool,
        device: &mut R,
    ) {
        let (l, total) = layout(&[8], 2, 4096).unwrap();
        let l = l[0];
        let shm = SharedMemory::new(total, false).unwrap();
        let mem = Shared::new(shm.region());
        let guest = ShmGuest {
            mem,
            len: shm.len() as u64,
        };
        let mut ring = driver(mem, l, packed, indirect);
        for slot in 0..2 {
            format.prepare_slot(&ring, slot, Dir::Read, 4096).unwrap();
        }
        let what = format!("{format:?}, packed {packed}, indirect {indirect}");
        for round in 0..12 {
            let dir = if round % 2 == 0 {
                Dir::Read
            } else {
                Dir::Write
            };
            for slot in 0..2 {
                if round > 0 {
                    format.set_direction(&ring, slot, dir, 4096).unwrap();
                }
                format
                    .write_command(mem, &l, slot, round, dir, 0, 4096, 512)
                    .unwrap();
                ring.offer(RequestFormat::head(slot)).unwrap();
            }
            ring.publish().unwrap();
            let found = device_serve(device, &guest);
            assert_eq!(found.len(), 2, "{what}, round {round}");
            for (slot, (id, bufs, descriptors)) in found.into_iter().enumerate() {
                assert_eq!(id, RequestFormat::head(slot), "{what}, round {round}");
                assert_eq!(
                    bufs,
                    expected(format, &l, slot, dir),
                    "{what}, round {round}"
                );
                // Indirect: the ring's descriptor and the table's three.
                assert_eq!(
                    descriptors,
                    if indirect { 4 } else { 3 },
                    "{what}, round {round}"
                );
            }
            assert_eq!(ring.used_pending().unwrap(), 2, "{what}, round {round}");
            for slot in 0..2 {
                let used = ring.take_used().unwrap();
                assert_eq!(used.id, u32::from(RequestFormat::head(slot)), "{what}");
            }
            assert_eq!(ring.in_flight(), 0);
        }
    }

    fn queue_config(l: &QueueLayout) -> QueueConfig {
        QueueConfig {
            size: l.size,
            desc_table: l.desc as u64,
            avail_ring: l.avail as u64,
            used_ring: l.used as u64,
        }
    }

    #[test]
    fn indirect_requests_round_trip_through_the_core_device_side() {
        let (l, _) = layout(&[8], 2, 4096).unwrap();
        let indirect = bit(feature::VIRTIO_F_RING_INDIRECT_DESC);
        let packed = bit(feature::VIRTIO_F_RING_PACKED);
        for format in [RequestFormat::Blk, RequestFormat::Scsi] {
            for with_tables in [false, true] {
                let mut split = SplitQueue::new(queue_config(&l[0]), indirect).unwrap();
                round_trip(format, false, with_tables, &mut split);
                let mut ring = PackedQueue::new(queue_config(&l[0]), indirect | packed).unwrap();
                round_trip(format, true, with_tables, &mut ring);
            }
        }
    }

    /// The negative control: a device that did not negotiate indirect descriptors refuses the
    /// same requests, so the round trip above really went through the tables.
    #[test]
    fn indirect_requests_are_refused_without_the_feature() {
        let (l, total) = layout(&[8], 2, 4096).unwrap();
        let shm = SharedMemory::new(total, false).unwrap();
        let mem = Shared::new(shm.region());
        let guest = ShmGuest {
            mem,
            len: shm.len() as u64,
        };
        for packed in [false, true] {
            let mut ring = driver(mem, l[0], packed, true);
            RequestFormat::Blk
                .prepare_slot(&ring, 1, Dir::Read, 4096)
                .unwrap();
            ring.offer(RequestFormat::head(1)).unwrap();
            ring.publish().unwrap();
            let mut chain = Chain::<4>::new();
            let err = if packed {
                let mut q =
                    PackedQueue::new(queue_config(&l[0]), bit(feature::VIRTIO_F_RING_PACKED))
                        .unwrap();
                let mut heads = [PackedHead::default(); 2];
                assert_eq!(q.pop_heads(&guest, &mut heads).unwrap(), 1);
                assert_eq!(heads[0].count, 1, "one ring descriptor per request");
                q.walk_chain(&guest, heads[0], &mut chain).unwrap_err()
            } else {
                let mut q = SplitQueue::new(queue_config(&l[0]), 0).unwrap();
                let mut heads = [0u16; 2];
                assert_eq!(q.pop_heads(&guest, &mut heads).unwrap(), 1);
                q.walk_chain(&guest, heads[0], &mut chain).unwrap_err()
            };
            assert_eq!(
                err.kind,
                ChainErrorKind::IndirectNotNegotiated,
                "packed {packed}"
            );
        }
    }

    #[test]
    fn indirect_tables_are_in_the_ring_layout() {
        let (l, total) = layout(&[8], 2, 4096).unwrap();
        let l = l[0];
        let shm = SharedMemory::new(total, false).unwrap();
        let mem = Shared::new(shm.region());
        let table = l.table_at(1);
        let entries = |mem: &Shared<'_>| {
            let mut raw = [0u8; 48];
            mem.read(table, &mut raw).unwrap();
            raw.chunks(16)
                .map(|c| {
                    (
                        u64::from_le_bytes(c[..8].try_into().unwrap()),
                        u32::from_le_bytes(c[8..12].try_into().unwrap()),
                        u16::from_le_bytes([c[12], c[13]]),
                        u16::from_le_bytes([c[14], c[15]]),
                    )
                })
                .collect::<Vec<_>>()
        };
        let (meta, data) = (l.meta_at(1) as u64, l.data_at(1) as u64);
        let prepared = |packed| {
            let ring = driver(mem, l, packed, true);
            RequestFormat::Blk
                .prepare_slot(&ring, 1, Dir::Read, 4096)
                .unwrap();
            ring
        };
        // Split: addr, len, flags, next; chained from entry 0 to 2.
        let ring = prepared(false);
        assert_eq!(
            entries(&mem),
            [
                (meta, 16, VIRTQ_DESC_F_NEXT, 1),
                (data, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
                (meta + 64, 1, VIRTQ_DESC_F_WRITE, 0)
            ]
        );
        let mut head = [0u8; 16];
        mem.read(l.desc + 3 * 16, &mut head).unwrap();
        assert_eq!(
            VirtqDesc::from_bytes(&head),
            VirtqDesc {
                addr: table as u64,
                len: 48,
                flags: VIRTQ_DESC_F_INDIRECT,
                next: 0
            },
            "the slot's head points at its table"
        );
        RequestFormat::Blk
            .set_direction(&ring, 1, Dir::Write, 4096)
            .unwrap();
        assert_eq!(entries(&mem)[1], (data, 4096, VIRTQ_DESC_F_NEXT, 2));
        // Packed: addr, len, buffer ID 0, flags with only WRITE.
        let ring = prepared(true);
        assert_eq!(
            entries(&mem),
            [
                (meta, 16, 0, 0),
                (data, 4096, 0, VIRTQ_DESC_F_WRITE),
                (meta + 64, 1, 0, VIRTQ_DESC_F_WRITE)
            ]
        );
        RequestFormat::Blk
            .set_direction(&ring, 1, Dir::Write, 4096)
            .unwrap();
        assert_eq!(entries(&mem)[1], (data, 4096, 0, 0));
    }

    #[test]
    fn blk_chain_and_header_match_the_spec() {
        let (l, total) = layout(&[8], 2, 4096).unwrap();
        let shm = SharedMemory::new(total, false).unwrap();
        let mem = Shared::new(shm.region());
        let ring = DriverRing::new(mem, l[0], Notification::Flags).unwrap();
        let f = RequestFormat::Blk;
        f.prepare_slot(&ring, 1, Dir::Read, 4096).unwrap();
        f.write_command(mem, &l[0], 1, 0, Dir::Read, 8192, 4096, 512)
            .unwrap();
        let mut d = [0u8; 48];
        mem.read(l[0].desc + 3 * 16, &mut d).unwrap();
        let descs: Vec<VirtqDesc> = d
            .chunks(16)
            .map(|c| VirtqDesc::from_bytes(c.try_into().unwrap()))
            .collect();
        let meta = l[0].meta_at(1) as u64;
        assert_eq!(
            descs[0],
            VirtqDesc {
                addr: meta,
                len: 16,
                flags: 1,
                next: 4
            }
        );
        assert_eq!(
            descs[1],
            VirtqDesc {
                addr: l[0].data_at(1) as u64,
                len: 4096,
                flags: 3,
                next: 5
            }
        );
        assert_eq!(
            descs[2],
            VirtqDesc {
                addr: meta + 64,
                len: 1,
                flags: 2,
                next: 0
            }
        );
        let mut hdr = [0u8; 16];
        mem.read(l[0].meta_at(1), &mut hdr).unwrap();
        // type IN (0), reserved, sector 16 (8192 / 512).
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            f.completion(mem, &l[0], 1).unwrap(),
            Completion::Failed(0xff)
        );
        f.set_direction(&ring, 1, Dir::Write, 4096).unwrap();
        mem.read(l[0].desc + 4 * 16 + 12, &mut d[..2]).unwrap();
        assert_eq!(
            &d[..2],
            &[1, 0],
            "data descriptor device-readable for a write"
        );
        mem.u8_at(l[0].meta_at(1) + 64)
            .unwrap()
            .store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(f.completion(mem, &l[0], 1).unwrap(), Completion::Ok);
    }

    #[test]
    fn scsi_read16_and_write16_chains() {
        let (l, total) = layout(&[8], 2, 4096).unwrap();
        let shm = SharedMemory::new(total, false).unwrap();
        let mem = Shared::new(shm.region());
        let ring = DriverRing::new(mem, l[0], Notification::Flags).unwrap();
        let f = RequestFormat::Scsi;
        f.prepare_slot(&ring, 0, Dir::Write, 4096).unwrap();
        f.write_command(mem, &l[0], 0, 0x1234, Dir::Write, 4096 * 3, 4096, 512)
            .unwrap();
        let mut req = [0u8; 51];
        mem.read(l[0].meta_at(0), &mut req).unwrap();
        let view = CmdReq::new_checked(&req[..], 32).unwrap();
        assert_eq!(
            view.lun(),
            [1, 0, 0x40, 0, 0, 0, 0, 0],
            "target 0 LUN 0, flat format"
        );
        assert_eq!(view.tag(), 0x1234);
        // WRITE(16), LBA 24, 8 blocks.
        assert_eq!(
            &view.cdb()[..16],
            &[0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0, 0, 8, 0, 0]
        );
        let mut d = [0u8; 48];
        mem.read(l[0].desc, &mut d).unwrap();
        let flags: Vec<u16> = d
            .chunks(16)
            .map(|c| u16::from_le_bytes([c[12], c[13]]))
            .collect();
        assert_eq!(
            flags,
            [1, 1, 2],
            "req, data-out readable; response writable"
        );
        f.set_direction(&ring, 0, Dir::Read, 4096).unwrap();
        mem.read(l[0].desc, &mut d).unwrap();
        let descs: Vec<VirtqDesc> = d
            .chunks(16)
            .map(|c| VirtqDesc::from_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(descs[1].addr, l[0].meta_at(0) as u64 + 64);
        assert_eq!(descs[1].len, 108);
        assert_eq!(descs[2].addr, l[0].data_at(0) as u64);
        assert_eq!(descs.iter().map(|d| d.flags).collect::<Vec<_>>(), [1, 3, 2]);
        // Response 0xff sentinel until the device answers; CHECK CONDITION is a failure.
        assert_eq!(
            f.completion(mem, &l[0], 0).unwrap(),
            Completion::Failed(0xff00)
        );
        let resp = l[0].meta_at(0) + 64;
        mem.u8_at(resp + 11)
            .unwrap()
            .store(0, std::sync::atomic::Ordering::Relaxed);
        mem.u8_at(resp + 10)
            .unwrap()
            .store(2, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(f.completion(mem, &l[0], 0).unwrap(), Completion::Failed(2));
        mem.u8_at(resp + 10)
            .unwrap()
            .store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(f.completion(mem, &l[0], 0).unwrap(), Completion::Ok);
    }
}
