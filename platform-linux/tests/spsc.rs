//! The SPSC control ring under real concurrency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rvhost_platform_linux::spsc;

#[test]
fn capacity_rounds_up_and_full_ring_refuses() {
    let (mut tx, mut rx) = spsc::channel::<u32>(5);
    assert_eq!(tx.capacity(), 8);
    assert_eq!(rx.capacity(), 8);
    assert_eq!(spsc::channel::<u8>(0).0.capacity(), 1);
    assert_eq!(rx.try_pop(), None);
    for i in 0..8 {
        tx.try_push(i).unwrap();
    }
    assert_eq!(tx.try_push(99), Err(99), "full ring hands the value back");
    assert_eq!(tx.len(), 8);
    assert_eq!(rx.len(), 8);
    assert_eq!(rx.try_pop(), Some(0));
    tx.try_push(8).unwrap();
    let drained: Vec<u32> = std::iter::from_fn(|| rx.try_pop()).collect();
    assert_eq!(drained, (1..=8).collect::<Vec<_>>());
    assert!(rx.is_empty());
    assert!(tx.is_empty());
}

#[test]
fn wraps_around_many_times() {
    let (mut tx, mut rx) = spsc::channel::<usize>(4);
    for round in 0..10_000 {
        tx.try_push(round * 3).unwrap();
        tx.try_push(round * 3 + 1).unwrap();
        tx.try_push(round * 3 + 2).unwrap();
        assert_eq!(rx.try_pop(), Some(round * 3));
        assert_eq!(rx.try_pop(), Some(round * 3 + 1));
        assert_eq!(rx.try_pop(), Some(round * 3 + 2));
    }
    assert_eq!(rx.try_pop(), None);
}

#[test]
fn two_threads_millions_of_items_in_order_without_loss() {
    const N: u64 = 5_000_000;
    let (mut tx, mut rx) = spsc::channel::<u64>(1024);
    let producer = std::thread::spawn(move || {
        let mut next = 0;
        while next < N {
            match tx.try_push(next) {
                Ok(()) => next += 1,
                Err(_) => std::hint::spin_loop(),
            }
        }
    });
    let mut expected = 0u64;
    let mut sum = 0u64;
    while expected < N {
        match rx.try_pop() {
            Some(v) => {
                assert_eq!(v, expected, "out of order or lost");
                sum = sum.wrapping_add(v);
                expected += 1;
            }
            None => std::hint::spin_loop(),
        }
    }
    producer.join().unwrap();
    assert_eq!(rx.try_pop(), None, "nothing extra");
    assert_eq!(sum, N * (N - 1) / 2);
    assert!(rx.is_abandoned());
}

#[test]
fn boxed_messages_and_replies_round_trip() {
    // Control message in, reply out: the pattern the reactors use.
    let (mut to_reactor, mut reactor_in) = spsc::channel::<Box<String>>(16);
    let (mut reactor_out, mut from_reactor) = spsc::channel::<Box<String>>(16);
    let reactor = std::thread::spawn(move || {
        let mut handled = 0;
        while handled < 100_000 {
            if let Some(msg) = reactor_in.try_pop() {
                let mut reply = Box::new(format!("ack {msg}"));
                loop {
                    match reactor_out.try_push(reply) {
                        Ok(()) => break,
                        Err(back) => {
                            reply = back;
                            std::hint::spin_loop();
                        }
                    }
                }
                handled += 1;
            }
        }
    });
    let mut sent = 0;
    let mut received = 0;
    while received < 100_000 {
        if sent < 100_000 && to_reactor.try_push(Box::new(sent.to_string())).is_ok() {
            sent += 1;
        }
        if let Some(reply) = from_reactor.try_pop() {
            assert_eq!(*reply, format!("ack {received}"));
            received += 1;
        }
    }
    reactor.join().unwrap();
}

/// Counts drops so the test can see that items left in the ring are dropped exactly once.
struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn items_left_in_the_ring_are_dropped_once() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (mut tx, mut rx) = spsc::channel(8);
    for _ in 0..6 {
        assert!(tx.try_push(Tracked(Arc::clone(&drops))).is_ok());
    }
    drop(rx.try_pop());
    drop(rx.try_pop());
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    drop(tx);
    assert!(rx.is_abandoned());
    drop(rx);
    assert_eq!(drops.load(Ordering::SeqCst), 6);
}

#[test]
fn halves_are_send() {
    fn assert_send<T: Send>() {}
    assert_send::<spsc::Producer<Box<u8>>>();
    assert_send::<spsc::Consumer<Box<u8>>>();
}
