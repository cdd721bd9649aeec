//! The virtio-vhost-user transport (`docs/virtio-vhost-user.md`): a controller served through a
//! virtio-vhost-user device instead of a Unix socket.
//!
//! The transport boundary is the session's vhost-user handler
//! ([`VhostUserBackendReqHandlerMut`] on [`Session`]): on the socket transport the `vhost`
//! crate frames messages and hands over their fds; here this module decodes the messages the
//! device delivers on its rxq and supplies what the fds would have been from the device:
//!
//! - memory: each region of `SET_MEM_TABLE` is mapped from the device's shared memory window
//!   (the file and offset [`VvuDevice::frontend_memory_fds`] names), so the session builds the
//!   same memory table it would from the frontend's fds;
//! - kick: the eventfd of the vring's MSI-X notification vector, which the device signals when
//!   the frontend kicks;
//! - call: an eventfd of our own, whose signals a forwarder thread turns into the vring's
//!   doorbell write (the shell's completion path is unchanged; the extra hop costs a thread
//!   wake-up per interrupt).
//!
//! Replies (and `REPLY_ACK` acknowledgements) go back on the txq. The device forwards only the
//! protocol features it supports (`MQ`, `REPLY_ACK`, `CONFIG`), so a frontend never negotiates
//! inflight tracking, dirty logging, memory slots or the backend channel on this transport.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rvhost_platform_linux::{EventFd, RegionSpec};
use rvhost_vvu::vfio::{VfioDeviceBackend, VfioTransport};
use rvhost_vvu::{Doorbells, VirtioPciTransport, VvuDevice};
use rvhost_vvu_emu::{EmuConfig, EmuDevice};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Result as VuResult, VhostUserBackendReqHandlerMut};

use super::backend_channel::BackendChannel;
use super::session::Session;
use super::{DeviceBackend, DeviceId, ServerShared, StopHook, VhostServer, NEXT_DEVICE_ID};
use crate::reactor::ReactorHandle;

const HEADER_LEN: usize = 12;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;
/// How long the control thread sleeps between checks of its stop flag.
const POLL: Duration = Duration::from_millis(100);

/// vhost-user request codes this transport handles (what the device forwards).
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
}

/// A message that cannot be decoded: the connection cannot be trusted any more.
#[derive(Debug, thiserror::Error)]
#[error("malformed {request} message: {reason}")]
pub struct MalformedMessage {
    request: u32,
    reason: String,
}

/// A message as delivered by the device: header fields and payload.
struct Message<'a> {
    request: u32,
    flags: u32,
    payload: &'a [u8],
}

impl<'a> Message<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, MalformedMessage> {
        let bad = |reason: &str| MalformedMessage {
            request: le32(bytes, 0).unwrap_or(0),
            reason: reason.into(),
        };
        let request = le32(bytes, 0).ok_or_else(|| bad("no header"))?;
        let flags = le32(bytes, 4).ok_or_else(|| bad("no header"))?;
        if flags & 0x3 != VERSION_1 || flags & REPLY != 0 {
            return Err(bad("not a version-1 request"));
        }
        let payload = bytes.get(HEADER_LEN..).unwrap_or(&[]);
        Ok(Message {
            request,
            flags,
            payload,
        })
    }

    fn bad(&self, reason: &str) -> MalformedMessage {
        MalformedMessage {
            request: self.request,
            reason: reason.into(),
        }
    }

    fn u32_at(&self, at: usize) -> Result<u32, MalformedMessage> {
        le32(self.payload, at).ok_or_else(|| self.bad("payload too short"))
    }

    fn u64_at(&self, at: usize) -> Result<u64, MalformedMessage> {
        le64(self.payload, at).ok_or_else(|| self.bad("payload too short"))
    }
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn le64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// A reply to `request` carrying `payload`.
fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Turns one vring's call eventfd into doorbell writes while its flag is up.
struct CallForwarder {
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CallForwarder {
    fn start<T: VirtioPciTransport + 'static>(
        vring: u16,
        call: EventFd,
        doorbells: Doorbells<T>,
    ) -> std::io::Result<Self> {
        let running = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&running);
        let thread = std::thread::Builder::new()
            .name(format!("vvu-call{vring}"))
            .spawn(move || {
                while flag.load(Ordering::Relaxed) {
                    if call.wait(POLL).unwrap_or(false) && call.consume().is_ok() {
                        if let Err(err) = doorbells.ring(vring) {
                            tracing::warn!(vring, %err, "doorbell write failed");
                        }
                    }
                }
            })?;
        Ok(CallForwarder {
            running,
            thread: Some(thread),
        })
    }
}

