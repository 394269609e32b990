//! The library's error type: every bad input ends here with a message that names the file, tensor or
//! field at fault, in the library's own vocabulary (a policy field is `kv_budget`, not a CLI flag), so
//! every front end — CLI, Triton backend, services — can show it as is or translate it.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in fastkv, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },

    #[error("{}: tensor `{name}` has {what} {actual}, expected {expected}", path.display())]
    TensorMismatch { path: PathBuf, name: String, what: &'static str, expected: String, actual: String },

    #[error("{}: unsupported model_type `{found}` (supported: {supported})", path.display())]
    UnsupportedModel { path: PathBuf, found: String, supported: &'static str },

    #[error("{}: engine format version {found} is newer than this fastkv reads ({supported}); rebuild the engine or upgrade fastkv", path.display())]
    EngineVersion { path: PathBuf, found: String, supported: String },

    /// A request, policy or option value out of range. `field` is the library's name for it
    /// (`kv_budget`, `prompt`); the CLI shows it as `--kv-budget`.
    #[error("invalid {field}: {msg}")]
    InvalidArgument { field: &'static str, msg: String },

    #[error("{0}")]
    Tokenizer(String),

    /// The backend was not compiled into this build.
    #[error("the {device} backend is not in this build of fastkv: rebuild with `--features {feature}`")]
    NotBuilt { device: String, feature: &'static str },

    /// The backend cannot run what was asked (e.g. a baseline that exists only on the CPU).
    #[error("{what} is not supported on the {backend} backend (it supports: {supported})")]
    Unsupported { backend: &'static str, what: String, supported: String },

    /// No driver, library or device for a backend: what is missing and what to do about it.
    #[error("no {backend} device: {reason}")]
    NoDevice { backend: &'static str, reason: String },

    /// The request was cancelled (its client went away, or asked) before it finished.
    #[error("the request was cancelled")]
    Cancelled,

    /// The batching engine's queue is full: the request may be retried later.
    #[error("the server is busy: {waiting} requests are waiting already; retry later")]
    QueueFull { waiting: usize },

    /// The batching engine is shutting down and takes no new requests.
    #[error("the server is shutting down")]
    ShuttingDown,

    /// A device call failed: which operation, the backend's error code, and its message.
    #[error("{backend} {operation} failed{}: {message}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
    Device { backend: &'static str, operation: String, code: Option<i64>, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn bad_file(path: &Path, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.to_path_buf(), msg: msg.into() }
    }

    /// The message as the command-line tools show it: a field (`kv_budget`) is named by its flag
    /// (`--kv-budget`).
    pub fn cli_message(&self) -> String {
        match self {
            Error::InvalidArgument { field, msg } => format!("invalid --{}: {msg}", field.replace('_', "-")),
            other => other.to_string(),
        }
    }

    pub(crate) fn invalid(field: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { field, msg: msg.into() }
    }
}
