//! Rough single-process timing of the 4-bit kernels, for tuning: `cargo run --release --example quant_speed`.
use nibblora_core::quant::{self, Floats, FloatsMut, QuantType};
use std::time::Instant;

fn main() {
    let n = 4096 * 11008;
    let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7137).sin() * 0.02).collect();
    let bf: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    for (name, input) in [("f32", Floats::F32(&x)), ("bf16", Floats::Bf16(&bf))] {
        let mut best = f64::MAX;
        let mut result = None;
        for _ in 0..5 {
            let t = Instant::now();
            result = Some(quant::quantize_4bit(input, QuantType::Nf4, 64).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "quantize {name}: {:.1} ms, {:.0} Mparam/s",
            best * 1e3,
            n as f64 / best / 1e6
        );
        let (packed, absmax) = result.unwrap();
        let mut out16 = vec![0u16; n];
        let mut out32 = vec![0f32; n];
        let mut best16 = f64::MAX;
        let mut best32 = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            quant::dequantize_4bit_into(
                &packed,
                &absmax,
                QuantType::Nf4,
                64,
                FloatsMut::Bf16(&mut out16),
            )
            .unwrap();
            best16 = best16.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            quant::dequantize_4bit_into(
                &packed,
                &absmax,
                QuantType::Nf4,
                64,
                FloatsMut::F32(&mut out32),
            )
            .unwrap();
            best32 = best32.min(t.elapsed().as_secs_f64());
        }
        println!(
            "dequantize -> bf16: {:.0} Mparam/s, -> f32: {:.0} Mparam/s",
            n as f64 / best16 / 1e6,
            n as f64 / best32 / 1e6
        );
    }
}
