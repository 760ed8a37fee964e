//! nibblora-core: the pure Rust half of nibblora.
//!
//! It knows nothing of Python. The `nibblora-python` crate binds it with pyo3; `cargo test` covers it alone.
//!
//! - [`quant`]: blockwise 4-bit quantization (NF4, FP4, INT4) and double quantization of the block scales,
//!   byte-compatible with bitsandbytes.
//! - [`safetensors`]: checked, memory-mapped reading of safetensors files (hostile headers are refused).
//! - [`lora`]: batched heterogeneous LoRA for serving (every adapter segment of a batch in one call).
//! - [`merge`]: W + sum of scaled low-rank LoRA updates, accumulated in float32 and cast once, in parallel.
//! - [`data`]: SFT data preparation: chat templates, tokenization, loss masks, packing, the prepared format.

pub mod buffer;
pub mod data;
pub mod error;
pub mod lora;
pub mod merge;
pub mod quant;
pub mod safetensors;

pub use error::{Error, Result};
