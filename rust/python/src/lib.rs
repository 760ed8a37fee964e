//! Thin pyo3 bindings over `nibblora-core`: convert arguments, release the GIL, convert errors. Nothing else.
//!
//! Inputs arrive as 1-D numpy views of torch memory (no copy when the tensor is contiguous); bfloat16 and
//! float16 arrive as uint16 bit patterns with a `dtype` name beside them. Outputs are numpy arrays that take
//! ownership of the Rust buffers (no copy), or caller-provided arrays written in place.

use nibblora_core::buffer::BufferPool;
use nibblora_core::quant::{self, Floats, FloatsMut, QuantType};
use nibblora_core::Error;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1, PyUntypedArray};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The one place core errors become Python exceptions. All are ValueError: bad values the caller passed.
fn to_py_err(phase: &str, err: Error) -> PyErr {
    PyValueError::new_err(format!("{phase}: {err}"))
}

fn parse_quant_type(name: &str) -> PyResult<QuantType> {
    QuantType::from_name(name).map_err(|e| to_py_err("quant_type", e))
}

enum Source<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    Bits(PyReadonlyArray1<'py, u16>, bool),
}

fn source<'py>(array: &Bound<'py, PyUntypedArray>, dtype: &str) -> PyResult<Source<'py>> {
    let wrong = |want: &str| {
        PyValueError::new_err(format!("expected a 1-D contiguous {want} array for dtype {dtype:?}"))
    };
    match dtype {
        "float32" => {
            Ok(Source::F32(array.downcast::<PyArray1<f32>>().map_err(|_| wrong("float32"))?.readonly()))
        }
        "bfloat16" | "float16" => Ok(Source::Bits(
            array.downcast::<PyArray1<u16>>().map_err(|_| wrong("uint16"))?.readonly(),
            dtype == "bfloat16",
        )),
        other => Err(PyValueError::new_err(format!(
            "unsupported dtype {other:?}: 4-bit quantization reads float32, bfloat16 or float16"
        ))),
    }
}

fn not_contiguous() -> PyErr {
    PyValueError::new_err("array must be C-contiguous; call .contiguous() on the tensor first")
}

/// quantize_4bit(values, dtype, quant_type, blocksize) -> (packed uint8[(n+1)//2], absmax float32[blocks])
#[pyfunction]
fn quantize_4bit<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyUntypedArray>,
    dtype: &str,
    quant_type: &str,
    blocksize: usize,
) -> PyResult<(Bound<'py, PyUntypedArray>, Bound<'py, PyArray1<f32>>)> {
    let qt = parse_quant_type(quant_type)?;
    quant::check_blocksize(blocksize).map_err(|e| to_py_err("quantizing to 4 bits", e))?;
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
    let packed = pooled_array::<u8, _>(py, "quantizing to 4 bits", quant::packed_len(n), |packed| {
        quant::quantize_4bit_into(input, qt, blocksize, packed, &mut absmax)
    })?;
    Ok((packed, PyArray1::from_vec(py, absmax)))
}

/// dequantize_4bit_into(packed, absmax, quant_type, blocksize, out, dtype): writes `out` in place.
#[pyfunction]
fn dequantize_4bit_into(
    py: Python<'_>,
    packed: PyReadonlyArray1<'_, u8>,
    absmax: PyReadonlyArray1<'_, f32>,
    quant_type: &str,
    blocksize: usize,
    out: &Bound<'_, PyUntypedArray>,
    dtype: &str,
) -> PyResult<()> {
    let qt = parse_quant_type(quant_type)?;
    let packed = packed.as_slice().map_err(|_| not_contiguous())?;
    let absmax = absmax.as_slice().map_err(|_| not_contiguous())?;
    let result = match dtype {
        "float32" => {
            let mut arr: PyReadwriteArray1<'_, f32> = out
                .downcast::<PyArray1<f32>>()
                .map_err(|_| PyValueError::new_err("out must be a float32 array for dtype float32"))?
                .readwrite();
            let o = arr.as_slice_mut().map_err(|_| not_contiguous())?;
            py.allow_threads(|| quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::F32(o)))
        }
        "bfloat16" | "float16" => {
            let mut arr: PyReadwriteArray1<'_, u16> = out
                .downcast::<PyArray1<u16>>()
                .map_err(|_| PyValueError::new_err("out must be a uint16 view for 16-bit dtypes"))?
                .readwrite();
            let o = arr.as_slice_mut().map_err(|_| not_contiguous())?;
            let o = if dtype == "bfloat16" { FloatsMut::Bf16(o) } else { FloatsMut::F16(o) };
            py.allow_threads(|| quant::dequantize_4bit_into(packed, absmax, qt, blocksize, o))
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unsupported output dtype {other:?}: use float32, bfloat16 or float16"
            )))
        }
    };
    result.map_err(|e| to_py_err("dequantizing 4-bit codes", e))
}

/// Large results (dequantized weights, packed codes) are handed out from a pool of buffers (up to 1 GiB by
/// default), so the same shape produced again reuses mapped memory; a buffer returns to the pool when numpy /
/// torch drop the last view of it.
static OUTPUT_POOL: BufferPool = BufferPool::new(1 << 30);

