//! The poll loop: keep `queue_depth` requests in flight on every queue, reap completions by
//! polling the used rings, and measure.
//!
//! One clock read per loop iteration serves as the completion time of everything reaped in it
//! and the submission time of everything offered in it, so measuring costs ~20 ns per poll, not
//! per I/O. The same timestamps give the initiator's own cost: the time of iterations that did
//! work, divided by the I/Os they did.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::device::{Completion, Connection, DiskInfo, RequestFormat};
use crate::dirty_log::{DirtyLogMemory, DirtyLogReport};
use crate::responder::Responder;
use crate::shm::{layout, PageKind, SharedMemory};
use crate::vring::{DriverRing, Notification, Shared};
use crate::workload::{fill_pattern, Dir, Generator, Verifier, VerifyOutcome, WorkloadOptions};
use crate::PerfError;

/// How long in-flight requests may take to drain after the run before it fails.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A loop iteration longer than this was preempted (the loop body is well under a microsecond per
/// request); its time is not the initiator's work and is left out of the busy time.
const PREEMPTED_NS: u64 = 50_000;
/// Longest latency the histograms hold (larger values are clamped).
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Where the requests go.
#[derive(Debug, Clone)]
pub enum Backend<'a> {
    /// A vhost-user target's socket.
    Socket(&'a Path),
    /// The in-process [`Responder`] on `cpu` (for measuring the initiator itself).
    Loopback {
        /// Core for the responder thread.
        cpu: Option<usize>,
        /// Capacity of the pretend disk.
        capacity: u64,
    },
}

/// Latency percentiles in nanoseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Latency {
    /// Mean.
    pub avg_ns: f64,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
}

/// One direction's results.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct DirReport {
    /// Requests completed in the measured window.
    pub ios: u64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Completion latency.
    pub latency: Latency,
}

/// The initiator's own cost.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct InitiatorCost {
    /// Share of its core spent in loop iterations that submitted or reaped something (iterations
    /// longer than 50 µs count as preempted and are left out).
    pub busy_fraction: f64,
    /// Busy time divided by I/Os: what one I/O costs the initiator.
    pub busy_ns_per_io: f64,
    /// Loop iterations (used-ring polls of every queue) per I/O.
    pub polls_per_io: f64,
    /// Kick eventfd writes per I/O (0 when the target polls and says so).
    pub kicks_per_io: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Device type.
    pub device: crate::workload::DeviceType,
    /// Access pattern.
    pub rw: crate::workload::RwMode,
    /// Bytes per request.
    pub block_size: u32,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Request queues.
    pub queues: u16,
    /// The disk as the target described it.
    pub disk: DiskInfo,
    /// Whether EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Whether the queues were packed rings.
    pub packed: bool,
    /// Whether requests went through indirect tables.
    pub indirect: bool,
    /// What backs the shared memory.
    pub page_kind: PageKind,
    /// The offered load of `--rate` in requests per second (`None`: closed loop).
    pub rate: Option<u64>,
    /// Measured window in seconds.
    pub seconds: f64,
    /// Reads.
    pub read: DirReport,
    /// Writes.
    pub write: DirReport,
    /// Both.
    pub total: DirReport,
    /// Requests the device completed with an error status.
    pub io_errors: u64,
    /// Reads whose data did not match what was written (`--verify`).
    pub verify_errors: u64,
    /// Reads checked against a pattern (`--verify`).
    pub verified_reads: u64,
    /// The initiator's own cost.
    pub initiator: InitiatorCost,
    /// `--dirty-log`: what the target marked in the log (`null` without it).
    pub dirty_log: Option<DirtyLogReport>,
}

/// One second's progress.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Interval {
    /// Seconds since the start.
    pub second: u64,
    /// Reads per second in this interval.
    pub read_iops: f64,
    /// Writes per second.
    pub write_iops: f64,
    /// MiB/s, both directions.
    pub mib_s: f64,
    /// Mean latency of the interval's completions.
    pub avg_lat_ns: f64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    dir: Dir,
    chain_dir: Dir,
    block: u64,
    generation: u32,
    submitted_ns: u64,
    in_flight: bool,
}

