//! Bindings of nibblora_core::quant: 4-bit quantize / dequantize and double quantization.

use nibblora_core::quant::{self, Floats, FloatsMut};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArray};
use pyo3::prelude::*;

use crate::errors::{input_error, not_contiguous, to_py_err, Area, FloatDtype, QuantTypeArg};
use crate::pool::pooled_array;

enum Source<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    Bits(PyReadonlyArray1<'py, u16>, bool),
}

fn source<'py>(array: &Bound<'py, PyUntypedArray>, dtype: FloatDtype) -> PyResult<Source<'py>> {
    let wrong = |want: &str| input_error(format!("expected a 1-D contiguous {want} array for this dtype"));
    match dtype {
        FloatDtype::F32 => {
            Ok(Source::F32(array.downcast::<PyArray1<f32>>().map_err(|_| wrong("float32"))?.readonly()))
        }
        FloatDtype::Bf16 | FloatDtype::F16 => Ok(Source::Bits(
            array.downcast::<PyArray1<u16>>().map_err(|_| wrong("uint16"))?.readonly(),
            dtype == FloatDtype::Bf16,
        )),
    }
}

/// quantize_4bit(values, dtype, quant_type, blocksize) -> (packed uint8[(n+1)//2], absmax float32[blocks])
#[pyfunction]
fn quantize_4bit<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyUntypedArray>,
    dtype: FloatDtype,
    quant_type: QuantTypeArg,
    blocksize: usize,
) -> PyResult<(Bound<'py, PyUntypedArray>, Bound<'py, PyArray1<f32>>)> {
    let qt = quant_type.0;
    quant::check_blocksize(blocksize).map_err(|e| to_py_err(Area::Compute, "quantizing to 4 bits", e))?;
    let src = source(values, dtype)?;
    let (input, n) = match &src {
        Source::F32(a) => {
            let s = a.as_slice().map_err(|_| not_contiguous())?;
            (Floats::F32(s), s.len())
        }
        Source::Bits(a, is_bf16) => {
            let s = a.as_slice().map_err(|_| not_contiguous())?;
            (if *is_bf16 { Floats::Bf16(s) } else { Floats::F16(s) }, s.len())
        }
    };
    let mut absmax = vec![0f32; quant::num_blocks(n, blocksize)];
    let packed =
        pooled_array::<u8, _>(py, Area::Compute, "quantizing to 4 bits", quant::packed_len(n), |packed| {
            quant::quantize_4bit_into(input, qt, blocksize, packed, &mut absmax)
        })?;
    Ok((packed, PyArray1::from_vec(py, absmax)))
}

const PHASE_DEQUANT: &str = "dequantizing 4-bit codes";

/// dequantize_4bit(packed, absmax, quant_type, blocksize, n, dtype) -> a new float32 or uint16 (bf16/f16
/// bits) array of n elements, in pooled memory handed to numpy without a copy.
#[pyfunction]
fn dequantize_4bit<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    quant_type: QuantTypeArg,
    blocksize: usize,
    n: usize,
    dtype: FloatDtype,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let qt = quant_type.0;
    let packed = packed.as_slice().map_err(|_| not_contiguous())?;
    let absmax = absmax.as_slice().map_err(|_| not_contiguous())?;
    match dtype {
        FloatDtype::F32 => pooled_array::<f32, _>(py, Area::Compute, PHASE_DEQUANT, n, |o| {
            quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::F32(o))
        }),
        FloatDtype::Bf16 => pooled_array::<u16, _>(py, Area::Compute, PHASE_DEQUANT, n, |o| {
            quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::Bf16(o))
        }),
        FloatDtype::F16 => pooled_array::<u16, _>(py, Area::Compute, PHASE_DEQUANT, n, |o| {
            quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::F16(o))
        }),
    }
}

