//! SPDK-compatible JSON-RPC: the protocol ([`jsonrpc`]), the Unix-socket server ([`server`]) and
//! the error replies every method gives. It knows nothing of what the methods do: the bdev
//! modules (`bdev::module`) and the control plane (`app::methods`) serve them.
//!
//! Wire format, as SPDK's `lib/jsonrpc`: JSON-RPC 2.0 objects streamed over a Unix stream socket
//! with no length prefix or delimiter; each reply is one JSON object followed by `\n`.

pub mod jsonrpc;
pub mod server;

use std::fmt;

/// JSON-RPC 2.0: the bytes are not JSON (the connection is then closed, as SPDK does).
pub const PARSE_ERROR: i32 = -32700;
/// JSON-RPC 2.0: the JSON is not a valid request object.
pub const INVALID_REQUEST: i32 = -32600;
/// JSON-RPC 2.0: no such method.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// JSON-RPC 2.0: the parameters are missing, ill-typed or unknown.
pub const INVALID_PARAMS: i32 = -32602;
/// JSON-RPC 2.0: the server failed.
pub const INTERNAL_ERROR: i32 = -32603;

/// SPDK replies `-errno` for failures of the operation itself; these are the ones rvhost uses.
pub mod errno {
    /// Operation not permitted (a bdev claimed by another bdev module).
    pub const EPERM: i32 = 1;
    /// No such process / entry.
    pub const ENOENT: i32 = 2;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Device or resource busy.
    pub const EBUSY: i32 = 16;
    /// The object already exists.
    pub const EEXIST: i32 = 17;
    /// No such device (missing bdev or controller).
    pub const ENODEV: i32 = 19;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Operation not supported.
    pub const ENOTSUP: i32 = 95;

    /// The C library's text for `errno`, which SPDK puts at the start of its error messages.
    pub fn text(errno: i32) -> &'static str {
        match errno {
            EPERM => "Operation not permitted",
            ENOENT => "No such file or directory",
            ENOMEM => "Cannot allocate memory",
            EBUSY => "Device or resource busy",
            EEXIST => "File exists",
            ENODEV => "No such device",
            EINVAL => "Invalid argument",
            ENOTSUP => "Operation not supported",
            _ => "Unknown error",
        }
    }
}

/// A JSON-RPC error object: `{"code": .., "message": ..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The JSON-RPC code (or SPDK's `-errno`).
    pub code: i32,
    /// What went wrong, for a person.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// -32602 with a description of what is wrong with the parameters.
    pub fn invalid_params(message: impl fmt::Display) -> Self {
        RpcError::new(INVALID_PARAMS, format!("Invalid parameters: {message}"))
    }

    /// SPDK's `-errno` reply: code `-errno`, message starting with the C library's text.
    pub fn errno(errno: i32, detail: impl fmt::Display) -> Self {
        RpcError::new(-errno, format!("{}: {detail}", errno::text(errno)))
    }

    /// The error as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}
