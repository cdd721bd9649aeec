//! The metrics endpoint (`--metrics ADDR`): Prometheus' text exposition format over HTTP, on a
//! TCP address or a Unix socket, served by `tiny_http` on a thread of its own.
//!
//! The endpoint reads nothing itself: each scrape is a `rvhost_get_metrics` call queued to the
//! control thread like any RPC request (through an in-process socket pair), so a scrape sees the
//! same state and counters as `bdev_get_iostat` and the other methods, and never races a change
//! of the bdev or controller set.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::rpc::server::Incoming;

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A TCP address (`127.0.0.1:9477`; port 0 picks a free one, which the log names).
    Tcp(std::net::SocketAddr),
    /// A Unix socket path (`unix:/run/rvhost/metrics.sock`, or any path starting with `/`).
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(text)));
        }
        text.parse().map(MetricsAddr::Tcp).map_err(|_| {
            format!("{text:?} is neither HOST:PORT (an IP address and a port) nor unix:PATH")
        })
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr:?}: {reason}")]
pub struct MetricsError {
    addr: MetricsAddr,
    reason: String,
}

/// How long a scrape waits for the control thread.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The running endpoint; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Listens on `addr` and answers scrapes by queueing `rvhost_get_metrics` on `control`.
    pub fn start(addr: &MetricsAddr, control: SyncSender<Incoming>) -> Result<Self, MetricsError> {
        let error = |reason: String| MetricsError {
            addr: addr.clone(),
            reason,
        };
        let (server, unix_path) = match addr {
            MetricsAddr::Tcp(socket) => (
                tiny_http::Server::http(socket).map_err(|e| error(e.to_string()))?,
                None,
            ),
            MetricsAddr::Unix(path) => {
                // A socket left by a process that died is in the way; anything else is not ours.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    && UnixStream::connect(path).is_err()
                {
                    let _ = std::fs::remove_file(path);
                }
                (
                    tiny_http::Server::http_unix(path).map_err(|e| error(e.to_string()))?,
                    Some(path.clone()),
                )
            }
        };
        let listening = match server.server_addr() {
            tiny_http::ListenAddr::IP(socket) => socket.to_string(),
            tiny_http::ListenAddr::Unix(path) => format!("{path:?}"),
        };
        tracing::info!(address = %listening, "metrics endpoint listening (Prometheus text format, GET /metrics)");
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&serving, &control))
            .map_err(|e| error(e.to_string()))?;
        Ok(MetricsServer {
            server,
            thread: Some(thread),
            unix_path,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn serve(server: &tiny_http::Server, control: &SyncSender<Incoming>) {
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let response = if request.method() != &tiny_http::Method::Get {
            tiny_http::Response::from_string("only GET\n").with_status_code(405)
        } else if path != "/metrics" && path != "/" {
            tiny_http::Response::from_string("metrics are at /metrics\n").with_status_code(404)
        } else {
            match scrape(control) {
                Ok(text) => tiny_http::Response::from_string(text).with_header(
                    tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4; charset=utf-8"[..],
                    )
                    .expect("a valid header"),
                ),
                Err(why) => {
                    tracing::warn!("metrics scrape failed: {why}");
                    tiny_http::Response::from_string(format!("{why}\n")).with_status_code(503)
                }
            }
        };
        if let Err(err) = request.respond(response) {
            tracing::debug!(%err, "could not answer a metrics scrape");
        }
    }
}

/// Asks the control thread for the metrics text.
fn scrape(control: &SyncSender<Incoming>) -> Result<String, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    ours.set_read_timeout(Some(SCRAPE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    control
        .send(Incoming::Message {
            conn: Arc::new(theirs),
            message: json!({"jsonrpc": "2.0", "id": 1, "method": "rvhost_get_metrics"}),
        })
        .map_err(|_| "the control thread is gone".to_string())?;
    let mut line = String::new();
    BufReader::new(ours)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the control thread: {e}"))?;
    let reply: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    match reply.get("result").and_then(Value::as_str) {
        Some(text) => Ok(text.to_owned()),
        None => Err(format!("rvhost_get_metrics failed: {reply}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:9477".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9477".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:0".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp("[::1]:0".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "/run/m.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert!("localhost:9477".parse::<MetricsAddr>().is_err());
        assert!("9477".parse::<MetricsAddr>().is_err());
    }
}
