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
    lora_tiles();
}

/// The merge's inner step on one thread, L2-sized tiles of a 2048 x 5632 weight with a rank-16 adapter:
/// the product written out then added, against the fused kernel.
fn lora_tiles() {
    use faer::MatRef;
    use lorafast::core::dtype::simd::add_scaled;
    use lorafast::core::linalg::{add_lowrank_product, matmul_into, PackedFactor};
    let (rows, cols, rank) = (2048usize, 5632usize, 16usize);
    let tile_rows = (1 << 16) / cols;
    let a: Vec<f32> = (0..rank * cols)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-5)
        .collect();
    let b: Vec<f32> = (0..rows * rank)
        .map(|i| ((i * 104729 % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    let mut w = vec![0.5f32; tile_rows * cols];
    let mut delta = vec![0f32; tile_rows * cols];
    let time = |f: &mut dyn FnMut(usize, usize)| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for r0 in (0..rows).step_by(tile_rows) {
                    f(r0, tile_rows.min(rows - r0));
                }
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let split = time(&mut |r0, n| {
        let bt = MatRef::from_row_major_slice(&b[r0 * rank..(r0 + n) * rank], n, rank);
        matmul_into(&mut delta[..n * cols], bt, MatRef::from_row_major_slice(&a, rank, cols));
        add_scaled(&mut w[..n * cols], &delta[..n * cols], 2.0);
    });
    let packed = PackedFactor::new(&a, rank, cols);
    let fused = time(&mut |r0, n| {
        add_lowrank_product(&mut w[..n * cols], &b[r0 * rank..(r0 + n) * rank], &packed, 2.0);
    });
    let el = (rows * cols) as f64;
    println!();
    println!("| LoRA merge step (1 thread, rank {rank}, {rows} x {cols}) | G elements/s |");
    println!("|---|---|");
    println!("| product (faer), then W += delta * s | {:.2} |", el / split / 1e9);
    println!("| fused | {:.2} |", el / fused / 1e9);
}