impl Drop for CallForwarder {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One frontend connection on the device: the session and its call forwarders.
struct VvuSession<T: VirtioPciTransport + 'static> {
    session: Session,
    id: DeviceId,
    calls: Vec<Option<CallForwarder>>,
    doorbells: Doorbells<T>,
    reply_ack: bool,
}

impl<T: VirtioPciTransport + 'static> VvuSession<T> {
    /// Handles one message; `Ok(Some(bytes))` is the reply to send.
    fn handle(&mut self, device: &VvuDevice<T>, bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let msg = Message::parse(bytes).map_err(|e| e.to_string())?;
        let outcome = self.dispatch(device, &msg).map_err(|e| e.to_string())?;
        let need_ack = self.reply_ack && msg.flags & NEED_REPLY != 0;
        match outcome {
            Ok(Some(payload)) => Ok(Some(reply(msg.request, &payload))),
            Ok(None) if need_ack => Ok(Some(reply(msg.request, &0u64.to_le_bytes()))),
            Ok(None) => Ok(None),
            Err(err) => match self.session.take_refusal() {
                // Refused, the session goes on (the frontend hears of it with REPLY_ACK).
                Some(false) if need_ack => Ok(Some(reply(msg.request, &1u64.to_le_bytes()))),
                Some(false) => Ok(None),
                _ => Err(format!("request {}: {err}", msg.request)),
            },
        }
    }

    fn vring(&self, msg: &Message<'_>) -> Result<(u8, bool), MalformedMessage> {
        let value = msg.u64_at(0)?;
        Ok(((value & VRING_IDX_MASK) as u8, value & VRING_NOFD != 0))
    }

    /// Calls the session's handler for `msg`. The outer error is a malformed message; the inner
    /// result is the handler's (`Some` payload: the request has a reply of its own).
    fn dispatch(
        &mut self,
        device: &VvuDevice<T>,
        msg: &Message<'_>,
    ) -> Result<VuResult<Option<Vec<u8>>>, MalformedMessage> {
        let s = &mut self.session;
        let none = |r: VuResult<()>| r.map(|()| None);
        let u64_reply = |r: VuResult<u64>| r.map(|v| Some(v.to_le_bytes().to_vec()));
        Ok(match msg.request {
            req::GET_FEATURES => u64_reply(s.get_features()),
            req::SET_FEATURES => none(s.set_features(msg.u64_at(0)?)),
            req::SET_OWNER => none(s.set_owner()),
            req::RESET_OWNER => none(s.reset_owner()),
            req::SET_MEM_TABLE => {
                let nregions = msg.u32_at(0)? as usize;
                let mut specs = Vec::with_capacity(nregions.min(8));
                for i in 0..nregions {
                    let at = 8 + i * 32;
                    specs.push(RegionSpec {
                        guest_phys_addr: msg.u64_at(at)?,
                        memory_size: msg.u64_at(at + 8)?,
                        userspace_addr: msg.u64_at(at + 16)?,
                        mmap_offset: msg.u64_at(at + 24)?,
                    });
                }
                // A memory table that does not fit the window is the device's fault: fatal.
                let mapped = device
                    .frontend_memory_fds(&specs)
                    .map_err(|e| msg.bad(&e.to_string()))?;
                let ctx: Vec<VhostUserMemoryRegion> = mapped
                    .iter()
                    .map(|(r, _)| {
                        VhostUserMemoryRegion::new(
                            r.guest_phys_addr,
                            r.memory_size,
                            r.userspace_addr,
                            r.mmap_offset,
                        )
                    })
                    .collect();
                let files: Vec<File> = mapped.into_iter().map(|(_, fd)| File::from(fd)).collect();
                s.set_mem_table(&ctx, files, None).map(|_| None)
            }
            req::SET_VRING_NUM => none(s.set_vring_num(msg.u32_at(0)?, msg.u32_at(4)?)),
            req::SET_VRING_ADDR => {
                let flags = VhostUserVringAddrFlags::from_bits_truncate(msg.u32_at(4)?);
                none(s.set_vring_addr(
                    msg.u32_at(0)?,
                    flags,
                    msg.u64_at(8)?,
                    msg.u64_at(16)?,
                    msg.u64_at(24)?,
                    msg.u64_at(32)?,
                ))
            }
            req::SET_VRING_BASE => none(s.set_vring_base(msg.u32_at(0)?, msg.u32_at(4)?)),
            req::GET_VRING_BASE => s.get_vring_base(msg.u32_at(0)?).map(|st| {
                let mut p = st.index.to_le_bytes().to_vec();
                p.extend_from_slice(&st.num.to_le_bytes());
                Some(p)
            }),
            req::SET_VRING_KICK => {
                let (index, nofd) = self.vring(msg)?;
                let kick = if nofd {
                    None
                } else {
                    let vector = device
                        .interrupts()
                        .vrings
                        .get(usize::from(index))
                        .ok_or_else(|| msg.bad("no notification vector for the vring"))?;
                    let fd = vector.try_clone().map_err(|e| msg.bad(&e.to_string()))?;
                    Some(File::from(OwnedFd::from(fd)))
                };
                none(self.session.set_vring_kick(index, kick))
            }
            req::SET_VRING_CALL => {
                let (index, nofd) = self.vring(msg)?;
                if let Some(slot) = self.calls.get_mut(usize::from(index)) {
                    *slot = None;
                }
                let call = if nofd {
                    None
                } else {
                    let call = EventFd::new().map_err(|e| msg.bad(&e.to_string()))?;
                    let ours = call.try_clone().map_err(|e| msg.bad(&e.to_string()))?;
                    let forwarder =
                        CallForwarder::start(u16::from(index), ours, self.doorbells.clone())
                            .map_err(|e| msg.bad(&e.to_string()))?;
                    if self.calls.len() <= usize::from(index) {
                        self.calls.resize_with(usize::from(index) + 1, || None);
                    }
                    self.calls[usize::from(index)] = Some(forwarder);
                    Some(File::from(OwnedFd::from(call)))
                };
                none(self.session.set_vring_call(index, call))
            }
            req::SET_VRING_ERR => {
                let (index, _) = self.vring(msg)?;
                none(self.session.set_vring_err(index, None))
            }
            req::GET_PROTOCOL_FEATURES => s
                .get_protocol_features()
                .map(|f| Some(f.bits().to_le_bytes().to_vec())),
            req::SET_PROTOCOL_FEATURES => {
                let features = msg.u64_at(0)?;
                let result = s.set_protocol_features(features);
                if result.is_ok() {
                    self.reply_ack = features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
                }
                none(result)
            }
            // No more vrings than the device has notification vectors for.
            req::GET_QUEUE_NUM => {
                let vrings = device.interrupts().vrings.len() as u64;
                u64_reply(s.get_queue_num().map(|n| n.min(vrings)))
            }
            req::SET_VRING_ENABLE => none(s.set_vring_enable(msg.u32_at(0)?, msg.u32_at(4)? != 0)),
            req::GET_CONFIG => {
                let (offset, size) = (msg.u32_at(0)?, msg.u32_at(4)?);
                let flags = VhostUserConfigFlags::from_bits_truncate(msg.u32_at(8)?);
                s.get_config(offset, size, flags).map(|bytes| {
                    let mut p = offset.to_le_bytes().to_vec();
                    p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    p.extend_from_slice(&flags.bits().to_le_bytes());
                    p.extend_from_slice(&bytes);
                    Some(p)
                })
            }
            req::SET_CONFIG => {
                let (offset, size) = (msg.u32_at(0)?, msg.u32_at(4)? as usize);
                let flags = VhostUserConfigFlags::from_bits_truncate(msg.u32_at(8)?);
                let buf = msg
                    .payload
                    .get(12..12 + size)
                    .ok_or_else(|| msg.bad("config bytes missing"))?;
                none(s.set_config(offset, buf, flags))
            }
            other => return Err(msg.bad(&format!("request {other} is not supported"))),
        })
    }
}

