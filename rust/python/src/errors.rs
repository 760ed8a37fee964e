//! Error conversion: the one place core errors become Python exceptions.

use nibblora_core::Error;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The one place core errors become Python exceptions. All are ValueError: bad values the caller passed.
pub(crate) fn to_py_err(phase: &str, err: Error) -> PyErr {
    PyValueError::new_err(format!("{phase}: {err}"))
}

pub(crate) fn not_contiguous() -> PyErr {
    PyValueError::new_err("array must be C-contiguous; call .contiguous() on the tensor first")
}
