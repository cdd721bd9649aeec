//! I/O statistics per bdev, as SPDK's `bdev_get_iostat` reports them.
//!
//! Every channel a reactor opens to a bdev in the registry is a [`CountedChannel`]: it gives the
//! bdev's own channel a tag of its own (an index into a slot table holding the caller's tag, the
//! kind, the bytes and the submission tick), and on completion adds the I/O to its
//! [`ChannelStats`]. Those counters belong to the reactor that owns the channel: only it writes
//! them, with plain stores of its own running totals (relaxed atomics, so the control thread may
//! read them at any time); no atomic is shared between reactors and nothing locks on the data
//! path. The control thread sums the channels of a bdev when asked ([`BdevIoStats::snapshot`]).
//!
//! What is counted is what SPDK counts: successful reads, writes and unmaps (ops, bytes, latency
//! ticks from submission to the completion's poll, min and max); failed I/Os count as errors.
//! Flushes and write-zeroes are not counted, as in SPDK.
//!
//! Where SPDK reads the time-stamp counter for every I/O at submission and at completion, a
//! counted channel reads it once per batch: at the first submission after a poll of the channel
//! (the I/Os a reactor submits before it polls the channel again share that tick) and at the first
//! completion a poll reports (the others of that poll share it). An I/O's latency may thus include
//! the time its reactor took to submit the I/Os before it in the same batch, and leave out the time
//! it took to report the completions before it: both within one pass of the reactor's loop,
//! microseconds against a device's latency, so min, max and sum keep their meaning.
//!
//! A reset cannot write a reactor's counters. Sums are reset by remembering what they were
//! (a baseline subtracted from later reads); min and max by a reset generation the control
//! thread raises and the channel applies at its next completion (until it has, the channel's
//! min and max read as none).
//!
//! A counted channel also applies the bdev's rate limits ([`super::qos`]): while a limit is set,
//! an I/O that finds its quota used up waits in the channel (counted as in flight) and is
//! submitted at a later poll; its latency includes the wait, as in SPDK.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rvhost_platform_linux::tsc;
use serde_json::{json, Map, Value};

use super::qos::BdevQos;
use super::{Bdev, BdevChannel, BdevError, BdevIo, IoKind, IoMemory, IoStatus, IoVec};

/// Slots a counted channel reserves when it opens, so that a queue's usual depth never grows
/// the table on the data path.
const INITIAL_SLOTS: usize = 256;

/// One kind's counters in a channel (read, write or unmap).
#[derive(Debug)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    latency_ticks: AtomicU64,
    max_latency_ticks: AtomicU64,
    /// `u64::MAX` while no I/O of this kind completed since the last min/max reset.
    min_latency_ticks: AtomicU64,
}

impl Default for KindCounters {
    fn default() -> Self {
        Self {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            latency_ticks: AtomicU64::new(0),
            max_latency_ticks: AtomicU64::new(0),
            min_latency_ticks: AtomicU64::new(u64::MAX),
        }
    }
}

/// Adds `value` to a counter only the calling reactor writes (a load and a store, no locked
/// read-modify-write).
#[inline]
fn add(counter: &AtomicU64, value: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(value),
        Ordering::Relaxed,
    );
}

impl KindCounters {
    #[inline]
    fn record(&self, bytes: u64, latency: u64) {
        add(&self.ops, 1);
        add(&self.bytes, bytes);
        add(&self.latency_ticks, latency);
        if latency > self.max_latency_ticks.load(Ordering::Relaxed) {
            self.max_latency_ticks.store(latency, Ordering::Relaxed);
        }
        if latency < self.min_latency_ticks.load(Ordering::Relaxed) {
            self.min_latency_ticks.store(latency, Ordering::Relaxed);
        }
    }

    fn reset_minmax(&self) {
        self.max_latency_ticks.store(0, Ordering::Relaxed);
        self.min_latency_ticks.store(u64::MAX, Ordering::Relaxed);
    }

    fn read(&self, minmax_valid: bool) -> KindTotals {
        KindTotals {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            latency_ticks: self.latency_ticks.load(Ordering::Relaxed),
            max_latency_ticks: if minmax_valid {
                self.max_latency_ticks.load(Ordering::Relaxed)
            } else {
                0
            },
            min_latency_ticks: if minmax_valid {
                self.min_latency_ticks.load(Ordering::Relaxed)
            } else {
                u64::MAX
            },
        }
    }
}

