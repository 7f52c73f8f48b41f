//! One error type for the whole core. Every variant names the file, tensor or module it is about,
//! so the one line a user sees says what is wrong and where.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS-level failure reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file that is truncated, corrupt or otherwise not what its header says.
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    /// A JSON file (config, index) that cannot be parsed or lacks a required field.
    #[error("{path}: {reason}")]
    Json { path: PathBuf, reason: String },
    /// An adapter folder or adapter config that lorafast cannot use.
    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    /// Something lorafast deliberately does not handle (yet), with a reason.
    #[error("{path}: unsupported: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// An adapter tensor whose shape does not fit the base weight it targets.
    #[error("module {module}: {reason}")]
    Shape { module: String, reason: String },
    /// The merge produced a non-finite value (checked with safe merge).
    #[error("tensor {tensor}: {reason}")]
    NonFinite { tensor: String, reason: String },
    /// The output path is unusable (exists, or is one of the inputs).
    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },
    /// A bad argument (weights count, thread count, dtype name...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller asked us to stop (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn adapter(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Adapter {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub fn unsupported(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub fn shape(module: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Shape {
            module: module.into(),
            reason: reason.into(),
        }
    }
    pub fn json(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Json {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
