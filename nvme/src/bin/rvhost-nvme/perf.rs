//! Polled random-read benchmark on one I/O queue pair.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rvhost_nvme::{Controller, DmaSegment};

/// What one run measured.
#[derive(Debug)]
pub struct PerfReport {
    io_size: u32,
    qd: u16,
    elapsed: Duration,
    completed: u64,
    errors: u64,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl fmt::Display for PerfReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let iops = self.completed as f64 / secs;
        let mib_s = iops * f64::from(self.io_size) / (1024.0 * 1024.0);
        writeln!(
            f,
            "random read {} B, qd {}, {:.1} s",
            self.io_size, self.qd, secs
        )?;
        writeln!(
            f,
            "  completed  {} ({} errors)",
            self.completed, self.errors
        )?;
        writeln!(f, "  IOPS       {iops:.0}")?;
        writeln!(f, "  bandwidth  {mib_s:.1} MiB/s")?;
        write!(
            f,
            "  latency    mean {:.1} us, p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            self.mean.as_secs_f64() * 1e6,
            self.p50.as_secs_f64() * 1e6,
            self.p99.as_secs_f64() * 1e6,
            self.max.as_secs_f64() * 1e6
        )
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Keeps `qd` random reads of `io_size` bytes in flight on namespace `nsid` for `time`.
pub fn run(
    ctrl: &Controller,
    nsid: u32,
    qd: u16,
    io_size: u32,
    time: Duration,
) -> Result<PerfReport> {
    let ns = ctrl
        .namespaces()
        .iter()
        .find(|n| n.nsid == nsid)
        .with_context(|| format!("no namespace {nsid}"))?
        .clone();
    let bs = ns.block_size();
    if io_size == 0 || io_size % bs != 0 {
        bail!("io size {io_size} is not a multiple of the block size {bs}");
    }
    let blocks = io_size / bs;
    let slots_max = ns.size_blocks / u64::from(blocks);
    if slots_max == 0 {
        bail!("namespace smaller than one I/O");
    }
    let qd = qd.max(1);
    let mut qp = ctrl.create_io_queue_pair(qd.saturating_add(1))?;
    let buffer = ctrl.allocate_dma(usize::from(qd) * io_size as usize)?;
    let mut submitted_at = vec![Instant::now(); usize::from(qd)];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let (mut completed, mut errors) = (0u64, 0u64);

    let submit = |qp: &mut rvhost_nvme::IoQueuePair, slot: u16, rng: &mut u64| {
        let lba = (xorshift(rng) % slots_max) * u64::from(blocks);
        let seg = DmaSegment {
            iova: buffer.iova() + u64::from(slot) * u64::from(io_size),
            len: io_size,
        };
        qp.read(nsid, lba, blocks, &[seg], u64::from(slot))
    };

    let start = Instant::now();
    for slot in 0..qd {
        submitted_at[usize::from(slot)] = Instant::now();
        submit(&mut qp, slot, &mut rng)?;
    }
    qp.ring();
    let deadline = start + time;
    let mut outstanding = usize::from(qd);
    let mut to_resubmit = Vec::with_capacity(usize::from(qd));
    while outstanding > 0 {
        let now = Instant::now();
        qp.poll(usize::MAX, |tag, result| {
            let slot = tag as usize;
            let lat = now.saturating_duration_since(submitted_at[slot]);
            latencies.push(u32::try_from(lat.as_nanos()).unwrap_or(u32::MAX));
            match result {
                Ok(()) => completed += 1,
                Err(_) => errors += 1,
            }
            to_resubmit.push(slot as u16);
        });
        outstanding -= to_resubmit.len();
        if now < deadline {
            for slot in to_resubmit.drain(..) {
                submitted_at[usize::from(slot)] = Instant::now();
                submit(&mut qp, slot, &mut rng)?;
                outstanding += 1;
            }
            qp.ring();
        } else {
            to_resubmit.clear();
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| -> Duration {
        let idx = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_nanos(latencies.get(idx).copied().map_or(0, u64::from))
    };
    let sum: u64 = latencies.iter().map(|&l| u64::from(l)).sum();
    let mean = Duration::from_nanos(sum / (latencies.len() as u64).max(1));
    Ok(PerfReport {
        io_size,
        qd,
        elapsed,
        completed,
        errors,
        mean,
        p50: pct(0.5),
        p99: pct(0.99),
        max: pct(1.0),
    })
}
