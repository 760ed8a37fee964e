//! Double quantization: the float32 block scales of a 4-bit tensor are themselves quantized to 8 bits.
//!
//! offset = mean(absmax); (absmax - offset) is quantized in blocks of 256 with the signed dynamic map, each
//! block keeping one float32 scale.
//!
//! How a value finds its code follows bitsandbytes' CPU kernel (0.50), byte for byte: the value is multiplied
//! by the reciprocal of the block's absmax, mapped to one of 65,536 evenly spaced bins over [-1, 1], and the
//! bin's precomputed code is taken (the code nearest the bin's centre, ties to the lower). This differs from
//! an exact nearest-code search for values within half a bin (about 1.5e-5) of a midpoint, and near zero,
//! where the dynamic map's codes are closer together than a bin; we follow the CPU kernel so checkpoints
//! made by nibblora and by transformers + bitsandbytes on a CPU are identical.

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
    let lut = bin_lut();
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
            if block_max == 0.0 {
                // Every scale equals the offset: code 0 times a zero scale, plus the offset, restores them.
                out.fill(0);
                return;
            }
            let reciprocal = 1.0f32 / block_max;
            for (o, &a) in out.iter_mut().zip(block) {
                *o = lut[bin_of((a - offset) * reciprocal)];
            }
        });
    Ok(DoubleQuantized { codes, nested_absmax, offset })
}

const BINS: usize = 65536;

/// The bin of a value in [-1, 1]: round((x + 1) / 2 * 65535), computed as bitsandbytes does (truncating
/// after adding 0.5, each step rounded to float32).
#[inline]
fn bin_of(normed: f32) -> usize {
    let x = normed.clamp(-1.0, 1.0);
    (((x + 1.0) * 0.5) * (BINS - 1) as f32 + 0.5) as usize
}

/// For each bin, the dynamic-map code nearest its centre: the number of midpoints strictly below it.
fn bin_lut() -> &'static [u8; BINS] {
    static LUT: std::sync::OnceLock<Box<[u8; BINS]>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let map = dynamic_map();
        let midpoints: [f32; 255] = std::array::from_fn(|i| 0.5 * (map[i] + map[i + 1]));
        let mut lut = Box::new([0u8; BINS]);
        let mut code = 0usize;
        for (i, entry) in lut.iter_mut().enumerate() {
            let centre = -1.0f32 + (2.0f32 * i as f32) / (BINS - 1) as f32;
            while code < 255 && midpoints[code] < centre {
                code += 1;
            }
            *entry = code as u8;
        }
        lut
    })
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
        return Err(Error::LengthMismatch {
            what: "dequantized absmax",
            expected: codes.len(),
            got: out.len(),
        });
    }
    let map = dynamic_map();
    for ((o, c), &scale) in
        out.chunks_mut(NESTED_BLOCKSIZE).zip(codes.chunks(NESTED_BLOCKSIZE)).zip(nested_absmax)
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
    fn bins_cover_the_range_and_codes_map_to_themselves() {
        assert_eq!(bin_of(-1.0), 0);
        assert_eq!(bin_of(1.0), BINS - 1);
        assert_eq!(bin_of(7.0), BINS - 1, "values are clamped into [-1, 1]");
        let lut = bin_lut();
        let map = dynamic_map();
        assert_eq!(lut[0], 0);
        assert_eq!(lut[BINS - 1], 255);
        // Away from zero the codes are further apart than a bin, so each code's own bin maps back to it.
        for (i, &c) in map.iter().enumerate() {
            if c.abs() > 0.01 {
                assert_eq!(lut[bin_of(c)] as usize, i, "code {i} ({c})");
            }
        }
    }

    #[test]
    fn non_finite_scales_are_refused() {
        assert_eq!(
            double_quantize_absmax(&[1.0, f32::NAN], None).unwrap_err(),
            Error::NonFinite { index: 1 }
        );
        assert!(double_quantize_absmax(&[], None).is_err());
    }
}