struct QueueState<'m> {
    ring: DriverRing<'m>,
    kick: Option<&'m vmm_sys_util::eventfd::EventFd>,
    slots: Vec<Slot>,
    /// Slots not in flight, waiting for the rate to allow them (only with `--rate`).
    idle: Vec<usize>,
}

/// Paces submissions to a fixed rate: by time `now` (ns since the start) the run may have
/// offered `rate * now / 1e9` requests. A target that falls behind does not get the missed
/// requests in one burst later: at most one queue depth of backlog is kept.
struct Pacer {
    rate: u64,
    offered: u64,
    backlog_cap: u64,
}

impl Pacer {
    /// Requests the rate allows now, beyond those already offered.
    fn allowance(&mut self, now: u64) -> u64 {
        let due = u64::try_from(u128::from(now) * u128::from(self.rate) / 1_000_000_000)
            .unwrap_or(u64::MAX);
        if due.saturating_sub(self.offered) > self.backlog_cap {
            self.offered = due - self.backlog_cap;
        }
        due.saturating_sub(self.offered)
    }
}

struct Counters {
    hist: [Histogram<u64>; 2],
    ios: [u64; 2],
    lat_sum: [u128; 2],
}

impl Counters {
    fn new() -> Result<Self, PerfError> {
        let h = || {
            Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .map_err(|e| PerfError::Options(format!("histogram: {e}")))
        };
        Ok(Counters {
            hist: [h()?, h()?],
            ios: [0; 2],
            lat_sum: [0; 2],
        })
    }
}

fn dir_index(dir: Dir) -> usize {
    match dir {
        Dir::Read => 0,
        Dir::Write => 1,
    }
}

