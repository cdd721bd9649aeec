//! `rvhost-perf`: a poll-mode vhost-user-blk/scsi initiator for measuring targets (see
//! `bench/README.md`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rvhost_bench::dirty_log::DirtyLogMode;
use rvhost_bench::engine::{Backend, DirReport, Interval, RunReport};
use rvhost_bench::{DeviceType, RwMode, WorkloadOptions};

/// Drives a vhost-user-blk or vhost-user-scsi target from one polling thread, the way SPDK's
/// bdevperf drives a virtio-user bdev: shared memfd memory (hugepages when available), N split
/// virtqueues, a fixed number of requests in flight per queue, no interrupts, kicks only when the
/// target asks for them.
#[derive(Debug, Parser)]
#[command(name = "rvhost-perf", version, about, verbatim_doc_comment)]
struct Cli {
    /// The target's vhost-user socket.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["loopback", "probe_cores"])]
    socket: Option<PathBuf>,
    /// Device type behind the socket.
    #[arg(long = "type", value_enum, default_value = "blk")]
    device: DeviceType,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: RwMode,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Bytes per request (suffixes k, m accepted: 4k).
    #[arg(long, default_value = "4k", value_parser = parse_size_u32)]
    bs: u32,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=341))]
    qd: u16,
    /// Request queues (all driven from the one thread).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Seconds to run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    time: u64,
    /// Bytes of the device to address, from offset 0 (default: all of it; suffixes k, m, g).
    #[arg(long, value_parser = parse_size_u64)]
    size: Option<u64>,
    /// CPU to pin the initiator to.
    #[arg(long)]
    cpu: Option<usize>,
    /// Write patterns and check them on read; exits non-zero on any mismatch.
    #[arg(long)]
    verify: bool,
    /// Do not negotiate VIRTIO_F_RING_EVENT_IDX (use the NO_NOTIFY flag for kick decisions).
    #[arg(long)]
    no_event_idx: bool,
    /// Drive packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones.
    #[arg(long)]
    packed: bool,
    /// Offer each request as one descriptor pointing at an indirect table of three (header,
    /// data, status), as a Linux guest does once VIRTIO_RING_F_INDIRECT_DESC is negotiated,
    /// instead of a chain of three descriptors in the ring. Fails if the target does not offer
    /// the feature; without this option it is not negotiated.
    #[arg(long)]
    indirect: bool,
    /// Use 4 KiB pages for the shared memory even when hugepages are available.
    #[arg(long)]
    no_hugepages: bool,
    /// Seed for the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Act as a migrating frontend (vhost-user "Migration"): hand the target a dirty log with
    /// SET_LOG_BASE and, with `on` (the default), turn logging on (VHOST_F_LOG_ALL, and
    /// VHOST_VRING_F_LOG on every vring) before the first request; `idle` hands the log over
    /// but leaves logging off. The pages the target marked are counted at the end.
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    dirty_log: Option<DirtyLogMode>,
    /// Offer this many requests per second (all queues together) instead of resubmitting each
    /// completion at once: a fixed load below saturation, for measuring a target's cost per
    /// request from its busy/idle time. --qd still bounds what is in flight.
    #[arg(long, value_name = "IOPS", value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Print the result as one JSON object on stdout (progress lines go to stderr).
    #[arg(long)]
    json: bool,
    /// Instead of a socket, complete requests with a trivial in-process responder on this CPU:
    /// measures the initiator's own ceiling and cost per I/O.
    #[arg(long, value_name = "CPU")]
    loopback: Option<usize>,
    /// Instead of a run, measure the cache-line round trip between two CPUs ("0,1") for
    /// --probe-ms and print it: what bounds every poll-mode figure between those cores.
    #[arg(long, value_name = "A,B", value_parser = parse_cpu_pair)]
    probe_cores: Option<(usize, usize)>,
    /// How long --probe-cores measures, in milliseconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    probe_ms: u64,
}

fn parse_cpu_pair(text: &str) -> Result<(usize, usize), String> {
    let (a, b) = text
        .split_once(',')
        .ok_or_else(|| format!("{text}: expected two CPUs, A,B"))?;
    let cpu = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("{t}: not a CPU number"))
    };
    Ok((cpu(a)?, cpu(b)?))
}

