//! Merging LoRA updates into a weight: out = cast(W + sum_t (B_t @ A_t) * s_t [+ D]) [DoRA-rescaled per row].
//!
//! W arrives as raw little-endian bytes (a slice of a memory-mapped shard, or a dequantized 4-bit weight) in
//! float32, bfloat16 or float16; everything is accumulated in float32 and cast once into the output dtype.
//! The arithmetic follows peft's merge_and_unload in float32 step for step, so the results are equal bit for
//! bit: each product B @ A is summed over the rank in order with fused multiply-adds (what MKL's sgemm does),
//! then multiplied by the scale, then added to the weight; several updates are added one after the other.
//!
//! The work is split into blocks of rows processed in parallel (rayon). Within a block, the columns go in
//! chunks of 32: the chunk of A (rank x 32 floats) stays in L1 while every row of the block uses it, and the 32
//! partial sums live in registers across the rank loop. The cost is O(rows * cols * rank).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::safetensors::{Dtype, DtypeExt};

/// One low-rank update `(B @ A) * scale`: B is [rows, rank], A is [rank, cols], both row-major float32.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    pub b: &'a [f32],
    pub a: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// Everything added to one weight of shape [rows, cols].
#[derive(Debug, Clone, Default)]
pub struct Update<'a> {
    pub terms: Vec<LowRank<'a>>,
    /// A dense, already scaled update [rows, cols] (TIES / DARE results), added after the low-rank terms.
    pub dense: Option<&'a [f32]>,
    /// DoRA: the magnitude vector m [rows]; each row becomes m / ||row|| * row after the updates.
    pub magnitude: Option<&'a [f32]>,
}

impl Update<'_> {
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty() && self.dense.is_none() && self.magnitude.is_none()
    }
}

/// Columns per register-blocked chunk of the low-rank product.
const CHUNK: usize = 32;
/// Target floats per row block: big enough to amortize the scheduling, small enough for L2.
const BLOCK_FLOATS: usize = 1 << 16;

fn check_float(dtype: Dtype, what: &str) -> Result<()> {
    match dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "{what} has dtype {}; merging reads and writes F32, BF16 or F16",
            other
        ))),
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::LengthMismatch { what, expected, got });
    }
    Ok(())
}

/// Write `cast(W + update)` for a weight W of shape [rows, cols] into `out` (raw bytes of `out_dtype`).
///
/// With an empty update this is a plain dtype conversion. Fails (before writing anything) when a length does
/// not match the shape, and after the fact with `NonFinite` when the merged weight holds NaN or infinity where
/// the base did not (a broken adapter).
pub fn merge_into(
    base: &[u8],
    base_dtype: Dtype,
    rows: usize,
    cols: usize,
    update: &Update<'_>,
    out: &mut [u8],
    out_dtype: Dtype,
) -> Result<()> {
    check_float(base_dtype, "the base weight")?;
    check_float(out_dtype, "the output")?;
    let n = rows.checked_mul(cols).ok_or_else(|| Error::InvalidArgument("shape overflows".into()))?;
    check_len("base weight bytes", n * base_dtype.size(), base.len())?;
    check_len("output bytes", n * out_dtype.size(), out.len())?;
    for t in &update.terms {
        check_len("lora_B elements (rows x rank)", rows * t.rank, t.b.len())?;
        check_len("lora_A elements (rank x cols)", t.rank * cols, t.a.len())?;
    }
    if let Some(d) = update.dense {
        check_len("dense update elements", n, d.len())?;
    }
    if let Some(m) = update.magnitude {
        check_len("DoRA magnitude elements", rows, m.len())?;
    }
    if n == 0 {
        return Ok(());
    }
    let block_rows = (BLOCK_FLOATS / cols).clamp(1, rows);
    let in_row = cols * base_dtype.size();
    let out_row = cols * out_dtype.size();
    let check_finite = !update.is_empty();
    let first_bad = out
        .par_chunks_mut(block_rows * out_row)
        .enumerate()
        // One float32 accumulator per worker thread, reused for every block it takes: a fresh one per block
        // would fault in four bytes of new memory for every weight merged.
        .map_init(Vec::<f32>::new, |acc, (block, out_block)| {
            let r0 = block * block_rows;
            let nrows = out_block.len() / out_row;
            acc.resize(nrows * cols, 0.0);
            let acc = &mut acc[..nrows * cols];
            decode(&base[r0 * in_row..(r0 + nrows) * in_row], base_dtype, acc);
            for t in &update.terms {
                add_low_rank_dispatch(acc, r0, nrows, cols, t);
            }
            if let Some(d) = update.dense {
                for (a, &x) in acc.iter_mut().zip(&d[r0 * cols..(r0 + nrows) * cols]) {
                    *a += x;
                }
            }
            if let Some(m) = update.magnitude {
                for (row, &mag) in acc.chunks_exact_mut(cols).zip(&m[r0..r0 + nrows]) {
                    let norm = row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
                    let factor = mag / norm;
                    row.iter_mut().for_each(|x| *x *= factor);
                }
            }
            let bad = if check_finite { acc.iter().position(|x| !x.is_finite()) } else { None };
            encode(acc, out_block, out_dtype);
            bad.map(|i| r0 * cols + i)
        })
        .flatten()
        .min();
    if let Some(index) = first_bad {
        // Only an error when the base itself was finite there: a merge must not invent NaN or infinity.
        let mut w = [0f32];
        decode(&base[index * base_dtype.size()..(index + 1) * base_dtype.size()], base_dtype, &mut w);
        if w[0].is_finite() {
            return Err(Error::NonFinite { index });
        }
    }
    Ok(())
}

