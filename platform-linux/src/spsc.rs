//! A bounded, lock-free single-producer single-consumer ring for control messages into each reactor
//! and replies back.
//!
//! The classic Lamport ring: the producer owns `tail`, the consumer owns `head`, each publishes its
//! index with `Release` and reads the other's with `Acquire`. Each half also caches the other's last
//! seen index, so in the common case a push or pop touches only its own cache line. Indices run
//! freely (wrapping `usize`) and are reduced modulo the power-of-two capacity, so a full ring and
//! an empty ring are told apart without wasting a slot.

use std::fmt;
use std::mem::MaybeUninit;

use crossbeam_utils::CachePadded;

use self::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};

/// The synchronisation primitives, swapped for loom's when model-checking (`--cfg loom`).
#[cfg(not(loom))]
mod sync {
    pub(super) use std::sync::atomic::{AtomicUsize, Ordering};
    pub(super) use std::sync::Arc;

    /// `std`'s `UnsafeCell` with loom's access API, so the ring's code is the same under both.
    #[derive(Debug)]
    pub(super) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(super) fn new(value: T) -> Self {
            UnsafeCell(std::cell::UnsafeCell::new(value))
        }

        pub(super) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(loom)]
mod sync {
    pub(super) use loom::cell::UnsafeCell;
    pub(super) use loom::sync::atomic::{AtomicUsize, Ordering};
    pub(super) use loom::sync::Arc;
}

struct Ring<T> {
    /// Next slot the consumer reads; written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Next slot the producer writes; written only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// `capacity - 1`; capacity is a power of two.
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: a slot is accessed by exactly one side at a time: the producer writes slots in
// `[tail, head + capacity)` and the consumer reads slots in `[head, tail)`, and the Release/Acquire
// pair on `tail` (and on `head`) orders each write before the read of the same slot (and each read
// before its reuse). Values of `T` move from one thread to the other, hence `T: Send`.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: see `Sync`; the ring owns values of `T`, which may be sent.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> Ring<T> {
    /// Runs `f` on the slot for free-running index `index`.
    fn with_slot<R>(&self, index: usize, f: impl FnOnce(*mut MaybeUninit<T>) -> R) -> Option<R> {
        // `mask + 1 == slots.len()`, so the slot always exists; `get` keeps this panic-free.
        self.slots
            .get(index & self.mask)
            .map(|cell| cell.with_mut(f))
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // Both halves are gone (we hold the last `Arc`), so nothing races these loads.
        let mut head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        while head != tail {
            // SAFETY: slots in `[head, tail)` hold initialised values that nobody else will read;
            // each is dropped exactly once here.
            self.with_slot(head, |slot| unsafe { (*slot).assume_init_drop() });
            head = head.wrapping_add(1);
        }
    }
}

/// The sending half. `Send`, not `Clone`: there is exactly one producer.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    /// Local copy of `tail` (only we write it).
    tail: usize,
    /// The consumer's `head` as last seen; refreshed only when the ring looks full.
    cached_head: usize,
}

/// The receiving half. `Send`, not `Clone`: there is exactly one consumer.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    /// Local copy of `head` (only we write it).
    head: usize,
    /// The producer's `tail` as last seen; refreshed only when the ring looks empty.
    cached_tail: usize,
}

/// Creates a ring holding up to `capacity` items (rounded up to a power of two, at least 1).
///
/// All memory is allocated here; pushing and popping never allocate.
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << (usize::BITS - 1));
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let ring = Arc::new(Ring {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        mask: capacity - 1,
        slots,
    });
    (
        Producer {
            ring: Arc::clone(&ring),
            tail: 0,
            cached_head: 0,
        },
        Consumer {
            ring,
            head: 0,
            cached_tail: 0,
        },
    )
}

impl<T> Producer<T> {
    /// Appends `value`, or gives it back if the ring is full.
    pub fn try_push(&mut self, value: T) -> Result<(), T> {
        let capacity = self.ring.mask + 1;
        if self.tail.wrapping_sub(self.cached_head) >= capacity {
            self.cached_head = self.ring.head.load(Ordering::Acquire);
            if self.tail.wrapping_sub(self.cached_head) >= capacity {
                return Err(value);
            }
        }
        // SAFETY: `tail - head < capacity`, so the slot is free: the consumer finished with it
        // (its `head` store was Release, our load Acquire) and will not touch it until we publish
        // the new `tail` below.
        self.ring.with_slot(self.tail, |slot| unsafe {
            (*slot).write(value);
        });
        self.tail = self.tail.wrapping_add(1);
        self.ring.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Number of items the ring can hold.
    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }

    /// Items queued and not yet popped (a snapshot).
    pub fn len(&self) -> usize {
        self.tail
            .wrapping_sub(self.ring.head.load(Ordering::Acquire))
    }

    /// Whether the consumer has popped everything pushed so far (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the consumer half has been dropped (nobody will ever pop again).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.ring) == 1
    }
}

impl<T> Consumer<T> {
    /// Takes the oldest item, if any.
    pub fn try_pop(&mut self) -> Option<T> {
        if self.head == self.cached_tail {
            self.cached_tail = self.ring.tail.load(Ordering::Acquire);
            if self.head == self.cached_tail {
                return None;
            }
        }
        // SAFETY: `head != tail`, so the slot holds a value the producer published (Release store of
        // `tail`, our Acquire load). We move it out exactly once; the producer will not reuse the
        // slot until it sees our new `head`.
        let value = self
            .ring
            .with_slot(self.head, |slot| unsafe { (*slot).assume_init_read() })?;
        self.head = self.head.wrapping_add(1);
        self.ring.head.store(self.head, Ordering::Release);
        Some(value)
    }

    /// Number of items the ring can hold.
    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }

    /// Items waiting to be popped (a snapshot).
    pub fn len(&self) -> usize {
        self.ring
            .tail
            .load(Ordering::Acquire)
            .wrapping_sub(self.head)
    }

    /// Whether nothing is waiting (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the producer half has been dropped (once empty, nothing more will arrive).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.ring) == 1
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}
