//! What the merge kept, per merged weight, computed in the same pass: the intended change
//! Delta = merged - base (in f32, before any rounding), the change that landed
//! R = output - base as the user will load them, and how much of Delta survived in R.
//!
//! For a 4-bit output the loaded values are `table[code] * absmax`. With double quantization a block's
//! final absmax is known only once the whole weight's absmax is (its mean is the nested offset), so the
//! sums that involve it are kept per block, as coefficients of that absmax, and finished at the end.
//!
//! Sums run in f32 over at most CHUNK elements in 16 independent lanes (so they vectorize; relative
//! error under CHUNK * u) and in f64 across chunks.
use crate::core::dtype::FloatType;

const CHUNK: usize = 1024;

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
        for ((b, d), o) in base.chunks(CHUNK).zip(delta.chunks(CHUNK)).zip(out.chunks(CHUNK)) {
            let s = kernels::known_sums(b, d, o);
            self.add_sums(s);
        }
    }

    /// A tile of a float output, in one pass: the base as loaded `base`, the merged values `merged`
    /// before rounding; the merge worked on the base rounded to `work` (when `round_base`) and the output
    /// is `merged` rounded to `work`.
    pub fn add_float(&mut self, base: &[f32], merged: &[f32], work: FloatType, round_base: bool) {
        for (b, v) in base.chunks(CHUNK).zip(merged.chunks(CHUNK)) {
            let s = match (work, round_base) {
                (FloatType::BF16, false) => kernels::float_sums_bf16(b, v),
                (FloatType::BF16, true) => kernels::float_sums_bf16_rb(b, v),
                (FloatType::F32, _) => kernels::float_sums_f32(b, v),
                (FloatType::F16, rb) => {
                    // f16 conversion does not vectorize: round into scratch first.
                    let o: Vec<f32> = v.iter().map(|x| work.round_trip(*x)).collect();
                    let w: Vec<f32> = b.iter().map(|x| if rb { work.round_trip(*x) } else { *x }).collect();
                    let d: Vec<f32> = v.iter().zip(&w).map(|(v, w)| v - w).collect();
                    kernels::known_sums(b, &d, &o)
                }
            };
            self.add_sums(s);
        }
    }

    fn add_sums(&mut self, s: [f32; 4]) {
        self.sums.delta2 += s[0] as f64;
        self.sums.weight2 += s[1] as f64;
        self.sums.landed_delta += s[2] as f64;
        self.sums.miss2 += s[3] as f64;
    }

    /// One block of a 4-bit output whose final absmax is not known yet: `t` the table values of its
    /// codes; the base as loaded `base` (known exactly).
    pub fn add_block(&mut self, base: &[f32], delta: &[f32], t: &[f32]) {
        let k = kernels::block_sums(base, delta, t);
        self.sums.delta2 += k[0] as f64;
        self.sums.weight2 += k[1] as f64;
        self.sums.landed_delta -= k[2] as f64;
        self.sums.miss2 += k[3] as f64;
        self.blocks.push(BlockSums {
            p: k[4] as f64,
            q: k[5] as f64,
            s: k[6] as f64,
            ..Default::default()
        });
    }

    /// One block where the base is quantized here too: `t_base` its own codes' table values.
    pub fn add_block_pair(&mut self, delta: &[f32], t: &[f32], t_base: &[f32]) {
        let k = kernels::pair_sums(delta, t, t_base);
        self.sums.delta2 += k[0] as f64;
        self.sums.miss2 += k[0] as f64;
        self.blocks.push(BlockSums {
            p: k[1] as f64,
            q: k[2] as f64,
            p2: k[3] as f64,
            q2: k[4] as f64,
            x: k[5] as f64,
            s: 0.0,
        });
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

/// How a kernel rounds: to bf16, or not at all. Delta = merged - base (rounded to the work type when
/// the merge rounded it), R = round(merged) - base.
trait Round {
    fn round(v: f32) -> f32;
}
struct BF16;
struct F32;
impl Round for BF16 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        f32::from_bits((crate::core::dtype::simd::bf16_bits(v) as u32) << 16)
    }
}
impl Round for F32 {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

mod kernels {
    use super::{Round, BF16, F32};
    use crate::dispatch;

