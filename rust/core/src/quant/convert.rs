//! Borrowed views of float buffers in the three dtypes the quantizer reads and writes.
//! bfloat16 and float16 travel as their raw `u16` bit patterns so the binding can hand over torch memory as is.

/// Input values: float32, or bfloat16 / float16 as raw bits.
#[derive(Clone, Copy, Debug)]
pub enum Floats<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

/// Output buffers for dequantization, in the same three dtypes.
#[derive(Debug)]
pub enum FloatsMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

impl Floats<'_> {
    pub fn len(&self) -> usize {
        match self {
            Floats::F32(s) => s.len(),
            Floats::Bf16(s) | Floats::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FloatsMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            FloatsMut::F32(s) => s.len(),
            FloatsMut::Bf16(s) | FloatsMut::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// bfloat16 bits to float32: exact, a shift.
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// float32 to bfloat16 bits with round-to-nearest-even, as torch's `.to(torch.bfloat16)` does (finite inputs).
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounding_bias = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding_bias) >> 16) as u16
}

#[inline(always)]
pub(crate) fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_and_ties_to_even() {
        for v in [0.0f32, 1.0, -2.5, 3.140625, 2f32.powi(-70), -1.5 * 2f32.powi(100)] {
            assert_eq!(bf16_to_f32(f32_to_bf16(v)), v, "{v} is representable in bf16");
        }
        // 1 + 2^-8 lies exactly between two bf16 values: ties to the even one (1.0).
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 lies between 1 + 2^-7 (odd mantissa) and 1 + 2^-6 (even): goes up.
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
    }
}