fn parse_size_u64(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (&t[..], 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{text}: not a size"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{text}: size out of range"))
}

fn parse_size_u32(text: &str) -> Result<u32, String> {
    let v = parse_size_u64(text)?;
    u32::try_from(v).map_err(|_| format!("{text}: too large"))
}

fn us(ns: f64) -> f64 {
    ns / 1000.0
}

fn print_dir(name: &str, d: &DirReport) {
    if d.ios == 0 {
        return;
    }
    let l = &d.latency;
    println!(
        "  {name:<5}: IOPS={:.0}, BW={:.1} MiB/s, lat (us): avg={:.2}, p50={:.2}, p99={:.2}, p99.9={:.2}, max={:.2}",
        d.iops,
        d.mib_s,
        us(l.avg_ns),
        us(l.p50_ns as f64),
        us(l.p99_ns as f64),
        us(l.p999_ns as f64),
        us(l.max_ns as f64)
    );
}

fn print_report(r: &RunReport) {
    println!(
        "rvhost-perf: {:?} {:?} bs={} qd={} queues={} ({}s, disk {} MiB, {}-byte blocks, event_idx={}, packed={}, indirect={}, {:?} pages)",
        r.device,
        r.rw,
        r.block_size,
        r.queue_depth,
        r.queues,
        r.seconds,
        r.disk.capacity >> 20,
        r.disk.block_size,
        r.event_idx,
        r.packed,
        r.indirect,
        r.page_kind
    );
    print_dir("read", &r.read);
    print_dir("write", &r.write);
    print_dir("total", &r.total);
    println!(
        "  initiator: {:.0}% busy, {:.1} ns per I/O, {:.2} polls per I/O, {:.4} kicks per I/O",
        r.initiator.busy_fraction * 100.0,
        r.initiator.busy_ns_per_io,
        r.initiator.polls_per_io,
        r.initiator.kicks_per_io
    );
    println!(
        "  errors: io={} verify={} (reads verified: {})",
        r.io_errors, r.verify_errors, r.verified_reads
    );
    if let Some(log) = &r.dirty_log {
        println!(
            "  dirty log ({:?}, {} bytes): {} pages marked, {} of {} data-buffer pages",
            log.mode, log.log_bytes, log.pages_marked, log.data_pages_marked, log.data_pages
        );
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rvhost-perf: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some((a, b)) = cli.probe_cores {
        let r = rvhost_bench::probe::core_round_trip(a, b, Duration::from_millis(cli.probe_ms))?;
        if cli.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "CPU {a} <-> CPU {b}: cache-line round trip {:.0} ns (median of {} batches; min {:.0}, max {:.0})",
                r.round_trip_ns, r.batches, r.min_ns, r.max_ns
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(cpu) = cli.cpu {
        // Before the memory is allocated, so it is first touched on this core's node.
        rvhost_platform_linux::cpu::pin_current_thread(cpu)
            .with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    let opts = WorkloadOptions {
        device: cli.device,
        rw: cli.rw,
        rwmixread: cli.rwmixread,
        block_size: cli.bs,
        queue_depth: cli.qd,
        queues: cli.queues,
        time: Duration::from_secs(cli.time),
        size: cli.size,
        verify: cli.verify,
        event_idx: !cli.no_event_idx,
        packed: cli.packed,
        indirect: cli.indirect,
        hugepages: !cli.no_hugepages,
        seed: cli.seed,
        dirty_log: cli.dirty_log,
        rate: cli.rate,
    };
    let backend = match (&cli.socket, cli.loopback) {
        (_, Some(cpu)) => Backend::Loopback {
            cpu: Some(cpu),
            capacity: cli.size.unwrap_or(1 << 30),
        },
        (Some(path), None) => Backend::Socket(path),
        (None, None) => anyhow::bail!("--socket or --loopback is required"),
    };
    let json = cli.json;
    let mut progress = |i: &Interval| {
        let line = format!(
            "[{:>4}s] read {:>10.0} IOPS  write {:>10.0} IOPS  {:>8.1} MiB/s  avg lat {:>8.2} us",
            i.second,
            i.read_iops,
            i.write_iops,
            i.mib_s,
            us(i.avg_lat_ns)
        );
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let report = rvhost_bench::run(backend, &opts, &mut progress)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.verify_errors > 0 || report.io_errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
