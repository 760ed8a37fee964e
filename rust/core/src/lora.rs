//! Batched heterogeneous LoRA on the CPU: one call adds every segment's low-rank update to a batch's output.
//!
//! The serving engine keeps each adapter of a linear module in a device "slot": A as `[slots, r_max, in]` and B
//! transposed as `[slots, r_max, out]`, rows past a slot's rank zero. A step's tokens are sorted by slot, so each
//! adapter owns one contiguous run of tokens (a segment, Punica's SGMV layout). For every segment this computes
//!
//! ```text
//! y[t] += scaling[slot] * (A[slot, :r] @ x[t]) @ Bt[slot, :r]      for t in start..end, r = rank[slot]
//! ```
//!
//! at the adapter's own rank, in one pass, so the cost does not grow with the number of segments the way a
//! Python loop of two small matmuls per segment does. Tokens are taken four at a time so each row of A and of
//! Bt is loaded once per four tokens; on x86-64 with AVX2 + FMA the same code is compiled for those units and
//! picked at run time.

use crate::error::{Error, Result};

/// One linear module's adapter slots (see the module docs for the layout).
pub struct LoraSlots<'a> {
    /// `[slots, max_rank, in_features]`, row-major.
    pub lora_a: &'a [f32],
    /// `[slots, max_rank, out_features]`, row-major (B transposed).
    pub lora_bt: &'a [f32],
    /// The true rank of each slot (0: the slot does not adapt this module).
    pub ranks: &'a [i64],
    /// The scaling of each slot (alpha / r, or alpha / sqrt(r) with rsLoRA).
    pub scaling: &'a [f32],
    pub max_rank: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// Tokens processed together: each A / Bt row loaded serves this many tokens.
const TOKEN_BLOCK: usize = 4;
/// Floats per vector step (one AVX2 register; two SSE ones).
const LANES: usize = 8;

/// `y [tokens, out] += LoRA(x [tokens, in])` for each `(start, end, slot)` triple in `segments` (flat, length a
/// multiple of 3). Tokens in no segment are left as they are (base-model-only rows).
///
/// Errors (`InvalidArgument` / `LengthMismatch`) when the buffers disagree with the shapes or a segment is out
/// of range; nothing is written then.
pub fn add_lora_segments(y: &mut [f32], x: &[f32], slots: &LoraSlots<'_>, segments: &[i64]) -> Result<()> {
    let (fan_in, fan_out) = (slots.in_features, slots.out_features);
    if fan_in == 0 || fan_out == 0 {
        return Err(Error::InvalidArgument("lora segments: in and out features must be positive".into()));
    }
    if !x.len().is_multiple_of(fan_in) {
        return Err(Error::InvalidArgument(format!(
            "lora segments: x holds {} floats, not a whole number of rows of {fan_in}",
            x.len()
        )));
    }
    let tokens = x.len() / fan_in;
    check_len("lora segments: y", tokens * fan_out, y.len())?;
    let num_slots = slots.scaling.len();
    check_len("lora segments: ranks", num_slots, slots.ranks.len())?;
    check_len("lora segments: lora_A", num_slots * slots.max_rank * fan_in, slots.lora_a.len())?;
    check_len("lora segments: lora_Bt", num_slots * slots.max_rank * fan_out, slots.lora_bt.len())?;
    if !segments.len().is_multiple_of(3) {
        return Err(Error::InvalidArgument(
            "lora segments: segments must be (start, end, slot) triples".into(),
        ));
    }
    let mut parsed = Vec::with_capacity(segments.len() / 3);
    for triple in segments.chunks_exact(3) {
        let (start, end, slot) = (triple[0], triple[1], triple[2]);
        let in_range = 0 <= start && start <= end && end as u64 <= tokens as u64;
        if !in_range || slot < 0 || slot as u64 >= num_slots as u64 {
            return Err(Error::InvalidArgument(format!(
                "lora segments: segment ({start}, {end}, slot {slot}) is outside {tokens} tokens / {num_slots} slots"
            )));
        }
        let rank = slots.ranks[slot as usize];
        if rank < 0 || rank as u64 > slots.max_rank as u64 {
            return Err(Error::InvalidArgument(format!(
                "lora segments: slot {slot} has rank {rank}, outside 0..={}",
                slots.max_rank
            )));
        }
        parsed.push((start as usize, end as usize, slot as usize, rank as usize));
    }

    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has just been checked for the features the function is compiled with.
            unsafe { run_avx2_fma(y, x, slots, &parsed) };
            return Ok(());
        }
    }
    run_segments::<false>(y, x, slots, &parsed);
    Ok(())
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::LengthMismatch { what, expected, got })
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2_fma(
    y: &mut [f32],
    x: &[f32],
    slots: &LoraSlots<'_>,
    segments: &[(usize, usize, usize, usize)],
) {
    run_segments::<true>(y, x, slots, segments);
}

