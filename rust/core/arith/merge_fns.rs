//! PEFT's task-vector merge functions (`peft/utils/merge_utils.py`) on flat f32 tensors, with torch's
//! f32 arithmetic order, and a torch-compatible random mask for DARE.
use rand_mt::Mt;

/// How each tensor is sparsified before mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prune {
    None,
    /// Keep the `int(density * numel)` largest magnitudes (`magnitude_based_pruning`).
    Magnitude,
    /// Keep each value with probability `density`, rescaled by `1 / density` (`random_pruning`).
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MajoritySign {
    Total,
    Frequency,
}

/// One of PEFT's merge functions: task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties.
#[derive(Debug, Clone, Copy)]
pub struct MergeFn {
    pub prune: Prune,
    /// Elect a sign per element and average the agreeing values (TIES).
    pub ties: bool,
    pub density: f64,
    pub majority: MajoritySign,
}

/// `torch.manual_seed(seed); torch.bernoulli(torch.full_like(t, density))` for a float32 tensor: torch's
/// CPU kernel draws one 32-bit mt19937 output per element in order and keeps it when its low 24 bits,
/// scaled to [0, 1), are below `float(density)`.
pub fn bernoulli_mask(seed: u32, density: f64, n: usize) -> Vec<bool> {
    let p = density as f32;
    let mut rng = Mt::new(seed);
    (0..n)
        .map(|_| ((rng.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / 16_777_216.0)) < p)
        .collect()
}

fn prune_magnitude(t: &mut [f32], density: f64) {
    let k = (density * t.len() as f64) as usize;
    if k >= t.len() {
        return;
    }
    if k == 0 {
        t.iter_mut().for_each(|v| *v *= 0.0);
        return;
    }
    let mut mags: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let (_, kth, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    // Everything above the k-th magnitude stays, then ties at it, first come first kept.
    let mut room = k - t.iter().filter(|v| v.abs() > threshold).count();
    for v in t.iter_mut() {
        let a = v.abs();
        if a > threshold {
            continue;
        }
        if a == threshold && room > 0 {
            room -= 1;
            continue;
        }
        *v *= 0.0;
    }
}

fn prune_random(t: &mut [f32], density: f64, seed: u32) {
    let d = density as f32;
    let mask = bernoulli_mask(seed, density, t.len());
    for (v, keep) in t.iter_mut().zip(mask) {
        *v = (*v * if keep { 1.0 } else { 0.0 }) / d;
    }
}

/// torch.sign
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl MergeFn {
    /// Mix same-shape `tensors` (consumed) with f32 `weights`; `seeds[i]` drives tensor i's DARE mask.
    pub fn apply(&self, mut tensors: Vec<Vec<f32>>, weights: &[f32], seeds: &[u32]) -> Vec<f32> {
        if self.density < 1.0 {
            for (t, seed) in tensors.iter_mut().zip(seeds) {
                match self.prune {
                    Prune::None => {}
                    Prune::Magnitude => prune_magnitude(t, self.density),
                    Prune::Random => prune_random(t, self.density, *seed),
                }
            }
        }
        let n = tensors[0].len();
        let mut out = vec![0f32; n];
        if !self.ties {
            for (t, w) in tensors.iter().zip(weights) {
                out.iter_mut().zip(t).for_each(|(o, v)| *o += v * w);
            }
            return out;
        }
        for (e, o) in out.iter_mut().enumerate() {
            // The elected sign comes from the pruned, unweighted values.
            let elect: f32 = match self.majority {
                MajoritySign::Total => tensors.iter().map(|t| t[e]).sum(),
                MajoritySign::Frequency => tensors.iter().map(|t| sign(t[e])).sum(),
            };
            let majority = if elect >= 0.0 { 1.0 } else { -1.0 };
            let (mut mixed, mut count) = (0f32, 0u32);
            for (t, w) in tensors.iter().zip(weights) {
                let agrees = sign(t[e]) == majority;
                mixed += (t[e] * w) * if agrees { 1.0 } else { 0.0 };
                count += agrees as u32;
            }
            *o = mixed / count.max(1) as f32;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_stream_is_torchs() {
        // torch.manual_seed(0); torch.randint(0, 2**32, ...) is not exposed, but mt19937(5489)'s first
        // output is the standard test value.
        let mut rng = Mt::new(5489);
        assert_eq!(rng.next_u32(), 3_499_211_612);
        let m = bernoulli_mask(1, 0.5, 10_000);
        let kept = m.iter().filter(|k| **k).count();
        assert!((4800..5200).contains(&kept), "{kept}");
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest() {
        let mut t = vec![0.1, -3.0, 2.0, -0.5, 0.0, 1.0];
        prune_magnitude(&mut t, 0.5);
        assert_eq!(t, vec![0.0, -3.0, 2.0, -0.0, 0.0, 1.0]);
    }

    #[test]
    fn ties_elects_a_sign_and_averages_the_agreeing() {
        let f = MergeFn {
            prune: Prune::None,
            ties: true,
            density: 1.0,
            majority: MajoritySign::Total,
        };
        let out = f.apply(vec![vec![1.0, -4.0, 0.0], vec![-3.0, 2.0, 0.0]], &[1.0, 1.0], &[0, 0]);
        // element 0: sum -2 -> negative wins, only -3 kept; element 1: sum -2 -> -4 kept; zeros stay.
        assert_eq!(out, vec![-3.0, -4.0, 0.0]);
        let f = MergeFn {
            majority: MajoritySign::Frequency,
            ..f
        };
        let out = f.apply(vec![vec![1.0], vec![-3.0], vec![0.5]], &[1.0, 1.0, 2.0], &[0, 0, 0]);
        assert_eq!(out, vec![(1.0 + 1.0) / 2.0]);
    }
}
