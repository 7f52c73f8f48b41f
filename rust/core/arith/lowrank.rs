//! Truncated SVDs with faer: exact for a product of thin factors (QR of each, SVD of the small core),
//! randomized subspace iteration for a dense matrix, stopped when the captured energy stops growing.
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rand_mt::Mt;

use crate::core::error::{Error, Result};

/// Left/right singular vectors (as columns) and singular values, largest first.
pub struct Svd {
    pub u: Mat<f64>,
    pub s: Vec<f64>,
    pub v: Mat<f64>,
    /// ||M||_F^2 of the whole matrix (not only of the part the vectors span).
    pub total_energy: f64,
}

/// A rank-k factorization M ~ B A in LoRA layout: B (m x k) and A (k x n), row-major f32.
pub struct Factors {
    pub b: Vec<f32>,
    pub a: Vec<f32>,
    pub rank: usize,
}

fn svd_failed(what: &str) -> Error {
    Error::InvalidArgument(format!("{what}: the SVD did not converge (non-finite values?)"))
}

/// Thin QR of a tall matrix: Q (rows x min) and R (min x cols).
fn thin_qr(m: MatRef<'_, f64>) -> (Mat<f64>, Mat<f64>) {
    let qr = m.qr();
    (qr.compute_thin_Q(), qr.thin_R().to_owned())
}

fn thin_svd(m: MatRef<'_, f64>, what: &str) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let svd = m.thin_svd().map_err(|_| svd_failed(what))?;
    let s = svd.S().column_vector().iter().copied().collect();
    Ok((svd.U().to_owned(), s, svd.V().to_owned()))
}

fn mul(lhs: MatRef<'_, f64>, rhs: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(lhs.nrows(), rhs.ncols());
    matmul(out.as_mut(), Accum::Replace, lhs, rhs, 1.0, Par::Seq);
    out
}

/// Exact SVD of `b (m x r) @ a (r x n)` (row-major f32) in f64, in O((m + n) r^2): never forms the product.
pub fn svd_of_product(b: &[f32], a: &[f32], m: usize, r: usize, n: usize, what: &str) -> Result<Svd> {
    let bm = Mat::<f64>::from_fn(m, r, |i, j| b[i * r + j] as f64);
    let at = Mat::<f64>::from_fn(n, r, |i, j| a[j * n + i] as f64);
    let (qb, rb) = thin_qr(bm.as_ref());
    let (qa, ra) = thin_qr(at.as_ref());
    let core = mul(rb.as_ref(), ra.transpose());
    let (uc, s, vc) = thin_svd(core.as_ref(), what)?;
    let total_energy = s.iter().map(|x| x * x).sum();
    Ok(Svd {
        u: mul(qb.as_ref(), uc.as_ref()),
        s,
        v: mul(qa.as_ref(), vc.as_ref()),
        total_energy,
    })
}

/// How hard the randomized SVD works.
#[derive(Debug, Clone, Copy)]
pub struct RandomizedOptions {
    /// Extra columns beyond the rank asked for.
    pub oversample: usize,
    /// Stop when a power iteration adds less than this share of the captured energy...
    pub tol: f64,
    /// ...or after this many power iterations.
    pub max_iters: usize,
    /// Iterate until the top-k singular subspace has converged to what float32 products can resolve,
    /// not only the energy (which converges quadratically faster): for results that stand in for an
    /// exact truncated SVD (combine's svd methods).
    pub converge_subspace: bool,
}

impl Default for RandomizedOptions {
    /// Two power iterations with 8 extra columns: within 1% of the exact SVD's energy on the flat
    /// spectra of short fine-tunes, within 0.01% on decaying ones, and above torch.svd_lowrank(q=r,
    /// niter=2) at a fraction of its time (benches/bench_arith.py).
    fn default() -> Self {
        RandomizedOptions {
            oversample: 8,
            tol: 1e-3,
            max_iters: 2,
            converge_subspace: false,
        }
    }
}

/// A dense row-major f32 matrix and its squared Frobenius norm.
#[derive(Clone, Copy)]
pub struct Dense<'a> {
    pub values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub total_energy: f64,
}

