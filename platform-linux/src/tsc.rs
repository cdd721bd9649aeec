//! A cheap clock for counting time on the data path: the CPU's time-stamp counter, as SPDK's
//! `spdk_get_ticks` reads it. On this project's x86-64 VMs one read costs about 20 ns against
//! about 80 ns for `Instant::now()` (`clock_gettime` through the vDSO), which matters when a
//! reactor reads it once per poll round. The counter runs at a constant rate on every CPU
//! rvhost targets (`constant_tsc`, `nonstop_tsc`); [`ticks_per_second`] measures that rate once
//! against the monotonic clock. Elsewhere than x86-64 the ticks are nanoseconds of the monotonic
//! clock.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long [`ticks_per_second`] measures the counter against the monotonic clock.
const CALIBRATION: Duration = Duration::from_millis(20);

/// The current tick count. Ticks only compare with ticks of the same process.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter and has no other effect; every x86-64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        monotonic_ns()
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Ticks per second, measured on the first call (which takes about 20 ms) and remembered.
pub fn ticks_per_second() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1_000_000_000;
        }
        let (start, start_ticks) = (Instant::now(), ticks());
        std::thread::sleep(CALIBRATION);
        let (elapsed, end_ticks) = (start.elapsed(), ticks());
        let nanos = elapsed.as_nanos().max(1);
        let rate = u128::from(end_ticks.wrapping_sub(start_ticks)) * 1_000_000_000 / nanos;
        u64::try_from(rate).unwrap_or(u64::MAX).max(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_at_the_measured_rate() {
        let rate = ticks_per_second();
        assert!(rate >= 1_000_000, "{rate} ticks per second");
        let (start, start_ticks) = (Instant::now(), ticks());
        std::thread::sleep(Duration::from_millis(50));
        let (elapsed, end_ticks) = (start.elapsed(), ticks());
        let measured = (end_ticks - start_ticks) as f64 / rate as f64;
        let real = elapsed.as_secs_f64();
        // A loaded machine may stretch either end by a scheduling delay, not more.
        assert!(
            (measured - real).abs() < 0.2 * real + 0.005,
            "{measured} s by ticks, {real} s by the clock"
        );
    }
}