impl VhostServer {
    /// Starts serving `backend` through `device` (already initialized, `BACKEND_UP` set): one
    /// control thread that waits for the frontend, runs a session per connection and answers
    /// its messages. Sessions are listed, coalesced, drained and hot-detached as on the socket
    /// transport.
    pub fn start_vvu<T: VirtioPciTransport + 'static>(
        name: &str,
        device: VvuDevice<T>,
        backend: Arc<dyn DeviceBackend>,
        reactor: Arc<ReactorHandle>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(ServerShared::default());
        let control = Control {
            device,
            ctx: Ctx {
                name: name.to_string(),
                backend,
                reactor: Arc::clone(&reactor),
                shared: Arc::clone(&shared),
            },
        };
        let thread = std::thread::Builder::new()
            .name(format!("vvu-{name}"))
            .spawn(move || control.run())?;
        tracing::info!(
            controller = name,
            core = reactor.core(),
            "vhost-user controller on a virtio-vhost-user device"
        );
        Ok(VhostServer {
            socket: PathBuf::new(),
            listener: None,
            shared,
            reactor,
            thread: Some(thread),
            on_stop: None,
        })
    }
}

/// Opens the virtio-vhost-user PCI function at `traddr` (bound to `vfio-pci`) and initializes
/// it.
pub fn open_pci(traddr: &str) -> Result<VvuDevice<VfioTransport<VfioDeviceBackend>>, String> {
    let backend = VfioDeviceBackend::open(traddr).map_err(|e| e.to_string())?;
    VvuDevice::open(VfioTransport::new(backend))
        .map_err(|e| format!("virtio-vhost-user device {traddr}: {e}"))
}

