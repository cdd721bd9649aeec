//! Errors of the guest harness.

use std::io;
use std::path::PathBuf;

use crate::cpio::CpioError;

/// Everything that can go wrong while preparing, booting or talking to a test guest or its peer.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("host tool `{tool}` is missing and could not be installed: {detail}")]
    MissingTool { tool: String, detail: String },
    #[error("no usable Debian kernel package: {0}")]
    NoKernel(String),
    #[error("kernel module `{0}` is neither in modules.dep nor built in")]
    ModuleNotFound(String),
    #[error("initramfs: {0}")]
    Cpio(#[from] CpioError),
    #[error("guest `{name}` did not finish within {seconds} s\n{diagnostics}")]
    GuestTimeout {
        name: String,
        seconds: u64,
        diagnostics: String,
    },
    #[error("guest `{name}` failed: {reason}\n{diagnostics}")]
    GuestFailed {
        name: String,
        reason: String,
        diagnostics: String,
    },
    #[error("{peer} did not come up: {detail}")]
    PeerStart { peer: &'static str, detail: String },
    #[error("the rvhost binary could not be built or found: {0}")]
    RvhostUnavailable(String),
    #[error("JSON-RPC `{method}`: {detail}")]
    Rpc { method: String, detail: String },
}

impl HarnessError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
