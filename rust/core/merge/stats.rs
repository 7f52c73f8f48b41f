//! What the merge kept, per merged weight, computed in the same pass: the intended change
//! Delta = merged - base (in f32, before any rounding), the change that landed
//! R = output - base as the user will load them, and how much of Delta survived in R.
//!
//! For a 4-bit output the loaded values are `table[code] * absmax`. With double quantization a block's
//! final absmax is known only once the whole weight's absmax is (its mean is the nested offset), so the
//! sums that involve it are kept per block, as coefficients of that absmax, and finished at the end.

/// The report for one merged weight.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    pub name: String,
    /// ||Delta||_F
    pub delta_norm: f64,
    /// ||W||_F of the base as loaded.
    pub weight_norm: f64,
    /// <R, Delta> / ||Delta||^2: the share of the intended change that survived.
    pub retention: f64,
    /// ||R - Delta||_F / ||Delta||_F.
    pub relative_error: f64,
}

impl TensorStats {
    /// ||Delta||_F / ||W||_F.
    pub fn ratio(&self) -> f64 {
        if self.weight_norm > 0.0 {
            self.delta_norm / self.weight_norm
        } else {
            f64::INFINITY
        }
    }
}

/// Sums over the elements whose loaded output is known.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    delta2: f64,
    weight2: f64,
    landed_delta: f64,
    miss2: f64,
}

/// Per-block coefficients of the block's final absmax `a` (and `a2`, the base's own, where the base is
/// quantized here too). With the base as loaded known: R = t a - b, so <R, Delta> gets a p and
/// ||R - Delta||^2 gets a^2 q - 2 a s. With the base quantized alone: R = t a - t2 a2, so <R, Delta> gets
/// a p - a2 p2 and ||R - Delta||^2 gets a^2 q + a2^2 q2 - 2 a a2 x - 2 a p + 2 a2 p2.
#[derive(Debug, Default, Clone, Copy)]
struct BlockSums {
    p: f64,
    q: f64,
    s: f64,
    p2: f64,
    q2: f64,
    x: f64,
}

#[derive(Debug, Default)]
pub struct Accumulator {
    sums: Sums,
    blocks: Vec<BlockSums>,
}

impl Accumulator {
    /// Elements whose loaded output `out` is final: base as loaded `base`, intended change `delta`.
    pub fn add_known(&mut self, base: &[f32], delta: &[f32], out: &[f32]) {
        // f32 partial sums over CHUNK elements keep the loop vectorized (relative error under CHUNK * u);
        // f64 across chunks.
        const CHUNK: usize = 1024;
        for ((b, d), o) in base.chunks(CHUNK).zip(delta.chunks(CHUNK)).zip(out.chunks(CHUNK)) {
            let (mut d2, mut w2, mut rd, mut m2) = (0f32, 0f32, 0f32, 0f32);
            for ((b, d), o) in b.iter().zip(d).zip(o) {
                let r = o - b;
                let miss = r - d;
                d2 += d * d;
                w2 += b * b;
                rd += r * d;
                m2 += miss * miss;
            }
            self.sums.delta2 += d2 as f64;
            self.sums.weight2 += w2 as f64;
            self.sums.landed_delta += rd as f64;
            self.sums.miss2 += m2 as f64;
        }
    }

    /// One block of a 4-bit output whose final absmax is not known yet: `t` the table values of its
    /// codes; the base as loaded `base` (known exactly).
    pub fn add_block(&mut self, base: &[f32], delta: &[f32], t: &[f32]) {
        let mut blk = BlockSums::default();
        for ((b, d), ti) in base.iter().zip(delta).zip(t) {
            let (b, d, ti) = (*b as f64, *d as f64, *ti as f64);
            self.sums.delta2 += d * d;
            self.sums.weight2 += b * b;
            self.sums.landed_delta -= b * d;
            self.sums.miss2 += (b + d) * (b + d);
            blk.p += ti * d;
            blk.q += ti * ti;
            blk.s += ti * (b + d);
        }
        self.blocks.push(blk);
    }

    /// One block where the base is quantized here too: `t_base` its own codes' table values.
    pub fn add_block_pair(&mut self, delta: &[f32], t: &[f32], t_base: &[f32]) {
        let mut blk = BlockSums::default();
        for ((d, ti), tb) in delta.iter().zip(t).zip(t_base) {
            let (d, ti, tb) = (*d as f64, *ti as f64, *tb as f64);
            self.sums.delta2 += d * d;
            self.sums.miss2 += d * d;
            blk.p += ti * d;
            blk.q += ti * ti;
            blk.p2 += tb * d;
            blk.q2 += tb * tb;
            blk.x += ti * tb;
        }
        self.blocks.push(blk);
    }

    /// The report, once every block's final absmax is known (`absmax`; `base_absmax` where the base
    /// was quantized here too).
    pub fn finish(mut self, name: &str, absmax: &[f32], base_absmax: Option<&[f32]>) -> TensorStats {
        for (i, blk) in self.blocks.iter().enumerate() {
            let a = absmax[i] as f64;
            let s = &mut self.sums;
            match base_absmax {
                None => {
                    s.landed_delta += a * blk.p;
                    s.miss2 += a * a * blk.q - 2.0 * a * blk.s;
                }
                Some(a2) => {
                    let a2 = a2[i] as f64;
                    s.landed_delta += a * blk.p - a2 * blk.p2;
                    s.miss2 +=
                        a * a * blk.q + a2 * a2 * blk.q2 - 2.0 * a * a2 * blk.x - 2.0 * a * blk.p + 2.0 * a2 * blk.p2;
                    s.weight2 += a2 * a2 * blk.q2;
                }
            }
        }
        let s = self.sums;
        let delta_norm = s.delta2.sqrt();
        let (retention, relative_error) = if s.delta2 > 0.0 {
            (s.landed_delta / s.delta2, s.miss2.max(0.0).sqrt() / delta_norm)
        } else {
            (1.0, 0.0)
        };
        TensorStats {
            name: name.to_string(),
            delta_norm,
            weight_norm: s.weight2.sqrt(),
            retention,
            relative_error,
        }
    }
}
