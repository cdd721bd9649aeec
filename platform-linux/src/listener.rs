//! Unix-socket listeners for the control plane (vhost-user controllers, JSON-RPC) that can be
//! stopped without touching the socket's path, and that never take over or delete a socket that
//! belongs to another process.
//!
//! Waking a blocked `accept` by connecting to the path works only while the path still leads to
//! this listener: once another process has replaced the socket (or someone deleted it), the
//! connection goes elsewhere and the listener thread never wakes, which hangs shutdown. Here the
//! accepting thread waits in `poll(2)` on the listening socket and an eventfd, and stopping
//! signals the eventfd. The socket file is removed on the way out only if it is still the one
//! this listener bound (same device and inode).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::eventfd::EventFd;

/// Errors binding a control socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A live process accepts connections on the path.
    #[error("{} is in use: another process is listening on it", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Any other failure (permissions, missing directory, eventfd).
    #[error("{}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Who may connect to a control socket. Applied to the socket file after `bind(2)` and before
/// `listen(2)`, so no connection is ever accepted under other permissions (until `listen` a
/// connect is refused whatever the file's mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Group owner of the socket file; `None`: the process's group.
    pub group: Option<u32>,
    /// Permission bits of the socket file (connecting needs write permission); `None`: what the
    /// umask leaves.
    pub mode: Option<u32>,
}

/// Binds a Unix stream socket at `path`, applies `access` to the file, then listens.
fn bind_listening(path: &Path, access: &SocketAccess) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is a plain C struct for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty, too long or containing NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket(2) just returned, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a live, initialised sockaddr_un and `len` (family, path, NUL) is within
    // it; `socket` is open for the call.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    let listening = apply_access(path, access).and_then(|()| {
        // SAFETY: listen(2) on the bound socket `socket` owns.
        if unsafe { libc::listen(socket.as_raw_fd(), libc::SOMAXCONN) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    });
    if let Err(err) = listening {
        let _ = std::fs::remove_file(path);
        return Err(err);
    }
    Ok(UnixListener::from(socket))
}

fn apply_access(path: &Path, access: &SocketAccess) -> io::Result<()> {
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Identity of the socket file a listener created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

fn file_id(path: &Path) -> io::Result<FileId> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok(FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// State shared by a listener and its [`ListenerHandle`]s.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    id: FileId,
    wake: EventFd,
}

/// A listening Unix socket whose `accept` can be interrupted from another thread.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    shared: Arc<Shared>,
}

/// Stops a [`ControlListener`] and removes its socket file (if it is still its own).
#[derive(Debug, Clone)]
pub struct ListenerHandle {
    shared: Arc<Shared>,
}

