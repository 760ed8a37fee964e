//! Blockwise 4-bit quantize / dequantize (NF4, FP4, INT4), byte-compatible with bitsandbytes' CPU path.
//!
//! The work is split into chunks of whole blocks that rayon spreads over the cores. Inside a chunk each block
//! runs simple loops (absmax on the float bits, scale and compare-count against the midpoints, pack) that the
//! compiler vectorizes; on x86-64 the same code is also compiled for AVX2 and AVX-512 and picked at run time.

use rayon::prelude::*;

use super::codes::{FP4_CODE, FP4_SORTED_ORDER, INT4_CODE, NF4_CODE};
use super::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Floats, FloatsMut};
use super::simd::dispatch;
use crate::{Error, Result};

pub const MIN_BLOCKSIZE: usize = 32;
pub const MAX_BLOCKSIZE: usize = 4096;

/// bitsandbytes clamps the divisor to this so an all-zero block scales to zeros instead of NaN. A full block
/// keeps its true absmax (0.0) in the output; the tail block stores the clamped value. We reproduce both.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Target elements per parallel task: large enough to amortise scheduling, small enough to balance two cores.
const CHUNK_ELEMS: usize = 1 << 16;

/// The 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 (QLoRA).
    Nf4,
    /// bitsandbytes' FP4 (E2M1, sign in bit 3).
    Fp4,
    /// Symmetric integer levels k/7, for comparison only (no bitsandbytes equivalent is written).
    Int4,
}

impl QuantType {
    /// Parse "nf4", "fp4" or "int4".
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            "int4" => Ok(QuantType::Int4),
            other => Err(Error::InvalidArgument(format!(
                "unknown quant_type {other:?}: expected \"nf4\", \"fp4\" or \"int4\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int4 => "int4",
        }
    }

    /// The 16-entry code table, indexed by the stored 4-bit code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
            QuantType::Int4 => &INT4_CODE,
        }
    }

    /// Sorted position -> stored code. Identity for the tables that are already sorted.
    fn sorted_order(self) -> [u8; 16] {
        match self {
            QuantType::Fp4 => FP4_SORTED_ORDER,
            QuantType::Nf4 | QuantType::Int4 => std::array::from_fn(|i| i as u8),
        }
    }

    /// The stored code of 0.0, used to pad an odd element count.
    pub fn zero_code(self) -> u8 {
        Encoder::new(self).encode(0.0)
    }
}

/// Midpoints between neighbouring sorted codes, and the map back to stored codes.
struct Encoder {
    midpoints: [f32; 15],
    order: [u8; 16],
}

impl Encoder {
    fn new(quant_type: QuantType) -> Self {
        let code = quant_type.code();
        let order = quant_type.sorted_order();
        let sorted: [f32; 16] = std::array::from_fn(|i| code[order[i] as usize]);
        // Computed in float32, as bitsandbytes computes them.
        let midpoints = std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) / 2.0);
        Encoder { midpoints, order }
    }

    /// Sorted position of `scaled`: the number of midpoints strictly below it, so a tie goes to the lower code.
    #[inline(always)]
    fn sorted_position(&self, scaled: f32) -> u8 {
        let mut position = 0u32;
        for m in self.midpoints {
            position += (scaled > m) as u32;
        }
        position as u8
    }

    #[inline(always)]
    fn encode(&self, scaled: f32) -> u8 {
        self.order[self.sorted_position(scaled) as usize]
    }
}

/// Check a blocksize: a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "blocksize {blocksize} is not supported: use a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE} \
             (64 is the bitsandbytes default)"
        )))
    }
}

