//! Eventfds: vhost-user kick (guest → backend) and call (backend → guest) notifications.
//!
//! A small wrapper of our own rather than vmm-sys-util's `EventFd`: we need to adopt fds received
//! over the vhost-user socket (checking they really are eventfds and making them nonblocking),
//! treat a saturated counter on `signal` as success, and report errors in this crate's types; that
//! is a few lines of libc, not worth another dependency and its error conventions.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Errors creating or adopting an eventfd.
#[derive(Debug, thiserror::Error)]
pub enum EventFdError {
    /// `eventfd(2)` failed.
    #[error("eventfd failed: {0}")]
    Create(io::Error),
    /// The received descriptor is not an eventfd.
    #[error("file descriptor {0} is not an eventfd")]
    NotAnEventFd(RawFd),
    /// `fcntl` (to make the fd nonblocking) failed.
    #[error("configuring file descriptor {fd} failed: {source}")]
    Configure {
        /// The descriptor.
        fd: RawFd,
        /// The OS error.
        source: io::Error,
    },
}

/// A nonblocking eventfd.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with counter 0 (nonblocking, close-on-exec).
    pub fn new() -> Result<Self, EventFdError> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(EventFdError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(EventFd { fd })
    }

    /// Adopts a descriptor received from a frontend: checks that it is an eventfd and makes it
    /// nonblocking (on the shared file description, which frontends expect of kick/call fds).
    pub fn from_owned_fd(fd: OwnedFd) -> Result<Self, EventFdError> {
        let raw = fd.as_raw_fd();
        // An eventfd's fdinfo has an `eventfd-count:` line; nothing else's does. Checking it keeps a
        // confused or hostile frontend from making us write into a file or socket.
        // Without /proc (a bare chroot) the check is skipped rather than failing every session.
        match std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")) {
            Ok(info) if info.lines().any(|l| l.starts_with("eventfd-count:")) => {}
            Ok(_) => return Err(EventFdError::NotAnEventFd(raw)),
            Err(e) => {
                tracing::warn!(fd = raw, error = %e, "cannot check that a received fd is an eventfd")
            }
        }
        // SAFETY: F_GETFL on a descriptor we own; no pointers.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(EventFdError::Configure {
                fd: raw,
                source: io::Error::last_os_error(),
            });
        }
        if flags & libc::O_NONBLOCK == 0 {
            // SAFETY: F_SETFL on a descriptor we own; no pointers.
            if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
                return Err(EventFdError::Configure {
                    fd: raw,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(EventFd { fd })
    }

    /// Adds 1 to the counter, waking whoever polls the fd. A counter already at its maximum
    /// (`EAGAIN`) means a wake-up is pending anyway, so that is success.
    pub fn signal(&self) -> io::Result<()> {
        self.add(1)
    }

    /// Adds `value` to the counter (`value` must be below `u64::MAX`).
    pub fn add(&self, value: u64) -> io::Result<()> {
        let buf = value.to_ne_bytes();
        loop {
            // SAFETY: writes 8 bytes from a live local buffer to a descriptor we own.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(()),
                _ if n >= 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short eventfd write",
                    ))
                }
                _ => return Err(err),
            }
        }
    }

    /// Reads and resets the counter; `Ok(0)` if it was zero (nothing signalled since last time).
    pub fn consume(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        loop {
            // SAFETY: reads at most 8 bytes into a live local buffer from a descriptor we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 8 {
                return Ok(u64::from_ne_bytes(buf));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ if n >= 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short eventfd read",
                    ))
                }
                _ => return Err(err),
            }
        }
    }

    /// Blocks until the counter is non-zero or `timeout` passed, then resets the counter;
    /// returns whether it had been signalled.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pollfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: one valid pollfd for our open fd, a valid timespec, no signal mask (null).
        let n = unsafe { libc::ppoll(&mut pollfd, 1, &ts, std::ptr::null()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            };
        }
        Ok(n > 0 && self.consume()? > 0)
    }

    /// A second handle to the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(EventFd {
            fd: self.fd.try_clone()?,
        })
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.fd
    }
}