/// The counters of one channel: written by the reactor that owns the channel, read by the
/// control thread.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Reads, writes and unmaps, indexed by [`counted_index`].
    kinds: [KindCounters; COUNTED_KINDS],
    failed: AtomicU64,
    /// The min/max reset generation the control thread asked for.
    minmax_requested: AtomicU64,
    /// The generation the channel has applied (written by the reactor).
    minmax_applied: AtomicU64,
    /// Which completions the latency histogram takes ([`HistogramFilter`] as a number; 0: off).
    histogram_filter: AtomicU8,
    /// Latency histogram buckets in SPDK's layout, allocated the first time it is enabled.
    histogram: OnceLock<Box<[AtomicU64]>>,
    /// The reactor task (a vhost session's device) that polls the channel, recorded at its
    /// first poll; 0 until then.
    owner_task: AtomicU64,
}

impl ChannelStats {
    fn read(&self) -> Totals {
        let valid = self.minmax_applied.load(Ordering::Acquire)
            == self.minmax_requested.load(Ordering::Relaxed);
        Totals {
            read: self.kinds[READ].read(valid),
            write: self.kinds[WRITE].read(valid),
            unmap: self.kinds[UNMAP].read(valid),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Kinds a channel counts: reads, writes and unmaps.
const COUNTED_KINDS: usize = 3;
const READ: usize = 0;
const WRITE: usize = 1;
const UNMAP: usize = 2;

/// The index of `kind`'s counters in [`ChannelStats`], `COUNTED_KINDS` for a kind SPDK does
/// not count (flush, write-zeroes).
#[inline]
fn counted_index(kind: IoKind) -> u8 {
    match kind {
        IoKind::Read => READ as u8,
        IoKind::Write => WRITE as u8,
        IoKind::Unmap => UNMAP as u8,
        IoKind::Flush | IoKind::WriteZeroes => COUNTED_KINDS as u8,
    }
}

/// SPDK's default histogram geometry (`spdk_histogram_data_alloc`): 2^7 buckets per power of
/// two, ranges 0 to 57 (every 64-bit tick count). `bdev_get_histogram` reports it so SPDK's
/// `scripts/histogram.py` decodes the buckets.
pub const HISTOGRAM_GRANULARITY: u32 = 7;
/// The first range (`min_range`).
pub const HISTOGRAM_MIN_RANGE: u32 = 0;
/// The last range (`max_range`).
pub const HISTOGRAM_MAX_RANGE: u32 = 64 - HISTOGRAM_GRANULARITY;
/// Buckets in a histogram: ranges x buckets per range.
pub const HISTOGRAM_BUCKETS: usize =
    ((HISTOGRAM_MAX_RANGE - HISTOGRAM_MIN_RANGE + 1) as usize) << HISTOGRAM_GRANULARITY;

/// The bucket of a latency of `ticks`, as `spdk_histogram_data_tally` places it.
#[inline]
pub fn histogram_bucket(ticks: u64) -> usize {
    let lsb = 64 - HISTOGRAM_GRANULARITY;
    let clz = ticks.leading_zeros();
    let range = lsb.saturating_sub(clz);
    let shift = range.saturating_sub(1);
    let index = (ticks >> shift) & ((1 << HISTOGRAM_GRANULARITY) - 1);
    ((range as usize) << HISTOGRAM_GRANULARITY) + index as usize
}

/// The geometry of a histogram as SPDK's `spdk_histogram_data_alloc_sized_ext` makes it: 2^g
/// buckets per range, ranges `min_range..=max_range` (latencies below the first range count in
/// its first bucket, those above the last in its last bucket).
///
/// Channels always count in the default geometry (granularity 7, every range); a histogram
/// enabled with another geometry is computed from those counts when it is read
/// ([`HistogramGeometry::rebin`]). That is exact for every granularity up to 7: a bucket of
/// granularity g holds the latencies whose g + 1 leading bits are equal, a union of default
/// buckets, and all the latencies of a default bucket have the same length, so the same range
/// and the same clamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramGeometry {
    /// Bits of precision (buckets per range: 2^granularity).
    pub granularity: u32,
    /// The first range.
    pub min_range: u32,
    /// The last range.
    pub max_range: u32,
}

impl Default for HistogramGeometry {
    fn default() -> Self {
        Self {
            granularity: HISTOGRAM_GRANULARITY,
            min_range: HISTOGRAM_MIN_RANGE,
            max_range: HISTOGRAM_MAX_RANGE,
        }
    }
}

impl HistogramGeometry {
    /// SPDK's geometry for latencies in `[min_ticks, max_ticks)`; `None` if the interval is
    /// empty or `granularity` is not 1 to [`HISTOGRAM_GRANULARITY`].
    pub fn new(granularity: u32, min_ticks: u64, max_ticks: u64) -> Option<Self> {
        if !(1..=HISTOGRAM_GRANULARITY).contains(&granularity) || min_ticks >= max_ticks {
            return None;
        }
        let range = |ticks: u64| (64 - granularity).saturating_sub(ticks.leading_zeros());
        Some(Self {
            granularity,
            min_range: range(min_ticks),
            max_range: range(max_ticks - 1),
        })
    }

    /// Buckets in a histogram of this geometry.
    pub fn buckets(&self) -> usize {
        ((self.max_range - self.min_range + 1) as usize) << self.granularity
    }

    /// The bucket `spdk_histogram_data_tally` counts a latency of `ticks` in.
    pub fn bucket(&self, ticks: u64) -> usize {
        let per_range = 1u64 << self.granularity;
        let range = (64 - self.granularity).saturating_sub(ticks.leading_zeros());
        let (range, index) = if range < self.min_range {
            (self.min_range, 0)
        } else if range > self.max_range {
            (self.max_range, per_range - 1)
        } else {
            (range, (ticks >> range.saturating_sub(1)) & (per_range - 1))
        };
        (((range - self.min_range) as usize) << self.granularity) + index as usize
    }

    /// Counts in the default geometry regrouped into this one.
    pub fn rebin(&self, default_counts: &[u64]) -> Vec<u64> {
        let mut out = vec![0u64; self.buckets()];
        for (bucket, &count) in default_counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            // The smallest latency of the default bucket stands for all of it.
            let range = (bucket >> HISTOGRAM_GRANULARITY) as u32;
            let index = (bucket & ((1 << HISTOGRAM_GRANULARITY) - 1)) as u64;
            let ticks = if range == 0 {
                index
            } else {
                ((1u64 << HISTOGRAM_GRANULARITY) + index) << (range - 1)
            };
            if let Some(sum) = out.get_mut(self.bucket(ticks)) {
                *sum = sum.wrapping_add(count);
            }
        }
        out
    }
}

/// Which completions a latency histogram takes (SPDK's `opc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistogramFilter {
    /// Every kind.
    All,
    /// One kind only.
    Kind(IoKind),
}