/// Number of bytes that hold `n` packed 4-bit codes.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks (and absmax values) for `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Check that `n` elements, the packed codes and the block scales agree, before any work.
fn check_layout(n: usize, blocksize: usize, packed: usize, absmax: usize, action: &str) -> Result<()> {
    check_blocksize(blocksize)?;
    if n == 0 {
        return Err(Error::InvalidArgument(format!("cannot {action} an empty tensor")));
    }
    if packed != packed_len(n) {
        return Err(Error::LengthMismatch {
            what: "packed 4-bit codes",
            expected: packed_len(n),
            got: packed,
        });
    }
    if absmax != num_blocks(n, blocksize) {
        return Err(Error::LengthMismatch {
            what: "absmax",
            expected: num_blocks(n, blocksize),
            got: absmax,
        });
    }
    Ok(())
}

fn chunk_elems(blocksize: usize) -> usize {
    CHUNK_ELEMS.max(blocksize)
}

/// Quantize `input` into caller-provided buffers: `packed` of [`packed_len`] bytes and `absmax` of
/// [`num_blocks`] float32 values. Fails on an empty input, a bad blocksize, wrong buffer sizes or a
/// non-finite value (reporting the first one's flat index).
pub fn quantize_4bit_into(
    input: Floats<'_>,
    quant_type: QuantType,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    let n = input.len();
    check_layout(n, blocksize, packed.len(), absmax.len(), "quantize")?;
    let encoder = Encoder::new(quant_type);
    match input {
        Floats::F32(x) => quantize_parallel(x, |v| v, &encoder, blocksize, packed, absmax),
        Floats::Bf16(x) => quantize_parallel(x, bf16_to_f32, &encoder, blocksize, packed, absmax),
        Floats::F16(x) => quantize_parallel(x, f16_to_f32, &encoder, blocksize, packed, absmax),
    }
}

/// Quantize `input`, returning `(packed, absmax)`.
pub fn quantize_4bit(
    input: Floats<'_>,
    quant_type: QuantType,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let n = input.len();
    let mut packed: Vec<u8> = crate::buffer::zeroed_output(packed_len(n));
    let mut absmax = vec![0f32; num_blocks(n, blocksize)];
    quantize_4bit_into(input, quant_type, blocksize, &mut packed, &mut absmax)?;
    Ok((packed, absmax))
}