/// Serves `backend` through an emulated virtio-vhost-user device (`rvhost-vvu-emu`) whose
/// vhost-user socket is `socket`: a frontend connects there as to the backend VM's QEMU, and
/// every message, memory region and notification reaches rvhost through the device model, as
/// it would inside a backend VM. Stopping the server stops the device and removes the socket.
pub fn start_emulated(
    name: &str,
    socket: &Path,
    backend: Arc<dyn DeviceBackend>,
    reactor: Arc<ReactorHandle>,
) -> Result<VhostServer, String> {
    // The device replaces whatever is at the path: refuse a live socket or another file.
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!("{} exists and is not a socket", socket.display()))
        }
        Ok(_) if UnixStream::connect(socket).is_ok() => {
            return Err(format!(
                "{} is in use: another process serves a controller on it",
                socket.display()
            ))
        }
        _ => {}
    }
    let emu = EmuDevice::new(EmuConfig::default());
    emu.listen(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let stop_emu = {
        let emu = Arc::clone(&emu);
        let socket = socket.to_path_buf();
        move || emu.stop(&socket)
    };
    let device = match VvuDevice::open(emu.transport()) {
        Ok(device) => device,
        Err(err) => {
            stop_emu();
            return Err(format!("emulated virtio-vhost-user device: {err}"));
        }
    };
    let mut server = match VhostServer::start_vvu(name, device, backend, reactor) {
        Ok(server) => server,
        Err(err) => {
            stop_emu();
            return Err(err.to_string());
        }
    };
    server.socket = socket.to_path_buf();
    server.on_stop = Some(StopHook(Box::new(stop_emu)));
    tracing::info!(controller = name, socket = %socket.display(), "emulated virtio-vhost-user device listening");
    Ok(server)
}

