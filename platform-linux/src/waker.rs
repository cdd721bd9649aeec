//! A poll-mode thread's wake-up eventfd.
//!
//! A reactor that runs out of work while operations it submitted are being completed by other
//! threads (librbd's) would otherwise spin, yield its core to whatever else is runnable there, or
//! sleep for a fixed time, and see the completion late. Instead it installs an eventfd as its
//! thread's waker; code that submits such operations on that thread takes the waker
//! ([`current`]), has the completing thread signal it, and counts what it expects ([`expect`],
//! [`arrived`]); while anything is expected, the idle reactor blocks on the eventfd and wakes as
//! soon as a completion arrives.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use crate::EventFd;

thread_local! {
    static WAKER: RefCell<Option<Arc<EventFd>>> = const { RefCell::new(None) };
    static EXPECTED: Cell<usize> = const { Cell::new(0) };
}

/// Makes `waker` the calling thread's waker.
pub fn install(waker: Arc<EventFd>) {
    WAKER.with(|w| *w.borrow_mut() = Some(waker));
}

/// The calling thread's waker, if it installed one.
pub fn current() -> Option<Arc<EventFd>> {
    WAKER.with(|w| w.borrow().clone())
}

/// `n` more operations submitted from this thread will signal its waker when they complete.
pub fn expect(n: usize) {
    EXPECTED.with(|e| e.set(e.get().saturating_add(n)));
}

/// `n` of the expected completions were taken.
pub fn arrived(n: usize) {
    EXPECTED.with(|e| e.set(e.get().saturating_sub(n)));
}

/// Completions this thread still expects a signal for.
pub fn expected() -> usize {
    EXPECTED.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_signal_from_another_thread_ends_the_wait_early() {
        let waker = Arc::new(EventFd::new().unwrap());
        install(Arc::clone(&waker));
        expect(2);
        arrived(1);
        assert_eq!(expected(), 1);
        let remote = current().unwrap();
        let signaller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            remote.signal().unwrap();
        });
        let started = Instant::now();
        assert!(waker.wait(Duration::from_secs(10)).unwrap());
        assert!(started.elapsed() < Duration::from_secs(5));
        signaller.join().unwrap();
        // Consumed: the next wait times out.
        assert!(!waker.wait(Duration::from_millis(5)).unwrap());
        arrived(5);
        assert_eq!(expected(), 0);
    }
}
