//! The emulated device: PCI function state, the vhost-user connection, the message tunnel.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rvhost_core::mem::GuestMemory;
use rvhost_core::virtio::{bit, feature, status as vstatus};
use rvhost_core::virtq::{Chain, QueueConfig, SplitQueue};
use rvhost_platform_linux::{EventFd, MemoryTable, RegionSpec};
use rvhost_vvu::pci::{self, cfg_type, common, device_cfg, notification, NO_VECTOR};
use rvhost_vvu::vfio::{VfioBackend, CONFIG_REGION, REGION_FLAG_MMAP};
use rvhost_vvu::{DmaRegion, TransportError, VirtioPciTransport};

use crate::layout::*;
use crate::socket::{le64, recv_message, RawMessage};

/// vhost-user requests the device knows (the RFC device's set, plus `SET_VRING_ERR`, which
/// current QEMU sends for every vring, and `GET_CONFIG`/`SET_CONFIG`, which vhost-user-blk needs).
const KNOWN_REQUESTS: [u32; 18] = [
    1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25,
];
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const VERSION_MASK: u32 = 0x3;
const REPLY_FLAG: u32 = 0x4;
const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;

/// Deliberate misbehaviour, for the driver's rejection tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    /// A well-behaved device.
    #[default]
    None,
    /// The device-configuration capability runs past the end of BAR 0.
    DeviceCapOutsideBar,
    /// The capability list loops back to its start.
    CapListLoop,
}

/// What the emulated device reports.
#[derive(Debug, Clone, Copy)]
pub struct EmuConfig {
    /// `max_vhost_queues` in the device configuration.
    pub max_vhost_queues: u32,
    /// `uuid` in the device configuration.
    pub uuid: [u8; 16],
    /// Misbehaviour to inject.
    pub fault: Fault,
}

