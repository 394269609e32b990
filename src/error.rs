//! The library's error type: every bad input ends here with a message that names the file, tensor or
//! flag at fault, so callers (CLI, Triton backend, services) can show it as is.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in fastkv, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
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

    #[error("invalid {flag}: {msg}")]
    InvalidArgument { flag: &'static str, msg: String },

    #[error("{0}")]
    Tokenizer(String),

    /// No NVIDIA driver or no device: CUDA paths report it and callers (tests) may skip.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),

    #[error("CUDA: {0}")]
    Cuda(String),

    /// A TensorRT library, plugin library or plugin call failed; the message says which and why.
    #[error("TensorRT: {0}")]
    TensorRt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn bad_file(path: &Path, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.to_path_buf(), msg: msg.into() }
    }

    pub(crate) fn invalid(flag: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { flag, msg: msg.into() }
    }
}
