//! Error conversion: the one place core errors become Python exceptions.

use nibblora_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;

/// The one place core errors become Python exceptions: a missing file is FileNotFoundError, other I/O
/// failures OSError, an interruption KeyboardInterrupt, everything else ValueError (bad values or input).
pub(crate) fn to_py_err(phase: &str, err: Error) -> PyErr {
    let message = format!("{phase}: {err}");
    match err {
        Error::Io { not_found: true, .. } => PyFileNotFoundError::new_err(message),
        Error::Io { .. } => PyOSError::new_err(message),
        Error::Interrupted => PyKeyboardInterrupt::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

pub(crate) fn not_contiguous() -> PyErr {
    PyValueError::new_err("array must be C-contiguous; call .contiguous() on the tensor first")
}
