//! Error conversion: the one place core errors become Python exceptions.

use nibblora_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

/// The one place core errors become Python exceptions: files that cannot be opened raise FileNotFoundError or
/// OSError; everything else (bad values, corrupt files) ValueError.
pub(crate) fn to_py_err(phase: &str, err: Error) -> PyErr {
    let message = format!("{phase}: {err}");
    match err {
        Error::Io { not_found: true, .. } => PyFileNotFoundError::new_err(message),
        Error::Io { .. } => PyOSError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

pub(crate) fn not_contiguous() -> PyErr {
    PyValueError::new_err("array must be C-contiguous; call .contiguous() on the tensor first")
}