/// dequantize_4bit_to(packed, absmax, quant_type, blocksize, out): dequantize len(out) values into `out`, a
/// float32 array or the uint16 bits of bfloat16 / float16 (dtype says which). For callers that reuse one buffer,
/// such as a matmul walking a weight a slice of rows at a time.
#[pyfunction]
fn dequantize_4bit_to<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    quant_type: QuantTypeArg,
    blocksize: usize,
    out: &Bound<'py, PyUntypedArray>,
    dtype: FloatDtype,
) -> PyResult<()> {
    let qt = quant_type.0;
    let packed = packed.as_slice().map_err(|_| not_contiguous())?;
    let absmax = absmax.as_slice().map_err(|_| not_contiguous())?;
    let fill = |o: FloatsMut<'_>| {
        py.allow_threads(|| quant::dequantize_4bit_into(packed, absmax, qt, blocksize, o))
            .map_err(|e| to_py_err(Area::Compute, PHASE_DEQUANT, e))
    };
    match dtype {
        FloatDtype::F32 => {
            let array = out
                .downcast::<PyArray1<f32>>()
                .map_err(|_| input_error("out must be a float32 array".into()))?;
            let mut view = array.readwrite();
            fill(FloatsMut::F32(view.as_slice_mut().map_err(|_| not_contiguous())?))
        }
        FloatDtype::Bf16 | FloatDtype::F16 => {
            let array = out.downcast::<PyArray1<u16>>().map_err(|_| {
                input_error("out must be a uint16 array (the bits of bfloat16 or float16)".into())
            })?;
            let mut view = array.readwrite();
            let slice = view.as_slice_mut().map_err(|_| not_contiguous())?;
            fill(if matches!(dtype, FloatDtype::Bf16) {
                FloatsMut::Bf16(slice)
            } else {
                FloatsMut::F16(slice)
            })
        }
    }
}

/// (codes uint8, nested_absmax float32, offset)
type DoubleQuantizedArrays<'py> = (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>, f32);

/// double_quantize(absmax, offset=None) -> (codes uint8, nested_absmax float32, offset float)
#[pyfunction]
#[pyo3(signature = (absmax, offset=None))]
fn double_quantize<'py>(
    py: Python<'py>,
    absmax: PyReadonlyArray1<'py, f32>,
    offset: Option<f32>,
) -> PyResult<DoubleQuantizedArrays<'py>> {
    let a = absmax.as_slice().map_err(|_| not_contiguous())?;
    let dq = py
        .allow_threads(|| quant::double_quantize_absmax(a, offset))
        .map_err(|e| to_py_err(Area::Compute, "double-quantizing block scales", e))?;
    Ok((PyArray1::from_vec(py, dq.codes), PyArray1::from_vec(py, dq.nested_absmax), dq.offset))
}

/// dequantize_absmax(codes, nested_absmax, offset) -> float32 scales
#[pyfunction]
fn dequantize_absmax<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    nested_absmax: PyReadonlyArray1<'py, f32>,
    offset: f32,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let c = codes.as_slice().map_err(|_| not_contiguous())?;
    let n = nested_absmax.as_slice().map_err(|_| not_contiguous())?;
    let mut out = vec![0f32; c.len()];
    py.allow_threads(|| quant::dequantize_absmax(c, n, offset, &mut out))
        .map_err(|e| to_py_err(Area::Compute, "dequantizing block scales", e))?;
    Ok(PyArray1::from_vec(py, out))
}

/// code_table(quant_type) -> list of 16 floats, indexed by the stored 4-bit code.
#[pyfunction]
fn code_table(quant_type: QuantTypeArg) -> Vec<f32> {
    quant_type.0.code().to_vec()
}

/// dynamic_map() -> float32[256], the signed 8-bit map used for double quantization.
#[pyfunction]
fn dynamic_map(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
    PyArray1::from_vec(py, quant::codes::dynamic_map().to_vec())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit_to, m)?)?;
    m.add_function(wrap_pyfunction!(double_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(code_table, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add("NESTED_BLOCKSIZE", quant::NESTED_BLOCKSIZE)?;
    Ok(())
}
