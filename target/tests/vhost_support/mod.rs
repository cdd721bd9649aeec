//! A minimal virtio-blk *driver* over a vhost-user frontend, for the data plane's integration
//! tests: it owns shared guest memory (a file in /dev/shm, as QEMU's memory-backend-file), lays
//! out split virtqueues (or packed ones, when `VIRTIO_F_RING_PACKED` was negotiated) in it, and speaks vhost-user through the `vhost` crate's `Frontend`.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvhost_target::bdev::delay::{DelayBdev, Latencies};
use rvhost_target::bdev::malloc::{MallocBdev, MemoryBudget};
use rvhost_target::bdev::Bdev;
use rvhost_target::dataplane::Dataplane;
use rvhost_target::ops::{BlkControllerSpec, ControllerOps};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// Packed ring descriptor flags (virtio 1.2 §2.8.1).
pub const F_AVAIL: u16 = 1 << 7;
pub const F_USED: u16 = 1 << 15;

/// Guest memory: one region at GPA 0.
pub const MEM_SIZE: u64 = 4 << 20;
/// Where the "frontend" pretends to have guest memory mapped (any value works, as with QEMU).
pub const FRONTEND_VA: u64 = 0x7f00_0000_0000;
/// Queue size used by the tests.
pub const QUEUE_SIZE: u16 = 64;
/// Each queue gets 64 KiB of ring space at `queue * RING_STRIDE`.
const RING_STRIDE: u64 = 0x1_0000;
/// Request buffers start here; each queue gets its own 512 KiB window.
const DATA_BASE: u64 = 0x10_0000;
const DATA_STRIDE: u64 = 0x8_0000;

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A directory for sockets, unique per test.
pub fn socket_dir(test: &str) -> PathBuf {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rvhost-{}-{test}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket dir");
    dir
}

/// A RAM bdev of `blocks` blocks.
pub fn malloc_bdev(name: &str, blocks: u64, block_size: u32) -> Arc<dyn Bdev> {
    let budget = MemoryBudget::new(1 << 30);
    let mut uuid = [0u8; 16];
    uuid[..name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
    MallocBdev::new(name, blocks, block_size, uuid, &budget).expect("malloc bdev")
}

/// Starts a data plane on core 0 with one blk controller per `(name, bdev, readonly)`.
pub fn start(test: &str, controllers: &[(&str, Arc<dyn Bdev>, bool)]) -> (Arc<Dataplane>, PathBuf) {
    start_on(0x1, test, controllers)
}

/// Every online core's bit (cores 0..63).
pub fn online_mask() -> u64 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut mask = 0u64;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u32, u32) = (lo.parse().unwrap_or(0), hi.parse().unwrap_or(0));
        for core in lo..=hi.min(63) {
            mask |= 1u64 << core;
        }
    }
    mask.max(1)
}

/// [`start`] with reactors on the cores of `cpumask`.
pub fn start_on(
    cpumask: u64,
    test: &str,
    controllers: &[(&str, Arc<dyn Bdev>, bool)],
) -> (Arc<Dataplane>, PathBuf) {
    // RUST_LOG=debug shows the target's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = socket_dir(test);
    let dp = Dataplane::start(cpumask, dir.clone()).expect("data plane");
    for (name, bdev, readonly) in controllers {
        dp.create_blk_controller(BlkControllerSpec {
            name: name.to_string(),
            bdev: Arc::clone(bdev),
            cpumask: None,
            readonly: *readonly,
        })
        .expect("controller");
    }
    (dp, dir)
}

/// Shared guest memory.
pub struct GuestRam {
    pub file: File,
    pub mem: GuestMemoryMmap,
}

impl GuestRam {
    pub fn new(size: u64) -> Self {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let path = format!("/dev/shm/rvhost-test-{}-{n}", std::process::id());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("shm file");
        std::fs::remove_file(&path).expect("unlink shm file");
        file.set_len(size).expect("size shm file");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file.try_clone().expect("dup"), 0)),
        )])
        .expect("map guest memory");
        GuestRam { file, mem }
    }

    pub fn region(&self, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: FRONTEND_VA,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .expect("guest write");
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(gpa))
            .expect("guest read");
        out
    }

    pub fn store_u16(&self, gpa: u64, v: u16) {
        self.mem
            .store(v, GuestAddress(gpa), Ordering::Release)
            .expect("guest store");
    }

    pub fn load_u16(&self, gpa: u64) -> u16 {
        self.mem
            .load(GuestAddress(gpa), Ordering::Acquire)
            .expect("guest load")
    }
}

