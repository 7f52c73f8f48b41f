// The loops mirror the indices of ATen's cascade sum one for one, which is how this was checked.
#![allow(clippy::needless_range_loop)]
//! `torch.mean` of an f32 vector on the CPU, in torch's own summation order (ATen's cascade sum:
//! `aten/src/ATen/native/cpu/SumKernel.cpp`), so the double-quantization offset - and every nested
//! code derived from it - comes out bit-identical to bitsandbytes'.
//!
//! Verified against torch 2.15 on x86-64: 8 f32 lanes, 4 accumulators, cascade levels; inputs of
//! fewer than 8 elements use the same cascade on scalars; from 32768 elements up the input is split
//! into one chunk per torch thread and the chunk sums are added in order.

const LANES: usize = 8;
const GRAIN: usize = 32768;

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

fn cascade<const W: usize>(x: &[f32]) -> f32 {
    let vectors = x.len() / W;
    let rows = vectors / 4;
    let vec = |i: usize| -> [f32; W] { x[i * W..(i + 1) * W].try_into().expect("W elements") };
    let level_power = (ceil_log2(rows) / 4).max(4);
    let step = 1usize << level_power;
    let mask = step - 1;
    let mut acc = [[[0f32; W]; 4]; 4];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            for k in 0..4 {
                add(&mut acc[0][k], &vec(4 * i + k));
            }
            i += 1;
        }
        for j in 1..4 {
            for k in 0..4 {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0f32; W];
            }
            if i & (mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for k in 0..4 {
            add(&mut acc[0][k], &vec(4 * i + k));
        }
        i += 1;
    }
    for j in 1..4 {
        for k in 0..4 {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut p = acc[0];
    for v in 4 * rows..vectors {
        add(&mut p[0], &vec(v));
    }
    for k in 1..4 {
        let pk = p[k];
        add(&mut p[0], &pk);
    }
    let mut s = 0f32;
    for e in &x[vectors * W..] {
        s += *e;
    }
    for lane in p[0] {
        s += lane;
    }
    s
}

fn chunk_sum(x: &[f32]) -> f32 {
    if x.len() < LANES {
        cascade::<1>(x)
    } else {
        cascade::<LANES>(x)
    }
}

/// torch's `x.mean()` for a 1-D f32 tensor with `threads` intra-op threads.
pub fn torch_mean(x: &[f32], threads: usize) -> f32 {
    let n = x.len();
    let sum = if n >= GRAIN && threads > 1 {
        let chunks = threads.min(n.div_ceil(GRAIN));
        let chunk = n.div_ceil(chunks);
        x.chunks(chunk).fold(0f32, |total, c| total + chunk_sum(c))
    } else {
        chunk_sum(x)
    };
    sum / n as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_exact_cases() {
        assert_eq!(torch_mean(&[1.0, 2.0, 3.0], 1), 2.0);
        assert_eq!(torch_mean(&[0.5; 1000], 2), 0.5);
        let x: Vec<f32> = (0..100_000).map(|i| (i % 7) as f32).collect();
        let exact = x.iter().map(|v| *v as f64).sum::<f64>() / x.len() as f64;
        assert!((torch_mean(&x, 2) as f64 - exact).abs() < 1e-5);
    }

    #[test]
    fn ceil_log2_matches_torch() {
        assert_eq!([0, 1, 2, 3, 4, 5, 8, 9].map(ceil_log2), [1, 1, 1, 2, 2, 3, 3, 4]);
    }
}
