//! The application: start-up configuration, the RPC server and the control loop, over any data
//! plane ([`ControllerOps`]).
//!
//! The control thread (the caller of [`App::run`]) owns the bdevs and is the only thread that
//! runs RPC methods or calls the data plane; connection threads only frame requests and hand them
//! over. It wakes at least every [`SHUTDOWN_POLL`] to notice a shutdown request from a signal,
//! and then ticks the bdev modules' housekeeping. The methods it serves are in [`methods`].

pub mod methods;
pub mod metrics;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvhost_platform_linux::SocketAccess;
use serde_json::{json, Value};

use crate::bdev::malloc::MemoryBudget;
use crate::config::{self, ConfigError};
use crate::ops::ControllerOps;
use crate::rpc::jsonrpc::{handle_message, Dispatch};
use crate::rpc::server::{Incoming, RpcServer, ServerError, QUEUED_MESSAGES};
use crate::rpc::RpcError;
use methods::{KillRequest, LogControl, RpcMethods};

/// How often the control loop checks for a shutdown request when no RPC arrives.
pub const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// Name of the RAM bdev created when there is no configuration file.
pub const DEFAULT_BDEV: &str = "Malloc0";
/// Name of the vhost-blk controller created when there is no configuration file.
pub const DEFAULT_CONTROLLER: &str = "vhost.0";
/// Size of the default RAM bdev.
pub const DEFAULT_BDEV_BYTES: u64 = 256 * 1024 * 1024;
/// Block size of the default RAM bdev.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;
/// How long a stopping target waits for the requests in flight by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the application is asked to do at start.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Where controller sockets go.
    pub socket_dir: PathBuf,
    /// The cores reactors run on (bit i = core i).
    pub cpumask: u64,
    /// How many bytes RAM bdevs may use in total.
    pub memory_bytes: u64,
    /// The JSON-RPC socket.
    pub rpc_socket: PathBuf,
    /// The start-up configuration file, if any.
    pub json_config: Option<PathBuf>,
    /// Log and skip failing configuration entries instead of refusing to start.
    pub ignore_init_errors: bool,
    /// Without a configuration file, start empty instead of with Malloc0 on vhost.0.
    pub no_default: bool,
    /// The log level or filter in force (`-L`), reported by `log_get_level`.
    pub log_level: String,
    /// How long a stop waits for the requests in flight to complete.
    pub shutdown_timeout: Duration,
    /// Group and mode of the RPC socket, set before it accepts.
    pub rpc_socket_access: SocketAccess,
    /// Where to serve metrics (Prometheus text format), if anywhere.
    pub metrics: Option<metrics::MetricsAddr>,
}

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not in SPDK's format.
    #[error("configuration file {path}: {source}")]
    ConfigFormat {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
    /// A configuration entry failed.
    #[error("{origin}: {method} failed: {error}")]
    ConfigCall {
        /// Where the entry is.
        origin: String,
        /// Its method.
        method: String,
        /// The error the method returned.
        error: RpcError,
    },
    /// The RPC server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// How [`App::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down cleanly (signal or `spdk_kill_instance` with a terminating signal).
    Clean,
    /// `spdk_kill_instance SIGKILL`: the caller should kill the process without cleaning up.
    Kill,
    /// A stop whose requests in flight did not all complete within the shutdown timeout: the
    /// caller should exit at once with a failure status (tearing the controllers down would
    /// wait for those requests again).
    DrainTimedOut,
}

/// A running target's control plane.
#[derive(Debug)]
pub struct App {
    methods: RpcMethods,
    events: Receiver<Incoming>,
    server: Option<RpcServer>,
    metrics: Option<metrics::MetricsServer>,
    shutdown: Arc<AtomicBool>,
    shutdown_timeout: Duration,
}