/// Top-`k` SVD of a dense matrix.
///
/// Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) with a QR after every
/// product. Each `D^T Q` is also `B^T` of the current approximation `Q B`, so the captured energy is
/// known after every iteration at no extra pass over `d`; the iteration stops once it stops growing.
/// Small matrices get faer's exact SVD.
pub fn dense_svd(d: Dense<'_>, k: usize, opts: &RandomizedOptions, seed: u32, what: &str) -> Result<Svd> {
    let (m, n, total_energy) = (d.rows, d.cols, d.total_energy);
    let d = d.values;
    let q = (k + opts.oversample).min(m).min(n);
    let dm = MatRef::from_row_major_slice(d, m, n);
    if 2 * q >= m.min(n) {
        let full = Mat::<f64>::from_fn(m, n, |i, j| d[i * n + j] as f64);
        let (u, s, v) = thin_svd(full.as_ref(), what)?;
        return Ok(Svd { u, s, v, total_energy });
    }
    // Rademacher test matrix: as good as Gaussian for the range finder, and cheap.
    let mut rng = Mt::new(seed);
    let mut bits = 0u32;
    let omega = Mat::<f32>::from_fn(n, q, |i, j| {
        if (i * q + j) % 32 == 0 {
            bits = rng.next_u32();
        }
        let bit = (bits >> ((i * q + j) % 32)) & 1;
        if bit == 1 {
            1.0
        } else {
            -1.0
        }
    });
    let mut y = Mat::<f32>::zeros(m, q);
    let mut z = Mat::<f32>::zeros(n, q);
    matmul(y.as_mut(), Accum::Replace, dm, omega.as_ref(), 1.0, Par::Seq);
    let mut captured_before = 0.0f64;
    let mut u_before: Option<Mat<f64>> = None;
    let mut iter = 0;
    loop {
        let (qy, _) = thin_qr(to_f64(y.as_ref()).as_ref());
        let qy32 = to_f32(qy.as_ref());
        // z = D^T Q = B^T, where B = Q^T D is the projection of D onto span(Q).
        matmul(z.as_mut(), Accum::Replace, dm.transpose(), qy32.as_ref(), 1.0, Par::Seq);
        // Z = Q_z R_z: the singular values of Z are those of the small R_z, and Q_z is the next basis.
        let (qz, rz) = thin_qr(to_f64(z.as_ref()).as_ref());
        let (ur, s, vr) = thin_svd(rz.as_ref(), what)?;
        // D ~ Q B = Q Z^T = Q (Q_z U_r S V_r^T)^T = (Q V_r) S (Q_z U_r)^T.
        let u = mul(qy.as_ref(), vr.as_ref());
        let captured: f64 = s.iter().take(k).map(|x| x * x).sum();
        iter += 1;
        let converged = if opts.converge_subspace {
            let done = u_before
                .as_ref()
                .is_some_and(|prev| subspace_converged(prev.as_ref(), u.as_ref(), &s, k));
            u_before = Some(u.clone());
            done
        } else {
            captured - captured_before <= opts.tol * captured
        };
        if converged || iter > opts.max_iters {
            return Ok(Svd {
                u,
                s,
                v: mul(qz.as_ref(), ur.as_ref()),
                total_energy,
            });
        }
        captured_before = captured;
        matmul(
            y.as_mut(),
            Accum::Replace,
            dm,
            to_f32(qz.as_ref()).as_ref(),
            1.0,
            Par::Seq,
        );
    }
}

/// Whether subspace iteration has brought the top-k left singular vectors as close to the exact ones as
/// an exact float32 SVD would: within u s_1 / (s_k - s_{k+1}) (Wedin's bound for a perturbation of
/// one rounding). The step between two iterations shrinks by rho = (s_q / s_k)^2 per iteration, so
/// what is left to go is about step * rho / (1 - rho).
fn subspace_converged(before: MatRef<'_, f64>, now: MatRef<'_, f64>, s: &[f64], k: usize) -> bool {
    let (q, k) = (s.len(), k.min(s.len()));
    if k == 0 || s[0] == 0.0 {
        return true;
    }
    let (prev, cur) = (before.subcols(0, k), now.subcols(0, k));
    // || cur - prev (prev^T cur) ||_F: how far the new top-k space moved out of the old one.
    let overlap = mul(prev.transpose(), cur);
    let moved = mul(prev, overlap.as_ref());
    let step = (0..cur.nrows())
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| (cur[(i, j)] - moved[(i, j)]).powi(2))
        .sum::<f64>()
        .sqrt();
    let rho = (s[q - 1] / s[k - 1]).powi(2);
    if rho >= 1.0 {
        return false;
    }
    let gap = (s[k - 1] - if k < q { s[k] } else { 0.0 }).max(f64::MIN_POSITIVE);
    let resolvable = f64::from(f32::EPSILON / 2.0) * s[0] / gap;
    step * rho / (1.0 - rho) <= resolvable
}