/// Runs the workload against `backend`, calling `progress` once per second.
pub fn run(
    backend: Backend<'_>,
    opts: &WorkloadOptions,
    progress: &mut dyn FnMut(&Interval),
) -> Result<RunReport, PerfError> {
    if opts.queues == 0 {
        return Err(PerfError::Options("--queues must be at least 1".into()));
    }
    let format = RequestFormat::for_device(opts.device);
    let (mut conn, vrings, first_rq, event_idx, queue_sizes) = match &backend {
        Backend::Socket(path) => {
            let conn = Connection::connect(
                path,
                opts.device,
                opts.queues,
                opts.event_idx,
                opts.packed,
                opts.indirect,
                opts.dirty_log.is_some(),
            )?;
            let sizes = conn.queue_sizes(opts.queue_depth)?;
            let (v, f, e) = (conn.vrings, conn.first_request_queue(), conn.event_idx());
            (Some(conn), v, f, e, sizes)
        }
        Backend::Loopback { .. } if opts.dirty_log.is_some() => {
            return Err(PerfError::Options(
                "--dirty-log needs a target: the loopback responder keeps no log".into(),
            ));
        }
        Backend::Loopback { .. } if opts.packed => {
            return Err(PerfError::Options(
                "--packed needs a target: the loopback responder serves split rings only".into(),
            ));
        }
        Backend::Loopback { .. } => {
            let size = crate::device::queue_size_for(opts.queue_depth)?;
            let n = usize::from(opts.queues);
            (None, n, 0, false, vec![size; n])
        }
    };
    let slots = usize::from(opts.queue_depth);
    let (layouts, total) = layout(&queue_sizes, slots, opts.block_size as usize)?;
    let shm = SharedMemory::new(total, opts.hugepages)?;
    let mem = Shared::new(shm.region());
    let notification = if event_idx {
        Notification::EventIdx
    } else {
        Notification::Flags
    };
    let mut rings = Vec::with_capacity(usize::from(opts.queues));
    for l in &layouts[first_rq..] {
        let ring = if opts.packed {
            DriverRing::new_packed(mem, *l, notification)?
        } else {
            DriverRing::new(mem, *l, notification)?
        };
        rings.push(if opts.indirect {
            ring.with_indirect_tables()
        } else {
            ring
        });
    }
    let disk = match (&backend, conn.as_mut()) {
        (Backend::Socket(_), Some(c)) => {
            c.start(&shm, &layouts)?;
            match c.disk {
                Some(d) => d,
                None => {
                    let ring = rings
                        .first_mut()
                        .ok_or_else(|| PerfError::Options("no queue".into()))?;
                    c.scsi_read_capacity(mem, ring)?
                }
            }
        }
        (Backend::Loopback { capacity, .. }, _) => DiskInfo {
            capacity: *capacity,
            block_size: 512,
            read_only: false,
        },
        _ => return Err(PerfError::Options("no connection".into())),
    };
    debug_assert_eq!(vrings, layouts.len());
    // Logging starts under running queues, before the first request, as a migration would.
    let dirty_log = match (opts.dirty_log, conn.as_mut()) {
        (Some(mode), Some(c)) => {
            let log = DirtyLogMemory::for_memory(shm.len() as u64)?;
            c.start_dirty_log(&shm, &layouts, &log, mode)?;
            Some((log, mode))
        }
        _ => None,
    };

    let bs = u64::from(opts.block_size);
    if bs == 0 || bs % u64::from(disk.block_size) != 0 {
        return Err(PerfError::Options(format!(
            "--bs {bs} is not a multiple of the device's {}-byte blocks",
            disk.block_size
        )));
    }
    if disk.read_only
        && !matches!(
            opts.rw,
            crate::workload::RwMode::Read | crate::workload::RwMode::Randread
        )
    {
        return Err(PerfError::Target("the device is read-only".into()));
    }
    let span = opts.size.unwrap_or(disk.capacity).min(disk.capacity);
    let blocks = span / bs;
    let mut generator = Generator::new(opts.rw, opts.rwmixread, blocks, opts.seed)?;
    let mut verifier = if opts.verify {
        let in_flight = u64::from(opts.queue_depth) * u64::from(opts.queues);
        if blocks < 2 * in_flight {
            return Err(PerfError::Options(format!(
                "--verify needs at least {} blocks of --bs in --size, there are {blocks}",
                2 * in_flight
            )));
        }
        Some(Verifier::new(blocks, opts.block_size as usize)?)
    } else {
        None
    };

    let stop_responder = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<RunReport, PerfError> {
        let responder_handle = match &backend {
            Backend::Loopback { cpu, .. } => {
                let responder = Responder::new(mem, layouts.clone(), format);
                let cpu = *cpu;
                let stop = &stop_responder;
                Some(scope.spawn(move || responder.serve(cpu, stop)))
            }
            Backend::Socket(_) => None,
        };
        let result = drive(
            &format,
            mem,
            rings,
            conn.as_ref(),
            first_rq,
            opts,
            disk,
            &mut generator,
            verifier.as_mut(),
            progress,
        );
        stop_responder.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = responder_handle {
            match h.join() {
                Ok(r) => r?,
                Err(_) => return Err(PerfError::Options("responder thread panicked".into())),
            }
        }
        let mut report = result?;
        report.event_idx = event_idx;
        report.packed = opts.packed;
        report.indirect = opts.indirect;
        report.page_kind = shm.page_kind();
        // Every request has completed: the marks of all of them are in the log.
        if let Some((log, mode)) = &dirty_log {
            report.dirty_log = Some(log.report(*mode, &layouts[first_rq..], slots)?);
        }
        Ok(report)
    })
}

