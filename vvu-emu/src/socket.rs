//! Reading vhost-user messages, with the file descriptors attached to them, from the frontend.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::layout::{HEADER_LEN, MAX_PAYLOAD};

/// One message as received: header and payload bytes, and its descriptors.
#[derive(Debug)]
pub(crate) struct RawMessage {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl RawMessage {
    pub fn request(&self) -> u32 {
        le32(&self.bytes, 0)
    }

    pub fn flags(&self) -> u32 {
        le32(&self.bytes, 4)
    }

    pub fn payload(&self) -> &[u8] {
        self.bytes.get(HEADER_LEN..).unwrap_or(&[])
    }
}

/// The little-endian `u32` at `at`, or 0 past the end.
pub(crate) fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

/// The little-endian `u64` at `at`, or 0 past the end.
pub(crate) fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// Reads one message; `None` when the frontend closed the connection.
pub(crate) fn recv_message(stream: &mut UnixStream) -> io::Result<Option<RawMessage>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds: [RawFd; 32] = [-1; 32];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the only iovec points at `header`, which is live and writable for its length.
    let (got, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds
        .iter()
        .take(nfds)
        // SAFETY: the kernel installed these descriptors for us; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    if let Some(rest) = header.get_mut(got..) {
        stream.read_exact(rest)?;
    }
    let size = le32(&header, 8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("payload of {size} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut bytes = vec![0u8; HEADER_LEN + size];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    stream.read_exact(&mut bytes[HEADER_LEN..])?;
    Ok(Some(RawMessage { bytes, fds }))
}