impl ControlListener {
    /// Binds `path`. A stale socket left by a process that is gone is replaced; a socket that a
    /// live process still accepts on is not (`InUse`), nor is a file that is not a socket.
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        Self::bind_with(path, &SocketAccess::default())
    }

    /// [`ControlListener::bind`], with the socket file's group and mode set before it listens.
    pub fn bind_with(path: &Path, access: &SocketAccess) -> Result<Self, ListenError> {
        let io_err = |source| ListenError::Io {
            path: path.to_owned(),
            source,
        };
        if Self::check_free(path)? {
            // A stale socket: nobody accepts on it any more.
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let listener = bind_listening(path, access).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                // Another process bound it between our check and our bind.
                ListenError::InUse(path.to_owned())
            } else {
                io_err(e)
            }
        })?;
        let id = file_id(path).map_err(io_err)?;
        let wake = EventFd::new().map_err(|e| io_err(io::Error::other(e)))?;
        Ok(ControlListener {
            listener,
            shared: Arc::new(Shared {
                path: path.to_owned(),
                id,
                wake,
            }),
        })
    }

    /// Checks, without changing anything, that `path` can be bound: `Ok(true)` if a stale socket
    /// is there (which [`ControlListener::bind`] replaces), `Ok(false)` if nothing is; an error if
    /// a live process listens on it or it is not a socket.
    pub fn check_free(path: &Path) -> Result<bool, ListenError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    Err(ListenError::InUse(path.to_owned()))
                } else {
                    Ok(true)
                }
            }
            Ok(_) => Err(ListenError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ListenError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// A handle that stops this listener from any thread.
    pub fn handle(&self) -> ListenerHandle {
        ListenerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Waits for the next connection; `Ok(None)` once [`ListenerHandle::stop`] has been called
    /// (then and for every later call).
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            if self.stopped()? {
                return Ok(None);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.shared.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live local array of two initialised pollfds and the length
            // passed matches it; both descriptors are owned by `self` and stay open for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if fds[1].revents != 0 {
                continue; // `stopped` reports it at the top of the loop.
            }
            if fds[0].revents != 0 {
                return self.listener.accept().map(|(stream, _)| Some(stream));
            }
        }
    }

    /// Whether a stop was requested. The eventfd is read but never reset: once stopped, stays so.
    fn stopped(&self) -> io::Result<bool> {
        let mut fds = [libc::pollfd {
            fd: self.shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: as in `accept`: one live, initialised pollfd on a descriptor `self` owns; a zero
        // timeout makes this a non-blocking check.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fds[0].revents != 0)
    }
}

impl ListenerHandle {
    /// Makes the listener's `accept` return `Ok(None)`, now and from then on.
    pub fn stop(&self) {
        if let Err(err) = self.shared.wake.signal() {
            tracing::error!(socket = %self.shared.path.display(), %err, "cannot wake the listener");
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Deletes the socket file if it is still the one the listener bound; one that another
    /// process has put at the path since is left alone.
    pub fn remove_socket(&self) {
        let path = &self.shared.path;
        match file_id(path) {
            Ok(id) if id == self.shared.id => {
                if let Err(err) = std::fs::remove_file(path) {
                    tracing::warn!(socket = %path.display(), %err, "removing socket");
                }
            }
            Ok(_) => {
                tracing::warn!(socket = %path.display(), "socket was replaced by another process; leaving it")
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(socket = %path.display(), %err, "checking socket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("rvhost-listener-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("sock")
    }

    #[test]
    fn accepts_then_stops_without_using_the_path() {
        let path = scratch("stop");
        let listener = ControlListener::bind(&path).unwrap();
        let handle = listener.handle();
        let thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(mut stream) = listener.accept().unwrap() {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).unwrap();
                got.push(byte[0]);
            }
            got
        });
        UnixStream::connect(&path).unwrap().write_all(&[7]).unwrap();
        UnixStream::connect(&path).unwrap().write_all(&[9]).unwrap();
        // The socket path no longer leads to the listener; stopping must not depend on it.
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        handle.stop();
        assert_eq!(thread.join().unwrap(), vec![7, 9]);
    }

    #[test]
    fn refuses_a_live_socket_and_replaces_a_stale_one() {
        let path = scratch("live");
        let first = ControlListener::bind(&path).unwrap();
        assert!(matches!(
            ControlListener::bind(&path),
            Err(ListenError::InUse(_))
        ));
        // Dropping the listener closes the socket but leaves the file: a stale socket.
        drop(first);
        assert!(path.exists());
        let second = ControlListener::bind(&path).unwrap();
        let handle = second.handle();
        handle.stop();
        assert!(second.accept().unwrap().is_none());
        assert!(second.accept().unwrap().is_none(), "stays stopped");
        handle.remove_socket();
        assert!(!path.exists());
    }

    #[test]
    fn refuses_a_file_that_is_not_a_socket() {
        let path = scratch("file");
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            ControlListener::bind(&path),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn leaves_a_socket_another_listener_put_at_the_path() {
        let path = scratch("replaced");
        let ours = ControlListener::bind(&path).unwrap();
        let handle = ours.handle();
        // Someone removes our file and binds their own socket at the same path.
        std::fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        handle.stop();
        handle.remove_socket();
        assert!(path.exists(), "the other listener's socket must survive");
        drop(theirs);
    }
}
