//! Blockwise 4-bit quantization compatible with bitsandbytes, and double quantization of the block scales.
//!
//! Format facts (see DESIGN.md): blocks of `blocksize` elements over the flattened row-major tensor; one float32
//! absmax per block; elements scaled by the reciprocal of the absmax, then mapped to the nearest code with strict
//! `>` tests against the midpoints (a tie goes to the lower code); two codes per byte, the first element in the
//! high nibble; an odd tail padded with the code of 0.0.

pub mod codes;
mod convert;
pub mod double_quant;
pub mod fourbit;
mod simd;

pub use convert::{Floats, FloatsMut};
pub use double_quant::{dequantize_absmax, double_quantize_absmax, DoubleQuantized, NESTED_BLOCKSIZE};
pub use fourbit::{
    check_blocksize, dequantize_4bit_into, num_blocks, packed_len, quantize_4bit, quantize_4bit_into,
    QuantType,
};
