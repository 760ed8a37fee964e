//! Timing of the 4-bit kernels alone, for tuning: `cargo run --release -p nibblora-core --example quant_speed`.
//! Buffers are reused, so this measures the arithmetic, not page faults (bench/bench_quant.py measures both).
use nibblora_core::quant::{self, Floats, FloatsMut, QuantType};
use std::time::Instant;

/// Best of five runs, in seconds.
fn best_of_five(mut run: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let n = 4096 * 11008;
    let mparam_per_s = |seconds: f64| n as f64 / seconds / 1e6;
    let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7137).sin() * 0.02).collect();
    let bf: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
    for (name, input) in [("f32", Floats::F32(&x)), ("bf16", Floats::Bf16(&bf))] {
        let (mut packed, mut absmax) = quant::quantize_4bit(input, QuantType::Nf4, 64).unwrap();
        let quantize = best_of_five(|| {
            quant::quantize_4bit_into(input, QuantType::Nf4, 64, &mut packed, &mut absmax).unwrap()
        });
        let (mut out16, mut out32) = (vec![0u16; n], vec![0f32; n]);
        let to_bf16 = best_of_five(|| {
            let out = FloatsMut::Bf16(&mut out16);
            quant::dequantize_4bit_into(&packed, &absmax, QuantType::Nf4, 64, out).unwrap()
        });
        let to_f32 = best_of_five(|| {
            let out = FloatsMut::F32(&mut out32);
            quant::dequantize_4bit_into(&packed, &absmax, QuantType::Nf4, 64, out).unwrap()
        });
        println!(
            "{name}: quantize {:.0} Mparam/s; dequantize -> bf16 {:.0}, -> f32 {:.0} Mparam/s",
            mparam_per_s(quantize),
            mparam_per_s(to_bf16),
            mparam_per_s(to_f32)
        );
    }
}
