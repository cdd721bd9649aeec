//! Interrupt coalescing with SPDK's semantics (`vhost_controller_set_coalescing`).
//!
//! Each queue measures its completion rate over a stats interval ([`STATS_INTERVAL`], SPDK's 10
//! ms). While the rate is above the controller's `iops_threshold`, a call (the guest's
//! interrupt) is followed by a quiet period of `delay_base_us × (iops − threshold) / threshold`
//! (SPDK's formula: at twice the threshold the delay is the base), during which completions are
//! published on the used ring at once but not signalled; the first call after it covers them all.
//! At or under the threshold there is no delay. As in SPDK, each measurement also lets a held
//! call go, so a busy queue calls at least once per stats interval however long its delay.
//! `delay_base_us` 0 turns coalescing off, which is the default (SPDK's too: it shows
//! `delay_base_us` 0 and `iops_threshold` 60000).
//!
//! A held call is never lost: a device with held calls checks them every poll round, busy or
//! idle, and a queue that stops, drains or is removed sends it at once. The driver's notification
//! suppression still decides whether a call is needed at all (EVENT_IDX's `used_event`, or
//! `VRING_AVAIL_F_NO_INTERRUPT`): a held call is decided when it is due, over everything
//! published since the last call.
//!
//! Unlike SPDK, the rate is measured per queue over the time that really passed since the last
//! measurement (SPDK's counter adds up across intervals until it passes the threshold, and its
//! one stats timer per session serves whichever queue signals first), and the delay never
//! exceeds [`MAX_DELAY_BASE_US`]. A measurement under the last rate does not replace it at once:
//! the rate used is the higher of the measurement and the last rate halved for each interval
//! passed, so one quiet interval (a guest whose threads moved to another queue's vCPU for a
//! moment) halves the delay instead of ending it and letting the next burst call at every
//! completion, while a queue quiet for a few intervals drops to its real rate. SPDK keeps the
//! last delay as long as a queue stays under the threshold.

use std::time::Duration;

/// How long each queue's completion rate is measured over (SPDK's
/// `SPDK_VHOST_STATS_CHECK_INTERVAL_MS`).
pub const STATS_INTERVAL: Duration = Duration::from_millis(10);
/// `iops_threshold` of a controller nobody set one for (SPDK's
/// `SPDK_VHOST_VQ_IOPS_COALESCING_THRESHOLD`).
pub const DEFAULT_IOPS_THRESHOLD: u32 = 60_000;
/// The lowest `iops_threshold`: one request per stats interval (SPDK refuses a threshold that
/// rounds to no request per interval).
pub const MIN_IOPS_THRESHOLD: u32 = 100;
/// The longest `delay_base_us`, and the longest delay it can scale to. SPDK refuses a base
/// whose tick count does not fit in 32 bits (one to two seconds on current CPUs); a fixed bound
/// keeps a saved configuration valid on every machine.
pub const MAX_DELAY_BASE_US: u32 = 1_000_000;

/// A controller's coalescing parameters, as `vhost_controller_set_coalescing` sets them and
/// `vhost_get_controllers` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescingSettings {
    delay_base_us: u32,
    iops_threshold: u32,
}

/// Why coalescing parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoalescingError {
    /// `delay_base_us` over [`MAX_DELAY_BASE_US`].
    #[error("delay_base_us {0} is over the limit of {MAX_DELAY_BASE_US} (1 s)")]
    DelayTooLong(u32),
    /// `iops_threshold` under [`MIN_IOPS_THRESHOLD`].
    #[error(
        "iops_threshold {0} is too low; the minimum is {MIN_IOPS_THRESHOLD} \
         (one request per 10 ms stats interval)"
    )]
    ThresholdTooLow(u32),
}

impl Default for CoalescingSettings {
    fn default() -> Self {
        CoalescingSettings {
            delay_base_us: 0,
            iops_threshold: DEFAULT_IOPS_THRESHOLD,
        }
    }
}

impl CoalescingSettings {
    /// Checked parameters. As in SPDK, the threshold is checked even when `delay_base_us` 0
    /// turns coalescing off.
    pub fn new(delay_base_us: u32, iops_threshold: u32) -> Result<Self, CoalescingError> {
        if delay_base_us > MAX_DELAY_BASE_US {
            return Err(CoalescingError::DelayTooLong(delay_base_us));
        }
        if iops_threshold < MIN_IOPS_THRESHOLD {
            return Err(CoalescingError::ThresholdTooLow(iops_threshold));
        }
        Ok(CoalescingSettings {
            delay_base_us,
            iops_threshold,
        })
    }

    /// The base delay in microseconds (0: off).
    pub fn delay_base_us(&self) -> u32 {
        self.delay_base_us
    }

    /// Completions per second per queue above which calls are delayed.
    pub fn iops_threshold(&self) -> u32 {
        self.iops_threshold
    }