    /// Lanes per accumulator: one AVX-512 register of f32.
    const L: usize = 16;

    /// Sums over a run in the form the compiler vectorizes inside the dispatched (AVX2 / AVX-512)
    /// functions: plain loops over whole chunks of L lanes into `$n` lane accumulators, no closures (a
    /// closure would be compiled for the baseline and not inlined), then a scalar tail.
    /// `|$x, ...| [terms]` names each slice's element and gives the element's `$n` terms.
    macro_rules! lane_sums {
        ($n:literal; $($s:ident),+; |$($x:ident),+| $terms:expr) => {{
            let len = lane_sums!(@first $($s),+).len();
            let whole = len / L * L;
            let mut acc = [[0f32; L]; $n];
            let mut c = 0;
            while c < whole {
                $(let $s = &$s[c..c + L];)+
                for j in 0..L {
                    $(let $x = $s[j];)+
                    let t: [f32; $n] = $terms;
                    for k in 0..$n {
                        acc[k][j] += t[k];
                    }
                }
                c += L;
            }
            let mut out = [0f32; $n];
            for k in 0..$n {
                for j in 0..L {
                    out[k] += acc[k][j];
                }
            }
            for i in whole..len {
                $(let $x = $s[i];)+
                let t: [f32; $n] = $terms;
                for k in 0..$n {
                    out[k] += t[k];
                }
            }
            out
        }};
        (@first $first:ident $(, $rest:ident)*) => { $first };
    }

    dispatch! {
        /// ||Delta||^2, ||b||^2, <R, Delta>, ||R - Delta||^2 with R = out - base.
        pub fn known_sums(base: &[f32], delta: &[f32], out: &[f32]) -> [f32; 4] {
            lane_sums!(4; base, delta, out; |b, d, o| {
                let r = o - b;
                [d * d, b * b, r * d, (r - d) * (r - d)]
            })
        }
    }

    #[inline(always)]
    fn float_sums_generic<R: Round, const ROUND_BASE: bool>(base: &[f32], merged: &[f32]) -> [f32; 4] {
        lane_sums!(4; base, merged; |b, v| {
            let d = v - if ROUND_BASE { R::round(b) } else { b };
            let r = R::round(v) - b;
            [d * d, b * b, r * d, (r - d) * (r - d)]
        })
    }

    dispatch! {
        /// A bf16 output of a bf16 base.
        pub fn float_sums_bf16(base: &[f32], merged: &[f32]) -> [f32; 4] {
            float_sums_generic::<BF16, false>(base, merged)
        }
    }
    dispatch! {
        /// A bf16 output of a wider base, which the merge rounded to bf16 first.
        pub fn float_sums_bf16_rb(base: &[f32], merged: &[f32]) -> [f32; 4] {
            float_sums_generic::<BF16, true>(base, merged)
        }
    }
    dispatch! {
        /// An f32 output.
        pub fn float_sums_f32(base: &[f32], merged: &[f32]) -> [f32; 4] {
            float_sums_generic::<F32, false>(base, merged)
        }
    }

    dispatch! {
        /// ||Delta||^2, ||b||^2, <b, Delta>, ||b + Delta||^2, p = <t, Delta>, q = ||t||^2, s = <t, b + Delta>.
        pub fn block_sums(base: &[f32], delta: &[f32], t: &[f32]) -> [f32; 7] {
            lane_sums!(7; base, delta, t; |b, d, ti| {
                let bd = b + d;
                [d * d, b * b, b * d, bd * bd, ti * d, ti * ti, ti * bd]
            })
        }
    }

    dispatch! {
        /// ||Delta||^2, p = <t, Delta>, q = ||t||^2, p2 = <t2, Delta>, q2 = ||t2||^2, x = <t, t2>.
        pub fn pair_sums(delta: &[f32], t: &[f32], t2: &[f32]) -> [f32; 6] {
            lane_sums!(6; delta, t, t2; |d, a, b| [d * d, a * d, a * a, b * d, b * b, a * b])
        }
    }
}