impl HistogramFilter {
    fn code(self) -> u8 {
        match self {
            HistogramFilter::All => 1,
            HistogramFilter::Kind(IoKind::Read) => 2,
            HistogramFilter::Kind(IoKind::Write) => 3,
            HistogramFilter::Kind(IoKind::Unmap) => 4,
            HistogramFilter::Kind(IoKind::Flush) => 5,
            HistogramFilter::Kind(IoKind::WriteZeroes) => 6,
        }
    }
}

#[inline]
fn kind_code(kind: IoKind) -> u8 {
    HistogramFilter::Kind(kind).code()
}

fn new_buckets() -> Box<[AtomicU64]> {
    (0..HISTOGRAM_BUCKETS).map(|_| AtomicU64::new(0)).collect()
}

fn read_buckets(buckets: &[AtomicU64]) -> Vec<u64> {
    buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
}

/// One kind's totals as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindTotals {
    /// Completed operations.
    pub ops: u64,
    /// Bytes they moved (or unmapped).
    pub bytes: u64,
    /// Sum of their latencies, in ticks.
    pub latency_ticks: u64,
    /// Longest latency since the last min/max reset (0 if none).
    pub max_latency_ticks: u64,
    /// Shortest latency since the last min/max reset (`u64::MAX` if none).
    pub min_latency_ticks: u64,
}

