//! Rate limits of a bdev (`bdev_set_qos_limit`), with SPDK's semantics.
//!
//! A bdev may limit read and write I/Os per second (`rw_ios_per_sec`), read and write bytes per
//! second together (`rw_mbytes_per_sec`), reads alone (`r_mbytes_per_sec`) and writes alone
//! (`w_mbytes_per_sec`). Other kinds (unmap, flush, write-zeroes) are never limited. As in SPDK
//! (`lib/bdev/bdev.c`), time is cut into timeslices of 1 ms; each limit has a quota per timeslice
//! (its rate over a thousand, at least one I/O or 512 bytes), from which every I/O takes its share.
//! An I/O that finds a quota used up waits in its channel's queue (it is never failed) until a
//! later timeslice refills the quota; an I/O larger than what is left may overdraw it once, the
//! overdraft being taken from the next timeslices.
//!
//! Unlike SPDK, whose poller runs every timeslice on a dedicated core and drops what a timeslice
//! left unused, the quota here is a token bucket refilled from the time elapsed: a refill adds a
//! timeslice's quota for every timeslice that ended since the last one, however late it comes,
//! and keeps what was not used, up to [`BURST_TIMESLICES`] timeslices' worth. So a reactor that was
//! not scheduled for tens of milliseconds (a loaded host), or a guest that was not, makes the lost
//! time up at once instead of losing it, while a bdev idle for long gets no more than that bound
//! ahead. Over any span of time a bdev gets at most the limit's share of the span plus
//! [`BURST_TIMESLICES`] timeslices' worth (and one I/O's overdraft).
//!
//! The quotas are one set of counters per bdev, shared by every channel of it, so the limits hold
//! for the bdev as a whole however many controllers and reactors use it. There is no lock: a
//! channel takes its share with an atomic subtraction, and the refill at a timeslice boundary is
//! done by whichever channel first notices the boundary passed (it wins a compare-and-swap on the
//! timeslice's start). SPDK refills from a poller on one thread; here the channels that have I/O
//! waiting refill at their polls, and a channel whose I/O finds the quota empty refills before
//! queuing it. While a bdev has no limit, its channels pay one relaxed load per submission.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use rvhost_platform_linux::tsc;

use super::IoKind;

/// SPDK's timeslice (`SPDK_BDEV_QOS_TIMESLICE_IN_USEC`), in microseconds.
pub const TIMESLICE_USEC: u64 = 1000;
/// The smallest I/O quota of a timeslice (`SPDK_BDEV_QOS_MIN_IO_PER_TIMESLICE`).
const MIN_IOS_PER_TIMESLICE: u64 = 1;
/// The smallest byte quota of a timeslice (`SPDK_BDEV_QOS_MIN_BYTE_PER_TIMESLICE`).
const MIN_BYTES_PER_TIMESLICE: u64 = 512;
/// I/O limits are multiples of this (`SPDK_BDEV_QOS_MIN_IOS_PER_SEC`).
pub const MIN_IOS_PER_SEC: u64 = 1000;
/// Byte limits are multiples of this (`SPDK_BDEV_QOS_MIN_BYTES_PER_SEC`): whole MiB.
pub const MIN_BYTES_PER_SEC: u64 = 1024 * 1024;
/// The largest MiB/s limit whose byte rate fits 64 bits (`SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC`).
pub const MAX_MBYTES_PER_SEC: u64 = u64::MAX / (1024 * 1024);
/// Timeslices' worth of quota a limit may bank (see the module documentation): 100 ms at the limit.
///
/// The bound trades two errors. A reactor or guest that was not scheduled for longer than this
/// loses the rest of the pause: on two cores shared by a TCG guest and other work (load 5-10) the
/// guest QoS check saw limited seconds 20-25 % short with a bound of 50 ms, so pauses of 100 ms
/// and more do happen. A bdev idle for long then loaded runs this much ahead of its limit: 100 ms
/// is at most 10 % of any one-second count (what `iostat` and the guest QoS check print per
/// second) and 2 % of the guest check's 5-second phases, whose bound is 10 %. A whole second would
/// let one second after an idle spell read twice the limit.
pub const BURST_TIMESLICES: u64 = 100;

/// The limits, in SPDK's order (`enum spdk_bdev_qos_rate_limit_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Reads and writes per second.
    RwIos,
    /// Bytes read and written per second.
    RwBytes,
    /// Bytes read per second.
    ReadBytes,
    /// Bytes written per second.
    WriteBytes,
}

