//! Kernel throughput with preallocated buffers (what a checkpoint pass sees): `cargo bench --bench kernels`.
use std::time::Instant;

use lorafast::core::dtype::FloatType;
use lorafast::core::quant::{dequantize_into, quantize_codes, NestedAbsmax, QuantType};

fn main() {
    let n: usize = 5632 * 2048 * 8; // 92 M elements, bf16
    let mut state = 0x9E3779B97F4A7C15u64;
    let input: Vec<u16> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
            half::bf16::from_f32(v).to_bits()
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new().build().expect("pool");
    let threads = pool.current_num_threads();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(64)];
    let mut out = vec![0u8; n * 2];
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    pool.install(|| {
        let q = best(&mut || {
            quantize_codes(
                lorafast::core::quant::Input::BF16(&input),
                QuantType::Nf4,
                64,
                &mut packed,
                &mut absmax,
            );
            std::hint::black_box(NestedAbsmax::quantize(&absmax, 2));
        });
        let d = best(&mut || dequantize_into(&packed, &absmax, QuantType::Nf4, 64, FloatType::BF16, &mut out));
        println!("| kernel ({threads} threads, bf16, NF4, blocksize 64) | G elements/s |");
        println!("|---|---|");
        println!("| quantize + double quant | {:.2} |", n as f64 / q / 1e9);
        println!("| dequantize | {:.2} |", n as f64 / d / 1e9);
    });
}