impl Default for KindTotals {
    fn default() -> Self {
        Self {
            ops: 0,
            bytes: 0,
            latency_ticks: 0,
            max_latency_ticks: 0,
            min_latency_ticks: u64::MAX,
        }
    }
}

impl KindTotals {
    fn add(&mut self, other: &KindTotals) {
        self.ops = self.ops.wrapping_add(other.ops);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.latency_ticks = self.latency_ticks.wrapping_add(other.latency_ticks);
        self.max_latency_ticks = self.max_latency_ticks.max(other.max_latency_ticks);
        self.min_latency_ticks = self.min_latency_ticks.min(other.min_latency_ticks);
    }

    /// The sums since `base` was taken (min and max are not sums and stay).
    fn since(&self, base: &KindTotals) -> KindTotals {
        KindTotals {
            ops: self.ops.wrapping_sub(base.ops),
            bytes: self.bytes.wrapping_sub(base.bytes),
            latency_ticks: self.latency_ticks.wrapping_sub(base.latency_ticks),
            ..*self
        }
    }

    fn json(&self, kind: &str, out: &mut Map<String, Value>) {
        let min = if self.min_latency_ticks == u64::MAX {
            0
        } else {
            self.min_latency_ticks
        };
        out.insert(format!("{kind}_latency_ticks"), json!(self.latency_ticks));
        out.insert(
            format!("max_{kind}_latency_ticks"),
            json!(self.max_latency_ticks),
        );
        out.insert(format!("min_{kind}_latency_ticks"), json!(min));
    }
}

/// A bdev's (or one channel's) statistics as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Successful reads.
    pub read: KindTotals,
    /// Successful writes.
    pub write: KindTotals,
    /// Successful unmaps.
    pub unmap: KindTotals,
    /// I/Os the bdev failed.
    pub failed: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.read.add(&other.read);
        self.write.add(&other.write);
        self.unmap.add(&other.unmap);
        self.failed = self.failed.wrapping_add(other.failed);
    }

    fn since(&self, base: &Totals) -> Totals {
        Totals {
            read: self.read.since(&base.read),
            write: self.write.since(&base.write),
            unmap: self.unmap.since(&base.unmap),
            failed: self.failed.wrapping_sub(base.failed),
        }
    }

    fn clear_minmax(&mut self) {
        for kind in [&mut self.read, &mut self.write, &mut self.unmap] {
            kind.max_latency_ticks = 0;
            kind.min_latency_ticks = u64::MAX;
        }
    }

    /// The members SPDK's `spdk_bdev_dump_io_stat_json` writes, in its order (copy is not an
    /// operation rvhost's bdevs offer, so its counters are always 0).
    pub fn json(&self, out: &mut Map<String, Value>, with_errors: bool) {
        out.insert("bytes_read".into(), json!(self.read.bytes));
        out.insert("num_read_ops".into(), json!(self.read.ops));
        out.insert("bytes_written".into(), json!(self.write.bytes));
        out.insert("num_write_ops".into(), json!(self.write.ops));
        out.insert("bytes_unmapped".into(), json!(self.unmap.bytes));
        out.insert("num_unmap_ops".into(), json!(self.unmap.ops));
        out.insert("bytes_copied".into(), json!(0));
        out.insert("num_copy_ops".into(), json!(0));
        self.read.json("read", out);
        self.write.json("write", out);
        self.unmap.json("unmap", out);
        KindTotals::default().json("copy", out);
        if with_errors {
            let mut errors = Map::new();
            if self.failed != 0 {
                errors.insert("failed".into(), json!(self.failed));
            }
            out.insert("io_error".into(), Value::Object(errors));
        }
    }
}

/// How `bdev_reset_iostat` (and `bdev_get_iostat`'s `reset_mode`) resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetMode {
    /// Every counter.
    All,
    /// Only the min and max latencies.
    MaxMin,
    /// Only the error counts.
    Errors,
}

/// A channel of the bdev, as the control thread tracks it.
#[derive(Debug)]
struct ChannelEntry {
    stats: Arc<ChannelStats>,
    /// What its sums were at the last reset.
    baseline: Totals,
    /// Order of opening (1 for the bdev's first channel), reported as `thread_id` per channel.
    ordinal: u64,
    /// Its histogram buckets when the histogram was last enabled.
    histogram_baseline: Vec<u64>,
}