fn quantize_parallel<T, C>(
    x: &[T],
    to_f32: C,
    encoder: &Encoder,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()>
where
    T: Copy + Sync,
    C: Fn(T) -> f32 + Sync + Copy,
{
    let chunk = chunk_elems(blocksize);
    let blocks_per_chunk = chunk / blocksize;
    x.par_chunks(chunk)
        .zip(packed.par_chunks_mut(chunk / 2))
        .zip(absmax.par_chunks_mut(blocks_per_chunk))
        .enumerate()
        .try_for_each(|(chunk_index, ((xs, ps), ams))| {
            dispatch(
                true,
                #[inline(always)]
                || quantize_chunk(xs, to_f32, encoder, blocksize, ps, ams),
            )
            .map_err(|local| Error::NonFinite { index: chunk_index * chunk + local })
        })
}

/// Quantize whole blocks (the last one may be the short tail of the tensor). Err carries the local index of
/// the first non-finite value.
#[inline(always)]
fn quantize_chunk<T: Copy, C: Fn(T) -> f32 + Copy>(
    xs: &[T],
    to_f32: C,
    encoder: &Encoder,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> std::result::Result<(), usize> {
    let mut positions = vec![0u32; blocksize + 1];
    let identity_order = encoder.order.iter().enumerate().all(|(i, &o)| i == o as usize);
    for (block_index, block) in xs.chunks(blocksize).enumerate() {
        let len = block.len();
        // Pass 1: absmax on the bit patterns. For |x| the IEEE bits order like the values, and an integer
        // max vectorizes where a float max (with its NaN rules) does not; NaN and infinity show up as bits
        // at or above those of infinity.
        let mut max_bits = 0u32;
        for &v in block {
            max_bits = max_bits.max(to_f32(v).to_bits() & 0x7fff_ffff);
        }
        if max_bits >= f32::INFINITY.to_bits() {
            let first = block.iter().position(|&v| !to_f32(v).is_finite()).unwrap_or(0);
            return Err(block_index * blocksize + first);
        }
        let block_max = f32::from_bits(max_bits);
        // Pass 2: scale into [-1, 1] and count the midpoints below (the nearest code, ties to the lower).
        // bitsandbytes multiplies full blocks by the reciprocal but divides the tail block, and stores the
        // tail's clamped absmax; both change bytes, so we follow them.
        let positions = &mut positions[..len.div_ceil(2) * 2];
        if len == blocksize {
            absmax[block_index] = block_max;
            let reciprocal = 1.0f32 / block_max.max(ABSMAX_FLOOR);
            for (p, &v) in positions.iter_mut().zip(block) {
                *p = encoder.sorted_position(clamp_unit(to_f32(v) * reciprocal)) as u32;
            }
        } else {
            let divisor = block_max.max(ABSMAX_FLOOR);
            absmax[block_index] = divisor;
            for (p, &v) in positions.iter_mut().zip(block) {
                *p = encoder.sorted_position(clamp_unit(to_f32(v) / divisor)) as u32;
            }
            if len % 2 == 1 {
                positions[len] = encoder.sorted_position(0.0) as u32;
            }
        }
        // Pass 3: stored codes, two per byte, the first element in the high nibble.
        let out = &mut packed[block_index * blocksize / 2..][..len.div_ceil(2)];
        if identity_order {
            for (byte, pair) in out.iter_mut().zip(positions.chunks_exact(2)) {
                *byte = ((pair[0] << 4) | pair[1]) as u8;
            }
        } else {
            for (byte, pair) in out.iter_mut().zip(positions.chunks_exact(2)) {
                *byte = (encoder.order[pair[0] as usize] << 4) | encoder.order[pair[1] as usize];
            }
        }
    }
    Ok(())
}

/// Dequantize `packed` codes with their float32 `absmax` into `out` (whose length is the element count):
/// `code[q] * absmax` in float32, then rounded to the output dtype.
pub fn dequantize_4bit_into(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    out: FloatsMut<'_>,
) -> Result<()> {
    let n = out.len();
    check_layout(n, blocksize, packed.len(), absmax.len(), "dequantize")?;
    let lut = pair_table(quant_type.code());
    match out {
        FloatsMut::F32(o) => dequantize_parallel(packed, absmax, &lut, blocksize, o, |v| v),
        FloatsMut::Bf16(o) => dequantize_parallel(packed, absmax, &lut, blocksize, o, f32_to_bf16),
        FloatsMut::F16(o) => dequantize_parallel(packed, absmax, &lut, blocksize, o, f32_to_f16),
    }
    Ok(())
}

/// For every byte, the codes of its high and low nibble: one lookup decodes two elements.
fn pair_table(code: &[f32; 16]) -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [code[b >> 4], code[b & 0xf]])
}

fn dequantize_parallel<U, W>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[[f32; 2]; 256],
    blocksize: usize,
    out: &mut [U],
    from_f32: W,
) where
    U: Copy + Send,
    W: Fn(f32) -> U + Sync + Copy,
{
    let chunk = chunk_elems(blocksize);
    out.par_chunks_mut(chunk)
        .zip(packed.par_chunks(chunk / 2))
        .zip(absmax.par_chunks(chunk / blocksize))
        .for_each(|((os, ps), ams)| {
            dispatch(
                false,
                #[inline(always)]
                || dequantize_chunk(ps, ams, lut, blocksize, os, from_f32),
            )
        });
}

#[inline(always)]
fn dequantize_chunk<U: Copy, W: Fn(f32) -> U + Copy>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[[f32; 2]; 256],
    blocksize: usize,
    out: &mut [U],
    from_f32: W,
) {
    for (block_index, block_out) in out.chunks_mut(blocksize).enumerate() {
        let scale = absmax[block_index];
        let bytes = &packed[block_index * blocksize / 2..][..block_out.len().div_ceil(2)];
        let mut pairs = block_out.chunks_exact_mut(2);
        for (pair, &byte) in (&mut pairs).zip(bytes) {
            let [hi, lo] = lut[byte as usize];
            pair[0] = from_f32(hi * scale);
            pair[1] = from_f32(lo * scale);
        }
        if let [last] = pairs.into_remainder() {
            *last = from_f32(lut[bytes[bytes.len() - 1] as usize][0] * scale);
        }
    }
}

