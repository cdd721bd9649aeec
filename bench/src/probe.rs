//! How long one cache line takes to go from one core to another and back.
//!
//! A vhost-user data path at queue depth is bound by cache-line transfers between the target's
//! and the initiator's cores (avail ring, request headers, used ring, status bytes), so its IOPS
//! move with this latency. On a virtual machine the latency is not a constant: the host places
//! the vCPUs on physical cores that share a cache or do not, and moves them. On the machine
//! `bench/README.md` describes, the round trip switches between ~150 ns and ~500 ns for seconds
//! at a time, and every poll-mode figure follows it (rvhost-perf's in-process loopback drops from
//! ~13M to ~5M IOPS). Benchmarks therefore record it next to every figure.
//!
//! The probe: one thread per core, pinned; the first stores a counter into one cache line, the
//! second copies it into another, the first waits for the copy. Each round trip moves each line
//! across once in each direction, as a request and its completion do.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::PerfError;

/// Round trips per timed batch (a batch takes tens of microseconds).
const BATCH: u64 = 256;
/// Spins after which a waiting thread yields: never reached when the two threads have a core
/// each (a round trip is a few hundred spins), it keeps the probe from stalling for whole
/// scheduler slices when they share one.
const SPINS_BEFORE_YIELD: u32 = 1 << 16;
/// How long the first thread waits for the second to start spinning.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A 128-byte aligned counter, so the two never share a line (nor an adjacent-line prefetch pair).
#[repr(align(128))]
struct Line(AtomicU64);

/// What the probe measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CoreLatency {
    /// The core that starts each round trip.
    pub cpu_a: usize,
    /// The core that answers.
    pub cpu_b: usize,
    /// Median over batches of the mean round trip in a batch, in nanoseconds.
    pub round_trip_ns: f64,
    /// Fastest batch.
    pub min_ns: f64,
    /// Slowest batch (preemption shows here, not in the median).
    pub max_ns: f64,
    /// Batches timed.
    pub batches: usize,
}

/// Bounces a cache line between `cpu_a` and `cpu_b` for about `time`. Both threads are pinned
/// and spin; the calling thread's own affinity is left alone.
pub fn core_round_trip(
    cpu_a: usize,
    cpu_b: usize,
    time: Duration,
) -> Result<CoreLatency, PerfError> {
    let ping = Line(AtomicU64::new(0));
    let pong = Line(AtomicU64::new(0));
    let ready = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let echo = scope.spawn(|| -> Result<(), PerfError> {
            rvhost_platform_linux::cpu::pin_current_thread(cpu_b)
                .map_err(|source| PerfError::Pin { cpu: cpu_b, source })?;
            ready.store(true, Ordering::Release);
            let mut seen = 0;
            let mut spins = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let v = ping.0.load(Ordering::Acquire);
                if v != seen {
                    seen = v;
                    spins = 0;
                    pong.0.store(v, Ordering::Release);
                }
                spins += 1;
                if spins > SPINS_BEFORE_YIELD {
                    spins = 0;
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
            Ok(())
        });
        let measured = (|| -> Result<Vec<f64>, PerfError> {
            rvhost_platform_linux::cpu::pin_current_thread(cpu_a)
                .map_err(|source| PerfError::Pin { cpu: cpu_a, source })?;
            let started = Instant::now();
            while !ready.load(Ordering::Acquire) {
                if started.elapsed() > START_TIMEOUT {
                    return Err(PerfError::Options(format!(
                        "the probe thread on CPU {cpu_b} did not start"
                    )));
                }
                std::thread::yield_now();
            }
            let mut batches = Vec::new();
            let mut n = 0u64;
            let start = Instant::now();
            while start.elapsed() < time || batches.is_empty() {
                let t0 = Instant::now();
                for _ in 0..BATCH {
                    n += 1;
                    ping.0.store(n, Ordering::Release);
                    let mut spins = 0u32;
                    while pong.0.load(Ordering::Acquire) != n {
                        spins += 1;
                        if spins > SPINS_BEFORE_YIELD {
                            spins = 0;
                            std::thread::yield_now();
                        }
                        std::hint::spin_loop();
                    }
                }
                batches.push(t0.elapsed().as_nanos() as f64 / BATCH as f64);
            }
            Ok(batches)
        })();
        stop.store(true, Ordering::Relaxed);
        let echoed = echo
            .join()
            .map_err(|_| PerfError::Options("probe thread panicked".into()))?;
        let mut batches = measured?;
        echoed?;
        batches.sort_by(f64::total_cmp);
        let median = batches[batches.len() / 2];
        Ok(CoreLatency {
            cpu_a,
            cpu_b,
            round_trip_ns: median,
            min_ns: batches[0],
            max_ns: batches[batches.len() - 1],
            batches: batches.len(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_measures_a_positive_round_trip_on_one_core() {
        // Both threads on CPU 0 still complete (the answer comes when the echo thread runs), so
        // this works on one-core CI machines; the figure is then a context switch, not a line
        // transfer, and only its sanity is checked.
        let r = core_round_trip(0, 0, Duration::from_millis(20)).unwrap();
        assert!(r.batches >= 1);
        assert!(r.min_ns > 0.0 && r.min_ns <= r.round_trip_ns && r.round_trip_ns <= r.max_ns);
    }
}