#[derive(Debug, Default)]
struct StatsInner {
    channels: Vec<ChannelEntry>,
    /// What closed channels counted since the last reset.
    retired: Totals,
    opened: u64,
    /// The histogram's filter while it is enabled.
    histogram: Option<HistogramFilter>,
    /// The geometry it is reported in.
    histogram_geometry: HistogramGeometry,
    /// What closed channels' histograms counted since it was enabled.
    retired_histogram: Vec<u64>,
}

/// The statistics of one bdev: the channels' counters and what closed channels left. Only the
/// control thread and channel opening take its lock, never the data path.
#[derive(Debug, Default)]
pub struct BdevIoStats {
    inner: Mutex<StatsInner>,
    /// The bdev's rate limits, which its channels apply.
    qos: Arc<BdevQos>,
}

impl BdevIoStats {
    /// The bdev's rate limits (`bdev_set_qos_limit`).
    pub fn qos(&self) -> &Arc<BdevQos> {
        &self.qos
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self) -> Arc<ChannelStats> {
        let stats = Arc::new(ChannelStats::default());
        let mut inner = self.lock();
        inner.opened += 1;
        let ordinal = inner.opened;
        if let Some(filter) = inner.histogram {
            stats.histogram.get_or_init(new_buckets);
            stats
                .histogram_filter
                .store(filter.code(), Ordering::Release);
        }
        inner.channels.push(ChannelEntry {
            stats: Arc::clone(&stats),
            baseline: Totals::default(),
            ordinal,
            histogram_baseline: Vec::new(),
        });
        stats
    }

    /// Folds channels no longer open into `retired`.
    fn prune(inner: &mut StatsInner) {
        let mut index = 0;
        while index < inner.channels.len() {
            if Arc::strong_count(&inner.channels[index].stats) == 1 {
                let entry = inner.channels.swap_remove(index);
                let left = entry.stats.read().since(&entry.baseline);
                inner.retired.add(&left);
                if inner.histogram.is_some() {
                    let counts = entry.histogram_since_baseline();
                    add_buckets(&mut inner.retired_histogram, &counts);
                }
            } else {
                index += 1;
            }
        }
        inner.channels.sort_by_key(|c| c.ordinal);
    }

    /// The bdev's totals: its open channels' and what closed ones counted.
    pub fn snapshot(&self) -> Totals {
        let mut inner = self.lock();
        Self::prune(&mut inner);
        let mut total = inner.retired;
        for channel in &inner.channels {
            total.add(&channel.stats.read().since(&channel.baseline));
        }
        total
    }

    /// Each open channel's totals with the reactor task that polls it (`None` before its first
    /// poll, which its first I/O brings).
    pub fn per_channel(&self) -> Vec<(Option<u64>, Totals)> {
        let mut inner = self.lock();
        Self::prune(&mut inner);
        inner
            .channels
            .iter()
            .map(|c| {
                let owner = match c.stats.owner_task.load(Ordering::Relaxed) {
                    0 => None,
                    task => Some(task),
                };
                (owner, c.stats.read().since(&c.baseline))
            })
            .collect()
    }

    /// Resets the counters `mode` names.
    pub fn reset(&self, mode: ResetMode) {
        let mut inner = self.lock();
        Self::prune(&mut inner);
        match mode {
            ResetMode::All => inner.retired = Totals::default(),
            ResetMode::MaxMin => inner.retired.clear_minmax(),
            ResetMode::Errors => inner.retired.failed = 0,
        }
        for channel in &mut inner.channels {
            match mode {
                ResetMode::All => {
                    channel.baseline = channel.stats.read();
                    channel
                        .stats
                        .minmax_requested
                        .fetch_add(1, Ordering::Release);
                }
                ResetMode::MaxMin => {
                    channel
                        .stats
                        .minmax_requested
                        .fetch_add(1, Ordering::Release);
                }
                ResetMode::Errors => {
                    channel.baseline.failed = channel.stats.failed.load(Ordering::Relaxed);
                }
            }
        }
    }
}

