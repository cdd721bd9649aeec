//! Model-checks the SPSC ring with loom: every interleaving of a producer and a consumer thread
//! (within loom's bounds) delivers every item once, in order, and drops leftovers exactly once.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p rvhost-platform-linux --release --test spsc_loom`;
//! without `--cfg loom` this file is empty.
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use rvhost_platform_linux::spsc;

#[test]
fn items_arrive_once_and_in_order() {
    loom::model(|| {
        let (mut tx, mut rx) = spsc::channel::<usize>(2);
        let producer = loom::thread::spawn(move || {
            let mut next = 0;
            while next < 3 {
                if tx.try_push(next).is_ok() {
                    next += 1;
                } else {
                    loom::thread::yield_now();
                }
            }
        });
        let mut expected = 0;
        while expected < 3 {
            match rx.try_pop() {
                Some(v) => {
                    assert_eq!(v, expected);
                    expected += 1;
                }
                None => loom::thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(rx.try_pop(), None);
    });
}

struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn leftovers_dropped_exactly_once_whichever_half_goes_last() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut tx, mut rx) = spsc::channel::<Tracked>(2);
        let counter = Arc::clone(&drops);
        let producer = loom::thread::spawn(move || {
            for _ in 0..2 {
                let _ = tx.try_push(Tracked(Arc::clone(&counter)));
            }
        });
        let popped = rx.try_pop();
        drop(rx);
        producer.join().unwrap();
        drop(popped);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    });
}
