//! Eventfd wrapper: new and adopted descriptors.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rvhost_platform_linux::{EventFd, EventFdError};

#[test]
fn signal_and_consume() {
    let efd = EventFd::new().unwrap();
    assert_eq!(
        efd.consume().unwrap(),
        0,
        "nothing signalled yet, and no blocking"
    );
    efd.signal().unwrap();
    efd.signal().unwrap();
    efd.add(5).unwrap();
    assert_eq!(efd.consume().unwrap(), 7);
    assert_eq!(efd.consume().unwrap(), 0);
}

#[test]
fn saturated_counter_is_not_an_error() {
    let efd = EventFd::new().unwrap();
    efd.add(u64::MAX - 1).unwrap();
    // The counter is at its maximum: a further signal would block, which counts as delivered.
    efd.signal().unwrap();
    assert_eq!(efd.consume().unwrap(), u64::MAX - 1);
}

#[test]
fn clones_share_the_counter() {
    let kick = EventFd::new().unwrap();
    let other = kick.try_clone().unwrap();
    assert_ne!(kick.as_raw_fd(), other.as_raw_fd());
    std::thread::spawn(move || other.signal().unwrap())
        .join()
        .unwrap();
    assert_eq!(kick.consume().unwrap(), 1);
}

fn blocking_eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

#[test]
fn adopted_fds_become_nonblocking() {
    // A frontend may send a blocking eventfd; a poll-mode reactor must never block on it.
    let fd = blocking_eventfd();
    let efd = EventFd::from_owned_fd(fd).unwrap();
    // SAFETY: F_GETFL on a valid descriptor.
    let flags = unsafe { libc::fcntl(efd.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    assert_eq!(efd.consume().unwrap(), 0);
    efd.signal().unwrap();
    assert_eq!(efd.consume().unwrap(), 1);
}

#[test]
fn non_eventfds_are_refused() {
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let raw = file.as_raw_fd();
    assert!(
        matches!(EventFd::from_owned_fd(file.into()), Err(EventFdError::NotAnEventFd(fd)) if fd == raw)
    );
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(matches!(
        EventFd::from_owned_fd(a.into()),
        Err(EventFdError::NotAnEventFd(_))
    ));
}
