//! The rvhost target binary: parses the command line, starts the data plane (reactors), applies
//! the start-up configuration and serves JSON-RPC until told to stop.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, EnvFilter};

use rvhost_platform_linux::SocketAccess;
use rvhost_target::app::methods::LogControl;
use rvhost_target::app::{available_memory, App, AppConfig, Exit};
use rvhost_target::cli::Cli;
use rvhost_target::dataplane::{Dataplane, DataplaneOptions};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(&cli.log);
    match run(&cli, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the stderr logger; returns the hook that lets `log_set_level` change its filter.
fn init_logging(level: &str) -> LogControl {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|err| {
            eprintln!("rvhost: invalid log level {level:?} ({err}); using info");
            EnvFilter::new("info")
        });
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only help on a terminal; they garble log files.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    Box::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// Tells systemd (`Type=notify`, through `NOTIFY_SOCKET`; nothing without it) that start-up is
/// complete. [`App::start`] returns only once the start-up configuration is applied, so every
/// configured controller's socket listens, and the RPC socket is bound last.
fn notify_ready(app: &App, config: &AppConfig) {
    let controllers = app.methods().ops().controllers(None).map_or(0, |c| c.len());
    let status = format!(
        "serving {controllers} controllers; RPC on {}",
        config.rpc_socket.display()
    );
    let states = [NotifyState::Ready, NotifyState::Status(&status)];
    if let Err(err) = sd_notify::notify(&states) {
        tracing::warn!(%err, "cannot notify the service manager (NOTIFY_SOCKET) of start-up");
    }
}

fn run(cli: &Cli, log: LogControl) -> anyhow::Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGQUIT, SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&shutdown))
            .with_context(|| format!("installing the handler for signal {signal}"))?;
    }
    let memory_bytes = match cli.mem_size_mib {
        Some(mib) => mib
            .checked_mul(1024 * 1024)
            .context("-s/--mem-size is too large")?,
        None => available_memory().unwrap_or(u64::MAX),
    };
    let config = AppConfig {
        socket_dir: cli.socket_dir.clone(),
        cpumask: cli.cpumask,
        memory_bytes,
        rpc_socket: cli.rpc_socket.clone(),
        json_config: cli.json_config.clone(),
        ignore_init_errors: cli.json_ignore_init_errors,
        no_default: cli.no_default,
        log_level: cli.log.clone(),
        shutdown_timeout: cli.shutdown_timeout,
        rpc_socket_access: SocketAccess {
            group: cli.rpc_socket_group,
            mode: cli.rpc_socket_mode,
        },
        metrics: cli.metrics.clone(),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        cpumask = format_args!("{:#x}", cli.cpumask),
        socket_dir = %cli.socket_dir.display(),
        memory_mib = memory_bytes / (1024 * 1024),
        "starting rvhost"
    );
    let options = DataplaneOptions {
        socket_access: SocketAccess {
            group: cli.socket_group,
            mode: cli.socket_mode,
        },
        ..DataplaneOptions::default()
    };
    let dataplane = Dataplane::start_with(cli.cpumask, cli.socket_dir.clone(), options)
        .context("starting the data plane")?;
    let app = match App::start(&config, dataplane.clone(), shutdown, Some(log)) {
        Ok(app) => app,
        Err(err) => {
            dataplane.shutdown();
            return Err(err.into());
        }
    };
    notify_ready(&app, &config);
    match app.run() {
        Exit::Clean => {}
        Exit::Kill => {
            tracing::warn!("spdk_kill_instance SIGKILL: exiting without cleaning up");
            signal_hook::low_level::raise(SIGKILL).context("raising SIGKILL")?;
        }
        // Tearing down the data plane would wait for the stuck requests again.
        Exit::DrainTimedOut => std::process::exit(1),
    }
    dataplane.shutdown();
    Ok(())
}
