//! Small dense kernels on top of faer.
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// `dst (m x n) = lhs (m x k) @ rhs (k x n)` in f32, all row-major slices except where views say otherwise.
pub fn matmul_into(dst: &mut [f32], lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) {
    let (m, n) = (lhs.nrows(), rhs.ncols());
    let dst = MatMut::from_row_major_slice_mut(dst, m, n);
    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
}

/// Column-block width of the fused LoRA kernel.
const BLOCK_COLS: usize = 32;

/// A LoRA factor A (rank x cols) laid out for `add_lowrank_product`: each block of 32 columns' rank x 32
/// values contiguous (the kernel streams one block per row group instead of striding across A's rows),
/// then the last `cols % 32` columns row-major.
pub struct PackedFactor {
    data: Vec<f32>,
    rank: usize,
    cols: usize,
}

impl PackedFactor {
    pub fn new(a: &[f32], rank: usize, cols: usize) -> Self {
        debug_assert_eq!(a.len(), rank * cols);
        let full = cols / BLOCK_COLS * BLOCK_COLS;
        let mut data = Vec::with_capacity(rank * cols);
        for j in (0..full).step_by(BLOCK_COLS) {
            for row in a.chunks_exact(cols.max(1)) {
                data.extend_from_slice(&row[j..j + BLOCK_COLS]);
            }
        }
        for row in a.chunks_exact(cols.max(1)) {
            data.extend_from_slice(&row[full..]);
        }
        PackedFactor { data, rank, cols }
    }
}

/// `w (n x cols) += (b (n x rank) @ a (rank x cols)) * s`, all row-major, with each product element
/// rounded as a matrix product computes it (fused multiply-adds in k order from +0, as the gemm kernels
/// under `matmul_into` and torch do) and then scaled and added with two roundings (`W += delta * s`).
/// One pass over the tile instead of a product written out, read back and added.
pub fn add_lowrank_product(w: &mut [f32], b: &[f32], a: &PackedFactor, s: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(w: &mut [f32], b: &[f32], a: &PackedFactor, s: f32) {
            add_lowrank_product_generic(w, b, a, s)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(w: &mut [f32], b: &[f32], a: &PackedFactor, s: f32) {
            add_lowrank_product_generic(w, b, a, s)
        }
        let widest = crate::core::dtype::simd::widest();
        if widest >= 2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
            return unsafe { avx512(w, b, a, s) };
        }
        if widest >= 1 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { avx2(w, b, a, s) };
        }
    }
    add_lowrank_product_generic(w, b, a, s)
}

#[inline(always)]
fn add_lowrank_product_generic(w: &mut [f32], b: &[f32], a: &PackedFactor, s: f32) {
    const C: usize = BLOCK_COLS;
    let (rank, cols) = (a.rank, a.cols);
    let n = w.len() / cols.max(1);
    debug_assert!(b.len() >= n * rank);
    // Column blocks outside, rows inside: a block of A (rank x 32) stays in L1 for the whole tile.
    let full = cols / C * C;
    for (jb, block) in a.data[..full * rank].chunks_exact(rank * C).enumerate() {
        let j = jb * C;
        let mut i = 0;
        // Eight rows at a time (sixteen independent chains of fused multiply-adds), then the rest in
        // fours, twos and ones rather than ones alone, which the latency of two chains bounds.
        while i + 8 <= n {
            add_block::<8, C>(w, b, block, rank, cols, s, i, j);
            i += 8;
        }
        if i + 4 <= n {
            add_block::<4, C>(w, b, block, rank, cols, s, i, j);
            i += 4;
        }
        if i + 2 <= n {
            add_block::<2, C>(w, b, block, rank, cols, s, i, j);
            i += 2;
        }
        if i < n {
            add_block::<1, C>(w, b, block, rank, cols, s, i, j);
        }
    }
    // The last columns one at a time, in the same order.
    let (tail, rest) = (cols - full, &a.data[full * rank..]);
    for r in 0..n {
        for jj in 0..tail {
            let mut c = 0f32;
            for k in 0..rank {
                c = b[r * rank + k].mul_add(rest[k * tail + jj], c);
            }
            w[r * cols + full + jj] += c * s;
        }
    }
}