    /// Whether calls are coalesced at all.
    pub fn enabled(&self) -> bool {
        self.delay_base_us != 0
    }

    /// The settings in a reactor's clock (`ticks_per_second` of
    /// `rvhost_platform_linux::tsc`), or `None` if coalescing is off. Made on the control side,
    /// where measuring the clock's rate may take a while.
    pub fn in_ticks(&self, ticks_per_second: u64) -> Option<CoalescingTicks> {
        if !self.enabled() {
            return None;
        }
        let hz = ticks_per_second.max(1);
        let per_us = |us: u64| {
            let ticks = u128::from(us) * u128::from(hz) / 1_000_000;
            u64::try_from(ticks).unwrap_or(u64::MAX)
        };
        let interval_us = u64::try_from(STATS_INTERVAL.as_micros()).unwrap_or(u64::MAX);
        Some(CoalescingTicks {
            delay_base: per_us(u64::from(self.delay_base_us)),
            max_delay: per_us(u64::from(MAX_DELAY_BASE_US)),
            iops_threshold: u64::from(self.iops_threshold),
            interval: per_us(interval_us).max(1),
            ticks_per_second: hz,
        })
    }
}

/// [`CoalescingSettings`] in time-stamp counter ticks, as a device applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescingTicks {
    delay_base: u64,
    max_delay: u64,
    iops_threshold: u64,
    interval: u64,
    ticks_per_second: u64,
}

/// One queue's coalescing state: its last measurement, its current delay and its last call.
/// Plain fields, written by the queue's reactor only.
#[derive(Debug, Clone, Copy)]
pub(super) struct Coalescer {
    settings: CoalescingTicks,
    /// When the rate was last measured, and the queue's completion count then.
    measured_at: u64,
    completed_at: u64,
    /// The completion rate the delay was computed from (per second).
    rate: u128,
    /// The quiet period after a call, from the last measurement.
    delay: u64,
    /// When the last call was sent.
    called_at: u64,
}

impl Coalescer {
    /// A queue starting at tick `now` with `completed` requests completed so far.
    pub(super) fn new(settings: CoalescingTicks, now: u64, completed: u64) -> Self {
        Coalescer {
            settings,
            measured_at: now,
            completed_at: completed,
            rate: 0,
            delay: 0,
            called_at: now,
        }
    }

    /// Whether a call for completions published but not yet signalled may go out at tick
    /// `now`, the queue having completed `completed` requests since it started: once the delay
    /// since the last call passed, or when a stats interval has passed (the rate is measured
    /// again then, and the call goes, as SPDK's stats update lets it).
    #[inline]
    pub(super) fn call_due(&mut self, now: u64, completed: u64) -> bool {
        let since_measure = now.wrapping_sub(self.measured_at);
        if since_measure >= self.settings.interval {
            self.measure(since_measure, completed);
            self.measured_at = now;
            self.completed_at = completed;
            return true;
        }
        now.wrapping_sub(self.called_at) >= self.delay
    }

    /// A call went out at tick `now`: the next waits for the delay.
    #[inline]
    pub(super) fn called(&mut self, now: u64) {
        self.called_at = now;
    }

    /// Sets the delay from the completions of the last `elapsed` ticks.
    fn measure(&mut self, elapsed: u64, completed: u64) {
        let s = &self.settings;
        let count = u128::from(completed.wrapping_sub(self.completed_at));
        let measured = count * u128::from(s.ticks_per_second) / u128::from(elapsed.max(1));
        let intervals = (elapsed / s.interval).clamp(1, 127) as u32;
        let iops = measured.max(self.rate >> intervals);
        self.rate = iops;
        let threshold = u128::from(s.iops_threshold.max(1));
        self.delay = if iops > threshold {
            let delay = u128::from(s.delay_base) * (iops - threshold) / threshold;
            u64::try_from(delay).unwrap_or(u64::MAX).min(s.max_delay)
        } else {
            0
        };
    }