/// Clamp a scaled value to [-1, 1] as `torch.clamp` after bitsandbytes' scaling does. `max`/`min` (not
/// `f32::clamp`) so that a NaN (0 * inf in an all-zero block) lands on -1 rather than staying NaN.
#[inline]
#[allow(clippy::manual_clamp)]
fn clamp_unit(x: f32) -> f32 {
    x.max(-1.0).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant_f32(packed: &[u8], absmax: &[f32], qt: QuantType, bs: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        dequantize_4bit_into(packed, absmax, qt, bs, FloatsMut::F32(&mut out)).unwrap();
        out
    }

    #[test]
    fn codes_round_trip_exactly_when_scaled_by_absmax() {
        // Every NF4 code times a power-of-two absmax is representable, so it must come back unchanged.
        let values: Vec<f32> = NF4_CODE.iter().map(|c| c * 4.0).collect();
        let (packed, absmax) = quantize_4bit(Floats::F32(&values), QuantType::Nf4, 32).unwrap();
        assert_eq!(absmax, vec![4.0]);
        assert_eq!(packed[..8], [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(dequant_f32(&packed, &absmax, QuantType::Nf4, 32, 16), values);
    }

    #[test]
    fn midpoint_ties_go_to_the_lower_code() {
        let enc = Encoder::new(QuantType::Nf4);
        for i in 0..15 {
            let m = enc.midpoints[i];
            assert_eq!(enc.encode(m), i as u8, "a value on midpoint {i} takes the lower code");
            let above = f32::from_bits(m.to_bits().wrapping_add(if m >= 0.0 { 1 } else { u32::MAX }));
            assert_eq!(enc.encode(above), i as u8 + 1);
        }
    }

    #[test]
    fn odd_tail_is_padded_with_the_zero_code() {
        let values = vec![1.0f32; 33];
        let (packed, absmax) = quantize_4bit(Floats::F32(&values), QuantType::Nf4, 32).unwrap();
        assert_eq!(packed.len(), 17);
        assert_eq!(absmax, vec![1.0, 1.0]);
        assert_eq!(packed[16], 0xf7, "last element in the high nibble, pad code 7 (0.0) in the low");
        assert_eq!(QuantType::Nf4.zero_code(), 7);
        assert_eq!(QuantType::Fp4.zero_code(), 0);
    }

    #[test]
    fn all_zero_blocks_store_zero_absmax_and_a_clamped_tail() {
        let values = vec![0f32; 40];
        let (packed, absmax) = quantize_4bit(Floats::F32(&values), QuantType::Nf4, 32).unwrap();
        assert_eq!(absmax[0], 0.0);
        assert_eq!(absmax[1], 1e-38f32, "the tail block stores bitsandbytes' clamped divisor");
        assert!(packed.iter().all(|&b| b == 0x77));
    }

    #[test]
    fn non_finite_values_are_reported_with_their_index() {
        let mut values = vec![0.5f32; 200];
        values[137] = f32::NAN;
        let err = quantize_4bit(Floats::F32(&values), QuantType::Nf4, 64).unwrap_err();
        assert_eq!(err, Error::NonFinite { index: 137 });
        values[137] = f32::INFINITY;
        assert_eq!(
            quantize_4bit(Floats::F32(&values), QuantType::Fp4, 64).unwrap_err(),
            Error::NonFinite { index: 137 }
        );
    }

    #[test]
    fn bad_blocksizes_and_empty_inputs_are_refused() {
        for bs in [0, 16, 48, 8192] {
            assert!(matches!(check_blocksize(bs), Err(Error::InvalidArgument(_))), "{bs}");
        }
        assert!(quantize_4bit(Floats::F32(&[]), QuantType::Nf4, 64).is_err());
        assert!(QuantType::from_name("nf5").is_err());
    }

    #[test]
    fn parallel_chunks_agree_with_a_single_chunk() {
        // More than one chunk, with a tail: results must not depend on how the work was split.
        let n = CHUNK_ELEMS * 3 + 77;
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 97) as f32)).collect();
        let (packed, absmax) = quantize_4bit(Floats::F32(&values), QuantType::Nf4, 64).unwrap();
        let enc = Encoder::new(QuantType::Nf4);
        let mut p2 = vec![0u8; packed.len()];
        let mut a2 = vec![0f32; absmax.len()];
        quantize_chunk(&values, |v| v, &enc, 64, &mut p2, &mut a2).unwrap();
        assert_eq!(packed, p2);
        assert_eq!(absmax, a2);
    }

    #[test]
    fn bf16_and_f16_inputs_match_their_float32_values() {
        let bits: Vec<u16> = (0..1000u32).map(|i| f32_to_bf16((i as f32 * 0.013).cos() * 3.0)).collect();
        let as_f32: Vec<f32> = bits.iter().map(|&b| bf16_to_f32(b)).collect();
        let a = quantize_4bit(Floats::Bf16(&bits), QuantType::Nf4, 128).unwrap();
        let b = quantize_4bit(Floats::F32(&as_f32), QuantType::Nf4, 128).unwrap();
        assert_eq!(a, b);
        let h: Vec<u16> = as_f32.iter().map(|&v| f32_to_f16(v)).collect();
        let hf: Vec<f32> = h.iter().map(|&v| f16_to_f32(v)).collect();
        assert_eq!(
            quantize_4bit(Floats::F16(&h), QuantType::Fp4, 256).unwrap(),
            quantize_4bit(Floats::F32(&hf), QuantType::Fp4, 256).unwrap()
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn blocksizes() -> impl Strategy<Value = usize> {
        prop::sample::select(vec![32usize, 64, 128, 256, 1024, 4096])
    }

    fn quant_types() -> impl Strategy<Value = QuantType> {
        prop::sample::select(vec![QuantType::Nf4, QuantType::Fp4, QuantType::Int4])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Dequantize(quantize(x)) stays within half the widest code gap of each block's absmax, and
        /// quantizing the dequantized values again gives the same bytes (codes are fixed points).
        #[test]
        fn round_trip_is_bounded_and_requantization_is_stable(
            values in prop::collection::vec(-1e4f32..1e4, 1..3000),
            blocksize in blocksizes(),
            quant_type in quant_types(),
        ) {
            let (packed, absmax) = quantize_4bit(Floats::F32(&values), quant_type, blocksize).unwrap();
            prop_assert_eq!(packed.len(), values.len().div_ceil(2));
            let mut back = vec![0f32; values.len()];
            dequantize_4bit_into(&packed, &absmax, quant_type, blocksize, FloatsMut::F32(&mut back)).unwrap();
            let enc = Encoder::new(quant_type);
            let sorted: Vec<f32> = (0..16).map(|i| quant_type.code()[enc.order[i] as usize]).collect();
            let half_gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0;
            for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
                let scale = absmax[i / blocksize];
                prop_assert!((x - y).abs() <= scale * half_gap * 1.0001 + 1e-30, "element {i}: {x} -> {y}");
            }
            let (packed2, _) = quantize_4bit(Floats::F32(&back), quant_type, blocksize).unwrap();
            let mut back2 = vec![0f32; values.len()];
            let (p2, a2) = quantize_4bit(Floats::F32(&back), quant_type, blocksize).unwrap();
            dequantize_4bit_into(&p2, &a2, quant_type, blocksize, FloatsMut::F32(&mut back2)).unwrap();
            // The block absmax survives exactly (it is a code times itself), so values come back unchanged.
            prop_assert_eq!(back2, back);
            prop_assert_eq!(packed2.len(), packed.len());
        }
    }
}