/// acc[rows r0..r0+nrows] += (B[r0.., :] @ A) * scale, with the rank summed in order by fused multiply-adds.
#[inline(always)]
fn add_low_rank(acc: &mut [f32], r0: usize, nrows: usize, cols: usize, t: &LowRank<'_>) {
    let rank = t.rank;
    let mut j0 = 0;
    while j0 + CHUNK <= cols {
        for i in 0..nrows {
            let b_row = &t.b[(r0 + i) * rank..(r0 + i + 1) * rank];
            let mut sum = [0f32; CHUNK];
            for (k, &bk) in b_row.iter().enumerate() {
                let a = &t.a[k * cols + j0..k * cols + j0 + CHUNK];
                for j in 0..CHUNK {
                    sum[j] = bk.mul_add(a[j], sum[j]);
                }
            }
            let out = &mut acc[i * cols + j0..i * cols + j0 + CHUNK];
            for j in 0..CHUNK {
                out[j] += sum[j] * t.scale;
            }
        }
        j0 += CHUNK;
    }
    for i in 0..nrows {
        let b_row = &t.b[(r0 + i) * rank..(r0 + i + 1) * rank];
        for j in j0..cols {
            let mut sum = 0f32;
            for (k, &bk) in b_row.iter().enumerate() {
                sum = bk.mul_add(t.a[k * cols + j], sum);
            }
            acc[i * cols + j] += sum * t.scale;
        }
    }
}

/// `add_low_rank` compiled with hardware FMA where the CPU has it. `mul_add` is always fused (a software fma
/// elsewhere, much slower), so results do not depend on the CPU; only the speed does. The kernel is inlined
/// into a `target_feature` function directly: through a closure, LLVM may leave it outside, without FMA.
fn add_low_rank_dispatch(acc: &mut [f32], r0: usize, nrows: usize, cols: usize, t: &LowRank<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { add_low_rank_avx2_fma(acc, r0, nrows, cols, t) };
        }
    }
    add_low_rank(acc, r0, nrows, cols, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_low_rank_avx2_fma(acc: &mut [f32], r0: usize, nrows: usize, cols: usize, t: &LowRank<'_>) {
    add_low_rank(acc, r0, nrows, cols, t)
}

/// Little-endian bytes of a float dtype to float32 (exact for all three).
pub fn decode(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        _ => unreachable!("checked by check_float"),
    }
}

/// float32 to little-endian bytes of a float dtype, rounding to nearest even as torch's `.to()` does.
pub fn encode(values: &[f32], out: &mut [u8], dtype: Dtype) {
    match dtype {
        Dtype::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        _ => unreachable!("checked by check_float"),
    }
}