/// Rows [i, i + R) x columns [j, j + C) of `add_lowrank_product`; `block` is A's rank x C block.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn add_block<const R: usize, const C: usize>(
    w: &mut [f32],
    b: &[f32],
    block: &[f32],
    rank: usize,
    cols: usize,
    s: f32,
    i: usize,
    j: usize,
) {
    let b = &b[i * rank..(i + R) * rank];
    let mut acc = [[0f32; C]; R];
    for (k, ak) in block.chunks_exact(C).enumerate() {
        let ak: &[f32; C] = ak.try_into().expect("C long");
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let bk = b[r * rank + k];
            for (c, av) in acc_r.iter_mut().zip(ak) {
                *c = bk.mul_add(*av, *c);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let at = (i + r) * cols + j;
        let wr: &mut [f32; C] = (&mut w[at..at + C]).try_into().expect("C long");
        for (wv, c) in wr.iter_mut().zip(acc_r) {
            *wv += *c * s;
        }
    }
}

/// The transpose of a row-major `rows x cols` matrix, row-major.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// Row-major blocks of `rows` rows placed side by side in a `rows x width` matrix; columns past the
/// blocks stay zero. `blocks` holds (columns, values) pairs.
pub fn hstack(blocks: &[(usize, &[f32])], rows: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * width];
    let mut col = 0;
    for &(cols, values) in blocks {
        for i in 0..rows {
            out[i * width + col..i * width + col + cols].copy_from_slice(&values[i * cols..(i + 1) * cols]);
        }
        col += cols;
    }
    out
}

/// ||B @ A||_F without forming the product: sqrt(sum((B^T B) .* (A A^T))), in f64.
/// `a` is (r x n) row-major and `b` is (m x r) row-major.
pub fn lowrank_frobenius(a: &[f32], b: &[f32], r: usize) -> f64 {
    if r == 0 {
        return 0.0;
    }
    let n = a.len() / r;
    let m = b.len() / r;
    let mut gram_a = vec![0f64; r * r];
    let mut gram_b = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..=i {
            let (ai, aj) = (&a[i * n..(i + 1) * n], &a[j * n..(j + 1) * n]);
            let s: f64 = ai.iter().zip(aj).map(|(x, y)| *x as f64 * *y as f64).sum();
            gram_a[i * r + j] = s;
            gram_a[j * r + i] = s;
            let s: f64 = (0..m).map(|row| b[row * r + i] as f64 * b[row * r + j] as f64).sum();
            gram_b[i * r + j] = s;
            gram_b[j * r + i] = s;
        }
    }
    gram_a
        .iter()
        .zip(&gram_b)
        .map(|(x, y)| x * y)
        .sum::<f64>()
        .max(0.0)
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel gives the bits of the product through faer followed by `W += delta * s`, for
    /// ranks, widths and row counts that exercise every path (row groups, column tails), with signed
    /// zeros in the factors.
    #[test]
    fn fused_lowrank_add_matches_matmul_then_add() {
        let mut seed = 0x9E37_79B9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            match seed % 17 {
                0 => 0.0,
                1 => -0.0,
                _ => (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0,
            }
        };
        for &(n, rank, cols) in &[
            (1, 1, 1),
            (3, 16, 31),
            (4, 16, 32),
            (7, 8, 70),
            (11, 16, 5632),
            (32, 64, 96),
            (5, 3, 33),
            (8, 128, 64),
            (4, 256, 2048),
            (2, 512, 64),
        ] {
            let b: Vec<f32> = (0..n * rank).map(|_| next()).collect();
            let a: Vec<f32> = (0..rank * cols).map(|_| next() * 1e-2).collect();
            let w0: Vec<f32> = (0..n * cols).map(|_| next()).collect();
            let s = 2.0f32 / 3.0;
            let mut delta = vec![0f32; n * cols];
            matmul_into(
                &mut delta,
                MatRef::from_row_major_slice(&b, n, rank),
                MatRef::from_row_major_slice(&a, rank, cols),
            );
            let expect: Vec<u32> = w0.iter().zip(&delta).map(|(w, d)| (w + d * s).to_bits()).collect();
            // Every vector width this CPU has, and the portable path.
            for widest in [2, 1, 0] {
                crate::core::dtype::simd::WIDEST.with(|w| w.set(widest));
                let mut w = w0.clone();
                add_lowrank_product(&mut w, &b, &PackedFactor::new(&a, rank, cols), s);
                let got: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, expect, "n {n} rank {rank} cols {cols} widest {widest}");
            }
        }
    }

    #[test]
    fn lowrank_norm_matches_dense() {
        let (m, r, n) = (5, 3, 7);
        let a: Vec<f32> = (0..r * n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..m * r).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let mut dense = vec![0f32; m * n];
        matmul_into(
            &mut dense,
            MatRef::from_row_major_slice(&b, m, r),
            MatRef::from_row_major_slice(&a, r, n),
        );
        let direct: f64 = dense.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((lowrank_frobenius(&a, &b, r) - direct).abs() < 1e-4 * direct);
        // The product itself: one element by hand.
        let e: f32 = (0..r).map(|k| b[k] * a[k * n]).sum();
        assert!((dense[0] - e).abs() < 1e-6);
    }

    #[test]
    fn hstack_places_blocks_and_zero_fills() {
        let (x, y) = ([1.0, 2.0], [3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            hstack(&[(1, &x), (2, &y)], 2, 4),
            vec![1.0, 3.0, 4.0, 0.0, 2.0, 5.0, 6.0, 0.0]
        );
    }
}