impl ChannelEntry {
    fn histogram_since_baseline(&self) -> Vec<u64> {
        let mut counts = match self.stats.histogram.get() {
            Some(buckets) => read_buckets(buckets),
            None => vec![0; HISTOGRAM_BUCKETS],
        };
        for (count, base) in counts.iter_mut().zip(&self.histogram_baseline) {
            *count = count.wrapping_sub(*base);
        }
        counts
    }
}

fn add_buckets(into: &mut Vec<u64>, counts: &[u64]) {
    if into.len() < counts.len() {
        into.resize(counts.len(), 0);
    }
    for (sum, count) in into.iter_mut().zip(counts) {
        *sum = sum.wrapping_add(*count);
    }
}

impl BdevIoStats {
    /// Starts (afresh) or stops the latency histogram of every channel of the bdev.
    pub fn set_histogram(&self, filter: Option<HistogramFilter>) {
        self.set_histogram_in(filter, HistogramGeometry::default());
    }

    /// [`BdevIoStats::set_histogram`], reported in `geometry`.
    pub fn set_histogram_in(&self, filter: Option<HistogramFilter>, geometry: HistogramGeometry) {
        let mut inner = self.lock();
        Self::prune(&mut inner);
        inner.histogram = filter;
        inner.histogram_geometry = geometry;
        inner.retired_histogram = vec![0; HISTOGRAM_BUCKETS];
        let code = filter.map_or(0, HistogramFilter::code);
        for channel in &mut inner.channels {
            if filter.is_some() {
                let buckets = channel.stats.histogram.get_or_init(new_buckets);
                channel.histogram_baseline = read_buckets(buckets);
            }
            channel
                .stats
                .histogram_filter
                .store(code, Ordering::Release);
        }
    }

    /// The bdev's histogram buckets (SPDK's layout) since it was enabled, or `None` while it is
    /// not.
    pub fn histogram(&self) -> Option<Vec<u64>> {
        let mut inner = self.lock();
        Self::prune(&mut inner);
        inner.histogram?;
        let mut total = inner.retired_histogram.clone();
        for channel in &inner.channels {
            add_buckets(&mut total, &channel.histogram_since_baseline());
        }
        Some(total)
    }

    /// The bdev's histogram in the geometry it was enabled with, or `None` while it is not.
    pub fn histogram_in_geometry(&self) -> Option<(HistogramGeometry, Vec<u64>)> {
        let counts = self.histogram()?;
        let geometry = self.lock().histogram_geometry;
        Some((geometry, geometry.rebin(&counts)))
    }
}

/// A bdev in the registry: the module's bdev with its statistics. Every property is the
/// module's; only the channels it opens are [`CountedChannel`]s.
#[derive(Debug)]
pub struct CountedBdev {
    inner: Arc<dyn Bdev>,
    stats: Arc<BdevIoStats>,
}

impl CountedBdev {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Bdev>) -> Self {
        Self {
            inner,
            stats: Arc::new(BdevIoStats::default()),
        }
    }

    /// The bdev's statistics.
    pub fn stats(&self) -> &Arc<BdevIoStats> {
        &self.stats
    }
}

impl Bdev for CountedBdev {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn product_name(&self) -> &str {
        self.inner.product_name()
    }
    fn module_name(&self) -> &'static str {
        self.inner.module_name()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn uuid(&self) -> [u8; 16] {
        self.inner.uuid()
    }
    fn supports(&self, kind: IoKind) -> bool {
        self.inner.supports(kind)
    }
    fn open_channel(self: Arc<Self>) -> Result<Box<dyn BdevChannel>, BdevError> {
        let inner = Arc::clone(&self.inner).open_channel()?;
        Ok(Box::new(CountedChannel {
            inner,
            stats: self.stats.register(),
            qos: Arc::clone(&self.stats.qos),
            waiting: VecDeque::new(),
            block_size: u64::from(self.inner.block_size()),
            slots: Vec::with_capacity(INITIAL_SLOTS),
            free_head: NO_FREE_SLOT,
            minmax_applied: 0,
            submit_tick: 0,
            owner_recorded: false,
        }))
    }
    fn prepare_memory(&self, mem: &IoMemory) {
        self.inner.prepare_memory(mem)
    }
    fn driver_specific(&self) -> Value {
        self.inner.driver_specific()
    }
}