impl Default for EmuConfig {
    fn default() -> Self {
        EmuConfig {
            max_vhost_queues: 8,
            uuid: *b"rvhost-vvu-emu\0\0",
            fault: Fault::None,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    size: u16,
    msix_vector: u16,
    desc: u64,
    driver: u64,
    device: u64,
    ring: Option<SplitQueue>,
}

#[derive(Debug)]
struct WindowRegion {
    bar_offset: u64,
    len: u64,
    fd: OwnedFd,
}

#[derive(Debug)]
struct State {
    config_space: [u8; 256],
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    status: u8,
    queue_select: u16,
    queues: [Queue; 2],
    conn_status: u32,
    vectors: Vec<EventFd>,
    dma: Arc<MemoryTable>,
    notification_select: u16,
    notification_vectors: Vec<u16>,
    call_fds: Vec<Option<EventFd>>,
    window: Vec<WindowRegion>,
    window_table: Arc<MemoryTable>,
    stream: Option<UnixStream>,
    generation: u64,
    pending_rx: VecDeque<Vec<u8>>,
    error: Option<String>,
    forwarded_to_driver: u64,
    forwarded_to_frontend: u64,
}

/// The emulated virtio-vhost-user device.
#[derive(Debug)]
pub struct EmuDevice {
    state: Mutex<State>,
    /// Signalled when the connection state changes (the socket reader waits for `BACKEND_UP`).
    changed: Condvar,
    config: EmuConfig,
    stopping: AtomicBool,
}

/// `msix_vectors` the device offers: configuration, rxq, txq and one per vring.
fn msix_table_size(config: &EmuConfig) -> u16 {
    let vrings = u16::try_from(config.max_vhost_queues.min(1024)).unwrap_or(1024);
    3 + vrings
}

fn build_config_space(config: &EmuConfig) -> [u8; 256] {
    let mut cs = [0u8; 256];
    cs[0..2].copy_from_slice(&pci::VIRTIO_VENDOR.to_le_bytes());
    cs[2..4].copy_from_slice(&pci::PCI_DEVICE_VHOST_USER_MODERN.to_le_bytes());
    cs[6..8].copy_from_slice(&pci::PCI_STATUS_CAP_LIST.to_le_bytes());
    cs[8] = 1; // revision
    cs[0x0b] = 0xff; // class: other
    cs[0x34] = 0x40;
    // MSI-X: control word = table size - 1.
    cs[0x40] = pci::PCI_CAP_ID_MSIX;
    cs[0x41] = 0x50;
    cs[0x42..0x44].copy_from_slice(&(msix_table_size(config) - 1).to_le_bytes());
    let device_at = if config.fault == Fault::DeviceCapOutsideBar {
        REGS_BAR_LEN - 8
    } else {
        DEVICE_AT
    };
    let caps: [(u8, u8, u64, u64, Option<u32>); 7] = [
        (cfg_type::COMMON, REGS_BAR, COMMON_AT, COMMON_LEN, None),
        (
            cfg_type::NOTIFY,
            REGS_BAR,
            NOTIFY_AT,
            NOTIFY_LEN,
            Some(NOTIFY_MULTIPLIER),
        ),
        (cfg_type::ISR, REGS_BAR, ISR_AT, 4, None),
        (cfg_type::DEVICE, REGS_BAR, device_at, DEVICE_LEN, None),
        (
            cfg_type::DOORBELL,
            RESOURCES_BAR,
            DOORBELL_AT,
            DOORBELL_LEN,
            Some(DOORBELL_MULTIPLIER),
        ),
        (
            cfg_type::NOTIFICATION,
            RESOURCES_BAR,
            NOTIFICATION_AT,
            NOTIFICATION_LEN,
            None,
        ),
        (
            cfg_type::SHARED_MEMORY,
            RESOURCES_BAR,
            SHARED_MEMORY_AT,
            SHARED_MEMORY_CAP_LEN,
            None,
        ),
    ];
    let mut at = 0x50usize;
    for (n, (kind, bar, offset, len, multiplier)) in caps.iter().enumerate() {
        let cap_len = if multiplier.is_some() { 20 } else { 16 };
        let next = if n + 1 == caps.len() {
            if config.fault == Fault::CapListLoop {
                0x40
            } else {
                0
            }
        } else {
            at + cap_len
        };
        cs[at] = pci::PCI_CAP_ID_VNDR;
        cs[at + 1] = next as u8;
        cs[at + 2] = cap_len as u8;
        cs[at + 3] = *kind;
        cs[at + 4] = *bar;
        cs[at + 8..at + 12].copy_from_slice(&(*offset as u32).to_le_bytes());
        cs[at + 12..at + 16].copy_from_slice(&(*len as u32).to_le_bytes());
        if let Some(m) = multiplier {
            cs[at + 16..at + 20].copy_from_slice(&m.to_le_bytes());
        }
        at += cap_len;
    }
    cs
}

fn device_features() -> u64 {
    bit(feature::VIRTIO_F_VERSION_1) | bit(feature::VIRTIO_F_RING_EVENT_IDX)
}

fn write_value(buf: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = buf.len().min(8);
    b[..n].copy_from_slice(&buf[..n]);
    u64::from_le_bytes(b)
}

fn out_of_range(what: &str, offset: u64, len: usize, size: u64) -> TransportError {
    TransportError::OutOfRange {
        what: what.into(),
        offset,
        len: len as u64,
        size,
    }
}

impl State {
    fn signal_vector(&self, vector: u16) {
        if let Some(fd) = self.vectors.get(usize::from(vector)) {
            let _ = fd.signal();
        }
    }

    fn signal_config(&self) {
        self.signal_vector(self.config_msix_vector);
    }

    /// The device gives up on the driver (`virtio_error`): `DEVICE_NEEDS_RESET`.
    fn device_error(&mut self, message: String) {
        tracing::warn!(%message, "emulated virtio-vhost-user device error");
        self.status |= vstatus::DEVICE_NEEDS_RESET;
        self.error = Some(message);
        self.signal_config();
    }

    fn connected(&self) -> bool {
        self.conn_status & device_cfg::STATUS_FRONTEND_UP != 0
    }

    /// Drops the frontend connection (RFC: `conn_action_disconnect`).
    fn disconnect(&mut self, notify: bool) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for fd in &mut self.call_fds {
            *fd = None;
        }
        self.pending_rx.clear();
        self.generation += 1;
        self.conn_status = 0;
        if notify {
            self.signal_config();
        }
    }

    /// Both sides are up: start forwarding.
    fn maybe_connect(&mut self) {
        if self.stream.is_some()
            && self.conn_status & device_cfg::STATUS_BACKEND_UP != 0
            && !self.connected()
        {
            self.conn_status |= device_cfg::STATUS_FRONTEND_UP;
            self.signal_config();
        }
    }

    fn reset(&mut self) {
        self.disconnect(false);
        self.status = 0;
        self.driver_features = 0;
        self.queues = Default::default();
        self.config_msix_vector = NO_VECTOR;
        self.error = None;
    }

    fn queue_config(q: &Queue) -> QueueConfig {
        QueueConfig {
            size: q.size,
            desc_table: q.desc,
            avail_ring: q.driver,
            used_ring: q.device,
        }
    }

    /// The next chain the driver made available on queue `qi` (`name` in errors): `None` when
    /// there is none (a kick is then asked for: avail_event with EVENT_IDX) or the queue failed
    /// (the device then needs a reset).
    fn next_chain(&mut self, qi: usize, name: &str) -> Option<(u16, Chain<16>)> {
        let dma = self.dma.clone();
        loop {
            let ring = self.queues[qi].ring.as_mut()?;
            let head = match ring.pop_head(&*dma) {
                Ok(Some(head)) => head,
                Ok(None) => match ring.enable_kicks(&*dma) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        self.device_error(format!("{name}: {e}"));
                        return None;
                    }
                },
                Err(e) => {
                    self.device_error(format!("{name}: {e}"));
                    return None;
                }
            };
            let mut chain: Chain<16> = Chain::new();
            if let Err(e) = ring.walk_chain(&*dma, head, &mut chain) {
                self.device_error(format!("{name} chain: {e}"));
                return None;
            }
            return Some((head, chain));
        }
    }

    /// Returns `head` to the driver on queue `qi` with `len` bytes written and signals its vector
    /// if the driver wants it; false if the queue failed (the device then needs a reset).
    fn return_used(&mut self, qi: usize, name: &str, head: u16, len: u32) -> bool {
        let dma = self.dma.clone();
        let vector = self.queues[qi].msix_vector;
        let Some(ring) = self.queues[qi].ring.as_mut() else {
            return false;
        };
        let notify = ring
            .add_used(&*dma, head, len)
            .and_then(|()| ring.needs_notification(&*dma));
        match notify {
            Ok(true) => self.signal_vector(vector),
            Ok(false) => {}
            Err(e) => {
                self.device_error(format!("{name} used ring: {e}"));
                return false;
            }
        }
        true
    }

    /// Moves queued frontend messages into rxq buffers.
    fn deliver_rx(&mut self) {
        while !self.pending_rx.is_empty() {
            let Some((head, chain)) = self.next_chain(0, "rxq") else {
                return;
            };
            let dma = self.dma.clone();
            let Some(message) = self.pending_rx.front() else {
                return;
            };
            if (chain.writable_len() as usize) < message.len() {
                let msg = format!(
                    "rxq buffer too small, got {}, needed {}",
                    chain.writable_len(),
                    message.len()
                );
                return self.device_error(msg);
            }
            if let Err(e) = chain.writable_range().writer().write_all(&*dma, message) {
                return self.device_error(format!("rxq buffer: {e}"));
            }
            let len = message.len() as u32;
            if !self.return_used(0, "rxq", head, len) {
                return;
            }
            self.pending_rx.pop_front();
            self.forwarded_to_driver += 1;
        }
    }

    /// Sends every txq buffer to the frontend.
    fn process_txq(&mut self) {
        while let Some((head, chain)) = self.next_chain(1, "txq") {
            let len = chain.readable_len() as usize;
            if !(HEADER_LEN..=HEADER_LEN + MAX_PAYLOAD).contains(&len) {
                return self.device_error(format!("invalid txq buffer size, got {len}"));
            }
            let mut message = vec![0u8; len];
            if let Err(e) = chain
                .readable_range()
                .reader()
                .read_exact(&*self.dma.clone(), &mut message)
            {
                return self.device_error(format!("txq buffer: {e}"));
            }
            if !self.return_used(1, "txq", head, 0) {
                return;
            }
            let size = crate::socket::le32(&message, 8) as usize;
            if size + HEADER_LEN != len {
                return self.device_error(format!(
                    "invalid txq buffer size, got {len}, header says {}",
                    size + HEADER_LEN
                ));
            }
            self.forward_to_frontend(message);
        }
    }

    /// Parses a backend message and writes it to the socket (RFC: `parse_s2m`).
    fn forward_to_frontend(&mut self, mut message: Vec<u8>) {
        let request = crate::socket::le32(&message, 0);
        let flags = crate::socket::le32(&message, 4);
        let violation = if flags & VERSION_MASK != 1 {
            Some(format!("backend message version {}", flags & VERSION_MASK))
        } else if flags & REPLY_FLAG == 0 {
            Some("backend message is not a reply".to_string())
        } else if !KNOWN_REQUESTS.contains(&request) {
            Some(format!("backend replied to unknown request {request}"))
        } else {
            None
        };
        if let Some(reason) = violation {
            tracing::warn!(%reason, "dropping the connection");
            self.disconnect(true);
            return;
        }
        if request == GET_PROTOCOL_FEATURES {
            let features = le64(&message, HEADER_LEN) & SUPPORTED_PROTOCOL_FEATURES;
            if let Some(p) = message.get_mut(HEADER_LEN..HEADER_LEN + 8) {
                p.copy_from_slice(&features.to_le_bytes());
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if stream.write_all(&message).is_err() {
            self.disconnect(true);
            return;
        }
        self.forwarded_to_frontend += 1;
    }

    fn vring_index(&self, payload: &[u8]) -> Result<(usize, bool), String> {
        let value = le64(payload, 0);
        let index = (value & VRING_IDX_MASK) as usize;
        if index >= self.call_fds.len() {
            return Err(format!("vring {index} is beyond max_vhost_queues"));
        }
        Ok((index, value & VRING_NOFD != 0))
    }

    /// Maps `SET_MEM_TABLE`'s regions into the shared memory window (RFC: `m2s_set_mem_table`).
    fn set_mem_table(&mut self, message: &RawMessage, fds: Vec<OwnedFd>) -> Result<(), String> {
        let payload = message.payload();
        let nregions = crate::socket::le32(payload, 0) as usize;
        if nregions > MAX_MEM_REGIONS || fds.len() != nregions {
            return Err(format!(
                "SET_MEM_TABLE with {nregions} regions and {} fds",
                fds.len()
            ));
        }
        let mut cursor = SHARED_MEMORY_AT;
        let mut window = Vec::with_capacity(nregions);
        let mut specs = Vec::with_capacity(nregions);
        for (i, fd) in fds.into_iter().enumerate() {
            let at = 8 + i * 32;
            let size = le64(payload, at + 8);
            let mmap_offset = le64(payload, at + 24);
            let total = mmap_offset
                .checked_add(size)
                .ok_or("region size overflows")?;
            let end = cursor.checked_add(total).ok_or("window overflows")?;
            if end > RESOURCES_BAR_LEN {
                return Err("the regions do not fit the BAR".into());
            }
            let dup = fd.try_clone().map_err(|e| e.to_string())?;
            specs.push((
                RegionSpec {
                    guest_phys_addr: cursor,
                    memory_size: total,
                    userspace_addr: cursor,
                    mmap_offset: 0,
                },
                dup,
            ));
            window.push(WindowRegion {
                bar_offset: cursor,
                len: total,
                fd,
            });
            cursor = end;
        }
        self.window_table = MemoryTable::from_regions(specs).map_err(|e| e.to_string())?;
        self.window = window;
        Ok(())
    }
}

impl EmuDevice {
    /// A device in its reset state, not listening yet.
    pub fn new(config: EmuConfig) -> Arc<Self> {
        let vrings = config.max_vhost_queues as usize;
        Arc::new(EmuDevice {
            state: Mutex::new(State {
                config_space: build_config_space(&config),
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                config_msix_vector: NO_VECTOR,
                status: 0,
                queue_select: 0,
                queues: Default::default(),
                conn_status: 0,
                vectors: Vec::new(),
                dma: MemoryTable::empty(),
                notification_select: 0,
                notification_vectors: vec![NO_VECTOR; vrings],
                call_fds: (0..vrings).map(|_| None).collect(),
                window: Vec::new(),
                window_table: MemoryTable::empty(),
                stream: None,
                generation: 0,
                pending_rx: VecDeque::new(),
                error: None,
                forwarded_to_driver: 0,
                forwarded_to_frontend: 0,
            }),
            changed: Condvar::new(),
            config,
            stopping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transport the driver uses.
    pub fn transport(self: &Arc<Self>) -> EmuTransport {
        EmuTransport(self.clone())
    }

    /// The device as a VFIO backend, for the VFIO transport's tests.
    pub fn vfio(self: &Arc<Self>) -> EmuVfio {
        EmuVfio(self.clone())
    }

    /// The virtio device status (`DEVICE_NEEDS_RESET` after a device error).
    pub fn device_status(&self) -> u8 {
        self.lock().status
    }

    /// The last device error, if any.
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// The device configuration's connection status bits.
    pub fn connection_status(&self) -> u32 {
        self.lock().conn_status
    }

    /// Messages delivered into the rxq, and replies written to the frontend.
    pub fn forwarded(&self) -> (u64, u64) {
        let s = self.lock();
        (s.forwarded_to_driver, s.forwarded_to_frontend)
    }

    /// Puts `bytes` into the rxq as if the frontend had sent them (hostile-device tests).
    pub fn inject_rx(&self, bytes: Vec<u8>) {
        let mut s = self.lock();
        s.pending_rx.push_back(bytes);
        s.deliver_rx();
    }

    /// Listens on `path` for the frontend; one connection at a time, each served on a thread of
    /// its own until it ends.
    pub fn listen(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let device = self.clone();
        std::thread::Builder::new()
            .name("vvu-emu-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if device.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    match stream {
                        Ok(stream) => device.serve(stream),
                        Err(e) => tracing::warn!(%e, "accept failed"),
                    }
                }
            })?;
        Ok(())
    }

    /// Stops accepting after the current connection (`path` is the listening socket).
    pub fn stop(&self, path: &Path) {
        self.stopping.store(true, Ordering::Relaxed);
        self.lock().disconnect(true);
        self.changed.notify_all();
        let _ = UnixStream::connect(path);
        let _ = std::fs::remove_file(path);
    }

    /// Serves one frontend connection.
    fn serve(self: &Arc<Self>, mut stream: UnixStream) {
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let generation = {
            let mut s = self.lock();
            if s.stream.is_some() {
                s.disconnect(false);
            }
            s.stream = Some(writer);
            s.maybe_connect();
            s.generation
        };
        self.changed.notify_all();
        loop {
            // Messages are read only while both sides are up (the RFC device's flow control).
            {
                let mut s = self.lock();
                while !s.connected() && s.generation == generation && s.stream.is_some() {
                    if self.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    s = self
                        .changed
                        .wait_timeout(s, Duration::from_millis(100))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                if s.generation != generation || s.stream.is_none() {
                    return;
                }
            }
            let message = match recv_message(&mut stream) {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => {
                    let mut s = self.lock();
                    if s.generation == generation {
                        s.disconnect(true);
                    }
                    return;
                }
            };
            let mut s = self.lock();
            if s.generation != generation {
                return;
            }
            if let Err(reason) = self.from_frontend(&mut s, message, generation) {
                tracing::warn!(%reason, "frontend protocol violation: dropping the connection");
                s.disconnect(true);
                return;
            }
        }
    }

    /// Handles a frontend message and queues it for the rxq (RFC: `parse_m2s`).
    fn from_frontend(
        self: &Arc<Self>,
        s: &mut State,
        mut message: RawMessage,
        generation: u64,
    ) -> Result<(), String> {
        let flags = message.flags();
        if flags & VERSION_MASK != 1 {
            return Err(format!("version {}", flags & VERSION_MASK));
        }
        if flags & REPLY_FLAG != 0 {
            return Err("unexpected reply".into());
        }
        let request = message.request();
        if !KNOWN_REQUESTS.contains(&request) {
            return Err(format!("unknown request {request}"));
        }
        let fds = std::mem::take(&mut message.fds);
        match request {
            SET_MEM_TABLE => s.set_mem_table(&message, fds)?,
            SET_VRING_KICK => {
                let (index, nofd) = s.vring_index(message.payload())?;
                if !nofd {
                    let fd = fds.into_iter().next().ok_or("SET_VRING_KICK without fd")?;
                    let kick = EventFd::from_owned_fd(fd).map_err(|e| e.to_string())?;
                    self.forward_kicks(kick, index, generation);
                }
            }
            SET_VRING_CALL => {
                let (index, nofd) = s.vring_index(message.payload())?;
                let call = if nofd {
                    None
                } else {
                    let fd = fds.into_iter().next().ok_or("SET_VRING_CALL without fd")?;
                    Some(EventFd::from_owned_fd(fd).map_err(|e| e.to_string())?)
                };
                if let Some(slot) = s.call_fds.get_mut(index) {
                    *slot = call;
                }
            }
            SET_VRING_ERR => {
                s.vring_index(message.payload())?;
            }
            SET_PROTOCOL_FEATURES => {
                let features = le64(message.payload(), 0) & SUPPORTED_PROTOCOL_FEATURES;
                if let Some(p) = message.bytes.get_mut(HEADER_LEN..HEADER_LEN + 8) {
                    p.copy_from_slice(&features.to_le_bytes());
                }
            }
            _ => {}
        }
        s.pending_rx.push_back(message.bytes);
        s.deliver_rx();
        Ok(())
    }

    /// Turns kicks of `index` into its notification vector's interrupt while this connection
    /// lasts (what QEMU does with the kick fd and `msix_notify`).
    fn forward_kicks(self: &Arc<Self>, kick: EventFd, index: usize, generation: u64) {
        let device = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vvu-emu-kick{index}"))
            .spawn(move || loop {
                let fired = kick.wait(Duration::from_millis(50)).unwrap_or(false);
                let s = device.lock();
                if s.generation != generation || device.stopping.load(Ordering::Relaxed) {
                    return;
                }
                if fired && kick.consume().is_ok() {
                    if let Some(&vector) = s.notification_vectors.get(index) {
                        s.signal_vector(vector);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(%e, "cannot forward kicks");
        }
    }

    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), TransportError> {
        let s = self.lock();
        let at = usize::from(offset);
        let src = s
            .config_space
            .get(at..at + buf.len())
            .ok_or_else(|| out_of_range("config space", u64::from(offset), buf.len(), 256))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), TransportError> {
        let mut s = self.lock();
        let at = usize::from(offset);
        if at + buf.len() > 256 {
            return Err(out_of_range(
                "config space",
                u64::from(offset),
                buf.len(),
                256,
            ));
        }
        // Only the command register and the MSI-X control word are writable.
        let writable = |i: usize| (4..6).contains(&i) || (0x42..0x44).contains(&i);
        for (i, b) in buf.iter().enumerate() {
            if writable(at + i) {
                s.config_space[at + i] = *b;
            }
        }
        Ok(())
    }

    fn check_width(bar: u8, offset: u64, buf_len: usize) -> Result<(), TransportError> {
        if !matches!(buf_len, 1 | 2 | 4 | 8) {
            return Err(TransportError::Device(format!(
                "BAR {bar} access of {buf_len} bytes at {offset:#x}"
            )));
        }
        Ok(())
    }

    fn common_image(&self, s: &State) -> [u8; COMMON_LEN as usize] {
        let mut img = [0u8; COMMON_LEN as usize];
        let put = |img: &mut [u8], at: u64, bytes: &[u8]| {
            img[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(
            &mut img,
            common::DEVICE_FEATURE_SELECT,
            &s.device_feature_select.to_le_bytes(),
        );
        let features = match s.device_feature_select {
            0 => device_features() as u32,
            1 => (device_features() >> 32) as u32,
            _ => 0,
        };
        put(&mut img, common::DEVICE_FEATURE, &features.to_le_bytes());
        put(
            &mut img,
            common::DRIVER_FEATURE_SELECT,
            &s.driver_feature_select.to_le_bytes(),
        );
        let driver = match s.driver_feature_select {
            0 => s.driver_features as u32,
            1 => (s.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut img, common::DRIVER_FEATURE, &driver.to_le_bytes());
        put(
            &mut img,
            common::CONFIG_MSIX_VECTOR,
            &s.config_msix_vector.to_le_bytes(),
        );
        put(&mut img, common::NUM_QUEUES, &2u16.to_le_bytes());
        put(&mut img, common::DEVICE_STATUS, &[s.status]);
        put(
            &mut img,
            common::QUEUE_SELECT,
            &s.queue_select.to_le_bytes(),
        );
        if let Some(q) = s.queues.get(usize::from(s.queue_select)) {
            let size = if q.size == 0 { QUEUE_SIZE } else { q.size };
            put(&mut img, common::QUEUE_SIZE, &size.to_le_bytes());
            put(
                &mut img,
                common::QUEUE_MSIX_VECTOR,
                &q.msix_vector.to_le_bytes(),
            );
            let enabled = u16::from(q.ring.is_some());
            put(&mut img, common::QUEUE_ENABLE, &enabled.to_le_bytes());
            put(
                &mut img,
                common::QUEUE_NOTIFY_OFF,
                &s.queue_select.to_le_bytes(),
            );
            put(&mut img, common::QUEUE_DESC, &q.desc.to_le_bytes());
            put(&mut img, common::QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(&mut img, common::QUEUE_DEVICE, &q.device.to_le_bytes());
        }
        img
    }

    fn write_common(&self, s: &mut State, offset: u64, value: u64) {
        let vectors = msix_table_size(&self.config);
        let vector = |v: u64| {
            let v = v as u16;
            if v < vectors {
                v
            } else {
                NO_VECTOR
            }
        };
        let select = usize::from(s.queue_select);
        match offset {
            common::DEVICE_FEATURE_SELECT => s.device_feature_select = value as u32,
            common::DRIVER_FEATURE_SELECT => s.driver_feature_select = value as u32,
            common::DRIVER_FEATURE => {
                let shift = 32 * u64::from(s.driver_feature_select.min(1));
                s.driver_features &= !(0xffff_ffffu64 << shift);
                s.driver_features |= (value & 0xffff_ffff) << shift;
            }
            common::CONFIG_MSIX_VECTOR => s.config_msix_vector = vector(value),
            common::DEVICE_STATUS => {
                let value = value as u8;
                if value == 0 {
                    s.reset();
                } else if value & vstatus::FEATURES_OK != 0
                    && s.driver_features & !device_features() != 0
                {
                    // Features the device did not offer: FEATURES_OK does not stick.
                    s.status = value & !vstatus::FEATURES_OK;
                } else {
                    s.status = value;
                }
            }
            common::QUEUE_SELECT => s.queue_select = value as u16,
            _ => {
                let dma = s.dma.clone();
                let features = s.driver_features;
                let Some(q) = s.queues.get_mut(select) else {
                    return;
                };
                match offset {
                    common::QUEUE_SIZE => q.size = value as u16,
                    common::QUEUE_MSIX_VECTOR => q.msix_vector = vector(value),
                    common::QUEUE_DESC => q.desc = value,
                    common::QUEUE_DRIVER => q.driver = value,
                    common::QUEUE_DEVICE => q.device = value,
                    common::QUEUE_ENABLE if value == 1 => {
                        if q.size == 0 {
                            q.size = QUEUE_SIZE;
                        }
                        let ring = SplitQueue::new(State::queue_config(q), features)
                            .and_then(|ring| ring.check_rings(&*dma).map(|()| ring));
                        match ring {
                            Ok(ring) => q.ring = Some(ring),
                            Err(e) => s.device_error(format!("queue {select}: {e}")),
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn device_image(&self, s: &State) -> [u8; DEVICE_LEN as usize] {
        let mut img = [0u8; DEVICE_LEN as usize];
        img[0..4].copy_from_slice(&s.conn_status.to_le_bytes());
        img[4..8].copy_from_slice(&self.config.max_vhost_queues.to_le_bytes());
        img[8..24].copy_from_slice(&self.config.uuid);
        img
    }

    fn read_bar(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), TransportError> {
        Self::check_width(bar, offset, buf.len())?;
        let s = self.lock();
        let copy = |img: &[u8], at: u64, buf: &mut [u8]| {
            let at = at as usize;
            match img.get(at..at + buf.len()) {
                Some(src) => buf.copy_from_slice(src),
                None => buf.fill(0),
            }
        };
        match (bar, offset) {
            (REGS_BAR, o) if o < COMMON_AT + COMMON_LEN => {
                copy(&self.common_image(&s), o - COMMON_AT, buf)
            }
            (REGS_BAR, o) if (DEVICE_AT..DEVICE_AT + DEVICE_LEN).contains(&o) => {
                copy(&self.device_image(&s), o - DEVICE_AT, buf)
            }
            (REGS_BAR, o) if o < REGS_BAR_LEN => buf.fill(0),
            (RESOURCES_BAR, o) if (NOTIFICATION_AT..SHARED_MEMORY_AT).contains(&o) => {
                let vector = s
                    .notification_vectors
                    .get(usize::from(s.notification_select))
                    .copied()
                    .unwrap_or(NO_VECTOR);
                let mut img = [0u8; 4];
                img[0..2].copy_from_slice(&s.notification_select.to_le_bytes());
                img[2..4].copy_from_slice(&vector.to_le_bytes());
                copy(&img, o - NOTIFICATION_AT, buf)
            }
            (RESOURCES_BAR, o) if (SHARED_MEMORY_AT..RESOURCES_BAR_LEN).contains(&o) => {
                if s.window_table.read(o, buf).is_err() {
                    buf.fill(0xff);
                }
            }
            (RESOURCES_BAR, o) if o < RESOURCES_BAR_LEN => buf.fill(0),
            _ => {
                return Err(out_of_range(
                    &format!("BAR {bar}"),
                    offset,
                    buf.len(),
                    self.bar_len(bar).unwrap_or(0),
                ))
            }
        }
        Ok(())
    }

    fn write_bar(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), TransportError> {
        Self::check_width(bar, offset, buf.len())?;
        let value = write_value(buf);
        let mut s = self.lock();
        match (bar, offset) {
            (REGS_BAR, o) if o < COMMON_AT + COMMON_LEN => {
                self.write_common(&mut s, o - COMMON_AT, value);
                drop(s);
                self.changed.notify_all();
            }
            (REGS_BAR, o) if (NOTIFY_AT..NOTIFY_AT + NOTIFY_LEN).contains(&o) => {
                match (o - NOTIFY_AT) / u64::from(NOTIFY_MULTIPLIER) {
                    0 => s.deliver_rx(),
                    1 => s.process_txq(),
                    _ => {}
                }
                drop(s);
                self.changed.notify_all();
            }
            (REGS_BAR, o) if o == DEVICE_AT + device_cfg::STATUS => {
                let status = value as u32;
                let known = device_cfg::STATUS_BACKEND_UP | device_cfg::STATUS_FRONTEND_UP;
                if status & !known != 0 {
                    s.device_error(format!(
                        "undefined virtio-vhost-user status bit set ({status:#x})"
                    ));
                } else {
                    let was_up = s.conn_status & device_cfg::STATUS_BACKEND_UP != 0;
                    let up = status & device_cfg::STATUS_BACKEND_UP != 0;
                    if up && !was_up {
                        s.conn_status |= device_cfg::STATUS_BACKEND_UP;
                        s.maybe_connect();
                    } else if !up && was_up {
                        if s.connected() {
                            // The driver asked: no configuration interrupt.
                            s.disconnect(false);
                        } else {
                            s.conn_status = 0;
                        }
                    }
                }
                drop(s);
                self.changed.notify_all();
            }
            (REGS_BAR, o) if o < REGS_BAR_LEN => {}
            (RESOURCES_BAR, o) if o < DOORBELL_AT + DOORBELL_LEN => {
                let index = ((o - DOORBELL_AT) / u64::from(DOORBELL_MULTIPLIER)) as usize;
                if let Some(Some(call)) = s.call_fds.get(index) {
                    let _ = call.signal();
                }
            }
            (RESOURCES_BAR, o) if o == NOTIFICATION_AT + notification::SELECT => {
                let select = value as u16;
                if usize::from(select) < s.notification_vectors.len() {
                    s.notification_select = select;
                }
            }
            (RESOURCES_BAR, o) if o == NOTIFICATION_AT + notification::MSIX_VECTOR => {
                let vector = value as u16;
                let vector = if vector < msix_table_size(&self.config) {
                    vector
                } else {
                    NO_VECTOR
                };
                let select = usize::from(s.notification_select);
                if let Some(slot) = s.notification_vectors.get_mut(select) {
                    *slot = vector;
                }
            }
            (RESOURCES_BAR, o) if (SHARED_MEMORY_AT..RESOURCES_BAR_LEN).contains(&o) => {
                let _ = s.window_table.write(o, buf);
            }
            (RESOURCES_BAR, o) if o < RESOURCES_BAR_LEN => {}
            _ => {
                return Err(out_of_range(
                    &format!("BAR {bar}"),
                    offset,
                    buf.len(),
                    self.bar_len(bar).unwrap_or(0),
                ))
            }
        }
        Ok(())
    }

    fn bar_len(&self, bar: u8) -> Option<u64> {
        match bar {
            REGS_BAR => Some(REGS_BAR_LEN),
            RESOURCES_BAR => Some(RESOURCES_BAR_LEN),
            _ => None,
        }
    }

    fn bar_mappable(
        &self,
        bar: u8,
        offset: u64,
        len: u64,
    ) -> Result<(OwnedFd, u64), TransportError> {
        let not_mappable = |reason: &str| TransportError::NotMappable {
            bar,
            offset,
            len,
            reason: reason.into(),
        };
        if bar != RESOURCES_BAR {
            return Err(not_mappable("only the shared memory window is mappable"));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| not_mappable("overflow"))?;
        let s = self.lock();
        let region = s
            .window
            .iter()
            .find(|r| offset >= r.bar_offset && end <= r.bar_offset + r.len)
            .ok_or_else(|| not_mappable("no frontend memory region there"))?;
        let fd = region
            .fd
            .try_clone()
            .map_err(|e| not_mappable(&e.to_string()))?;
        Ok((fd, offset - region.bar_offset))
    }

    fn enable_msix(&self, vectors: Vec<EventFd>) -> Result<(), TransportError> {
        let mut s = self.lock();
        s.vectors = vectors;
        let control = &mut s.config_space[0x43];
        *control |= 0x80; // MSI-X enable
        Ok(())
    }

    fn map_dma(&self, region: DmaRegion<'_>) -> Result<(), TransportError> {
        let fd = region
            .fd
            .try_clone_to_owned()
            .map_err(|e| TransportError::Device(e.to_string()))?;
        let spec = RegionSpec {
            guest_phys_addr: region.iova,
            memory_size: region.len,
            userspace_addr: region.iova,
            mmap_offset: 0,
        };
        let mut s = self.lock();
        let table = s
            .dma
            .with_region_added(spec, fd)
            .map_err(|e| TransportError::Device(e.to_string()))?;
        s.dma = table;
        Ok(())
    }
}

/// [`VirtioPciTransport`] straight onto the emulated device.
#[derive(Debug, Clone)]
pub struct EmuTransport(Arc<EmuDevice>);

impl VirtioPciTransport for EmuTransport {
    fn read_config(&self, offset: u16, buf: &mut [u8]) -> Result<(), TransportError> {
        self.0.read_config(offset, buf)
    }

    fn write_config(&self, offset: u16, buf: &[u8]) -> Result<(), TransportError> {
        self.0.write_config(offset, buf)
    }

    fn bar_len(&self, bar: u8) -> Option<u64> {
        self.0.bar_len(bar)
    }

    fn read_bar(&self, bar: u8, offset: u64, buf: &mut [u8]) -> Result<(), TransportError> {
        self.0.read_bar(bar, offset, buf)
    }

    fn write_bar(&self, bar: u8, offset: u64, buf: &[u8]) -> Result<(), TransportError> {
        self.0.write_bar(bar, offset, buf)
    }

    fn bar_mappable(
        &self,
        bar: u8,
        offset: u64,
        len: u64,
    ) -> Result<(OwnedFd, u64), TransportError> {
        self.0.bar_mappable(bar, offset, len)
    }

    fn enable_msix(&self, vectors: &[&EventFd]) -> Result<(), TransportError> {
        let fds = vectors
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Device(e.to_string()))?;
        self.0.enable_msix(fds)
    }

    unsafe fn map_dma(&self, region: DmaRegion<'_>) -> Result<(), TransportError> {
        self.0.map_dma(region)
    }
}

/// The emulated device as VFIO presents a PCI function: regions 0–5 (BARs) and 7 (configuration
/// space), MSI-X as interrupt index 2.
#[derive(Debug, Clone)]
pub struct EmuVfio(Arc<EmuDevice>);

impl VfioBackend for EmuVfio {
    fn region_size(&self, index: u32) -> u64 {
        match index {
            CONFIG_REGION => 256,
            i if i < 6 => self.0.bar_len(i as u8).unwrap_or(0),
            _ => 0,
        }
    }

    fn region_flags(&self, index: u32) -> u32 {
        if index == u32::from(RESOURCES_BAR) {
            REGION_FLAG_MMAP
        } else {
            0
        }
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) {
        let result = match index {
            CONFIG_REGION => u16::try_from(offset)
                .map_err(|_| TransportError::Device("offset".into()))
                .and_then(|o| self.0.read_config(o, buf)),
            i => self.0.read_bar(i as u8, offset, buf),
        };
        if result.is_err() {
            // What a read nobody claims returns on PCI.
            buf.fill(0xff);
        }
    }

    fn region_write(&self, index: u32, offset: u64, buf: &[u8]) {
        let _ = match index {
            CONFIG_REGION => u16::try_from(offset)
                .map_err(|_| TransportError::Device("offset".into()))
                .and_then(|o| self.0.write_config(o, buf)),
            i => self.0.write_bar(i as u8, offset, buf),
        };
    }

    fn region_mappable(&self, index: u32, offset: u64, len: u64) -> Result<(OwnedFd, u64), String> {
        self.0
            .bar_mappable(index as u8, offset, len)
            .map_err(|e| e.to_string())
    }

    fn enable_msix(&self, fds: &[&vmm_sys_util::eventfd::EventFd]) -> Result<(), String> {
        let mut vectors = Vec::with_capacity(fds.len());
        for fd in fds {
            let clone = fd.try_clone().map_err(|e| e.to_string())?;
            // SAFETY: `clone` is a fresh duplicate owned by nobody else; the `OwnedFd` takes it.
            let dup = unsafe { OwnedFd::from_raw_fd(clone.into_raw_fd()) };
            vectors.push(EventFd::from_owned_fd(dup).map_err(|e| e.to_string())?);
        }
        self.0.enable_msix(vectors).map_err(|e| e.to_string())
    }

    unsafe fn dma_map(&self, region: DmaRegion<'_>) -> Result<(), String> {
        self.0.map_dma(region).map_err(|e| e.to_string())
    }
}