/// Every limit kind, in SPDK's order.
pub const LIMIT_KINDS: [LimitKind; 4] = [
    LimitKind::RwIos,
    LimitKind::RwBytes,
    LimitKind::ReadBytes,
    LimitKind::WriteBytes,
];

impl LimitKind {
    /// The name SPDK's RPC and `assigned_rate_limits` give it.
    pub fn rpc_name(self) -> &'static str {
        match self {
            LimitKind::RwIos => "rw_ios_per_sec",
            LimitKind::RwBytes => "rw_mbytes_per_sec",
            LimitKind::ReadBytes => "r_mbytes_per_sec",
            LimitKind::WriteBytes => "w_mbytes_per_sec",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// What an I/O of `kind` moving `bytes` takes from this limit's quota (0: not limited by it).
    #[inline]
    fn cost(self, kind: IoKind, bytes: u64) -> u64 {
        match (self, kind) {
            (LimitKind::RwIos, IoKind::Read | IoKind::Write) => 1,
            (LimitKind::RwBytes, IoKind::Read | IoKind::Write) => bytes,
            (LimitKind::ReadBytes, IoKind::Read) => bytes,
            (LimitKind::WriteBytes, IoKind::Write) => bytes,
            _ => 0,
        }
    }
}

/// Limits as the RPC takes them and `assigned_rate_limits` reports them: I/Os per second and
/// MiB per second, 0 for no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits(pub [u64; 4]);

impl RateLimits {
    /// The value of `kind`.
    pub fn get(&self, kind: LimitKind) -> u64 {
        self.0[kind.index()]
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.0.iter().any(|&l| l != 0)
    }
}

/// A limit as SPDK stores it after `spdk_bdev_set_qos_rate_limits`' adjustments: MiB/s above
/// [`MAX_MBYTES_PER_SEC`] lowered to it, I/O rates rounded up to a multiple of
/// [`MIN_IOS_PER_SEC`]. Returns the value in the RPC's unit and whether it was adjusted.
pub fn adjust_limit(kind: LimitKind, value: u64) -> (u64, bool) {
    match kind {
        LimitKind::RwIos => {
            let rest = value % MIN_IOS_PER_SEC;
            if rest == 0 {
                (value, false)
            } else {
                // Rounding up cannot overflow past the largest multiple below u64::MAX by much;
                // saturate to the largest multiple instead.
                let up = value
                    .checked_add(MIN_IOS_PER_SEC - rest)
                    .unwrap_or(u64::MAX - u64::MAX % MIN_IOS_PER_SEC);
                (up, true)
            }
        }
        _ if value > MAX_MBYTES_PER_SEC => (MAX_MBYTES_PER_SEC, true),
        _ => (value, false),
    }
}

/// One limit's quota.
#[derive(Debug, Default)]
struct Quota {
    /// The quota of a whole timeslice (I/Os or bytes); 0 while the limit is not set.
    per_timeslice: AtomicU64,
    /// What is left of this timeslice's quota; below zero after an overdraft.
    remaining: AtomicI64,
}

impl Quota {
    /// Takes `cost` if anything is left (SPDK's `bdev_qos_rw_queue_io`); `false` means wait.
    #[inline]
    fn take(&self, cost: u64) -> bool {
        if cost == 0 || self.per_timeslice.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        let before = self.remaining.fetch_sub(cost, Ordering::Relaxed);
        if before > 0 {
            return true;
        }
        self.remaining.fetch_add(cost, Ordering::Relaxed);
        false
    }

    fn give_back(&self, cost: u64) {
        if cost != 0 && self.per_timeslice.load(Ordering::Relaxed) != 0 {
            let cost = i64::try_from(cost).unwrap_or(i64::MAX);
            self.remaining.fetch_add(cost, Ordering::Relaxed);
        }
    }
}

/// A bdev's rate limits and quotas, shared by its channels (see the module documentation).
#[derive(Debug)]
pub struct BdevQos {
    /// Whether any limit is set: the one thing a submission reads while none is.
    enabled: AtomicBool,
    /// The limits in the RPC's units, for `assigned_rate_limits` and `save_config`.
    limits: [AtomicU64; 4],
    quotas: [Quota; 4],
    /// The tick the current timeslice started at.
    timeslice_start: AtomicU64,
    /// Ticks per timeslice.
    timeslice_ticks: u64,
    /// Timeslices' worth a quota may bank ([`BURST_TIMESLICES`]; tests change it).
    burst_timeslices: u64,
    /// I/Os that had to wait for a quota, ever (for monitoring).
    queued: AtomicU64,
}

impl Default for BdevQos {
    fn default() -> Self {
        let ticks = tsc::ticks_per_second().saturating_mul(TIMESLICE_USEC) / 1_000_000;
        Self {
            enabled: AtomicBool::new(false),
            limits: Default::default(),
            quotas: Default::default(),
            timeslice_start: AtomicU64::new(0),
            timeslice_ticks: ticks.max(1),
            burst_timeslices: BURST_TIMESLICES,
            queued: AtomicU64::new(0),
        }
    }
}

impl BdevQos {
    /// Whether any limit is set.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The limits in force (0: none).
    pub fn limits(&self) -> RateLimits {
        RateLimits(std::array::from_fn(|i| {
            self.limits[i].load(Ordering::Relaxed)
        }))
    }