impl App {
    /// Applies the start-up configuration (or the default set-up), then starts serving RPC.
    /// `shutdown` is the flag signal handlers set; `log`, if given, lets the log RPCs change the
    /// log filter.
    pub fn start(
        config: &AppConfig,
        ops: Arc<dyn ControllerOps>,
        shutdown: Arc<AtomicBool>,
        log: Option<LogControl>,
    ) -> Result<Self, AppError> {
        let budget = MemoryBudget::new(config.memory_bytes);
        let mut methods = RpcMethods::new(ops, budget, config.cpumask, config.socket_dir.clone());
        if let Some(log) = log {
            methods.set_log_control(log, &config.log_level);
        }
        // A second instance started by mistake fails here, before its start-up configuration can
        // touch anything. (The socket itself is bound only once the configuration is applied: a
        // connectable RPC socket tells scripts that start-up is complete.)
        RpcServer::check_available(&config.rpc_socket)?;
        let calls = match &config.json_config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| AppError::ConfigRead {
                        path: path.clone(),
                        source,
                    })?;
                let calls = config::parse(&text).map_err(|source| AppError::ConfigFormat {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!("applying {} entries of {}", calls.len(), path.display());
                calls
            }
            None if config.no_default => Vec::new(),
            None => default_setup(),
        };
        for call in calls {
            match methods.call(&call.method, call.params) {
                Ok(_) => {}
                Err(error) if config.ignore_init_errors => {
                    tracing::error!("{}: {} failed (ignored): {error}", call.origin, call.method);
                }
                Err(error) => {
                    // Controllers already created must not outlive a failed start.
                    delete_all_controllers(methods.ops().as_ref());
                    return Err(AppError::ConfigCall {
                        origin: call.origin,
                        method: call.method,
                        error,
                    });
                }
            }
        }
        let (sender, events) = mpsc::sync_channel(QUEUED_MESSAGES);
        let sender_for_metrics = sender.clone();
        let server = match RpcServer::start_with_access(
            &config.rpc_socket,
            sender,
            &config.rpc_socket_access,
        ) {
            Ok(server) => server,
            Err(err) => {
                delete_all_controllers(methods.ops().as_ref());
                return Err(err.into());
            }
        };
        let metrics = match &config.metrics {
            None => None,
            Some(addr) => match metrics::MetricsServer::start(addr, sender_for_metrics) {
                Ok(server) => Some(server),
                Err(err) => {
                    delete_all_controllers(methods.ops().as_ref());
                    return Err(err.into());
                }
            },
        };
        Ok(App {
            methods,
            events,
            server: Some(server),
            metrics,
            shutdown,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// The control state (bdevs and the data plane).
    pub fn methods(&self) -> &RpcMethods {
        &self.methods
    }

    /// Serves RPC until a shutdown is requested; then stops serving, removes the RPC socket,
    /// drains the controllers (no new guest requests; those in flight complete and are published
    /// to the guests, within the shutdown timeout) and deletes every controller (which removes
    /// their sockets).
    pub fn run(mut self) -> Exit {
        let exit = self.serve();
        // Stop taking requests before tearing down what they would act on.
        drop(self.server.take());
        drop(self.metrics.take());
        // Tells systemd (Type=notify; nothing without NOTIFY_SOCKET) that the stop has begun.
        if let Err(err) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
            tracing::warn!(%err, "cannot notify the service manager (NOTIFY_SOCKET) of the stop");
        }
        if exit == Exit::Clean {
            if !self.drain() {
                return Exit::DrainTimedOut;
            }
            delete_all_controllers(self.methods.ops().as_ref());
            tracing::info!("shut down cleanly");
        }
        exit
    }

    /// Lets the guests' requests in flight complete before the controllers go, so a target
    /// started again from the same configuration finds every used ring up to date. Returns
    /// whether they all completed in time.
    fn drain(&self) -> bool {
        let timeout = self.shutdown_timeout;
        tracing::info!(
            timeout_s = timeout.as_secs_f64(),
            "stopping: no new guest requests; draining those in flight"
        );
        let started = Instant::now();
        let report = self.methods.ops().drain(timeout);
        let took = started.elapsed().as_secs_f64();
        if report.timed_out > 0 {
            tracing::error!(
                "shutdown timeout ({:.1} s) hit: {} of {} sessions still had requests in flight \
                 ({} requests of the others completed); exiting without waiting for them",
                timeout.as_secs_f64(),
                report.timed_out,
                report.sessions + report.timed_out,
                report.requests
            );
            return false;
        }
        tracing::info!(
            "drained {} requests in flight from {} sessions in {took:.3} s",
            report.requests,
            report.sessions
        );
        true
    }

    fn serve(&mut self) -> Exit {
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                tracing::info!("shutdown requested by signal");
                return Exit::Clean;
            }
            self.methods.tick_bdev_modules();
            match self.events.recv_timeout(SHUTDOWN_POLL) {
                Ok(incoming) => {
                    let methods = &mut self.methods;
                    incoming.answer(|message| handle_message(message, methods));
                    match self.methods.take_kill_request() {
                        Some(KillRequest::Shutdown(signal)) => {
                            tracing::info!("shutdown requested by spdk_kill_instance {signal}");
                            return Exit::Clean;
                        }
                        Some(KillRequest::Kill) => return Exit::Kill,
                        None => {}
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    tracing::error!("the RPC server stopped unexpectedly; shutting down");
                    return Exit::Clean;
                }
            }
        }
    }
}

