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
    /// An input file could not be opened or read (the binding maps `not_found` to a FileNotFoundError subclass,
    /// anything else to the input error of the area: the file is unusable).
    Io { path: String, message: String, not_found: bool },
    /// An output could not be written (disk full, permissions; maps to `OutputError`, an `OSError`).
    Output { path: String, message: String },
    /// A chat template failed to compile or render; the message says where and why (maps to `ValueError`).
    Template(String),
    /// The tokenizer file is missing pieces or cannot be read (maps to `ValueError`).
    Tokenizer(String),
    /// One input row is malformed; `location` is `file:line` or `row N` (maps to `ValueError`).
    Input { location: String, message: String },
    /// The caller asked to stop (Ctrl-C reached the progress callback); nothing was kept.
    Interrupted,
    /// A file's contents break its format (a corrupt or hostile safetensors header, a truncated file).
    Format { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) => write!(f, "{msg}"),
            Error::NonFinite { index } => write!(
                f,
                "input holds a non-finite value (NaN or infinity) at flat index {index}; \
                 the weights must be finite, so check the checkpoint or adapter for overflow"
            ),
            Error::LengthMismatch { what, expected, got } => {
                write!(f, "{what}: expected {expected} elements, got {got}")
            }
            Error::Io { path, message, .. } => write!(f, "{path}: {message}"),
            Error::Output { path, message } => write!(f, "writing {path}: {message}"),
            Error::Format { path, message } => write!(f, "{path}: {message}"),
            Error::Template(msg) | Error::Tokenizer(msg) => write!(f, "{msg}"),
            Error::Input { location, message } if location.is_empty() => write!(f, "{message}"),
            Error::Input { location, message } => write!(f, "{location}: {message}"),
            Error::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// An I/O failure on `path`, phrased for a user.
    pub fn io(path: &std::path::Path, err: &std::io::Error) -> Error {
        let not_found = err.kind() == std::io::ErrorKind::NotFound;
        let message = if not_found { "no such file or folder".to_string() } else { err.to_string() };
        Error::Io { path: path.display().to_string(), message, not_found }
    }

    /// A failure to write `path` (an output).
    pub fn write(path: &std::path::Path, err: &std::io::Error) -> Error {
        Error::Output { path: path.display().to_string(), message: err.to_string() }
    }
}
