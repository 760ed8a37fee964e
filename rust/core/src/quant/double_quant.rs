//! Double quantization: the float32 block scales of a 4-bit tensor are themselves quantized to 8 bits.
//!
//! offset = mean(absmax); (absmax - offset) is quantized in blocks of 256 with the signed dynamic map, each
//! block keeping one float32 scale. bitsandbytes' CPU kernel divides by the block's absmax, finds the code to
//! the left by binary search and then takes the right neighbour only if it is strictly closer; we do the same.

use rayon::prelude::*;

use super::codes::dynamic_map;
use crate::{Error, Result};

/// bitsandbytes' nested blocksize for the scales.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The double-quantized scales of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantized {
    /// One 8-bit dynamic-map code per 4-bit block.
    pub codes: Vec<u8>,
    /// One float32 scale per 256 codes.
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted before quantizing.
    pub offset: f32,
}

/// The mean of the scales, summed in float64 and rounded once to float32.
pub fn mean_of(absmax: &[f32]) -> f32 {
    let sum: f64 = absmax.iter().map(|&v| v as f64).sum();
    (sum / absmax.len() as f64) as f32
}

/// Double-quantize `absmax`. `offset` is normally None (the mean is computed here); the Python layer passes
/// torch's own float32 mean so the offset matches bitsandbytes to the last bit.
pub fn double_quantize_absmax(absmax: &[f32], offset: Option<f32>) -> Result<DoubleQuantized> {
    if absmax.is_empty() {
        return Err(Error::InvalidArgument("double quantization needs at least one block scale".into()));
    }
    if let Some(i) = absmax.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { index: i });
    }
    let offset = offset.unwrap_or_else(|| mean_of(absmax));
    if !offset.is_finite() {
        return Err(Error::InvalidArgument(format!("double quantization offset {offset} is not finite")));
    }
    let map = dynamic_map();
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    codes
        .par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE))
        .zip(nested_absmax.par_iter_mut())
        .for_each(|((out, block), scale)| {
            let mut block_max = 0f32;
            for &a in block {
                block_max = block_max.max((a - offset).abs());
            }
            *scale = block_max;
            for (o, &a) in out.iter_mut().zip(block) {
                // 0/0 gives NaN when every scale equals the offset; like bitsandbytes we then store code 0.
                *o = nearest_dynamic_code(&map, (a - offset) / block_max);
            }
        });
    Ok(DoubleQuantized { codes, nested_absmax, offset })
}

#[inline]
fn nearest_dynamic_code(map: &[f32; 256], normed: f32) -> u8 {
    // Index of the last code <= normed (0 when there is none, or for NaN).
    let left = map.partition_point(|&c| c <= normed).saturating_sub(1);
    if left < 255 {
        let dist_left = (normed - map[left]).abs();
        let dist_right = (normed - map[left + 1]).abs();
        if dist_right < dist_left {
            return (left + 1) as u8;
        }
    }
    left as u8
}

/// Recover float32 scales: `map[code] * nested_absmax[i / 256] + offset`, computed in float32.
pub fn dequantize_absmax(codes: &[u8], nested_absmax: &[f32], offset: f32, out: &mut [f32]) -> Result<()> {
    if nested_absmax.len() != codes.len().div_ceil(NESTED_BLOCKSIZE) {
        return Err(Error::LengthMismatch {
            what: "nested absmax",
            expected: codes.len().div_ceil(NESTED_BLOCKSIZE),
            got: nested_absmax.len(),
        });
    }
    if out.len() != codes.len() {
        return Err(Error::LengthMismatch { what: "dequantized absmax", expected: codes.len(), got: out.len() });
    }
    let map = dynamic_map();
    for ((o, c), &scale) in out
        .chunks_mut(NESTED_BLOCKSIZE)
        .zip(codes.chunks(NESTED_BLOCKSIZE))
        .zip(nested_absmax)
    {
        for (v, &q) in o.iter_mut().zip(c) {
            *v = map[q as usize] * scale + offset;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_small_relative_to_the_block_range() {
        let absmax: Vec<f32> = (0..1000).map(|i| 0.5 + ((i * 37) % 101) as f32 / 100.0).collect();
        let dq = double_quantize_absmax(&absmax, None).unwrap();
        assert_eq!(dq.codes.len(), 1000);
        assert_eq!(dq.nested_absmax.len(), 4);
        let mut back = vec![0f32; 1000];
        dequantize_absmax(&dq.codes, &dq.nested_absmax, dq.offset, &mut back).unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() <= 0.01, "{a} vs {b}");
        }
    }

    #[test]
    fn constant_scales_give_code_zero_and_come_back_exactly() {
        let absmax = vec![0.25f32; 300];
        let dq = double_quantize_absmax(&absmax, None).unwrap();
        assert_eq!(dq.offset, 0.25);
        assert!(dq.codes.iter().all(|&c| c == 0));
        assert_eq!(dq.nested_absmax, vec![0.0, 0.0]);
        let mut back = vec![0f32; 300];
        dequantize_absmax(&dq.codes, &dq.nested_absmax, dq.offset, &mut back).unwrap();
        assert!(back.iter().all(|&v| v == 0.25));
    }

    #[test]
    fn nearest_code_prefers_left_on_ties_and_handles_the_ends() {
        let map = dynamic_map();
        assert_eq!(nearest_dynamic_code(&map, 1.0), 255);
        assert_eq!(nearest_dynamic_code(&map, -1.0), 0);
        assert_eq!(nearest_dynamic_code(&map, f32::NAN), 0);
        for i in 0..255 {
            assert_eq!(nearest_dynamic_code(&map, map[i]) as usize, i);
        }
    }

    #[test]
    fn non_finite_scales_are_refused() {
        assert_eq!(double_quantize_absmax(&[1.0, f32::NAN], None).unwrap_err(), Error::NonFinite { index: 1 });
        assert!(double_quantize_absmax(&[], None).is_err());
    }
}