fn delete_all_controllers(ops: &dyn ControllerOps) {
    match ops.controllers(None) {
        Ok(controllers) => {
            for controller in controllers {
                if let Err(err) = ops.delete_controller(&controller.ctrlr) {
                    tracing::warn!("deleting controller {}: {err}", controller.ctrlr);
                }
            }
        }
        Err(err) => tracing::warn!("listing controllers to delete them: {err}"),
    }
}

/// Without a configuration: a 256 MiB RAM bdev exported as `vhost.0`.
fn default_setup() -> Vec<config::ConfigCall> {
    let num_blocks = DEFAULT_BDEV_BYTES / u64::from(DEFAULT_BLOCK_SIZE);
    let call = |method: &str, params: Value| config::ConfigCall {
        method: method.to_owned(),
        params: Some(params),
        origin: "default set-up".to_owned(),
    };
    vec![
        call(
            "bdev_malloc_create",
            json!({"name": DEFAULT_BDEV, "num_blocks": num_blocks, "block_size": DEFAULT_BLOCK_SIZE}),
        ),
        call(
            "vhost_create_blk_controller",
            json!({"ctrlr": DEFAULT_CONTROLLER, "dev_name": DEFAULT_BDEV}),
        ),
    ]
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .and_then(|kib| kib.checked_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::methods::tests::FakeOps;
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rvhost-app-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(dir: &Path) -> AppConfig {
        AppConfig {
            socket_dir: dir.to_owned(),
            cpumask: 1,
            memory_bytes: 1 << 30,
            rpc_socket: dir.join("rpc.sock"),
            json_config: None,
            ignore_init_errors: false,
            no_default: false,
            log_level: "info".into(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            rpc_socket_access: SocketAccess::default(),
            metrics: None,
        }
    }

    fn request(conn: &mut BufReader<UnixStream>, text: &str) -> Value {
        conn.get_mut().write_all(text.as_bytes()).unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn default_setup_then_serve_until_killed() {
        let dir = temp_dir("default");
        let ops = Arc::new(FakeOps::default());
        let app = App::start(
            &config(&dir),
            ops.clone(),
            Arc::new(AtomicBool::new(false)),
            None,
        )
        .unwrap();
        assert_eq!(
            app.methods()
                .bdevs()
                .get(DEFAULT_BDEV)
                .unwrap()
                .num_blocks(),
            524_288
        );
        assert!(ops
            .controllers
            .lock()
            .unwrap()
            .contains_key(DEFAULT_CONTROLLER));
        let rpc = dir.join("rpc.sock");
        let runner = std::thread::spawn(move || app.run());
        let mut conn = BufReader::new(UnixStream::connect(&rpc).unwrap());
        // Two requests in one write, then one split over three writes.
        conn.get_mut()
            .write_all(br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1}{"jsonrpc":"2.0","method":"spdk_get_version","id":2}"#)
            .unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        let first: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(first["result"][0]["name"], DEFAULT_BDEV);
        line.clear();
        conn.read_line(&mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["id"], 2);
        for part in [
            r#"{"jsonrpc":"2.0","#,
            r#""method":"bdev_null_create","params":{"name":"N","#,
            r#""num_blocks":8,"block_size":512},"id":3}"#,
        ] {
            conn.get_mut().write_all(part.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        line.clear();
        conn.read_line(&mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["result"], "N");
        let reply = request(
            &mut conn,
            r#"{"jsonrpc":"2.0","method":"spdk_kill_instance","params":{"sig_name":"SIGINT"},"id":4}"#,
        );
        assert_eq!(reply["result"], true);
        assert_eq!(runner.join().unwrap(), Exit::Clean);
        assert!(!rpc.exists(), "RPC socket left behind");
        assert!(
            ops.controllers.lock().unwrap().is_empty(),
            "controllers left behind"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_and_oversized_requests_close_only_their_connection() {
        let dir = temp_dir("garbage");
        let mut cfg = config(&dir);
        cfg.no_default = true;
        let shutdown = Arc::new(AtomicBool::new(false));
        let app = App::start(&cfg, Arc::new(FakeOps::default()), shutdown.clone(), None).unwrap();
        let runner = std::thread::spawn(move || app.run());
        let rpc = dir.join("rpc.sock");

        let mut bad = UnixStream::connect(&rpc).unwrap();
        bad.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"rpc_get_methods\",\"id\":1} ]]garbage")
            .unwrap();
        let mut all = String::new();
        bad.read_to_string(&mut all).unwrap();
        let replies: Vec<Value> = all
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(replies.len(), 2, "{all}");
        assert!(replies[0]["result"].is_array());
        assert_eq!(replies[1]["error"]["code"], -32700);
        assert_eq!(replies[1]["id"], Value::Null);

        let mut big = UnixStream::connect(&rpc).unwrap();
        let huge = format!(
            r#"{{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":{{"name":"{}"}},"id":9}}"#,
            "x".repeat(1 << 20)
        );
        // The server may close before reading everything; a broken pipe here is expected.
        let _ = big.write_all(huge.as_bytes());
        let mut reply = String::new();
        let _ = big.read_to_string(&mut reply);
        let reply: Value = serde_json::from_str(reply.lines().next().unwrap()).unwrap();
        assert_eq!(reply["error"]["code"], -32700);
        assert!(reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit"));

        let mut good = BufReader::new(UnixStream::connect(&rpc).unwrap());
        let reply = request(
            &mut good,
            r#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":"after"}"#,
        );
        assert_eq!(reply, json!({"jsonrpc":"2.0","id":"after","result":[]}));

        shutdown.store(true, Ordering::Release);
        assert_eq!(runner.join().unwrap(), Exit::Clean);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_config_entry_stops_start_up_and_undoes_controllers() {
        let dir = temp_dir("config");
        let file = dir.join("conf.json");
        std::fs::write(
            &file,
            r#"{"subsystems":[{"subsystem":"bdev","config":[
                {"method":"bdev_malloc_create","params":{"name":"M","num_blocks":8,"block_size":512}}]},
              {"subsystem":"vhost_blk","config":[
                {"method":"vhost_create_blk_controller","params":{"ctrlr":"v0","dev_name":"M"}},
                {"method":"vhost_create_blk_controller","params":{"ctrlr":"v1","dev_name":"missing"}}]}]}"#,
        )
        .unwrap();
        let mut cfg = config(&dir);
        cfg.json_config = Some(file);
        let ops = Arc::new(FakeOps::default());
        let err =
            App::start(&cfg, ops.clone(), Arc::new(AtomicBool::new(false)), None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("subsystem vhost_blk, entry 1") && text.contains("missing"),
            "{text}"
        );
        assert!(ops.controllers.lock().unwrap().is_empty());
        assert!(!dir.join("rpc.sock").exists());

        cfg.ignore_init_errors = true;
        let app = App::start(&cfg, ops.clone(), Arc::new(AtomicBool::new(true)), None).unwrap();
        assert!(ops.controllers.lock().unwrap().contains_key("v0"));
        assert_eq!(app.run(), Exit::Clean);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_available_memory() {
        assert!(available_memory().is_some_and(|m| m > 0));
    }
}