/// The end of a counted channel's list of free slots.
const NO_FREE_SLOT: u32 = u32::MAX;

/// What a counted channel remembers of an I/O in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The submitter's tag; in a free slot, the index of the next free slot.
    tag: u64,
    /// Submission tick.
    start: u64,
    bytes: u64,
    kind: IoKind,
    /// [`counted_index`] of the kind.
    counted: u8,
}

/// A channel that counts what it completes (see the module documentation).
pub struct CountedChannel {
    inner: Box<dyn BdevChannel>,
    stats: Arc<ChannelStats>,
    /// The bdev's rate limits.
    qos: Arc<BdevQos>,
    /// I/Os waiting for a rate limit's quota, oldest first.
    waiting: VecDeque<WaitingIo>,
    block_size: u64,
    /// I/Os in flight by the tag given to the inner channel, and free slots.
    slots: Vec<InFlight>,
    /// The first free slot (the free slots are a list through their `tag`), or `NO_FREE_SLOT`.
    free_head: u32,
    /// The min/max reset generation last applied.
    minmax_applied: u64,
    /// The tick of this submission batch (the I/Os submitted since the last poll), read at its
    /// first submission; 0 until then.
    submit_tick: u64,
    /// Whether the task polling the channel is recorded (`ChannelStats::owner_task`).
    owner_recorded: bool,
}

impl std::fmt::Debug for CountedChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedChannel")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// An I/O a rate limit holds back: what the inner channel is to be given, owned.
struct WaitingIo {
    kind: IoKind,
    offset_blocks: u64,
    num_blocks: u64,
    iovs: Vec<IoVec>,
    /// The slot index (the inner channel's tag).
    index: u32,
    mem: IoMemory,
}

impl CountedChannel {
    /// Submits `io` (already given slot `index`) under the bdev's rate limits: at once if its
    /// quota allows and nothing waits before it, else it waits (see [`super::qos`]).
    #[cold]
    #[inline(never)]
    fn submit_limited(&mut self, io: &BdevIo<'_>, index: u32) -> Result<(), BdevError> {
        let bytes = io.num_blocks.wrapping_mul(self.block_size);
        if self.waiting.is_empty() && self.qos.admit(io.kind, bytes) {
            return self.submit_inner(io, index);
        }
        self.qos.count_queued();
        self.waiting.push_back(WaitingIo {
            kind: io.kind,
            offset_blocks: io.offset_blocks,
            num_blocks: io.num_blocks,
            iovs: io.iovs.to_vec(),
            index,
            mem: IoMemory::clone(io.mem),
        });
        Ok(())
    }

    /// Gives `io` (in slot `index`) to the inner channel; frees the slot if it refuses it.
    #[inline]
    fn submit_inner(&mut self, io: &BdevIo<'_>, index: u32) -> Result<(), BdevError> {
        let submitted = self.inner.submit(io);
        if submitted.is_err() {
            if let Some(slot) = self.slots.get_mut(index as usize) {
                slot.tag = u64::from(self.free_head);
                self.free_head = index;
            }
        }
        submitted
    }

    /// Submits the waiting I/Os the rate limits now admit (all of them once no limit is set), in
    /// order, passing over those a limit still holds (SPDK's `bdev_qos_io_submit`). One the
    /// inner channel refuses completes as failed through `done`.
    #[cold]
    #[inline(never)]
    fn submit_waiting(&mut self, done: &mut dyn FnMut(u64, IoStatus)) {
        let limited = self.qos.enabled();
        if limited {
            self.qos.refill(tsc::ticks());
        }
        let mut waiting = std::mem::take(&mut self.waiting);
        waiting.retain(|w| {
            let bytes = w.num_blocks.wrapping_mul(self.block_size);
            if limited && !self.qos.admit(w.kind, bytes) {
                return true;
            }
            let io = BdevIo {
                kind: w.kind,
                offset_blocks: w.offset_blocks,
                num_blocks: w.num_blocks,
                iovs: &w.iovs,
                tag: u64::from(w.index),
                mem: &w.mem,
            };
            let tag = self.slots.get(w.index as usize).map(|s| s.tag);
            if let Err(err) = self.submit_inner(&io, w.index) {
                tracing::debug!(%err, "bdev refused an I/O a rate limit held back");
                add(&self.stats.failed, 1);
                if let Some(tag) = tag {
                    done(tag, IoStatus::Failed);
                }
            }
            false
        });
        self.waiting = waiting;
    }

