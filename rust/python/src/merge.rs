//! Bindings of nibblora_core::safetensors and nibblora_core::merge: a checked, memory-mapped safetensors file
//! and the LoRA merge kernel. Outputs are numpy uint8 arrays over pooled Rust buffers (no copy).

use std::path::PathBuf;

use nibblora_core::merge::{self, LowRank, Update};
use nibblora_core::safetensors::{Dtype, DtypeExt, SafetensorsFile as CoreFile};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::errors::{not_contiguous, to_py_err, Area, DtypeArg};
use crate::pool::pooled_array;

/// (B [rows*rank] float32, A [rank*cols] float32, rank, scale)
type Term<'py> = (PyReadonlyArray1<'py, f32>, PyReadonlyArray1<'py, f32>, usize, f32);

/// Borrow the terms' float slices, run the merge without the GIL, return the output bytes.
#[allow(clippy::too_many_arguments)]
fn run_merge<'py>(
    py: Python<'py>,
    phase: &str,
    base: &[u8],
    base_dtype: Dtype,
    shape: &[usize],
    out_dtype: Dtype,
    terms: &[Term<'py>],
    dense: Option<&PyReadonlyArray1<'py, f32>>,
    magnitude: Option<&PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let numel: usize = shape.iter().product();
    let rows = if shape.len() >= 2 { shape[0] } else { 1 };
    let cols = numel.checked_div(rows).unwrap_or(0);
    let mut update = Update::default();
    for (b, a, rank, scale) in terms {
        let b = b.as_slice().map_err(|_| not_contiguous())?;
        let a = a.as_slice().map_err(|_| not_contiguous())?;
        update.terms.push(LowRank { b, a, rank: *rank, scale: *scale });
    }
    update.dense = dense.map(|d| d.as_slice().map_err(|_| not_contiguous())).transpose()?;
    update.magnitude = magnitude.map(|m| m.as_slice().map_err(|_| not_contiguous())).transpose()?;
    // The output comes from nibblora's buffer pool: the writer drops it once written, and the next tensor of
    // the same shape (every layer repeats the same projections) reuses already mapped memory.
    let out = pooled_array::<u8, _>(py, Area::Checkpoint, phase, numel * out_dtype.size(), |out| {
        merge::merge_into(base, base_dtype, rows, cols, &update, out, out_dtype)
    })?;
    Ok(out.into_any().downcast_into::<PyArray1<u8>>()?)
}

/// SafetensorsFile(path): a safetensors file whose header has been checked (sizes, offsets, overlaps, dtype
/// widths, truncation) before anything else, then memory-mapped. Raises CheckpointError (a ValueError) for a
/// corrupt, hostile or unreadable file, CheckpointFileNotFoundError (a FileNotFoundError) for a missing one.
#[pyclass(frozen, module = "nibblora._native")]
struct SafetensorsFile {
    inner: CoreFile,
}

#[pymethods]
impl SafetensorsFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .allow_threads(|| CoreFile::open(&path))
            .map_err(|e| to_py_err(Area::Checkpoint, "reading safetensors", e))?;
        Ok(SafetensorsFile { inner })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// [(name, dtype, shape, absolute byte offset, nbytes)] in data order.
    fn tensors(&self) -> Vec<(String, String, Vec<usize>, usize, usize)> {
        let data_start = self.inner.header().data_start;
        self.inner
            .header()
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.to_string(), t.shape.clone(), data_start + t.begin, t.nbytes()))
            .collect()
    }

    /// The header's __metadata__ as [(key, value)].
    fn metadata(&self) -> Vec<(String, String)> {
        self.inner.header().metadata.clone()
    }

    /// A copy of tensor `name`'s raw bytes (uint8).
    fn read<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let info = self.inner.tensor(name).map_err(|e| to_py_err(Area::Checkpoint, "reading tensor", e))?;
        let bytes = py.allow_threads(|| self.inner.bytes(info).to_vec());
        self.inner.release(info);
        Ok(PyArray1::from_vec(py, bytes))
    }

    /// merge(name, out_dtype, terms, dense=None, magnitude=None) -> uint8 bytes of
    /// cast(W + sum (B @ A) * scale + dense) for tensor `name` (F32/BF16/F16, rows = shape[0]), then drops the
    /// tensor's pages from memory. terms: [(B float32[rows*rank], A float32[rank*cols], rank, scale)].
    #[pyo3(signature = (name, out_dtype, terms, dense=None, magnitude=None))]
    fn merge<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        out_dtype: DtypeArg,
        terms: Vec<Term<'py>>,
        dense: Option<PyReadonlyArray1<'py, f32>>,
        magnitude: Option<PyReadonlyArray1<'py, f32>>,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let info = self.inner.tensor(name).map_err(|e| to_py_err(Area::Checkpoint, "merging", e))?;
        let phase = format!("merging {name}");
        let result = run_merge(
            py,
            &phase,
            self.inner.bytes(info),
            info.dtype,
            &info.shape,
            out_dtype.0,
            &terms,
            dense.as_ref(),
            magnitude.as_ref(),
        );
        self.inner.release(info);
        result
    }
}

/// merge_array(base, base_dtype, shape, out_dtype, terms, dense=None, magnitude=None) -> uint8 bytes: as
/// SafetensorsFile.merge, for a weight already in memory (raw little-endian bytes, e.g. a dequantized 4-bit one).
#[pyfunction]
#[pyo3(signature = (base, base_dtype, shape, out_dtype, terms, dense=None, magnitude=None))]
#[allow(clippy::too_many_arguments)]
fn merge_array<'py>(
    py: Python<'py>,
    base: PyReadonlyArray1<'py, u8>,
    base_dtype: DtypeArg,
    shape: Vec<usize>,
    out_dtype: DtypeArg,
    terms: Vec<Term<'py>>,
    dense: Option<PyReadonlyArray1<'py, f32>>,
    magnitude: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let base = base.as_slice().map_err(|_| not_contiguous())?;
    run_merge(
        py,
        "merging",
        base,
        base_dtype.0,
        &shape,
        out_dtype.0,
        &terms,
        dense.as_ref(),
        magnitude.as_ref(),
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SafetensorsFile>()?;
    m.add_function(wrap_pyfunction!(merge_array, m)?)?;
    Ok(())
}
