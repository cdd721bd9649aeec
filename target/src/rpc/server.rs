//! The JSON-RPC Unix-socket server.
//!
//! One thread accepts connections and one thread per connection reads and frames requests; every
//! parsed message goes, in order, to the single control thread (which owns the bdevs and talks to
//! the data plane) as an [`Incoming`], and the control thread writes the reply. So methods never
//! run concurrently and replies on a connection come back in request order.
//!
//! Framing: JSON values are streamed with nothing between them. A read may carry several requests
//! or part of one; the reader parses every complete value in its buffer and keeps the rest. A
//! value that is not JSON gets a parse error (-32700) and the connection is closed, as in SPDK:
//! there is no way to find the start of the next request in a broken stream. The same happens to a
//! request larger than [`MAX_REQUEST_BYTES`]; other connections are unaffected.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rvhost_platform_linux::{ControlListener, ListenError, ListenerHandle, SocketAccess};
use serde_json::Value;

use super::jsonrpc::error_response;
use super::{RpcError, PARSE_ERROR};

/// Largest request accepted, in bytes. SPDK's server reads into a fixed 32 KiB buffer and stalls
/// on anything larger; rvhost allows more (start-up configs can be big) but still bounds the
/// memory one client can make it hold.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Most connections served at once (SPDK's `SPDK_JSONRPC_MAX_CONNS`); more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Parsed messages waiting for the control thread, over all connections. When the queue is full,
/// connection threads stop reading, so a client that floods requests is held back by its socket
/// instead of growing the target's memory.
pub const QUEUED_MESSAGES: usize = 256;

/// How long the control thread may block writing one reply to a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const READ_CHUNK: usize = 16 * 1024;

/// What a connection hands to the control thread.
#[derive(Debug)]
pub enum Incoming {
    /// A complete JSON value (a request or a batch) to execute and answer on `conn`.
    Message {
        /// The client to answer.
        conn: Arc<UnixStream>,
        /// The parsed message.
        message: Value,
    },
    /// The stream broke (not JSON, or too large): answer `error` with id null, then close `conn`.
    Fatal {
        /// The client to answer.
        conn: Arc<UnixStream>,
        /// The error to send.
        error: RpcError,
    },
}