    /// I/Os that waited for a quota since the bdev was created.
    pub fn queued_total(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Sets the limits `changes` names (`None` keeps a limit as it is, `Some(0)` removes it),
    /// already adjusted by [`adjust_limit`]. Takes effect at the channels' next submission or
    /// poll; a new quota starts with a full timeslice.
    pub fn set_limits(&self, changes: [Option<u64>; 4]) {
        for kind in LIMIT_KINDS {
            let Some(value) = changes[kind.index()] else {
                continue;
            };
            let quota = &self.quotas[kind.index()];
            let per_timeslice = match kind {
                LimitKind::RwIos => {
                    (value.saturating_mul(TIMESLICE_USEC) / 1_000_000).max(MIN_IOS_PER_TIMESLICE)
                }
                _ => (value
                    .saturating_mul(MIN_BYTES_PER_SEC)
                    .saturating_mul(TIMESLICE_USEC)
                    / 1_000_000)
                    .max(MIN_BYTES_PER_TIMESLICE),
            };
            let per_timeslice = if value == 0 { 0 } else { per_timeslice };
            self.limits[kind.index()].store(value, Ordering::Relaxed);
            quota.remaining.store(
                i64::try_from(per_timeslice).unwrap_or(i64::MAX),
                Ordering::Relaxed,
            );
            quota.per_timeslice.store(per_timeslice, Ordering::Relaxed);
        }
        self.timeslice_start.store(tsc::ticks(), Ordering::Relaxed);
        let any = self.limits().any();
        self.enabled.store(any, Ordering::Release);
    }

    /// Takes the quota of an I/O of `kind` moving `bytes` from every limit, or nothing if one of
    /// them has none left (then the I/O waits). Refills the quotas first when a timeslice ended.
    pub fn admit(&self, kind: IoKind, bytes: u64) -> bool {
        self.take(kind, bytes) || (self.refill(tsc::ticks()) && self.take(kind, bytes))
    }

    /// Counts an I/O that had to wait.
    pub fn count_queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self, kind: IoKind, bytes: u64) -> bool {
        for (taken, limit) in LIMIT_KINDS.iter().enumerate() {
            if !self.quotas[limit.index()].take(limit.cost(kind, bytes)) {
                for earlier in &LIMIT_KINDS[..taken] {
                    self.quotas[earlier.index()].give_back(earlier.cost(kind, bytes));
                }
                return false;
            }
        }
        true
    }

    /// Starts the timeslices that ended by `now` (SPDK's `bdev_channel_poll_qos`, made up for
    /// late calls): each quota gains a timeslice's worth per timeslice passed, an overdraft is
    /// paid from it, and what is left unused stays, up to [`BURST_TIMESLICES`] timeslices' worth.
    /// Only the caller that moves the timeslice's start does it; returns whether a timeslice had
    /// ended (the quota may then have grown, by this call or a racing one).
    pub fn refill(&self, now: u64) -> bool {
        let start = self.timeslice_start.load(Ordering::Relaxed);
        let passed = now.saturating_sub(start) / self.timeslice_ticks;
        if passed == 0 {
            return false;
        }
        let new_start = start.wrapping_add(passed.wrapping_mul(self.timeslice_ticks));
        if self
            .timeslice_start
            .compare_exchange(start, new_start, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // Another channel refilled; its quota is there to take.
            return true;
        }
        for quota in &self.quotas {
            let per_timeslice = quota.per_timeslice.load(Ordering::Relaxed);
            if per_timeslice == 0 {
                continue;
            }
            let gain = i64::try_from(per_timeslice.saturating_mul(passed)).unwrap_or(i64::MAX);
            let cap = i64::try_from(per_timeslice.saturating_mul(self.burst_timeslices))
                .unwrap_or(i64::MAX);
            // Takes racing with this only move `remaining` down; the update retries over them.
            // A quota already above the cap (a limit lowered) is left to drain, never raised.
            let _ = quota
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    Some(left.saturating_add(gain).min(cap).max(left))
                });
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_adjusted_as_spdk_does() {
        assert_eq!(adjust_limit(LimitKind::RwIos, 2000), (2000, false));
        assert_eq!(adjust_limit(LimitKind::RwIos, 1500), (2000, true));
        assert_eq!(adjust_limit(LimitKind::RwIos, 1), (1000, true));
        assert_eq!(adjust_limit(LimitKind::RwIos, 0), (0, false));
        assert_eq!(
            adjust_limit(LimitKind::RwIos, u64::MAX),
            (u64::MAX - u64::MAX % 1000, true)
        );
        assert_eq!(adjust_limit(LimitKind::RwBytes, 10), (10, false));
        assert_eq!(
            adjust_limit(LimitKind::WriteBytes, u64::MAX),
            (MAX_MBYTES_PER_SEC, true)
        );
    }