struct Control<T: VirtioPciTransport + 'static> {
    device: VvuDevice<T>,
    ctx: Ctx,
}

struct Ctx {
    name: String,
    backend: Arc<dyn DeviceBackend>,
    reactor: Arc<ReactorHandle>,
    shared: Arc<ServerShared>,
}

impl<T: VirtioPciTransport + 'static> Control<T> {
    fn run(mut self) {
        while !self.ctx.stopping() {
            let device = &mut self.device;
            match device.frontend_up() {
                Ok(true) => {}
                Ok(false) => {
                    let config = &device.interrupts().config;
                    let _ = config.wait(POLL);
                    let _ = config.consume();
                    continue;
                }
                Err(err) => {
                    tracing::error!(controller = %self.ctx.name, %err, "device unusable");
                    return;
                }
            }
            self.ctx.serve(&mut self.device);
        }
    }
}

impl Ctx {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn open<T: VirtioPciTransport + 'static>(
        &self,
        device: &VvuDevice<T>,
    ) -> Option<VvuSession<T>> {
        let id = DeviceId(NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed));
        // No backend channel on this transport (the device does not forward BACKEND_REQ).
        let channel = Arc::new(BackendChannel::default());
        let session = self.shared.open_session(
            &self.name,
            &self.backend,
            &self.reactor,
            id,
            None,
            &channel,
        )?;
        Some(VvuSession {
            session,
            id,
            calls: Vec::new(),
            doorbells: device.doorbells(),
            reply_ack: false,
        })
    }

    /// Serves the connected frontend until it goes away or breaks the protocol.
    fn serve<T: VirtioPciTransport + 'static>(&self, device: &mut VvuDevice<T>) {
        let Some(mut session) = self.open(device) else {
            // Refuse the frontend: the device drops it when the backend goes down.
            let _ = device.set_backend_up(false);
            let _ = device.set_backend_up(true);
            return;
        };
        tracing::info!(controller = %self.name, device = session.id.0, "frontend connected (virtio-vhost-user)");
        let mut fatal = false;
        while !self.stopping() {
            let message = match device.wait_message(POLL) {
                Ok(Some(message)) => message,
                Ok(None) => {
                    if !device.frontend_up().unwrap_or(false) {
                        break;
                    }
                    continue;
                }
                Err(err) => {
                    tracing::warn!(controller = %self.name, %err, "rxq");
                    fatal = true;
                    break;
                }
            };
            match session.handle(device, &message) {
                Ok(Some(reply)) => {
                    if let Err(err) = device.send_message(&reply) {
                        tracing::warn!(controller = %self.name, %err, "txq");
                        fatal = true;
                        break;
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(controller = %self.name, %err, "dropping the frontend");
                    fatal = true;
                    break;
                }
            }
        }
        self.shared.end_session(session.id, || {
            session.calls.clear();
            session.session.close();
        });
        if fatal || self.stopping() {
            // Clearing BACKEND_UP makes the device drop the frontend.
            let _ = device.set_backend_up(false);
        }
        if !self.stopping() {
            // A disconnect cleared the status bits: ready for the next frontend.
            let _ = device.set_backend_up(true);
        }
        tracing::info!(controller = %self.name, "frontend session ended (virtio-vhost-user)");
    }
}
