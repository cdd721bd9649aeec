//! `rvhost-nvme`: inspect and exercise an NVMe controller bound to `vfio-pci` with rvhost's driver.
//!
//! - `rvhost-nvme identify BDF`: controller and namespaces.
//! - `rvhost-nvme perf BDF --time 5 --qd 32`: polled 4 KiB random reads, IOPS and latency.
//! - `rvhost-nvme selftest BDF`: the data-integrity exercise the guest test runs (multi-queue
//!   write/read-back, flush, write zeroes, deallocate, reset with I/O in flight).

mod perf;
mod selftest;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rvhost_nvme::{Controller, ControllerConfig, SglPolicy};

#[derive(Debug, Parser)]
#[command(
    name = "rvhost-nvme",
    version,
    about = "rvhost's user-space VFIO NVMe driver tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the controller and its namespaces.
    Identify {
        /// PCI address of a controller bound to vfio-pci (`0000:01:00.0`).
        bdf: String,
    },
    /// Polled random-read benchmark.
    Perf {
        /// PCI address.
        bdf: String,
        /// Seconds to run.
        #[arg(long, default_value_t = 5)]
        time: u64,
        /// Commands kept in flight.
        #[arg(long, default_value_t = 32)]
        qd: u16,
        /// Bytes per read (a multiple of the block size).
        #[arg(long, default_value_t = 4096)]
        io_size: u32,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
    },
    /// Checks a namespace's backing file (on the host, after `selftest` ran in a guest) against the
    /// self test's final layout.
    VerifyImage {
        /// The raw image file.
        path: std::path::PathBuf,
        /// Logical block size the namespace had.
        #[arg(long, default_value_t = 512)]
        block_size: usize,
    },
    /// Data-integrity self test (destroys the namespace's contents).
    Selftest {
        /// PCI address.
        bdf: String,
        /// I/O queue pairs, each driven by its own thread.
        #[arg(long, default_value_t = 2)]
        queues: u16,
        /// Commands in flight per queue.
        #[arg(long, default_value_t = 16)]
        qd: u16,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// When to use SGLs: never, when-needed or always.
        #[arg(long, value_enum, default_value_t = SglArg::WhenNeeded)]
        sgl: SglArg,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SglArg {
    Never,
    WhenNeeded,
    Always,
}

impl From<SglArg> for SglPolicy {
    fn from(arg: SglArg) -> Self {
        match arg {
            SglArg::Never => SglPolicy::Never,
            SglArg::WhenNeeded => SglPolicy::WhenNeeded,
            SglArg::Always => SglPolicy::Always,
        }
    }
}

fn print_identify(ctrl: &Controller) {
    let info = ctrl.info();
    let cap = ctrl.capabilities();
    println!("Controller {}", ctrl.bdf());
    println!("  vendor id        {:#06x}", info.vendor_id);
    println!("  model            {}", info.model);
    println!("  serial           {}", info.serial);
    println!("  firmware         {}", info.firmware);
    println!("  version          {}", ctrl.version());
    println!("  controller id    {}", info.controller_id);
    println!("  max queue size   {}", cap.max_queue_entries);
    println!("  ready timeout    {:?}", cap.ready_timeout());
    println!(
        "  doorbell stride  {} bytes",
        4u32 << cap.doorbell_stride_shift
    );
    println!("  max transfer     {} bytes", ctrl.max_transfer_bytes());
    println!("  I/O queues       {} granted", ctrl.io_queues_granted());
    println!(
        "  SGL              {}",
        if info.sgl_supported {
            "supported"
        } else {
            "no"
        }
    );
    println!(
        "  write cache      {}",
        if info.volatile_write_cache {
            "volatile"
        } else {
            "none"
        }
    );
    println!(
        "  optional cmds    dsm={} write-zeroes={}",
        info.supports_dsm(),
        info.supports_write_zeroes()
    );
    println!(
        "  namespaces       {} active usable of {}",
        ctrl.namespaces().len(),
        info.namespace_count
    );
    for ns in ctrl.namespaces() {
        println!(
            "Namespace {}: {} blocks of {} B ({} MiB), capacity {}, used {}",
            ns.nsid,
            ns.size_blocks,
            ns.block_size(),
            ns.size_bytes() >> 20,
            ns.capacity_blocks,
            ns.utilization_blocks
        );
        for (i, f) in ns.formats.iter().enumerate() {
            let size = f
                .block_size()
                .map_or_else(|| "?".to_string(), |s| s.to_string());
            let mark = if i == ns.format_index {
                " (in use)"
            } else {
                ""
            };
            println!(
                "  LBA format {i}: data {size} B, metadata {} B, rp {}{mark}",
                f.metadata_size, f.relative_performance
            );
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Identify { bdf } => {
            let ctrl = Controller::open(
                &bdf,
                ControllerConfig {
                    io_queues: 1,
                    ..Default::default()
                },
            )
            .with_context(|| format!("opening {bdf}"))?;
            print_identify(&ctrl);
        }
        Command::Perf {
            bdf,
            time,
            qd,
            io_size,
            nsid,
        } => {
            let ctrl = Controller::open(
                &bdf,
                ControllerConfig {
                    io_queues: 1,
                    ..Default::default()
                },
            )
            .with_context(|| format!("opening {bdf}"))?;
            let info = ctrl.info();
            println!(
                "{} {} (serial {}, firmware {}), {} I/O queue",
                ctrl.bdf(),
                info.model,
                info.serial,
                info.firmware,
                ctrl.io_queues_granted()
            );
            for ns in ctrl.namespaces() {
                println!(
                    "  namespace {}: {} blocks of {} B",
                    ns.nsid,
                    ns.size_blocks,
                    ns.block_size()
                );
            }
            let report = perf::run(
                &ctrl,
                nsid,
                qd,
                io_size,
                std::time::Duration::from_secs(time),
            )?;
            println!("{report}");
        }
        Command::VerifyImage { path, block_size } => {
            let chunks = selftest::verify_image(&path, block_size)?;
            println!(
                "image {} verified: {chunks} chunks as the self test left them",
                path.display()
            );
        }
        Command::Selftest {
            bdf,
            queues,
            qd,
            nsid,
            sgl,
        } => {
            let config = ControllerConfig {
                io_queues: queues,
                sgl: sgl.into(),
                ..Default::default()
            };
            let ctrl = Controller::open(&bdf, config).with_context(|| format!("opening {bdf}"))?;
            print_identify(&ctrl);
            selftest::run(&ctrl, nsid, queues, qd)?;
            println!("SELFTEST PASS");
        }
    }
    Ok(())
}