/// Round to nearest even; NaN stays a (quiet) NaN, as in torch.
#[inline(always)]
fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let rounding_bias = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding_bias) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn from_bytes(b: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; b.len() / 4];
        decode(b, Dtype::F32, &mut out);
        out
    }

    /// The reference: peft's order of operations, one element at a time.
    fn reference(
        w: &[f32],
        rows: usize,
        cols: usize,
        terms: &[(Vec<f32>, Vec<f32>, usize, f32)],
    ) -> Vec<f32> {
        let mut out = w.to_vec();
        for (b, a, rank, scale) in terms {
            for i in 0..rows {
                for j in 0..cols {
                    let mut s = 0f32;
                    for k in 0..*rank {
                        s = b[i * rank + k].mul_add(a[k * cols + j], s);
                    }
                    out[i * cols + j] += s * scale;
                }
            }
        }
        out
    }

    #[test]
    fn merge_adds_scaled_product_exactly() {
        // W = 0, B = [[1], [2]], A = [[3, 4, 5]], scale 0.5 -> [[1.5, 2, 2.5], [3, 4, 5]]
        let base = f32_bytes(&[0.0; 6]);
        let (b, a) = ([1.0f32, 2.0], [3.0f32, 4.0, 5.0]);
        let update =
            Update { terms: vec![LowRank { b: &b, a: &a, rank: 1, scale: 0.5 }], ..Default::default() };
        let mut out = vec![0u8; 24];
        merge_into(&base, Dtype::F32, 2, 3, &update, &mut out, Dtype::F32).unwrap();
        assert_eq!(from_bytes(&out), [1.5, 2.0, 2.5, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn bf16_output_is_rounded_once_from_float32() {
        // 1 + 2^-9 + 2^-9: added in float32 (exact: 1 + 2^-8, a tie) then rounded to even -> 1.0.
        let base = f32_bytes(&[1.0]);
        let (b, a) = ([1.0f32], [2f32.powi(-9)]);
        let terms = [LowRank { b: &b, a: &a, rank: 1, scale: 1.0 }; 2].to_vec();
        let mut out = vec![0u8; 2];
        merge_into(&base, Dtype::F32, 1, 1, &Update { terms, ..Default::default() }, &mut out, Dtype::BF16)
            .unwrap();
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3f80);
    }

    #[test]
    fn dora_rescales_each_row_to_its_magnitude() {
        let base = f32_bytes(&[3.0, 4.0, 0.0, 2.0]);
        let m = [10.0f32, 1.0];
        let update = Update { magnitude: Some(&m), ..Default::default() };
        let mut out = vec![0u8; 16];
        merge_into(&base, Dtype::F32, 2, 2, &update, &mut out, Dtype::F32).unwrap();
        assert_eq!(from_bytes(&out), [6.0, 8.0, 0.0, 1.0]);
    }

    #[test]
    fn wrong_lengths_and_non_float_dtypes_are_errors() {
        let base = f32_bytes(&[0.0; 6]);
        let (b, a) = ([1.0f32, 2.0], [3.0f32, 4.0]);
        let update =
            Update { terms: vec![LowRank { b: &b, a: &a, rank: 1, scale: 1.0 }], ..Default::default() };
        let mut out = vec![0u8; 24];
        let err = merge_into(&base, Dtype::F32, 2, 3, &update, &mut out, Dtype::F32).unwrap_err();
        assert_eq!(err, Error::LengthMismatch { what: "lora_A elements (rank x cols)", expected: 3, got: 2 });
        let err = merge_into(&base, Dtype::I32, 2, 3, &Update::default(), &mut out, Dtype::F32).unwrap_err();
        assert!(err.to_string().contains("the base weight has dtype I32"), "{err}");
    }

    #[test]
    fn overflow_to_infinity_is_reported() {
        let base = f32_bytes(&[f32::MAX]);
        let (b, a) = ([f32::MAX], [1.0f32]);
        let update =
            Update { terms: vec![LowRank { b: &b, a: &a, rank: 1, scale: 1.0 }], ..Default::default() };
        let mut out = vec![0u8; 4];
        let err = merge_into(&base, Dtype::F32, 1, 1, &update, &mut out, Dtype::F32).unwrap_err();
        assert_eq!(err, Error::NonFinite { index: 0 });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn blocked_parallel_merge_equals_the_elementwise_reference(
            rows in 1usize..40, cols in 1usize..100, rank in 1usize..6, nterms in 1usize..3, seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5 };
            let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let terms: Vec<(Vec<f32>, Vec<f32>, usize, f32)> = (0..nterms)
                .map(|_| ((0..rows * rank).map(|_| next()).collect(), (0..rank * cols).map(|_| next()).collect(),
                          rank, next() * 4.0))
                .collect();
            let update = Update {
                terms: terms.iter().map(|(b, a, r, s)| LowRank { b, a, rank: *r, scale: *s }).collect(),
                ..Default::default()
            };
            let mut out = vec![0u8; rows * cols * 4];
            merge_into(&f32_bytes(&w), Dtype::F32, rows, cols, &update, &mut out, Dtype::F32).unwrap();
            prop_assert_eq!(from_bytes(&out), reference(&w, rows, cols, &terms));
        }
    }
}