impl Incoming {
    /// Sends the reply to this message (if any), and closes the connection after a fatal error.
    /// Write failures only concern that client, so they are logged and otherwise ignored.
    pub fn answer(self, reply: impl FnOnce(Value) -> Option<Value>) {
        match self {
            Incoming::Message { conn, message } => {
                if let Some(response) = reply(message) {
                    if let Err(err) = send(&conn, &response) {
                        tracing::debug!("could not send an RPC reply: {err}");
                        let _ = conn.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
            Incoming::Fatal { conn, error } => {
                tracing::warn!("closing an RPC connection: {}", error.message);
                let _ = send(&conn, &error_response(Value::Null, &error));
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Writes one reply: the JSON object and a newline.
fn send(conn: &UnixStream, response: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let mut writer = conn;
    writer.write_all(&bytes)?;
    writer.flush()
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves the socket.
    #[error(
        "another process is already serving RPC on {0} (stop it, or pick another path with -r)"
    )]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding or another socket operation failed.
    #[error("cannot listen on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl From<ListenError> for ServerError {
    fn from(e: ListenError) -> Self {
        match e {
            ListenError::InUse(p) => ServerError::InUse(p),
            ListenError::NotASocket(p) => ServerError::NotASocket(p),
            ListenError::Io { path, source } => ServerError::Io { path, source },
        }
    }
}

/// A listening JSON-RPC server. Dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct RpcServer {
    path: PathBuf,
    listener: ListenerHandle,
    acceptor: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Listens on `path` and delivers parsed messages to `events`.
    ///
    /// A stale socket left by a crashed process is replaced; a live one is not.
    pub fn start(path: &Path, events: SyncSender<Incoming>) -> Result<Self, ServerError> {
        Self::start_with_access(path, events, &SocketAccess::default())
    }

    /// [`RpcServer::start`], with the socket file's group and mode set before it accepts.
    pub fn start_with_access(
        path: &Path,
        events: SyncSender<Incoming>,
        access: &SocketAccess,
    ) -> Result<Self, ServerError> {
        let listener = ControlListener::bind_with(path, access).map_err(ServerError::from)?;
        let handle = listener.handle();
        let acceptor = std::thread::Builder::new()
            .name("rpc-accept".into())
            .spawn(move || accept_loop(listener, events))
            .map_err(|source| {
                handle.remove_socket();
                ServerError::Io {
                    path: path.to_owned(),
                    source,
                }
            })?;
        tracing::info!("JSON-RPC server listening on {}", path.display());
        Ok(RpcServer {
            path: path.to_owned(),
            listener: handle,
            acceptor: Some(acceptor),
        })
    }

    /// Fails as [`RpcServer::start`] would if another process serves `path` or it is not a
    /// socket, without creating anything: lets start-up refuse before it changes any state.
    pub fn check_available(path: &Path) -> Result<(), ServerError> {
        ControlListener::check_free(path)
            .map(|_| ())
            .map_err(ServerError::from)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.listener.stop();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.listener.remove_socket();
    }
}

fn accept_loop(listener: ControlListener, events: SyncSender<Incoming>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok(Some(stream)) => stream,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!("accepting an RPC connection failed: {err}");
                // A persistent error (EMFILE) must not spin the thread.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            tracing::warn!("refusing an RPC connection: {MAX_CONNECTIONS} are already open");
            continue;
        }
        if let Err(err) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
            tracing::warn!("configuring an RPC connection failed: {err}");
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let conn = Arc::new(stream);
        let events = events.clone();
        let open_count = Arc::clone(&open);
        let spawned = std::thread::Builder::new()
            .name("rpc-conn".into())
            .spawn(move || {
                read_loop(&conn, &events);
                open_count.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(err) = spawned {
            open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("cannot start an RPC connection thread: {err}");
        }
    }
}

/// What the framer found at the front of a connection's buffer.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A complete value and the number of bytes it (and the whitespace before it) took.
    Value(Value, usize),
    /// Only whitespace: nothing to do until more bytes arrive.
    Empty,
    /// The start of a value; more bytes are needed.
    Incomplete,
    /// Not JSON.
    Invalid(String),
}

/// Finds the first complete JSON value in `buf`.
pub fn next_frame(buf: &[u8]) -> Frame {
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match values.next() {
        None => Frame::Empty,
        Some(Ok(value)) => Frame::Value(value, values.byte_offset()),
        Some(Err(err)) if err.is_eof() => Frame::Incomplete,
        Some(Err(err)) => Frame::Invalid(err.to_string()),
    }
}

fn read_loop(conn: &Arc<UnixStream>, events: &SyncSender<Incoming>) {
    let fatal = |message: String| {
        let error = RpcError::new(PARSE_ERROR, message);
        let _ = events.send(Incoming::Fatal {
            conn: Arc::clone(conn),
            error,
        });
    };
    let too_large = || {
        format!(
            "Parse error: request is larger than the {MAX_REQUEST_BYTES}-byte limit; closing the \
             connection"
        )
    };
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        loop {
            match next_frame(&buf) {
                Frame::Value(_, used) if used > MAX_REQUEST_BYTES => {
                    return fatal(too_large());
                }
                Frame::Value(message, used) => {
                    buf.drain(..used);
                    let sent = events.send(Incoming::Message {
                        conn: Arc::clone(conn),
                        message,
                    });
                    if sent.is_err() {
                        return; // the control thread is gone: shutting down
                    }
                }
                Frame::Empty => {
                    buf.clear();
                    break;
                }
                Frame::Incomplete => break,
                Frame::Invalid(reason) => {
                    return fatal(format!("Parse error: {reason}; closing the connection"));
                }
            }
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return fatal(too_large());
        }
        let mut reader: &UnixStream = conn;
        match reader.read(&mut chunk) {
            Ok(0) => {
                if !buf.is_empty() {
                    fatal(
                        "Parse error: the connection was closed in the middle of a request".into(),
                    );
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::debug!("RPC connection read failed: {err}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;

    #[test]
    fn replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
        let dir = std::env::temp_dir().join(format!("rvhost-server-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rpc.sock");
        let _ = std::fs::remove_file(&path);
        // A socket file nobody listens on, as a killed process leaves it.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (events, incoming) = std::sync::mpsc::sync_channel(QUEUED_MESSAGES);
        let server = RpcServer::start(&path, events.clone()).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .write_all(br#"{"jsonrpc":"2.0","method":"m","id":1}"#)
            .unwrap();
        let Ok(Incoming::Message { message, .. }) = incoming.recv_timeout(Duration::from_secs(10))
        else {
            panic!("no message delivered");
        };
        assert_eq!(message["method"], "m");
        assert!(matches!(
            RpcServer::start(&path, events.clone()),
            Err(ServerError::InUse(_))
        ));
        drop(server);
        assert!(
            !path.exists(),
            "the socket is removed when the server stops"
        );
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            RpcServer::start(&path, events),
            Err(ServerError::NotASocket(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn frames_back_to_back_split_and_broken_input() {
        let two = br#" {"a":1}{"b":[2]}  {"c""#;
        let Frame::Value(first, used) = next_frame(two) else {
            panic!("no first value")
        };
        assert_eq!(first, json!({"a":1}));
        let rest = &two[used..];
        let Frame::Value(second, used2) = next_frame(rest) else {
            panic!("no second value")
        };
        assert_eq!(second, json!({"b":[2]}));
        assert_eq!(next_frame(&rest[used2..]), Frame::Incomplete);
        assert_eq!(next_frame(b"  \n\t"), Frame::Empty);
        assert_eq!(next_frame(b""), Frame::Empty);
        assert!(matches!(next_frame(b"{\"a\":}"), Frame::Invalid(_)));
        assert!(matches!(next_frame(b"\xff\xfe"), Frame::Invalid(_)));
        assert!(matches!(next_frame(b"{\"a\":\"\xff\"}"), Frame::Invalid(_)));
        // Deep nesting is refused instead of overflowing the stack.
        let deep = "[".repeat(10_000);
        assert!(matches!(next_frame(deep.as_bytes()), Frame::Invalid(_)));
    }
}
