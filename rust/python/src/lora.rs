//! Binding of nibblora_core::lora: the serving engine's batched LoRA (every adapter segment in one call).

use nibblora_core::lora::{self, LoraSlots};
use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::errors::{not_contiguous, to_py_err, Area};

/// add_lora_segments(y, x, lora_a, lora_bt, ranks, scaling, segments, max_rank, in_features, out_features)
///
/// y float32[tokens * out] += each (start, end, slot) segment's scaling * (x @ A[slot, :r].T) @ Bt[slot, :r],
/// in place. x float32[tokens * in]; lora_a float32[slots * max_rank * in]; lora_bt float32[slots * max_rank *
/// out]; ranks int64[slots]; scaling float32[slots]; segments int64[3 * segments]. All 1-D contiguous views (no
/// copy); the GIL is released while it runs.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn add_lora_segments<'py>(
    py: Python<'py>,
    mut y: PyReadwriteArray1<'py, f32>,
    x: PyReadonlyArray1<'py, f32>,
    lora_a: PyReadonlyArray1<'py, f32>,
    lora_bt: PyReadonlyArray1<'py, f32>,
    ranks: PyReadonlyArray1<'py, i64>,
    scaling: PyReadonlyArray1<'py, f32>,
    segments: PyReadonlyArray1<'py, i64>,
    max_rank: usize,
    in_features: usize,
    out_features: usize,
) -> PyResult<()> {
    let slots = LoraSlots {
        lora_a: lora_a.as_slice().map_err(|_| not_contiguous())?,
        lora_bt: lora_bt.as_slice().map_err(|_| not_contiguous())?,
        ranks: ranks.as_slice().map_err(|_| not_contiguous())?,
        scaling: scaling.as_slice().map_err(|_| not_contiguous())?,
        max_rank,
        in_features,
        out_features,
    };
    let x = x.as_slice().map_err(|_| not_contiguous())?;
    let segments = segments.as_slice().map_err(|_| not_contiguous())?;
    let y = y.as_slice_mut().map_err(|_| not_contiguous())?;
    py.allow_threads(|| lora::add_lora_segments(y, x, &slots, segments))
        .map_err(|e| to_py_err(Area::Compute, "batched lora", e))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(add_lora_segments, m)?)?;
    Ok(())
}