#[allow(clippy::too_many_arguments)]
fn drive<'m>(
    format: &RequestFormat,
    mem: Shared<'m>,
    rings: Vec<DriverRing<'m>>,
    conn: Option<&'m Connection>,
    first_rq: usize,
    opts: &WorkloadOptions,
    disk: DiskInfo,
    generator: &mut Generator,
    mut verifier: Option<&mut Verifier>,
    progress: &mut dyn FnMut(&Interval),
) -> Result<RunReport, PerfError> {
    let bs = opts.block_size;
    let mut scratch = vec![0u8; bs as usize];
    let mut queues: Vec<QueueState<'m>> = Vec::with_capacity(rings.len());
    for (qi, ring) in rings.into_iter().enumerate() {
        let initial = Dir::Read;
        for slot in 0..usize::from(opts.queue_depth) {
            format.prepare_slot(&ring, slot, initial, bs)?;
        }
        queues.push(QueueState {
            kick: conn.and_then(|c| c.kick(first_rq + qi)),
            ring,
            slots: vec![
                Slot {
                    dir: initial,
                    chain_dir: initial,
                    block: 0,
                    generation: 0,
                    submitted_ns: 0,
                    in_flight: false,
                };
                usize::from(opts.queue_depth)
            ],
            idle: Vec::with_capacity(usize::from(opts.queue_depth)),
        });
    }
    let mut pacer = opts.rate.map(|rate| Pacer {
        rate,
        offered: 0,
        backlog_cap: u64::from(opts.queue_depth) * queues.len() as u64,
    });

    let mut counters = Counters::new()?;
    let mut io_errors = 0u64;
    let mut verify_errors = 0u64;
    let mut verified_reads = 0u64;
    let mut kicks = 0u64;
    let mut polls = 0u64;
    let mut busy_ns = 0u64;
    let mut tag = 0u64;

    let start = Instant::now();
    let end_ns = u64::try_from(opts.time.as_nanos()).unwrap_or(u64::MAX);
    let mut next_report_ns = 1_000_000_000u64;
    let mut interval_ios = [0u64; 2];
    let mut interval_lat = 0u128;
    let mut last_report = ([0u64; 2], 0u128);
    let mut stopping = false;
    let mut prev_now = 0u64;
    let mut prev_busy = false;
    let mut drain_deadline = None;

    // Submits a new request on `slot` of queue `q`.
    let submit = |q: &mut QueueState<'m>,
                  slot: usize,
                  now: u64,
                  tag: &mut u64,
                  generator: &mut Generator,
                  verifier: &mut Option<&mut Verifier>,
                  scratch: &mut [u8]|
     -> Result<(), PerfError> {
        let (dir, mut block) = generator.next_request();
        let mut generation = 0;
        if let Some(v) = verifier.as_deref_mut() {
            // At most half the blocks are ever busy, so this ends quickly.
            while v.is_busy(block) {
                block = generator.reroll(block);
            }
            generation = v.start(block, dir);
            let data = q.ring.layout().data_at(slot);
            match dir {
                Dir::Write => {
                    fill_pattern(scratch, block, generation);
                    mem.write(data, scratch)?;
                }
                // A device that claims success without writing is caught by the header.
                Dir::Read => mem.fill(data, scratch.len(), 0)?,
            }
        }
        let s = &mut q.slots[slot];
        if s.chain_dir != dir {
            format.set_direction(&q.ring, slot, dir, bs)?;
            s.chain_dir = dir;
        }
        *tag = tag.wrapping_add(1);
        format.write_command(
            mem,
            q.ring.layout(),
            slot,
            *tag,
            dir,
            block * u64::from(bs),
            bs,
            disk.block_size,
        )?;
        *s = Slot {
            dir,
            chain_dir: dir,
            block,
            generation,
            submitted_ns: now,
            in_flight: true,
        };
        q.ring.offer(RequestFormat::head(slot))
    };

    // Fill every queue (with a rate, the loop offers requests as it allows).
    for q in queues.iter_mut() {
        if pacer.is_some() {
            q.idle.extend((0..q.slots.len()).rev());
            continue;
        }
        for slot in 0..q.slots.len() {
            submit(q, slot, 0, &mut tag, generator, &mut verifier, &mut scratch)?;
        }
        if q.ring.publish()? {
            if let Some(k) = q.kick {
                k.write(1).map_err(PerfError::EventFd)?;
            }
            kicks += 1;
        }
    }

    loop {
        let now = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let gap = now.saturating_sub(prev_now);
        if prev_busy && gap < PREEMPTED_NS {
            busy_ns += gap;
        }
        prev_now = now;
        polls += 1;
        let mut did_work = false;
        if !stopping && now >= end_ns {
            stopping = true;
            drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
        }
        let mut in_flight = 0u64;
        for (qi, q) in queues.iter_mut().enumerate() {
            let pending = q.ring.used_pending()?;
            if pending > 0 {
                did_work = true;
            }
            for _ in 0..pending {
                let used = q.ring.take_used()?;
                let head = used.id;
                let slot = (head / u32::from(crate::device::DESCS_PER_REQUEST)) as usize;
                let valid = head % u32::from(crate::device::DESCS_PER_REQUEST) == 0
                    && q.slots.get(slot).is_some_and(|s| s.in_flight);
                if !valid {
                    return Err(PerfError::Protocol {
                        queue: qi,
                        what: format!("used id {head} is not a head in flight"),
                    });
                }
                let s = q.slots[slot];
                q.slots[slot].in_flight = false;
                let status = format.completion(mem, q.ring.layout(), slot)?;
                let ok = status == Completion::Ok;
                if !ok {
                    io_errors += 1;
                    if io_errors <= 5 {
                        eprintln!(
                            "rvhost-perf: queue {qi}: {:?} of block {} failed: {status:?}",
                            s.dir, s.block
                        );
                    }
                }
                if let Some(v) = verifier.as_deref_mut() {
                    match s.dir {
                        Dir::Write => v.finish_write(s.block, s.generation, ok),
                        Dir::Read => {
                            mem.read(q.ring.layout().data_at(slot), &mut scratch)?;
                            let outcome = if ok {
                                v.finish_read(s.block, &scratch)
                            } else {
                                v.finish_read(s.block, &[])
                            };
                            match outcome {
                                VerifyOutcome::Good => verified_reads += 1,
                                VerifyOutcome::Unchecked => {}
                                VerifyOutcome::Bad { offset } if ok => {
                                    verified_reads += 1;
                                    verify_errors += 1;
                                    if verify_errors <= 5 {
                                        eprintln!(
                                            "rvhost-perf: verify: block {} (byte offset {}) differs at byte {offset}",
                                            s.block,
                                            s.block * u64::from(bs)
                                        );
                                    }
                                }
                                VerifyOutcome::Bad { .. } => {}
                            }
                        }
                    }
                }
                if s.submitted_ns < end_ns && now <= end_ns.saturating_add(1_000_000) {
                    let d = dir_index(s.dir);
                    let lat = now.saturating_sub(s.submitted_ns).max(1);
                    counters.hist[d].saturating_record(lat.min(MAX_LATENCY_NS));
                    counters.ios[d] += 1;
                    counters.lat_sum[d] += u128::from(lat);
                    interval_ios[d] += 1;
                    interval_lat += u128::from(lat);
                }
                if pacer.is_some() {
                    q.idle.push(slot);
                } else if !stopping {
                    submit(
                        q,
                        slot,
                        now,
                        &mut tag,
                        generator,
                        &mut verifier,
                        &mut scratch,
                    )?;
                }
            }
            let mut offered = 0u64;
            if let Some(p) = pacer.as_mut().filter(|_| !stopping) {
                let allowed = p.allowance(now);
                while offered < allowed {
                    let Some(slot) = q.idle.pop() else { break };
                    submit(
                        q,
                        slot,
                        now,
                        &mut tag,
                        generator,
                        &mut verifier,
                        &mut scratch,
                    )?;
                    offered += 1;
                }
                p.offered += offered;
            }
            if offered > 0 {
                did_work = true;
            }
            if pending > 0 || offered > 0 {
                q.ring.suppress_interrupts()?;
                if q.ring.publish()? {
                    if let Some(k) = q.kick {
                        k.write(1).map_err(PerfError::EventFd)?;
                    }
                    kicks += 1;
                }
            }
            in_flight += u64::from(q.ring.in_flight());
        }
        prev_busy = did_work;
        if now >= next_report_ns && !stopping {
            let secs = (now - (next_report_ns - 1_000_000_000)) as f64 / 1e9;
            let dr = interval_ios[0] - last_report.0[0];
            let dw = interval_ios[1] - last_report.0[1];
            let dl = interval_lat - last_report.1;
            let n = dr + dw;
            progress(&Interval {
                second: next_report_ns / 1_000_000_000,
                read_iops: dr as f64 / secs,
                write_iops: dw as f64 / secs,
                mib_s: (n as f64 * f64::from(bs)) / secs / (1 << 20) as f64,
                avg_lat_ns: if n > 0 { dl as f64 / n as f64 } else { 0.0 },
            });
            last_report = (interval_ios, interval_lat);
            next_report_ns += 1_000_000_000;
        }
        if stopping {
            if in_flight == 0 {
                break;
            }
            if drain_deadline.is_some_and(|d| Instant::now() > d) {
                return Err(PerfError::Stuck(in_flight));
            }
        }
    }

    let seconds = opts.time.as_secs_f64();
    let dir_report = |d: usize| -> DirReport {
        let h = &counters.hist[d];
        let ios = counters.ios[d];
        DirReport {
            ios,
            iops: ios as f64 / seconds,
            mib_s: ios as f64 * f64::from(bs) / seconds / (1 << 20) as f64,
            latency: if ios == 0 {
                Latency::default()
            } else {
                Latency {
                    avg_ns: counters.lat_sum[d] as f64 / ios as f64,
                    p50_ns: h.value_at_quantile(0.50),
                    p99_ns: h.value_at_quantile(0.99),
                    p999_ns: h.value_at_quantile(0.999),
                    max_ns: h.max(),
                }
            },
        }
    };
    let read = dir_report(0);
    let write = dir_report(1);
    let mut both = counters.hist[0].clone();
    both.add(&counters.hist[1])
        .map_err(|e| PerfError::Options(format!("histogram: {e}")))?;
    let ios = read.ios + write.ios;
    let total = DirReport {
        ios,
        iops: ios as f64 / seconds,
        mib_s: read.mib_s + write.mib_s,
        latency: if ios == 0 {
            Latency::default()
        } else {
            Latency {
                avg_ns: (counters.lat_sum[0] + counters.lat_sum[1]) as f64 / ios as f64,
                p50_ns: both.value_at_quantile(0.50),
                p99_ns: both.value_at_quantile(0.99),
                p999_ns: both.value_at_quantile(0.999),
                max_ns: both.max(),
            }
        },
    };
    let all_ios = (ios.max(1)) as f64;
    Ok(RunReport {
        device: opts.device,
        rw: opts.rw,
        block_size: bs,
        queue_depth: opts.queue_depth,
        queues: opts.queues,
        disk,
        event_idx: false,
        packed: false,
        indirect: false,
        page_kind: PageKind::Base4KiB,
        rate: opts.rate,
        seconds,
        read,
        write,
        total,
        io_errors,
        verify_errors,
        verified_reads,
        initiator: InitiatorCost {
            busy_fraction: busy_ns as f64 / prev_now.max(1) as f64,
            busy_ns_per_io: busy_ns as f64 / all_ios,
            polls_per_io: polls as f64 / all_ios,
            kicks_per_io: kicks as f64 / all_ios,
        },
        dirty_log: None,
    })
}

#[cfg(test)]
mod tests {
    use super::Pacer;

    #[test]
    fn pacer_allows_the_rate_and_keeps_at_most_the_backlog_cap() {
        let mut p = Pacer {
            rate: 1_000_000,
            offered: 0,
            backlog_cap: 32,
        };
        assert_eq!(p.allowance(0), 0);
        // 10 us at 1M/s: 10 requests due.
        assert_eq!(p.allowance(10_000), 10);
        p.offered += 4;
        assert_eq!(p.allowance(10_000), 6);
        p.offered += 6;
        assert_eq!(p.allowance(10_999), 0);
        assert_eq!(p.allowance(11_000), 1);
        // A stall of 1 ms (1000 due) leaves only the cap, and the missed ones are not owed later.
        assert_eq!(p.allowance(1_011_000), 32);
        p.offered += 32;
        assert_eq!(p.allowance(1_012_000), 1);
    }

    #[test]
    fn pacer_does_not_overflow_at_extreme_rates() {
        let mut p = Pacer {
            rate: u64::MAX,
            offered: 0,
            backlog_cap: 8,
        };
        assert_eq!(p.allowance(u64::MAX), 8);
    }
}