    #[test]
    fn a_timeslice_admits_its_quota_then_queues_until_refilled() {
        let qos = BdevQos::default();
        // 2000 I/Os per second: 2 per timeslice.
        qos.set_limits([Some(2000), None, None, None]);
        assert!(qos.enabled());
        let start = qos.timeslice_start.load(Ordering::Relaxed);
        assert!(qos.take(IoKind::Read, 4096));
        assert!(qos.take(IoKind::Write, 4096));
        assert!(!qos.take(IoKind::Read, 4096));
        // Not limited: unmaps and flushes.
        assert!(qos.take(IoKind::Unmap, 1 << 20));
        assert!(qos.take(IoKind::Flush, 0));
        // Within the timeslice nothing refills.
        assert!(!qos.refill(start + qos.timeslice_ticks - 1));
        assert!(!qos.take(IoKind::Read, 4096));
        assert!(qos.refill(start + qos.timeslice_ticks));
        assert!(qos.take(IoKind::Read, 4096));
        assert!(qos.take(IoKind::Read, 4096));
        assert!(!qos.take(IoKind::Read, 4096));
        // A long pause banks a bounded number of timeslices' quota.
        assert!(qos.refill(start + 1000 * qos.timeslice_ticks));
        let mut admitted = 0;
        while qos.take(IoKind::Read, 512) {
            admitted += 1;
        }
        assert_eq!(admitted, 2 * BURST_TIMESLICES);
        // 0 removes the limit.
        qos.set_limits([Some(0), None, None, None]);
        assert!(!qos.enabled());
        assert!((0..100).all(|_| qos.take(IoKind::Read, 4096)));
    }

    #[test]
    fn byte_limits_overdraw_once_and_count_only_their_kinds() {
        let qos = BdevQos::default();
        // 1 MiB/s of writes: 1048 bytes per timeslice.
        qos.set_limits([None, None, None, Some(1)]);
        let start = qos.timeslice_start.load(Ordering::Relaxed);
        // A 4 KiB write overdraws the quota, the next one waits.
        assert!(qos.take(IoKind::Write, 4096));
        assert!(!qos.take(IoKind::Write, 512));
        // Reads are not limited by a write limit.
        assert!(qos.take(IoKind::Read, 1 << 20));
        // The overdraft (4096 - 1048) takes the next two timeslices too.
        assert!(qos.refill(start + qos.timeslice_ticks));
        assert!(!qos.take(IoKind::Write, 512));
        assert!(qos.refill(start + 3 * qos.timeslice_ticks));
        assert!(qos.take(IoKind::Write, 512));
    }

    #[test]
    fn a_refused_io_gives_back_what_other_limits_gave_it() {
        let qos = BdevQos::default();
        qos.set_limits([Some(1000), None, Some(1), None]);
        // The read takes the I/O quota (1) and overdraws the read bytes.
        assert!(qos.take(IoKind::Read, 8192));
        let start = qos.timeslice_start.load(Ordering::Relaxed);
        assert!(qos.refill(start + qos.timeslice_ticks));
        // The I/O quota is back to 1 but the read bytes are still overdrawn: refused, and the
        // I/O quota it took is returned, so a write (not read-limited) gets it.
        assert!(!qos.take(IoKind::Read, 512));
        assert!(qos.take(IoKind::Write, 512));
        assert!(!qos.take(IoKind::Write, 512));
    }

