//! The one error type of the core. The binding crate maps each variant to a Python exception in one place.

use std::fmt;

/// Everything that can go wrong in the core, with enough context to say what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A value the caller passed is out of range or inconsistent (maps to `ValueError`).
    InvalidArgument(String),
    /// The input holds NaN or infinity; `index` is the first offending element in flattened order.
    NonFinite { index: usize },
    /// Two buffers that must agree in length do not.
    LengthMismatch { what: &'static str, expected: usize, got: usize },
    /// The operating system refused a file operation; `path` names the file (maps to `OSError`, or
    /// `FileNotFoundError` when `not_found`).
    Io { path: String, message: String, not_found: bool },
    /// A file's contents break its format (a corrupt or hostile safetensors header, a truncated file).
    Format { path: String, message: String },
}

impl Error {
    pub fn io(path: &std::path::Path, err: &std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            message: err.to_string(),
            not_found: err.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) => write!(f, "{msg}"),
            Error::NonFinite { index } => write!(
                f,
                "input holds a non-finite value (NaN or infinity) at flat index {index}; \
                 4-bit quantization needs finite weights, so check the checkpoint for overflow"
            ),
            Error::LengthMismatch { what, expected, got } => {
                write!(f, "{what}: expected {expected} elements, got {got}")
            }
            Error::Io { path, message, .. } => write!(f, "{path}: {message}"),
            Error::Format { path, message } => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for Error {}
