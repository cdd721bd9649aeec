//! A poll-mode thread's wake-up eventfd.
//!
//! A reactor that runs out of work while operations it submitted are being completed by other
//! threads (librbd's) would otherwise spin, yield its core to whatever else is runnable there, or
//! sleep for a fixed time, and see the completion late. Instead it installs a [`Waker`] as its
//! thread's waker; code that submits such operations on that thread takes the waker
//! ([`current`]), has the completing thread call [`Waker::wake`] after it queued the completion,
//! and counts what it expects ([`expect`], [`arrived`]); while anything is expected, the idle
//! reactor blocks on the waker and wakes as soon as a completion arrives.
//!
//! The eventfd is written only while its owner sleeps (or is about to): [`Waker::wake`] on the
//! completing thread is a fence and one load while the reactor polls, as QEMU's `aio_notify`
//! writes its notifier only when the loop announced `notify_me`. The owner announces the sleep
//! ([`Waker::prepare_sleep`]), then polls everything once more, and only then blocks
//! ([`Waker::sleep`]): a completion queued before the announcement is found by that last poll,
//! one queued after it writes the eventfd (both sides order their store before their load with
//! a sequentially consistent fence).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::EventFd;

/// A thread's wake-up eventfd with its "asleep" flag.
#[derive(Debug)]
pub struct Waker {
    fd: EventFd,
    sleeping: AtomicBool,
    /// Parties that wake the owner from other threads ([`Waker::add_source`]).
    sources: AtomicUsize,
}

impl Waker {
    /// A new waker whose owner is awake.
    pub fn new() -> Result<Self, crate::EventFdError> {
        Ok(Waker {
            fd: EventFd::new()?,
            sleeping: AtomicBool::new(false),
            sources: AtomicUsize::new(0),
        })
    }

    /// Another thread's work for the owner now completes by waking it (an rbd queue took the
    /// waker): until the matching [`Waker::remove_source`], the owner may block between its
    /// requests instead of spinning (the reactor's kick wait).
    pub fn add_source(&self) {
        self.sources.fetch_add(1, Ordering::Relaxed);
    }

    /// Undoes one [`Waker::add_source`] (the queue was dropped).
    pub fn remove_source(&self) {
        // A failed update means it was already 0; nothing to undo.
        let _ = self
            .sources
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Whether any party added itself with [`Waker::add_source`] and is still there.
    #[inline]
    pub fn has_sources(&self) -> bool {
        self.sources.load(Ordering::Relaxed) > 0
    }

    /// The eventfd, for a producer that can only write a descriptor itself (librbd's
    /// event-socket mode): it then writes on every completion, asleep or not.
    pub fn event_fd(&self) -> &EventFd {
        &self.fd
    }

    /// Called by another thread after it made work visible to the owner (queued a completion):
    /// writes the eventfd only if the owner announced that it sleeps.
    #[inline]
    pub fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            // A failed write leaves the owner to find the work when its wait times out.
            let _ = self.fd.signal();
        }
    }

    /// The owner is about to sleep: from now on [`Waker::wake`] writes the eventfd. The owner
    /// must look for work once more after this and before [`Waker::sleep`] (and call
    /// [`Waker::cancel_sleep`] if it finds some).
    #[inline]
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// The owner found work after [`Waker::prepare_sleep`] and stays awake.
    #[inline]
    pub fn cancel_sleep(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Whether the owner announced a sleep (for tests and statistics).
    pub fn is_sleeping(&self) -> bool {
        self.sleeping.load(Ordering::Relaxed)
    }

    /// Blocks until the waker is woken, one of `fds` becomes readable, or `timeout` passed;
    /// then the owner is awake again and the eventfd reset. Returns how many descriptors
    /// (the eventfd counted) were ready. `fds` is scratch space the caller keeps: its first
    /// entry is replaced by the eventfd's.
    pub fn sleep(&self, fds: &mut Vec<libc::pollfd>, timeout: Duration) -> io::Result<usize> {
        let own = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        match fds.first_mut() {
            Some(first) => *first = own,
            None => fds.push(own),
        }
        let result = poll_fds(fds, timeout);
        self.sleeping.store(false, Ordering::Relaxed);
        let ready = result?;
        if fds.first().is_some_and(|p| p.revents != 0) {
            self.fd.consume()?;
        }
        Ok(ready)
    }
}

/// `ppoll` on `fds` for at most `timeout`; an interrupted call counts as nothing ready.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    let count = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `fds` is a live, exclusively borrowed array of `count` pollfds; valid timespec; no
    // signal mask (null).
    let n = unsafe { libc::ppoll(fds.as_mut_ptr(), count, &ts, std::ptr::null()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(err)
        };
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// A pollfd entry waiting for `fd` to become readable.
pub fn readable(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

thread_local! {
    static WAKER: RefCell<Option<Arc<Waker>>> = const { RefCell::new(None) };
    static EXPECTED: Cell<usize> = const { Cell::new(0) };
}

/// Makes `waker` the calling thread's waker.
pub fn install(waker: Arc<Waker>) {
    WAKER.with(|w| *w.borrow_mut() = Some(waker));
}

/// The calling thread's waker, if it installed one.
pub fn current() -> Option<Arc<Waker>> {
    WAKER.with(|w| w.borrow().clone())
}

/// `n` more operations submitted from this thread will wake its waker when they complete.
pub fn expect(n: usize) {
    EXPECTED.with(|e| e.set(e.get().saturating_add(n)));
}

/// `n` of the expected completions were taken.
pub fn arrived(n: usize) {
    EXPECTED.with(|e| e.set(e.get().saturating_sub(n)));
}

/// Completions this thread still expects a wake-up for.
pub fn expected() -> usize {
    EXPECTED.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_wake_from_another_thread_ends_an_announced_sleep_early() {
        let waker = Arc::new(Waker::new().unwrap());
        install(Arc::clone(&waker));
        expect(2);
        arrived(1);
        assert_eq!(expected(), 1);
        let remote = current().unwrap();
        waker.prepare_sleep();
        let signaller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            remote.wake();
        });
        let mut fds = Vec::new();
        let started = Instant::now();
        assert_eq!(waker.sleep(&mut fds, Duration::from_secs(10)).unwrap(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!waker.is_sleeping());
        signaller.join().unwrap();
        // Consumed: the next sleep times out.
        waker.prepare_sleep();
        assert_eq!(waker.sleep(&mut fds, Duration::from_millis(5)).unwrap(), 0);
        arrived(5);
        assert_eq!(expected(), 0);
    }

    #[test]
    fn an_awake_owner_gets_no_eventfd_write_and_other_fds_end_a_sleep() {
        let waker = Waker::new().unwrap();
        // Not announced: nothing is written, so a later sleep is not cut short by it.
        waker.wake();
        assert_eq!(waker.event_fd().consume().unwrap(), 0);
        // Negative control: announced, the same call writes.
        waker.prepare_sleep();
        waker.wake();
        waker.cancel_sleep();
        assert_eq!(waker.event_fd().consume().unwrap(), 1);
        // Another descriptor (a queue's kick eventfd) ends the sleep too.
        let kick = EventFd::new().unwrap();
        kick.signal().unwrap();
        let mut fds = vec![readable(-1), readable(kick.as_raw_fd())];
        waker.prepare_sleep();
        assert_eq!(waker.sleep(&mut fds, Duration::from_secs(10)).unwrap(), 1);
        assert_ne!(fds[1].revents, 0);
        assert_eq!(fds[0].revents, 0);
    }
}
