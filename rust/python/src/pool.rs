//! Pooled output buffers handed to numpy without a copy (see nibblora_core::buffer::BufferPool).

use nibblora_core::buffer::BufferPool;
use numpy::{PyArray1, PyUntypedArray};
use pyo3::prelude::*;

use crate::errors::{to_py_err, Area};

/// Large results (dequantized weights, packed codes) are handed out from a pool of buffers (up to 1 GiB by
/// default), so the same shape produced again reuses mapped memory; a buffer returns to the pool when numpy /
/// torch drop the last view of it.
pub(crate) static OUTPUT_POOL: BufferPool = BufferPool::new(1 << 30);

/// Owner of a pooled buffer behind a numpy array; gives the memory back to the pool when the array dies.
#[pyclass(frozen, module = "nibblora._native")]
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
pub(crate) fn pooled_array<'py, E: numpy::Element, F>(
    py: Python<'py>,
    area: Area,
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
    py.allow_threads(|| fill(elements)).map_err(|e| to_py_err(area, phase, e))?;
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

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_output_pool_limit, m)?)?;
    m.add_function(wrap_pyfunction!(output_pool_stats, m)?)?;
    m.add_class::<PooledBuffer>()?;
    Ok(())
}