    /// Records the reactor task polling the channel, for `bdev_get_iostat`'s per-channel
    /// `thread_id`.
    #[cold]
    #[inline(never)]
    fn record_owner(&mut self) {
        if let Some(task) = crate::reactor::current_task() {
            self.stats.owner_task.store(task.0, Ordering::Relaxed);
            self.owner_recorded = true;
        }
    }

    /// Adds a slot holding `entry` (when none is free) and returns its index. Out of the submission
    /// path's way: a channel reserves the slots of a queue's usual depth when it opens.
    #[cold]
    #[inline(never)]
    fn add_slot(&mut self, entry: InFlight) -> Result<u32, BdevError> {
        let index = u32::try_from(self.slots.len())
            .ok()
            .filter(|&index| index != NO_FREE_SLOT)
            .ok_or_else(|| BdevError::Backend("too many I/Os in flight".into()))?;
        self.slots.push(entry);
        Ok(index)
    }
}

impl BdevChannel for CountedChannel {
    #[inline]
    fn submit(&mut self, io: &BdevIo<'_>) -> Result<(), BdevError> {
        if self.submit_tick == 0 {
            self.submit_tick = tsc::ticks();
        }
        let entry = InFlight {
            tag: io.tag,
            start: self.submit_tick,
            bytes: io.num_blocks.wrapping_mul(self.block_size),
            kind: io.kind,
            counted: counted_index(io.kind),
        };
        let index = match self.slots.get_mut(self.free_head as usize) {
            Some(slot) => {
                let index = self.free_head;
                self.free_head = slot.tag as u32;
                *slot = entry;
                index
            }
            None => self.add_slot(entry)?,
        };
        let inner_io = BdevIo {
            tag: u64::from(index),
            ..*io
        };
        if self.qos.enabled() {
            return self.submit_limited(&inner_io, index);
        }
        self.submit_inner(&inner_io, index)
    }

    #[inline]
    fn poll(&mut self, done: &mut dyn FnMut(u64, IoStatus)) -> usize {
        if !self.owner_recorded {
            self.record_owner();
        }
        if !self.waiting.is_empty() {
            self.submit_waiting(done);
        }
        // The next submission starts a new batch with a fresh tick.
        self.submit_tick = 0;
        let slots = &mut self.slots;
        let free_head = &mut self.free_head;
        let stats = &*self.stats;
        let applied = &mut self.minmax_applied;
        let mut now = 0;
        let mut histogram_filter = 0;
        let mut histogram: Option<&[AtomicU64]> = None;
        self.inner.poll(&mut |index, status| {
            let Some(slot) = usize::try_from(index).ok().and_then(|i| slots.get_mut(i)) else {
                tracing::error!(index, "bdev completed an I/O it was not given");
                return;
            };
            let entry = *slot;
            slot.tag = u64::from(*free_head);
            *free_head = index as u32;
            if now == 0 {
                now = tsc::ticks();
                let requested = stats.minmax_requested.load(Ordering::Relaxed);
                if requested != *applied {
                    for kind in &stats.kinds {
                        kind.reset_minmax();
                    }
                    *applied = requested;
                    stats.minmax_applied.store(requested, Ordering::Release);
                }
                histogram_filter = stats.histogram_filter.load(Ordering::Acquire);
                if histogram_filter != 0 {
                    histogram = stats.histogram.get().map(|b| &b[..]);
                }
            }
            let latency = now.saturating_sub(entry.start);
            if let Some(buckets) = histogram {
                if histogram_filter == 1 || histogram_filter == kind_code(entry.kind) {
                    if let Some(bucket) = buckets.get(histogram_bucket(latency)) {
                        add(bucket, 1);
                    }
                }
            }
            if status == IoStatus::Success {
                if let Some(counters) = stats.kinds.get(usize::from(entry.counted)) {
                    counters.record(entry.bytes, latency);
                }
            } else {
                add(&stats.failed, 1);
            }
            done(entry.tag, status);
        })
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.waiting.len()
    }
}

#[cfg(test)]
mod tests;