    /// A fake-clock reactor polling a channel of `qos` at the given milliseconds after the limit
    /// was set (at tick `start`), with a guest that keeps `depth` I/Os of `bytes` in flight: each poll refills, then
    /// admits what the quota allows of the `depth` waiting I/Os (admitted ones complete within the
    /// poll and the guest submits them again before the next). Returns the I/Os admitted.
    fn reactor(
        (qos, start): (&BdevQos, u64),
        polls: impl IntoIterator<Item = u64>,
        depth: u64,
        bytes: u64,
    ) -> u64 {
        let mut admitted = 0;
        for ms in polls {
            qos.refill(start + ms * qos.timeslice_ticks);
            let mut this_poll = 0;
            while this_poll < depth && qos.take(IoKind::Read, bytes) {
                this_poll += 1;
            }
            admitted += this_poll;
        }
        admitted
    }

    /// Polls every millisecond of one second but for a stall of 50 ms at the start of every
    /// 200 ms: a quarter of the second without a poll, as a reactor descheduled on a loaded host.
    fn stalled_second() -> impl Iterator<Item = u64> {
        (0..=1000).filter(|ms| !(100..150).contains(&(ms % 200)))
    }

    /// A bdev whose quotas bank `burst` timeslices, limited by `changes`, and the tick they were
    /// set at.
    fn limited(burst: u64, changes: [Option<u64>; 4]) -> (BdevQos, u64) {
        let qos = BdevQos {
            burst_timeslices: burst,
            ..BdevQos::default()
        };
        qos.set_limits(changes);
        let start = qos.timeslice_start.load(Ordering::Relaxed);
        (qos, start)
    }

    #[test]
    fn reactor_stalls_of_50_ms_are_made_up() {
        // 2000 I/Os per second, 32 in flight: a second's count is 2000 (and the first
        // timeslice's quota): every 51 ms poll gap is made up.
        let (qos, start) = limited(BURST_TIMESLICES, [Some(2000), None, None, None]);
        let got = reactor((&qos, start), stalled_second(), 32, 4096);
        assert_eq!(got, 2002, "I/Os in the stalled second");
        // The same by bytes: 8 MiB/s of 4 KiB reads is 2048 a second.
        let (qos, start) = limited(BURST_TIMESLICES, [None, Some(8), None, None]);
        let got = reactor((&qos, start), stalled_second(), 32, 4096);
        assert!(
            (2048..=2050).contains(&got),
            "{got} reads of 4 KiB in the stalled second"
        );
        // Negative control: making up at most 8 timeslices (the bound before) loses most of each
        // stall, and the check above sees it: the rate sags more than 20 %.
        let (qos, start) = limited(8, [Some(2000), None, None, None]);
        let got = reactor((&qos, start), stalled_second(), 32, 4096);
        assert!(got < 1600, "{got} I/Os with 8 timeslices made up");
    }

    #[test]
    fn an_idle_bdev_banks_no_more_than_the_burst() {
        // Idle for 2 s after the limit is set, then loaded for a second, polled every ms.
        let loaded = || 2000..3000;
        let (qos, start) = limited(BURST_TIMESLICES, [Some(2000), None, None, None]);
        let got = reactor((&qos, start), loaded(), 32, 4096);
        // The second's share plus at most the 100 ms bound: within 10 % of the limit.
        assert_eq!(
            got,
            2 * BURST_TIMESLICES + 2 * 999,
            "{got} I/Os after idling"
        );
        assert!(got <= 2000 * 110 / 100);
        // Negative control: without the bound the idle 2 s come back as a burst and the second
        // runs at three times its limit.
        let (qos, start) = limited(u64::MAX, [Some(2000), None, None, None]);
        let got = reactor((&qos, start), loaded(), 32, 4096);
        assert!(got >= 3 * 2000, "{got} I/Os after idling, unbounded");
    }

    #[test]
    fn two_reactors_polling_in_turn_share_one_limit() {
        // Two channels of one bdev on two reactors, each polled every 2 ms, one on even and one
        // on odd milliseconds, 16 in flight each: together they get the limit, not twice it.
        let (qos, start) = limited(BURST_TIMESLICES, [Some(4000), None, None, None]);
        let even = reactor((&qos, start), [0], 16, 4096);
        let (mut a, mut b) = (even, 0);
        for ms in 1..=1000 {
            let got = reactor((&qos, start), [ms], 16, 4096);
            if ms % 2 == 0 {
                a += got;
            } else {
                b += got;
            }
        }
        assert_eq!(a + b, 4004, "{a} + {b}");
        assert!(a > 1900 && b > 1900, "{a} + {b}");
    }
}