    /// The current quiet period after a call, in ticks.
    #[cfg(test)]
    pub(super) fn delay(&self) -> u64 {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock of one tick per microsecond keeps the arithmetic readable.
    const HZ: u64 = 1_000_000;

    fn ticks(delay_base_us: u32, iops_threshold: u32) -> CoalescingTicks {
        CoalescingSettings::new(delay_base_us, iops_threshold)
            .unwrap()
            .in_ticks(HZ)
            .unwrap()
    }

    #[test]
    fn parameters_are_checked_as_spdk_checks_them() {
        assert_eq!(CoalescingSettings::default().delay_base_us(), 0);
        assert_eq!(CoalescingSettings::default().iops_threshold(), 60_000);
        assert!(!CoalescingSettings::default().enabled());
        assert!(CoalescingSettings::new(0, 60_000)
            .unwrap()
            .in_ticks(HZ)
            .is_none());
        assert_eq!(
            CoalescingSettings::new(0, 99),
            Err(CoalescingError::ThresholdTooLow(99)),
            "the threshold is checked even when turning coalescing off"
        );
        assert_eq!(
            CoalescingSettings::new(1_000_001, 100),
            Err(CoalescingError::DelayTooLong(1_000_001))
        );
        let max = CoalescingSettings::new(MAX_DELAY_BASE_US, 100).unwrap();
        assert!(max.enabled());
        assert_eq!(max.iops_threshold(), 100);
    }

    #[test]
    fn under_the_threshold_every_call_goes_out_at_once() {
        let mut c = Coalescer::new(ticks(100, 10_000), 0, 0);
        // 50 completions in the 10 ms interval: 5000 IOPS.
        let mut now = 0;
        for completed in 1..=60u64 {
            now += 200;
            assert!(c.call_due(now, completed), "at {now}");
            c.called(now);
        }
        assert_eq!(c.delay(), 0);
    }

    #[test]
    fn the_delay_scales_with_the_rate_above_the_threshold() {
        // 100 µs base, 10k IOPS threshold.
        let mut c = Coalescer::new(ticks(100, 10_000), 0, 0);
        // 300 completions in 10 ms = 30k IOPS: delay = 100 × (30k − 10k) / 10k = 200 µs.
        assert!(c.call_due(10_000, 300));
        assert_eq!(c.delay(), 200);
        c.called(10_000);
        assert!(!c.call_due(10_100, 305), "held inside the delay");
        assert!(!c.call_due(10_199, 310));
        assert!(c.call_due(10_200, 311), "due once the delay passed");
        c.called(10_200);
        // Twice the threshold over the next interval: the delay is the base.
        assert!(c.call_due(20_000, 300 + 200));
        assert_eq!(c.delay(), 100);
        c.called(20_000);
        assert!(!c.call_due(20_050, 505));
        assert!(c.call_due(20_100, 510));
    }

    #[test]
    fn a_quiet_spell_ends_the_delay() {
        let mut c = Coalescer::new(ticks(500, 1_000), 0, 0);
        // 100k IOPS against 1k: 500 µs × 99.
        assert!(c.call_due(10_000, 1_000));
        assert_eq!(c.delay(), 49_500);
        c.called(10_000);
        assert!(!c.call_due(15_000, 1_001));
        // One quiet interval halves the rate (100k -> 50k IOPS), it does not end the delay.
        assert!(c.call_due(25_000, 1_002));
        assert_eq!(c.delay(), 500 * 49);
        c.called(25_000);
        // The queue stays quiet: the next measurement, whenever it comes, sees a low rate over
        // the whole time since the last one (20 intervals: the last rate halved 20 times is
        // nothing), and the held call goes at once.
        assert!(c.call_due(225_000, 1_003));
        assert_eq!(c.delay(), 0);
    }

    #[test]
    fn a_dip_under_the_threshold_for_one_interval_keeps_coalescing() {
        // 100 ms base, 100 IOPS threshold: 1600 IOPS -> 1 s (capped); one interval with a
        // single completion (100 IOPS, under the threshold) halves the rate to 800 IOPS: a
        // 700 ms delay, where a fresh measurement alone would have had none.
        let mut c = Coalescer::new(ticks(100_000, 100), 0, 0);
        assert!(c.call_due(10_000, 16));
        assert_eq!(c.delay(), 1_000_000);
        c.called(10_000);
        assert!(c.call_due(20_000, 17));
        assert_eq!(c.delay(), 700_000);
        c.called(20_000);
        assert!(!c.call_due(20_500, 18), "the next completion is still held");
    }

    #[test]
    fn a_busy_queue_calls_at_least_once_per_stats_interval() {
        let mut c = Coalescer::new(ticks(500, 1_000), 0, 0);
        assert!(c.call_due(10_000, 1_000));
        assert_eq!(c.delay(), 49_500);
        c.called(10_000);
        assert!(
            !c.call_due(19_999, 1_900),
            "inside the delay and the interval"
        );
        // Still 100k IOPS, still a 49.5 ms delay, but the interval ended: the call goes.
        assert!(c.call_due(20_000, 2_000));
        assert_eq!(c.delay(), 49_500);
        c.called(20_000);
        assert!(!c.call_due(25_000, 2_500));
    }

    #[test]
    fn the_delay_is_capped() {
        let mut c = Coalescer::new(ticks(MAX_DELAY_BASE_US, 100), 0, 0);
        assert!(c.call_due(10_000, 1_000_000));
        assert_eq!(c.delay(), u64::from(MAX_DELAY_BASE_US));
    }

    #[test]
    fn ticks_follow_the_clock_rate() {
        let t = CoalescingSettings::new(70, 60_000)
            .unwrap()
            .in_ticks(2_000_000_000)
            .unwrap();
        assert_eq!(t.delay_base, 140_000);
        assert_eq!(t.interval, 20_000_000);
        assert_eq!(t.iops_threshold, 60_000);
    }
}