/// a * b + c; fused (one rounding) only where the CPU has FMA, since a software fma is slow.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn run_segments<const FMA: bool>(
    y: &mut [f32],
    x: &[f32],
    slots: &LoraSlots<'_>,
    segments: &[(usize, usize, usize, usize)],
) {
    let (fan_in, fan_out, r_max) = (slots.in_features, slots.out_features, slots.max_rank);
    let mut xa: Vec<[f32; TOKEN_BLOCK]> = Vec::new();
    for &(start, end, slot, rank) in segments {
        if rank == 0 || start == end {
            continue;
        }
        let scale = slots.scaling[slot];
        let a = &slots.lora_a[slot * r_max * fan_in..][..rank * fan_in];
        let bt = &slots.lora_bt[slot * r_max * fan_out..][..rank * fan_out];
        xa.resize(rank, [0.0; TOKEN_BLOCK]);
        let mut t = start;
        while t < end {
            let block = (end - t).min(TOKEN_BLOCK);
            let xs = &x[t * fan_in..(t + block) * fan_in];
            let ys = &mut y[t * fan_out..(t + block) * fan_out];
            if block == TOKEN_BLOCK {
                project_down::<TOKEN_BLOCK, FMA>(a, xs, fan_in, scale, &mut xa);
                project_up::<TOKEN_BLOCK, FMA>(bt, &xa, ys, fan_out);
            } else {
                for i in 0..block {
                    let x1 = &xs[i * fan_in..(i + 1) * fan_in];
                    let y1 = &mut ys[i * fan_out..(i + 1) * fan_out];
                    project_down::<1, FMA>(a, x1, fan_in, scale, &mut xa);
                    project_up::<1, FMA>(bt, &xa, y1, fan_out);
                }
            }
            t += block;
        }
    }
}

/// xa[j][i] = scale * dot(A[j], x[i]) for the TB token rows in `xs` ([TB, in]) and every rank row j of `a`.
#[inline(always)]
fn project_down<const TB: usize, const FMA: bool>(
    a: &[f32],
    xs: &[f32],
    fan_in: usize,
    scale: f32,
    xa: &mut [[f32; TOKEN_BLOCK]],
) {
    let full = fan_in / LANES * LANES;
    for (j, a_row) in a.chunks_exact(fan_in).enumerate() {
        let mut acc = [[0f32; LANES]; TB];
        let mut k = 0;
        while k < full {
            let av: &[f32; LANES] = a_row[k..k + LANES].try_into().unwrap_or(&[0.0; LANES]);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let off = i * fan_in + k;
                let xv: &[f32; LANES] = xs[off..off + LANES].try_into().unwrap_or(&[0.0; LANES]);
                for l in 0..LANES {
                    acc_i[l] = madd::<FMA>(av[l], xv[l], acc_i[l]);
                }
            }
            k += LANES;
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let mut sum = acc_i.iter().sum::<f32>();
            for kk in full..fan_in {
                sum = madd::<FMA>(a_row[kk], xs[i * fan_in + kk], sum);
            }
            xa[j][i] = sum * scale;
        }
    }
}

