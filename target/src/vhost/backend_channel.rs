//! The backend channel of vhost-user (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`, once called the
//! slave channel): a second socket, handed over by the frontend in `SET_BACKEND_REQ_FD`, on which
//! the backend sends requests to the frontend. rvhost sends one: `CONFIG_CHANGE_MSG`, after a
//! bdev changed size, so that QEMU re-reads the config space (`GET_CONFIG`) and interrupts the
//! guest's driver with a configuration change.
//!
//! The `vhost` crate frames `SET_BACKEND_REQ_FD` itself and keeps the socket in a `Backend` that
//! cannot send this message, so the session's thread peeks at each message header before the
//! crate reads it: for `SET_BACKEND_REQ_FD` it peeks again with room for the descriptor, which
//! installs a duplicate of it here while the crate still receives its own.
//!
//! The message is sent without `NEED_REPLY`: QEMU answers a config change by sending
//! `GET_CONFIG` on the main connection, served by the session's thread, and nothing is gained by
//! also waiting for an acknowledgement.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use rustix::net::{
    recv, recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
};

/// `VHOST_USER_SET_BACKEND_REQ_FD` (frontend request code).
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (backend request code).
const CONFIG_CHANGE_MSG: u32 = 2;
/// Protocol version 1 in the header's flags.
const VERSION_1: u32 = 0x1;
/// Length of a vhost-user message header: request, flags, size (each a little-endian u32).
const HEADER_LEN: usize = 12;
/// How long a config-change message may take to write before the channel is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One session's backend channel, once the frontend handed it over.
#[derive(Debug, Default)]
pub struct BackendChannel {
    socket: Mutex<Option<UnixStream>>,
}

impl BackendChannel {
    /// Looks at the next message on `connection` without consuming it; if it is
    /// `SET_BACKEND_REQ_FD`, keeps a duplicate of the socket it carries. Blocks until a header
    /// arrived (or the connection closed, which the caller's next read reports).
    pub fn peek(&self, connection: &UnixStream) {
        let mut header = [0u8; HEADER_LEN];
        // Without room for ancillary data a peek installs no descriptor.
        match recv(
            connection,
            &mut header,
            RecvFlags::PEEK | RecvFlags::WAITALL,
        ) {
            Ok((_, n)) if n == HEADER_LEN => {}
            _ => return,
        }
        let code = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if code != SET_BACKEND_REQ_FD {
            return;
        }
        match peek_fd(connection) {
            Ok(Some(fd)) => {
                let socket = UnixStream::from(fd);
                if let Err(err) = socket.set_write_timeout(Some(WRITE_TIMEOUT)) {
                    tracing::warn!(%err, "backend channel: cannot set a write timeout");
                }
                *self.lock() = Some(socket);
                tracing::debug!("backend channel received");
            }
            Ok(None) => tracing::warn!("SET_BACKEND_REQ_FD without a descriptor"),
            Err(err) => tracing::warn!(%err, "backend channel: cannot peek at its descriptor"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.socket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the frontend handed a channel over.
    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Sends `CONFIG_CHANGE_MSG`: the frontend re-reads the config space and tells the guest.
    /// Returns `Ok(false)` if there is no channel (the frontend did not negotiate one); a channel
    /// that fails is dropped.
    pub fn config_changed(&self) -> io::Result<bool> {
        let mut guard = self.lock();
        let Some(socket) = guard.as_mut() else {
            return Ok(false);
        };
        let mut message = [0u8; HEADER_LEN];
        message[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        message[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // Size 0: the message has no payload.
        match socket.write_all(&message) {
            Ok(()) => Ok(true),
            Err(err) => {
                *guard = None;
                Err(err)
            }
        }
    }
}

/// Peeks at the next message with room for one descriptor; returns the duplicate the kernel
/// installed, if the message carries one.
fn peek_fd(connection: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut header = [0u8; HEADER_LEN];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        connection,
        &mut [io::IoSliceMut::new(&mut header)],
        &mut control,
        RecvFlags::PEEK | RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        tracing::warn!("SET_BACKEND_REQ_FD carried more than one descriptor");
    }
    let mut found = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for fd in fds {
                // The first one is the channel; any other is closed when dropped.
                if found.is_none() {
                    found = Some(fd);
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_peeked_channel_carries_config_change_messages_and_the_message_stays_queued() {
        let (frontend, backend) = UnixStream::pair().unwrap();
        let (channel_frontend, channel_backend) = UnixStream::pair().unwrap();
        // The frontend sends SET_BACKEND_REQ_FD with the channel's backend end.
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        let fds = [std::os::fd::AsFd::as_fd(&channel_backend)];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &frontend,
            &[io::IoSlice::new(&header)],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        drop(channel_backend);

        let channel = BackendChannel::default();
        assert!(!channel.is_open());
        assert!(!channel.config_changed().unwrap());
        channel.peek(&backend);
        assert!(channel.is_open());
        assert!(channel.config_changed().unwrap());
        let mut got = [0u8; HEADER_LEN];
        (&channel_frontend).read_exact(&mut got).unwrap();
        assert_eq!(&got[0..4], &CONFIG_CHANGE_MSG.to_le_bytes());
        assert_eq!(&got[4..8], &VERSION_1.to_le_bytes());
        assert_eq!(&got[8..12], &0u32.to_le_bytes());

        // The message itself is still there for the vhost crate, with its descriptor.
        let mut again = [0u8; HEADER_LEN];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            &backend,
            &mut [io::IoSliceMut::new(&mut again)],
            &mut control,
            RecvFlags::empty(),
        )
        .unwrap();
        assert_eq!(msg.bytes, HEADER_LEN);
        assert_eq!(again, header);
        assert_eq!(control.drain().count(), 1);
    }

    #[test]
    fn other_messages_leave_no_channel() {
        let (mut frontend, backend) = UnixStream::pair().unwrap();
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&1u32.to_le_bytes());
        frontend.write_all(&header).unwrap();
        let channel = BackendChannel::default();
        channel.peek(&backend);
        assert!(!channel.is_open());
    }
}