/// A descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One virtqueue in guest memory, driven from the test. Split: `desc`, `avail`, `used` are the
/// three rings. Packed: `desc` is the descriptor ring, `avail` the driver and `used` the device
/// event suppression structure.
pub struct DriverQueue {
    pub index: usize,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub data: u64,
    pub avail_idx: u16,
    pub used_seen: u16,
    /// Packed: next ring position to make a list available at, and the driver's wrap counter.
    pub packed: Option<PackedDriverState>,
    pub call: EventFd,
    pub kick: EventFd,
    pub err: EventFd,
}

impl DriverQueue {
    fn new(index: usize) -> Self {
        let base = index as u64 * RING_STRIDE;
        DriverQueue {
            index,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            data: DATA_BASE + index as u64 * DATA_STRIDE,
            avail_idx: 0,
            used_seen: 0,
            packed: None,
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            err: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Header, status and data addresses for a request in this queue's window.
    pub fn header_addr(&self) -> u64 {
        self.data
    }
    pub fn status_addr(&self) -> u64 {
        self.data + 0x100
    }
    pub fn buffer_addr(&self) -> u64 {
        self.data + 0x1000
    }
}

/// A packed queue's driver-side positions (both wrap counters start at 1).
#[derive(Debug, Clone)]
pub struct PackedDriverState {
    pub avail_pos: u16,
    pub avail_wrap: bool,
    pub used_pos: u16,
    pub used_wrap: bool,
    /// Descriptors each outstanding buffer ID occupies in the ring.
    pub counts: std::collections::HashMap<u16, u16>,
}

impl Default for PackedDriverState {
    fn default() -> Self {
        PackedDriverState {
            avail_pos: 0,
            avail_wrap: true,
            used_pos: 0,
            used_wrap: true,
            counts: Default::default(),
        }
    }
}

/// Where [`Driver::post_blk_at`] puts a blk request, and what it asks.
#[derive(Debug, Clone, Copy)]
pub struct BlkRequestAt {
    /// The first of the three table slots, and the head made available.
    pub head: u16,
    /// `T_IN` (the data buffer is device-writable) or `T_OUT`.
    pub req_type: u32,
    pub sector: u64,
    pub hdr: u64,
    pub buf: u64,
    pub len: u32,
    pub status: u64,
}

/// `flags` as a packed descriptor made available in a lap with wrap counter `wrap`.
pub fn packed_avail_flags(flags: u16, wrap: bool) -> u16 {
    (flags & !(F_AVAIL | F_USED)) | if wrap { F_AVAIL } else { F_USED }
}

/// A packed ring descriptor's 16 bytes.
pub fn packed_desc_bytes(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&id.to_le_bytes());
    b[14..16].copy_from_slice(&flags.to_le_bytes());
    b
}

/// A blk request header: type and sector.
pub fn blk_header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// The three descriptors of a blk request, not chained (no `F_NEXT`, `next` 0; packed lists
/// chain by position): the 16-byte header at `hdr`, `len` bytes at `buf` (device-writable for
/// `T_IN`), the status byte at `status`.
pub fn blk_descs(req_type: u32, hdr: u64, buf: u64, len: u32, status: u64) -> [Desc; 3] {
    [
        Desc {
            addr: hdr,
            len: 16,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: buf,
            len,
            flags: if req_type == T_IN { F_WRITE } else { 0 },
            next: 0,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ]
}

/// A negotiated vhost-user-blk connection.
pub struct Driver {
    pub frontend: Frontend,
    pub ram: GuestRam,
    pub features: u64,
    pub queues: Vec<DriverQueue>,
}

/// Completes within this time or the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

impl Driver {
    /// Connects and negotiates `wanted` features (intersected with the offer).
    pub fn connect(socket: &Path, wanted: u64) -> Self {
        // A read timeout turns a missing reply into a test failure instead of a hang.
        let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let frontend = Frontend::from_stream(stream, 16);
        let ram = GuestRam::new(MEM_SIZE);
        let mut driver = Driver {
            frontend,
            ram,
            features: 0,
            queues: Vec::new(),
        };
        driver.negotiate(wanted);
        driver
    }

    pub fn negotiate(&mut self, wanted: u64) {
        self.frontend.set_owner().expect("SET_OWNER");
        let offered = self.frontend.get_features().expect("GET_FEATURES");
        assert_ne!(
            offered & VHOST_USER_F_PROTOCOL_FEATURES,
            0,
            "protocol features offered"
        );
        self.features = offered & (wanted | VHOST_USER_F_PROTOCOL_FEATURES);
        self.frontend
            .set_features(self.features)
            .expect("SET_FEATURES");
        let proto = self
            .frontend
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        assert!(proto.contains(want), "protocol features {proto:?}");
        self.frontend
            .set_protocol_features(want)
            .expect("SET_PROTOCOL_FEATURES");
        // Every message now waits for the backend's acknowledgement, so errors surface here.
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    pub fn config(&mut self) -> Vec<u8> {
        let (_, bytes) = self
            .frontend
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("GET_CONFIG");
        bytes
    }

    pub fn set_mem_table(&self) {
        self.frontend
            .set_mem_table(&[self.ram.region(MEM_SIZE)])
            .expect("SET_MEM_TABLE");
    }

    /// Whether packed rings were negotiated.
    pub fn is_packed(&self) -> bool {
        self.features & VIRTIO_F_RING_PACKED != 0
    }

    /// Sets up and enables queue `index` (ring memory zeroed first).
    pub fn setup_queue(&mut self, index: usize) {
        let q = DriverQueue::new(index);
        self.ram.write(q.desc, &vec![0u8; 0x3000]);
        // Packed: position 0, both wrap counters 1 (vring base bit 15).
        let base = if self.is_packed() { 0x8000 } else { 0 };
        self.start_queue_as_is(index, base)
            .expect("SET_VRING_* and SET_VRING_ENABLE");
        if self.is_packed() {
            self.queue(index).packed = Some(PackedDriverState::default());
        }
    }

    /// Starts queue `index` of the standard layout with its rings as they are in memory (not
    /// zeroed) and `base` as `SET_VRING_BASE`, with fresh eventfds, and records it (split
    /// indexes and packed state from zero: set them to what the rings hold). Returns the error
    /// of the first refused step.
    pub fn start_queue_as_is(&mut self, index: usize, base: u16) -> Result<(), vhost::Error> {
        let q = DriverQueue::new(index);
        let f = &self.frontend;
        f.set_vring_num(index, QUEUE_SIZE)?;
        f.set_vring_base(index, base)?;
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: FRONTEND_VA + q.desc,
            used_ring_addr: FRONTEND_VA + q.used,
            avail_ring_addr: FRONTEND_VA + q.avail,
            log_addr: None,
        };
        f.set_vring_addr(index, &config)?;
        f.set_vring_call(index, &q.call)?;
        f.set_vring_err(index, &q.err)?;
        f.set_vring_kick(index, &q.kick)?;
        self.frontend.set_vring_enable(index, true)?;
        match self
            .queues
            .iter_mut()
            .find(|existing| existing.index == index)
        {
            Some(existing) => *existing = q,
            None => self.queues.push(q),
        }
        Ok(())
    }

    /// Records queue `index` (standard layout) as set up by hand with these eventfds.
    pub fn setup_queue_record(&mut self, index: usize, call: EventFd, kick: EventFd) {
        let mut q = DriverQueue::new(index);
        q.call = call;
        q.kick = kick;
        self.queues.retain(|existing| existing.index != index);
        self.queues.push(q);
    }

    /// Negotiated, memory-mapped, queue 0 running: what a freshly booted guest has.
    pub fn ready(socket: &Path, wanted: u64) -> Self {
        let mut driver = Self::connect(socket, wanted);
        driver.set_mem_table();
        driver.setup_queue(0);
        driver
    }

    fn queue(&mut self, index: usize) -> &mut DriverQueue {
        self.queues
            .iter_mut()
            .find(|q| q.index == index)
            .expect("queue set up")
    }

    /// Writes descriptors at the start of the table and makes head 0 available.
    pub fn post(&mut self, index: usize, descs: &[Desc]) {
        self.post_head(index, descs, 0);
    }

    /// Writes `descs` into table slots 0.. and makes `head` available. Packed: writes `descs`
    /// as one list at the next ring positions, buffer ID `head` (their `next` is ignored), the
    /// first descriptor's flags last.
    pub fn post_head(&mut self, index: usize, descs: &[Desc], head: u16) {
        if self.is_packed() {
            return self.post_packed(index, descs, head);
        }
        self.post_split(index, descs, 0, head);
    }

    /// Makes a blk request available without waiting for it: the header (`req_type`, `sector`)
    /// at `hdr`, `len` bytes at `buf` (device-writable for `T_IN`) and the status byte at
    /// `status` (set to 0xff first). Split: in table slots `head..head + 2`, `head` made
    /// available. Packed: one list at the next ring positions, buffer ID `head`.
    pub fn post_blk_at(&mut self, index: usize, request: BlkRequestAt) {
        let BlkRequestAt {
            head,
            req_type,
            sector,
            hdr,
            buf,
            len,
            status,
        } = request;
        self.ram.write(hdr, &blk_header(req_type, sector));
        self.ram.write(status, &[0xff]);
        let mut descs = blk_descs(req_type, hdr, buf, len, status);
        if self.is_packed() {
            return self.post_packed(index, &descs, head);
        }
        for (i, d) in descs.iter_mut().take(2).enumerate() {
            d.flags |= F_NEXT;
            d.next = head + 1 + i as u16;
        }
        self.post_split(index, &descs, head, head);
    }

    /// Writes `descs` into table slots `first..` and makes `head` available (split ring).
    fn post_split(&mut self, index: usize, descs: &[Desc], first: u16, head: u16) {
        let (desc, avail, slot, new_idx) = {
            let q = self.queue(index);
            let slot = u64::from(q.avail_idx % QUEUE_SIZE);
            q.avail_idx = q.avail_idx.wrapping_add(1);
            (q.desc, q.avail, slot, q.avail_idx)
        };
        for (i, d) in descs.iter().enumerate() {
            self.ram
                .write(desc + 16 * (u64::from(first) + i as u64), &d.bytes());
        }
        self.ram.store_u16(avail + 4 + 2 * slot, head);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.ram.store_u16(avail + 2, new_idx);
    }

    /// Makes `descs` available as one packed list with buffer ID `id` at the next positions.
    pub fn post_packed(&mut self, index: usize, descs: &[Desc], id: u16) {
        let ring = self.queue(index).desc;
        let state = self.queue(index).packed.as_mut().expect("packed queue");
        let (mut pos, mut wrap) = (state.avail_pos, state.avail_wrap);
        let mut first = None;
        for (i, d) in descs.iter().enumerate() {
            let mut flags = d.flags & (F_WRITE | F_INDIRECT);
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let flags = packed_avail_flags(flags, wrap);
            let addr = ring + 16 * u64::from(pos);
            if i == 0 {
                first = Some((addr, flags));
                self.ram
                    .write(addr, &packed_desc_bytes(d.addr, d.len, id, 0)[..14]);
            } else {
                self.ram
                    .write(addr, &packed_desc_bytes(d.addr, d.len, id, flags));
            }
            pos += 1;
            if pos == QUEUE_SIZE {
                pos = 0;
                wrap = !wrap;
            }
        }
        let state = self.queue(index).packed.as_mut().expect("packed queue");
        state.avail_pos = pos;
        state.avail_wrap = wrap;
        state.counts.insert(id, descs.len() as u16);
        if let Some((addr, flags)) = first {
            std::sync::atomic::fence(Ordering::SeqCst);
            self.ram.store_u16(addr + 14, flags);
        }
    }

    /// Waits for the next used descriptor of packed queue `index`: `(buffer id, len)`.
    fn wait_used_packed(&mut self, index: usize, timeout: Duration) -> Option<(u32, u32)> {
        let ring = self.queue(index).desc;
        let (pos, wrap) = {
            let s = self.queue(index).packed.as_ref().expect("packed queue");
            (s.used_pos, s.used_wrap)
        };
        let addr = ring + 16 * u64::from(pos);
        let deadline = Instant::now() + timeout;
        loop {
            let flags = self.ram.load_u16(addr + 14);
            let avail = flags & F_AVAIL != 0;
            let used = flags & F_USED != 0;
            if avail == used && used == wrap {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let desc = self.ram.read(addr, 16);
        let len = u32::from_le_bytes(desc[8..12].try_into().expect("4 bytes"));
        let id = u16::from_le_bytes(desc[12..14].try_into().expect("2 bytes"));
        let state = self.queue(index).packed.as_mut().expect("packed queue");
        let count = state.counts.remove(&id).expect("used id was posted");
        let next = u32::from(pos) + u32::from(count);
        if next >= u32::from(QUEUE_SIZE) {
            state.used_pos = (next - u32::from(QUEUE_SIZE)) as u16;
            state.used_wrap = !state.used_wrap;
        } else {
            state.used_pos = next as u16;
        }
        Some((u32::from(id), len))
    }

    /// Waits for the next used element of queue `index`; `None` on timeout.
    pub fn wait_used_for(&mut self, index: usize, timeout: Duration) -> Option<(u32, u32)> {
        if self.is_packed() {
            return self.wait_used_packed(index, timeout);
        }
        let (used, seen) = {
            let q = self.queue(index);
            (q.used, q.used_seen)
        };
        let deadline = Instant::now() + timeout;
        while self.ram.load_u16(used + 2) == seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let slot = u64::from(seen % QUEUE_SIZE);
        let elem = self.ram.read(used + 4 + 8 * slot, 8);
        self.queue(index).used_seen = seen.wrapping_add(1);
        let id = u32::from_le_bytes(elem[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(elem[4..8].try_into().expect("4 bytes"));
        Some((id, len))
    }

    pub fn wait_used(&mut self, index: usize) -> (u32, u32) {
        self.wait_used_for(index, TIMEOUT)
            .expect("request completed in time")
    }

    /// A complete request: header, optional data buffer (device-writable for reads), status.
    /// Returns `(status, used_len)`.
    pub fn request(
        &mut self,
        index: usize,
        req_type: u32,
        sector: u64,
        data: Option<(&[u8], bool)>,
    ) -> (u8, u32) {
        self.request_within(index, req_type, sector, data, TIMEOUT)
    }

    /// [`Driver::request`], waiting up to `timeout` for its completion.
    pub fn request_within(
        &mut self,
        index: usize,
        req_type: u32,
        sector: u64,
        data: Option<(&[u8], bool)>,
        timeout: Duration,
    ) -> (u8, u32) {
        let (hdr, status, buf) = {
            let q = self.queue(index);
            (q.header_addr(), q.status_addr(), q.buffer_addr())
        };
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&req_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(hdr, &header);
        self.ram.write(status, &[0xff]);
        let mut descs = vec![Desc {
            addr: hdr,
            len: 16,
            flags: F_NEXT,
            next: 1,
        }];
        if let Some((bytes, device_writes)) = data {
            self.ram.write(buf, bytes);
            let flags = F_NEXT | if device_writes { F_WRITE } else { 0 };
            descs.push(Desc {
                addr: buf,
                len: bytes.len() as u32,
                flags,
                next: 2,
            });
        }
        descs.push(Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        });
        self.post(index, &descs);
        let (id, len) = self
            .wait_used_for(index, timeout)
            .expect("request completed in time");
        assert_eq!(id, 0, "used id is the head");
        (self.ram.read(status, 1)[0], len)
    }

    pub fn write_blocks(&mut self, index: usize, sector: u64, data: &[u8]) -> u8 {
        self.request(index, T_OUT, sector, Some((data, false))).0
    }

    pub fn read_blocks(&mut self, index: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let fill = vec![0xa5u8; len];
        let (status, used_len) = self.request(index, T_IN, sector, Some((&fill, true)));
        if status == S_OK {
            assert_eq!(
                used_len as usize,
                len + 1,
                "read used length = data + status"
            );
        }
        let buf = self.queue(index).buffer_addr();
        (status, self.ram.read(buf, len))
    }

    /// Whether the backend closed the connection: the next request fails.
    pub fn is_disconnected(&self) -> bool {
        self.frontend.get_features().is_err()
    }
}

/// A recognisable pattern for `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Waits until the controller reports `n` sessions.
pub fn wait_sessions(dp: &Dataplane, name: &str, n: u32) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = dp.controllers(Some(name)).expect("controller");
        if info[0].sessions == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {n} sessions"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Negotiates the protocol features the data plane offers, `INFLIGHT_SHMFD` among them.
pub fn negotiate_inflight(driver: &mut Driver) {
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

/// `GET_INFLIGHT_FD` for `queues` queues of `QUEUE_SIZE`.
pub fn get_inflight_region(driver: &mut Driver, queues: u16) -> (VhostUserInflight, File) {
    driver
        .frontend
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: QUEUE_SIZE,
        })
        .expect("GET_INFLIGHT_FD")
}

/// The first `len` bytes of an inflight region.
pub fn read_region(file: &File, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).expect("read region");
    buf
}

/// How long [`wait_region`] waits for the device's reactor at most.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Reads an inflight region of `len` bytes again until `settled` holds for it, for at most
/// `timeout`, and returns the last read: the device marks and clears entries from its reactor
/// thread, which a loaded machine may not run for a while after the driver's step. The caller
/// asserts on what it gets, so a region that never settles fails with the caller's message.
pub fn wait_region(
    file: &File,
    len: usize,
    timeout: Duration,
    settled: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let bytes = read_region(file, len);
        if settled(&bytes) || start.elapsed() >= timeout {
            return bytes;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Writes `bytes` into an inflight region at `offset`.
pub fn write_region(file: &File, offset: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset as u64)
        .expect("write region");
}

/// Controller `name` on a delay bdev (serial `serial`) whose reads take 300 ms and writes none,
/// and a frontend connected to it with `features` and inflight tracking negotiated.
pub fn slow_read_device(
    test: &str,
    name: &str,
    serial: [u8; 16],
    features: u64,
) -> (Arc<Dataplane>, Driver) {
    let latencies = Latencies {
        avg_read_us: 300_000,
        p99_read_us: 300_000,
        avg_write_us: 0,
        p99_write_us: 0,
    };
    let delay: Arc<dyn Bdev> = DelayBdev::new(
        "Delay0",
        serial,
        malloc_bdev("Malloc0", 2048, 512),
        latencies,
    );
    let (dp, dir) = start(test, &[(name, delay, false)]);
    let mut driver = Driver::connect(&dir.join(name), features);
    negotiate_inflight(&mut driver);
    (dp, driver)
}

/// Maps memory, hands the inflight region over and starts queue 0 (rings zeroed).
pub fn attach_region(driver: &mut Driver, info: &VhostUserInflight, file: &File) {
    driver.set_mem_table();
    driver
        .frontend
        .set_inflight_fd(info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    driver.setup_queue(0);
}

/// A frontend back after its backend died: the inflight region a first connection to
/// controller `name` was given (one queue), and a second connection with `features`, inflight
/// negotiated, memory mapped and queue 0 recorded but not started, for the test to fill its
/// rings and region as the earlier backend left them.
pub fn reconnect_with_region(
    dp: &Dataplane,
    socket: &Path,
    name: &str,
    features: u64,
) -> (Driver, VhostUserInflight, File) {
    let (info, file) = {
        let mut first = Driver::connect(socket, features);
        negotiate_inflight(&mut first);
        get_inflight_region(&mut first, 1)
    };
    wait_sessions(dp, name, 0);
    let mut driver = Driver::connect(socket, features);
    negotiate_inflight(&mut driver);
    driver.set_mem_table();
    driver.setup_queue_record(
        0,
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    );
    (driver, info, file)
}