/// ys[i] += sum_j xa[j][i] * Bt[j] for the TB token rows of `ys` ([TB, out]).
#[inline(always)]
fn project_up<const TB: usize, const FMA: bool>(
    bt: &[f32],
    xa: &[[f32; TOKEN_BLOCK]],
    ys: &mut [f32],
    fan_out: usize,
) {
    let full = fan_out / LANES * LANES;
    let mut o = 0;
    while o < full {
        let mut acc = [[0f32; LANES]; TB];
        for (i, acc_i) in acc.iter_mut().enumerate() {
            acc_i.copy_from_slice(&ys[i * fan_out + o..i * fan_out + o + LANES]);
        }
        for (j, b_row) in bt.chunks_exact(fan_out).enumerate() {
            let bv: &[f32; LANES] = b_row[o..o + LANES].try_into().unwrap_or(&[0.0; LANES]);
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let c = xa[j][i];
                for l in 0..LANES {
                    acc_i[l] = madd::<FMA>(c, bv[l], acc_i[l]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            ys[i * fan_out + o..i * fan_out + o + LANES].copy_from_slice(acc_i);
        }
        o += LANES;
    }
    for oo in full..fan_out {
        for i in 0..TB {
            let mut sum = ys[i * fan_out + oo];
            for (j, b_row) in bt.chunks_exact(fan_out).enumerate() {
                sum = madd::<FMA>(xa[j][i], b_row[oo], sum);
            }
            ys[i * fan_out + oo] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random floats in [-1, 1).
    fn floats(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The definition, in f64, one token at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        y: &mut [f32],
        x: &[f32],
        a: &[f32],
        bt: &[f32],
        ranks: &[i64],
        scaling: &[f32],
        r_max: usize,
        fan_in: usize,
        fan_out: usize,
        segments: &[i64],
    ) {
        for s in segments.chunks_exact(3) {
            let (start, end, slot) = (s[0] as usize, s[1] as usize, s[2] as usize);
            let r = ranks[slot] as usize;
            for t in start..end {
                for o in 0..fan_out {
                    let mut sum = 0f64;
                    for j in 0..r {
                        let mut d = 0f64;
                        for k in 0..fan_in {
                            d += a[(slot * r_max + j) * fan_in + k] as f64 * x[t * fan_in + k] as f64;
                        }
                        sum += d * bt[(slot * r_max + j) * fan_out + o] as f64;
                    }
                    y[t * fan_out + o] += (sum * scaling[slot] as f64) as f32;
                }
            }
        }
    }

    fn check(tokens: usize, fan_in: usize, fan_out: usize, r_max: usize, ranks: &[i64], segments: &[i64]) {
        let n = ranks.len();
        let mut a = floats(n * r_max * fan_in, 1);
        let mut bt = floats(n * r_max * fan_out, 2);
        for (slot, &r) in ranks.iter().enumerate() {
            // rows past the rank are zero, as the engine keeps them
            for j in r as usize..r_max {
                a[(slot * r_max + j) * fan_in..][..fan_in].fill(0.0);
                bt[(slot * r_max + j) * fan_out..][..fan_out].fill(0.0);
            }
        }
        let scaling: Vec<f32> = (0..n).map(|i| 0.5 + i as f32).collect();
        let x = floats(tokens * fan_in, 3);
        let y0 = floats(tokens * fan_out, 4);
        let mut want = y0.clone();
        reference(&mut want, &x, &a, &bt, ranks, &scaling, r_max, fan_in, fan_out, segments);
        let slots = LoraSlots {
            lora_a: &a,
            lora_bt: &bt,
            ranks,
            scaling: &scaling,
            max_rank: r_max,
            in_features: fan_in,
            out_features: fan_out,
        };
        let mut got = y0.clone();
        add_lora_segments(&mut got, &x, &slots, segments).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "element {i}: {g} vs {w}");
        }
        let mut portable = y0;
        run_segments::<false>(&mut portable, &x, &slots, &parse(segments, ranks));
        for (g, w) in portable.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()));
        }
    }

    fn parse(segments: &[i64], ranks: &[i64]) -> Vec<(usize, usize, usize, usize)> {
        segments
            .chunks_exact(3)
            .map(|s| (s[0] as usize, s[1] as usize, s[2] as usize, ranks[s[2] as usize] as usize))
            .collect()
    }

    #[test]
    fn matches_the_definition_for_mixed_segments_ranks_and_ragged_shapes() {
        // 13 tokens: a 6-token segment (one full block + 2), a base-only gap, single-token segments, a rank-0 slot.
        check(13, 37, 21, 8, &[8, 3, 0, 1], &[0, 6, 1, 7, 8, 0, 8, 9, 2, 9, 13, 3]);
        check(5, 64, 48, 16, &[16], &[0, 5, 0]);
        check(1, 8, 8, 1, &[1], &[0, 1, 0]);
    }

    #[test]
    fn tokens_in_no_segment_and_empty_segments_are_untouched() {
        let slots = LoraSlots {
            lora_a: &[1.0; 4],
            lora_bt: &[1.0; 4],
            ranks: &[1],
            scaling: &[1.0],
            max_rank: 1,
            in_features: 4,
            out_features: 4,
        };
        let x = [1.0; 8];
        let mut y = [0.0; 8];
        add_lora_segments(&mut y, &x, &slots, &[1, 1, 0, 1, 2, 0]).unwrap();
        assert_eq!(y, [0.0, 0.0, 0.0, 0.0, 4.0, 4.0, 4.0, 4.0]);
    }

    #[test]
    fn refuses_inconsistent_shapes_and_segments_out_of_range() {
        let slots = LoraSlots {
            lora_a: &[0.0; 8],
            lora_bt: &[0.0; 8],
            ranks: &[2],
            scaling: &[1.0],
            max_rank: 2,
            in_features: 4,
            out_features: 4,
        };
        let x = [0.0; 8];
        let mut y = [0.0; 8];
        assert!(add_lora_segments(&mut y, &x, &slots, &[0, 3, 0]).is_err());
        assert!(add_lora_segments(&mut y, &x, &slots, &[0, 2, 1]).is_err());
        assert!(add_lora_segments(&mut y, &x, &slots, &[1, 0, 0]).is_err());
        assert!(add_lora_segments(&mut y, &x, &slots, &[0, 2]).is_err());
        assert!(add_lora_segments(&mut y[..4], &x, &slots, &[0, 1, 0]).is_err());
        let bad_rank = LoraSlots { ranks: &[3], ..slots };
        assert!(add_lora_segments(&mut y, &x, &bad_rank, &[0, 1, 0]).is_err());
    }
}
