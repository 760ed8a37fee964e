//! Error conversion: the one place core errors become Python exceptions, and the enum arguments that are
//! converted (and validated) once, on the way in.
//!
//! The exception classes live in Python (`nibblora.errors`, so users catch `nibblora.CheckpointError`,
//! `nibblora.DataError`...) and are looked up when an error is raised. Each class subclasses the builtin
//! callers already catch (`ValueError`, `FileNotFoundError`, `OSError`).

use nibblora_core::data::{TrainOn, Truncation};
use nibblora_core::quant::QuantType;
use nibblora_core::safetensors::{Dtype, DtypeExt};
use nibblora_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Which part of the package a call belongs to: decides the class of input errors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    /// Checkpoint files (safetensors reading, merging): CheckpointError / CheckpointFileNotFoundError.
    Checkpoint,
    /// Data preparation (rows, templates, tokenizers, data files): DataError / DataFileNotFoundError.
    Data,
    /// Plain computations (quantization): InputError.
    Compute,
}

/// An instance of `nibblora.errors.<name>` carrying `message`; the builtin `fallback` if that module cannot
/// be imported (the extension used on its own).
fn raise(name: &str, message: String, fallback: fn(String) -> PyErr) -> PyErr {
    Python::with_gil(|py| {
        let class = py
            .import("nibblora.errors")
            .and_then(|m| m.getattr(name))
            .and_then(|c| c.downcast_into::<PyType>().map_err(PyErr::from));
        match class {
            Ok(class) => PyErr::from_type(class, message),
            Err(_) => fallback(message),
        }
    })
}

/// The one mapping from core errors to Python exceptions; `phase` prefixes the message ("reading
/// safetensors: model.safetensors: truncated ...").
///
/// | core error | Python class (builtin base) |
/// | --- | --- |
/// | `Io { not_found }` | CheckpointFileNotFoundError / DataFileNotFoundError (FileNotFoundError) |
/// | `Io`, `Format` | CheckpointError / DataError (ValueError): the input file is unusable |
/// | `Input`, `Template`, `Tokenizer` | DataError (ValueError) |
/// | `InvalidArgument`, `NonFinite`, `LengthMismatch` | InputError, or the area's class (ValueError) |
/// | `Output` | OutputError (OSError) |
/// | `Interrupted` | KeyboardInterrupt |
pub(crate) fn to_py_err(area: Area, phase: &str, err: Error) -> PyErr {
    let message = format!("{phase}: {err}");
    let input_class = match area {
        Area::Checkpoint => "CheckpointError",
        Area::Data => "DataError",
        Area::Compute => "InputError",
    };
    match err {
        Error::Io { not_found: true, .. } => {
            let class =
                if area == Area::Data { "DataFileNotFoundError" } else { "CheckpointFileNotFoundError" };
            raise(class, message, PyFileNotFoundError::new_err)
        }
        Error::Io { .. } | Error::Format { .. } => raise(
            if area == Area::Data { "DataError" } else { "CheckpointError" },
            message,
            PyValueError::new_err,
        ),
        Error::Input { .. } | Error::Template(_) | Error::Tokenizer(_) => {
            raise("DataError", message, PyValueError::new_err)
        }
        Error::InvalidArgument(_) | Error::NonFinite { .. } | Error::LengthMismatch { .. } => {
            raise(input_class, message, PyValueError::new_err)
        }
        Error::Output { .. } => raise("OutputError", message, PyOSError::new_err),
        Error::Interrupted => PyKeyboardInterrupt::new_err(message),
    }
}

/// A bad argument of a binding call (not a core error): InputError, a ValueError.
pub(crate) fn input_error(message: String) -> PyErr {
    raise("InputError", message, PyValueError::new_err)
}

pub(crate) fn not_contiguous() -> PyErr {
    input_error("array must be C-contiguous; call .contiguous() on the tensor first".into())
}

/// `quant_type`: "nf4", "fp4" or "int4".
pub(crate) struct QuantTypeArg(pub QuantType);

impl<'py> FromPyObject<'py> for QuantTypeArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let name: String = ob.extract()?;
        let name = name.as_str();
        QuantType::from_name(name).map(QuantTypeArg).map_err(|e| to_py_err(Area::Compute, "quant_type", e))
    }
}

/// `train_on`: "assistant", "all" or "last".
pub(crate) struct TrainOnArg(pub TrainOn);

impl<'py> FromPyObject<'py> for TrainOnArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let name: String = ob.extract()?;
        let name = name.as_str();
        TrainOn::from_name(name).map(TrainOnArg).map_err(|e| to_py_err(Area::Data, "train_on", e))
    }
}

/// `truncation`: "keep-start", "drop" or "error".
pub(crate) struct TruncationArg(pub Truncation);

impl<'py> FromPyObject<'py> for TruncationArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let name: String = ob.extract()?;
        let name = name.as_str();
        Truncation::from_name(name).map(TruncationArg).map_err(|e| to_py_err(Area::Data, "truncation", e))
    }
}

/// A float dtype by torch name: "float32", "bfloat16" or "float16".
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatDtype {
    F32,
    Bf16,
    F16,
}

impl<'py> FromPyObject<'py> for FloatDtype {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let name: String = ob.extract()?;
        let name = name.as_str();
        match name {
            "float32" => Ok(FloatDtype::F32),
            "bfloat16" => Ok(FloatDtype::Bf16),
            "float16" => Ok(FloatDtype::F16),
            other => Err(input_error(format!(
                "unsupported dtype {other:?}: 4-bit quantization reads and writes float32, bfloat16 or float16"
            ))),
        }
    }
}

/// A safetensors dtype by name ("F32", "BF16", "F16", ...).
pub(crate) struct DtypeArg(pub Dtype);

impl<'py> FromPyObject<'py> for DtypeArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let name: String = ob.extract()?;
        let name = name.as_str();
        Dtype::from_name(name)
            .map(DtypeArg)
            .ok_or_else(|| input_error(format!("unknown safetensors dtype {name:?} (F32, BF16, F16, ...)")))
    }
}
