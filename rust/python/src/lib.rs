//! Thin pyo3 bindings over `nibblora-core`: convert arguments, release the GIL, convert errors. Nothing else.
//!
//! Inputs arrive as 1-D numpy views of torch memory (no copy when the tensor is contiguous); bfloat16 and
//! float16 arrive as uint16 bit patterns with a `dtype` name beside them. Outputs are numpy arrays that take
//! ownership of the Rust buffers (no copy), or caller-provided arrays written in place.

use pyo3::prelude::*;

mod data;
mod errors;
mod lora;
mod merge;
mod pool;
mod quant;

/// The private extension module `nibblora._native`. Each binding module registers its own functions, so a new
/// area (merge, data) adds one `mod` line and one `register` call here.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    data::register(m)?;
    lora::register(m)?;
    merge::register(m)?;
    pool::register(m)?;
    quant::register(m)?;
    // The package's one version: Cargo's workspace version (maturin gives the wheel the same one).
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