fn to_f64(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

fn to_f32(m: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
}

impl Svd {
    /// Energy share of the first `k` components.
    pub fn energy(&self, k: usize) -> f64 {
        if self.total_energy <= 0.0 {
            return 1.0;
        }
        let kept: f64 = self.s.iter().take(k).map(|x| x * x).sum();
        (kept / self.total_energy).min(1.0)
    }

    /// The smallest rank (at least 1, at most `cap`) whose components hold `share` of the energy.
    pub fn rank_for_energy(&self, share: f64, cap: usize) -> usize {
        let cap = cap.min(self.s.len()).max(1);
        (1..=cap).find(|&k| self.energy(k) >= share).unwrap_or(cap)
    }

    /// B = U_k S_k and A = V_k^T, zero-padded to `pad` >= k components (PEFT's svd split: B carries S).
    pub fn factors(&self, k: usize, pad: usize) -> Factors {
        let (m, n) = (self.u.nrows(), self.v.nrows());
        let k = k.min(self.s.len());
        let mut b = vec![0f32; m * pad];
        let mut a = vec![0f32; pad * n];
        for j in 0..k {
            for i in 0..m {
                b[i * pad + j] = (self.u[(i, j)] * self.s[j]) as f32;
            }
            for i in 0..n {
                a[j * n + i] = self.v[(i, j)] as f32;
            }
        }
        Factors { b, a, rank: pad }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn product(b: &[f32], a: &[f32], m: usize, r: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        crate::core::linalg::matmul_into(
            &mut out,
            MatRef::from_row_major_slice(b, m, r),
            MatRef::from_row_major_slice(a, r, n),
        );
        out
    }

    fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
        x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn product_svd_reproduces_the_product() {
        let (m, r, n) = (40, 6, 30);
        let (b, a) = (lcg(m * r, 1), lcg(r * n, 2));
        let svd = svd_of_product(&b, &a, m, r, n, "t").unwrap();
        let f = svd.factors(r, r);
        let (want, got) = (product(&b, &a, m, r, n), product(&f.b, &f.a, m, r, n));
        assert!(max_abs_diff(&want, &got) < 1e-5);
        assert!((svd.energy(r) - 1.0).abs() < 1e-9);
        let total: f64 = want.iter().map(|x| (*x as f64).powi(2)).sum();
        assert!((svd.total_energy - total).abs() < 1e-4 * total);
        assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "sorted");
    }

    #[test]
    fn randomized_svd_recovers_an_exactly_low_rank_matrix() {
        let (m, r, n) = (300, 5, 200);
        let (b, a) = (lcg(m * r, 3), lcg(r * n, 4));
        let d = product(&b, &a, m, r, n);
        let total: f64 = d.iter().map(|x| (*x as f64).powi(2)).sum();
        let dense = Dense {
            values: &d,
            rows: m,
            cols: n,
            total_energy: total,
        };
        let svd = dense_svd(dense, r, &RandomizedOptions::default(), 7, "t").unwrap();
        let f = svd.factors(r, r);
        assert!(max_abs_diff(&d, &product(&f.b, &f.a, m, r, n)) < 1e-5);
        assert!(svd.energy(r) > 0.99999);
        assert_eq!(svd.rank_for_energy(0.999999, 16), r);
    }

    #[test]
    fn converged_randomized_svd_is_the_exact_truncation() {
        // Rank 12 plus full-rank noise (a DARE-pruned delta looks like this), cut at 6.
        let (m, r, n, k) = (150, 12, 110, 6);
        let mut d = product(&lcg(m * r, 5), &lcg(r * n, 6), m, r, n);
        for (x, e) in d.iter_mut().zip(lcg(m * n, 7)) {
            *x += 1.0 * e;
        }
        let total: f64 = d.iter().map(|x| (*x as f64).powi(2)).sum();
        let full = Mat::<f64>::from_fn(m, n, |i, j| d[i * n + j] as f64);
        let (u, s, v) = thin_svd(full.as_ref(), "t").unwrap();
        let exact = Svd {
            u,
            s,
            v,
            total_energy: total,
        }
        .factors(k, k);
        let opts = RandomizedOptions {
            oversample: 16,
            tol: 0.0,
            max_iters: 60,
            converge_subspace: true,
        };
        let dense = Dense {
            values: &d,
            rows: m,
            cols: n,
            total_energy: total,
        };
        let svd = dense_svd(dense, k, &opts, 3, "t").unwrap();
        let (want, got) = (
            product(&exact.b, &exact.a, m, k, n),
            product(&svd.factors(k, k).b, &svd.factors(k, k).a, m, k, n),
        );
        let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let diff: Vec<f32> = want.iter().zip(&got).map(|(a, b)| a - b).collect();
        // Within a few float32 roundings of the whole matrix, amplified by the gap at the cut (Wedin).
        let s = &svd.s;
        let bound = 8.0 * f64::from(f32::EPSILON) * (1.0 + s[0] / (s[k - 1] - s[k])) * total.sqrt() / norm(&want);
        assert!(
            norm(&diff) / norm(&want) < bound,
            "{} >= {bound}",
            norm(&diff) / norm(&want)
        );
        // Stopping on the energy alone (which converges quadratically faster) is not as close.
        let energy_only = RandomizedOptions {
            tol: 1e-7,
            converge_subspace: false,
            ..opts
        };
        let loose = dense_svd(dense, k, &energy_only, 3, "t").unwrap().factors(k, k);
        let loose_diff: Vec<f32> = want
            .iter()
            .zip(product(&loose.b, &loose.a, m, k, n))
            .map(|(a, b)| a - b)
            .collect();
        eprintln!(
            "subspace {} energy-only {}",
            norm(&diff) / norm(&want),
            norm(&loose_diff) / norm(&want)
        );
        assert!(norm(&diff) < norm(&loose_diff));
    }
}
