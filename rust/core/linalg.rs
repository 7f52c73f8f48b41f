//! Small dense kernels on top of faer.
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// `dst (m x n) = lhs (m x k) @ rhs (k x n)` in f32, all row-major slices except where views say otherwise.
pub fn matmul_into(dst: &mut [f32], lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) {
    let (m, n) = (lhs.nrows(), rhs.ncols());
    let dst = MatMut::from_row_major_slice_mut(dst, m, n);
    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
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