/// Owner of a pooled buffer behind a numpy array; gives the memory back to the pool when the array dies.
#[pyclass]
struct PooledBuffer {
    words: Vec<u32>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        OUTPUT_POOL.give(std::mem::take(&mut self.words));
    }
}

/// Lay `n` elements of `E` (1, 2 or 4 bytes) over a pooled buffer, fill them with `fill`, and wrap the result in
/// a numpy array that owns the buffer (no copy).
fn pooled_array<'py, E: numpy::Element, F>(
    py: Python<'py>,
    phase: &str,
    n: usize,
    fill: F,
) -> PyResult<Bound<'py, PyUntypedArray>>
where
    F: FnOnce(&mut [E]) -> nibblora_core::Result<()> + Send,
{
    let size = std::mem::size_of::<E>();
    assert!(size <= 4, "pooled arrays hold 1-, 2- or 4-byte elements");
    let mut words = OUTPUT_POOL.take((n * size).div_ceil(4));
    // SAFETY: the u32 storage is 4-byte aligned and holds at least n * size bytes; E is a plain number type
    // for which any bit pattern is valid, and `words` is not otherwise touched while the slice lives.
    let elements = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut E, n) };
    py.allow_threads(|| fill(elements)).map_err(|e| to_py_err(phase, e))?;
    let ptr = words.as_ptr() as *const E;
    let owner = Bound::new(py, PooledBuffer { words })?;
    // SAFETY: the view points into the heap buffer now owned by `owner` (moving the Vec did not move its
    // data), and numpy keeps `owner` alive as the array's base for as long as the array or a view lives.
    let array = unsafe {
        let view = numpy::ndarray::ArrayView1::from_shape_ptr(n, ptr);
        PyArray1::<E>::borrow_from_array(&view, owner.into_any())
    };
    Ok(array.into_any().downcast_into::<PyUntypedArray>()?)
}

const PHASE_DEQUANT: &str = "dequantizing 4-bit codes";

/// dequantize_4bit(packed, absmax, quant_type, blocksize, n, dtype) -> a new float32 or uint16 (bf16/f16
/// bits) array of n elements, in pooled memory handed to numpy without a copy.
#[pyfunction]
fn dequantize_4bit<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    quant_type: &str,
    blocksize: usize,
    n: usize,
    dtype: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let qt = parse_quant_type(quant_type)?;
    let packed = packed.as_slice().map_err(|_| not_contiguous())?;
    let absmax = absmax.as_slice().map_err(|_| not_contiguous())?;
    match dtype {
        "float32" => pooled_array::<f32, _>(py, PHASE_DEQUANT, n, |o| {
            quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::F32(o))
        }),
        "bfloat16" => pooled_array::<u16, _>(py, PHASE_DEQUANT, n, |o| {
            quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::Bf16(o))
        }),
        "float16" => pooled_array::<u16, _>(py, PHASE_DEQUANT, n, |o| {
            quant::dequantize_4bit_into(packed, absmax, qt, blocksize, FloatsMut::F16(o))
        }),
        other => Err(PyValueError::new_err(format!(
            "unsupported output dtype {other:?}: use float32, bfloat16 or float16"
        ))),
    }
}

/// set_output_pool_limit(bytes): how much freed dequantization output to keep for reuse (0 turns it off).
#[pyfunction]
fn set_output_pool_limit(limit_bytes: usize) {
    OUTPUT_POOL.set_limit(limit_bytes);
}

/// output_pool_stats() -> (buffers cached, bytes cached, byte limit)
#[pyfunction]
fn output_pool_stats() -> (usize, usize, usize) {
    OUTPUT_POOL.stats()
}

/// double_quantize(absmax, offset=None) -> (codes uint8, nested_absmax float32, offset float)
#[pyfunction]
#[pyo3(signature = (absmax, offset=None))]
fn double_quantize<'py>(
    py: Python<'py>,
    absmax: PyReadonlyArray1<'py, f32>,
    offset: Option<f32>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>, f32)> {
    let a = absmax.as_slice().map_err(|_| not_contiguous())?;
    let dq = py
        .allow_threads(|| quant::double_quantize_absmax(a, offset))
        .map_err(|e| to_py_err("double-quantizing block scales", e))?;
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
        .map_err(|e| to_py_err("dequantizing block scales", e))?;
    Ok(PyArray1::from_vec(py, out))
}

/// code_table(quant_type) -> list of 16 floats, indexed by the stored 4-bit code.
#[pyfunction]
fn code_table(quant_type: &str) -> PyResult<Vec<f32>> {
    Ok(parse_quant_type(quant_type)?.code().to_vec())
}

/// dynamic_map() -> float32[256], the signed 8-bit map used for double quantization.
#[pyfunction]
fn dynamic_map(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
    PyArray1::from_vec(py, quant::codes::dynamic_map().to_vec())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(set_output_pool_limit, m)?)?;
    m.add_function(wrap_pyfunction!(output_pool_stats, m)?)?;
    m.add_class::<PooledBuffer>()?;
    m.add_function(wrap_pyfunction!(dequantize_4bit_into, m)?)?;
    m.add_function(wrap_pyfunction!(double_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_absmax, m)?)?;
    m.add_function(wrap_pyfunction!(code_table, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add("NESTED_BLOCKSIZE", quant::NESTED_BLOCKSIZE)?;
    Ok(())
}
