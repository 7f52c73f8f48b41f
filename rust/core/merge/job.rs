//! One output tensor's work, tile by tile (a few rows, L2-sized): read the base's values, apply the
//! merge steps in f32 (LoRA deltas computed a tile at a time, DoRA, biases), hand the result to the
//! sink, and keep the sums for the report.
use std::sync::atomic::{AtomicU64, Ordering};

use faer::MatRef;

use crate::core::dtype::{simd, FloatType};
use crate::core::error::{Error, Result};
use crate::core::linalg::{add_lowrank_product, hstack, matmul_into, transpose, PackedFactor};
use crate::core::peft::Adapter;
use crate::core::progress::Progress;
use crate::core::quant::quantize_run;

use super::plan::{FourBit, Job, Layout, Origin, Output, Part, Step};
use super::resolve::shape_str;
use super::sink::{loaded_absmax, Dest, FourBitSink};
use super::source::{round_to, Base, Source};
use super::stats::{Accumulator, TensorStats};

/// Elements per tile: a tile of the base weight, its f32 delta and its output fit in L2 together.
const TILE_ELEMS: usize = 1 << 16;

pub struct Ctx<'a> {
    pub base: &'a Base,
    pub adapters: &'a [Adapter],
    pub safe: bool,
    pub stats: bool,
    pub nonfinite: &'a AtomicU64,
    pub progress: &'a dyn Progress,
    pub dest: &'a dyn Dest,
}

/// A LoRA step's factors, loaded once per tensor: B_cat (out x R) and A_cat (R x in), A pre-scaled.
struct Factors {
    a: Vec<f32>,
    /// `a` laid out for the fused kernel, for row-layout steps.
    packed: Option<PackedFactor>,
    b: Vec<f32>,
    rank: usize,
}

/// The factors of one segment of the tensor: the whole tensor, or for a stack of experts (`[E, ., .]`)
/// expert `segment`'s.
fn load_factors(adapters: &[Adapter], parts: &[Part], pack: bool, segment: usize) -> Result<Factors> {
    let mut a = Vec::new();
    let mut b_parts = Vec::new();
    for p in parts {
        let file = &adapters[p.adapter].file;
        let (mut pa, r, pb) = match &p.expert {
            None => (
                file.read_f32(&p.a)?,
                file.get(&p.b).expect("listed").shape[1],
                file.read_f32(&p.b)?,
            ),
            Some(slice) => {
                let r = file.get(&p.a).expect("listed").shape[0] / slice.experts;
                let (pa, pb) = slice.factors(file, &p.a, &p.b, r, segment)?;
                (pa, r, pb)
            }
        };
        if let Some((w, s)) = p.pre_scale {
            pa.iter_mut().for_each(|v| *v = (*v * w) * s);
        }
        a.extend(pa);
        b_parts.push((r, pb));
    }
    let rank: usize = b_parts.iter().map(|(r, _)| r).sum();
    let out = b_parts[0].1.len() / b_parts[0].0;
    let blocks: Vec<(usize, &[f32])> = b_parts.iter().map(|(r, pb)| (*r, pb.as_slice())).collect();
    let b = hstack(&blocks, out, rank);
    let packed = pack.then(|| PackedFactor::new(&a, rank, a.len() / rank.max(1)));
    Ok(Factors { a, packed, b, rank })
}

/// What each step needs, read once for the tensor.
enum Loaded {
    /// One set of factors per segment: one for a matrix, one per expert for a stack of experts.
    Lora(Vec<Factors>),
    Vector(Vec<f32>),
}

/// How many experts a LoRA step's tensor stacks (1: a matrix).
fn segments(parts: &[Part]) -> usize {
    parts
        .iter()
        .find_map(|p| p.expert.as_ref().map(|e| e.segments()))
        .unwrap_or(1)
}

/// Run one job; the report of a merged weight.
pub fn run(ctx: &Ctx, job: &Job) -> Result<Option<TensorStats>> {
    let source = match &job.origin {
        Origin::Base { shard, name } => {
            let file = &ctx.base.ck.shards[*shard];
            let entry = file.get(name).expect("planned");
            if matches!(job.output, Output::Copy) {
                ctx.dest.copy(&job.out_name, file, entry)?;
                return Ok(None);
            }
            Source::float(file, entry)?
        }
        Origin::FourBit { weight } => Source::four_bit(ctx.base, weight)?,
        Origin::Adapter { adapter, key } => {
            let file = &ctx.adapters[*adapter].file;
            let entry = file.get(key).expect("planned");
            if matches!(job.output, Output::Copy) {
                ctx.dest.copy(&job.out_name, file, entry)?;
                return Ok(None);
            }
            Source::float(file, entry)?
        }
    };
    Work::new(ctx, job, source)?.run()
}

struct Work<'a> {
    ctx: &'a Ctx<'a>,
    job: &'a Job,
    source: Source<'a>,
    work: FloatType,
    rows: usize,
    cols: usize,
    loaded: Vec<Option<Loaded>>,
    /// DoRA's m / ||W + delta|| per output channel.
    channel_scale: Option<Vec<f32>>,
    stats: Option<Accumulator>,
}

impl<'a> Work<'a> {
    fn new(ctx: &'a Ctx<'a>, job: &'a Job, source: Source<'a>) -> Result<Self> {
        let work = job.work_type().expect("not a copy");
        let cols = *job.shape.last().unwrap_or(&1);
        let rows = job.numel().checked_div(cols).unwrap_or(0);
        let has_lora = job.steps.iter().any(|s| matches!(s, Step::Lora { .. }));
        for step in &job.steps {
            if let Step::Lora { parts, .. } = step {
                let n = segments(parts);
                // A matrix, or a stack of one matrix per expert.
                let fits = if n == 1 {
                    job.shape.len() == 2
                } else {
                    job.shape.len() == 3 && job.shape[0] == n
                };
                if !fits {
                    return Err(Error::shape(
                        &job.out_name,
                        format!("LoRA target has shape {}, expected a matrix", shape_str(&job.shape)),
                    ));
                }
            }
        }
        let mut loaded = Vec::new();
        let mut magnitude = None;
        for step in &job.steps {
            match step {
                Step::Lora {
                    parts,
                    magnitude: m,
                    layout,
                    round_delta_first,
                    ..
                } => {
                    // The fused kernel's case (see `apply_steps`).
                    let fused = *layout == Layout::Rows && !*round_delta_first && m.is_none();
                    let factors = (0..segments(parts))
                        .map(|seg| load_factors(ctx.adapters, parts, fused, seg))
                        .collect::<Result<_>>()?;
                    loaded.push(Some(Loaded::Lora(factors)));
                    if let Some((ai, key)) = m {
                        magnitude = Some(ctx.adapters[*ai].file.read_f32(key)?);
                    }
                }
                Step::AddVector { adapter, key, coeff } => {
                    let v = ctx.adapters[*adapter].file.read_f32(key)?;
                    if v.len() != job.numel() {
                        return Err(Error::shape(
                            key,
                            format!(
                                "bias delta has {} values, base tensor {} has {}",
                                v.len(),
                                job.out_name,
                                job.numel()
                            ),
                        ));
                    }
                    loaded.push(Some(Loaded::Vector(v.into_iter().map(|x| x * coeff).collect())));
                }
            }
        }
        let stats = (ctx.stats && has_lora).then(Accumulator::default);
        let mut w = Work {
            ctx,
            job,
            source,
            work,
            rows,
            cols,
            loaded,
            channel_scale: None,
            stats,
        };
        if let Some(m) = magnitude {
            w.channel_scale = Some(w.dora_scale(&m)?);
        }
        Ok(w)
    }

    /// Rows per tile: about TILE_ELEMS elements, and whole bytes of a 4-bit source and whole blocks of a
    /// 4-bit output per tile.
    fn tile_rows(&self) -> usize {
        let mut align = 1usize;
        if matches!(self.source, Source::FourBit { .. }) {
            align = 2;
        }
        if let Output::FourBit(q) = self.job.output {
            align = lcm(align, q.quant.blocksize);
        }
        let step = align / gcd(self.cols.max(1), align);
        let rows = (TILE_ELEMS / self.cols.max(1)).max(1);
        (rows / step).max(1) * step
    }

    /// Whether the merge works on the base rounded to a narrower type than it is stored in.
    fn rounds_base(&self) -> bool {
        self.work != self.source.value_type() && self.work != FloatType::F32
    }

    /// Read rows [r0, r0 + n) as loaded (`base`) and rounded to the working type (`w`): PEFT loads the
    /// base in the dtype it merges in.
    fn read(&self, r0: usize, n: usize, raw: &mut Vec<u32>, base: &mut [f32], w: &mut [f32]) -> Result<()> {
        let len = n * self.cols;
        if self.stats.is_some() {
            self.source.read(r0 * self.cols, &mut base[..len], raw)?;
            w[..len].copy_from_slice(&base[..len]);
        } else {
            // Only the report looks at the base as loaded.
            self.source.read(r0 * self.cols, &mut w[..len], raw)?;
        }
        if self.rounds_base() {
            round_to(self.work, &mut w[..len]);
        }
        Ok(())
    }

    /// DoRA needs the norm of every output channel of W + delta before it can scale any element.
    fn dora_scale(&self, magnitude: &[f32]) -> Result<Vec<f32>> {
        let Some(Step::Lora { layout, post_scale, .. }) = self.job.steps.first() else {
            unreachable!("DoRA is a LoRA step")
        };
        let Some(Some(Loaded::Lora(f))) = self.loaded.first() else {
            unreachable!("a LoRA step loads factors")
        };
        // DoRA is refused on expert parameters (as PEFT does): one segment.
        let f = &f[0];
        let (rows, cols) = (self.rows, self.cols);
        let channels = if *layout == Layout::Rows { rows } else { cols };
        if magnitude.len() != channels {
            return Err(Error::shape(
                &self.job.out_name,
                format!(
                    "DoRA magnitude has {} values for {channels} output channels",
                    magnitude.len()
                ),
            ));
        }
        let tile_rows = self.tile_rows();
        let (mut raw, mut base, mut w, mut delta) = (
            Vec::new(),
            vec![0f32; tile_rows * cols],
            vec![0f32; tile_rows * cols],
            vec![0f32; tile_rows * cols],
        );
        let mut sumsq = vec![0f32; channels];
        for r0 in (0..rows).step_by(tile_rows) {
            let n = tile_rows.min(rows - r0);
            self.read(r0, n, &mut raw, &mut base, &mut w)?;
            lora_delta(f, *layout, r0, n, cols, &mut delta[..n * cols]);
            for i in 0..n {
                let row = &mut delta[i * cols..(i + 1) * cols];
                for (d, wv) in row.iter_mut().zip(&w[i * cols..(i + 1) * cols]) {
                    *d = *wv + *d * post_scale;
                }
                if *layout == Layout::Rows {
                    sumsq[r0 + i] = torch_row_sumsq(row);
                } else {
                    // A strided reduction in torch: each column accumulates in row order.
                    for (acc, v) in sumsq.iter_mut().zip(row.iter()) {
                        *acc += v * v;
                    }
                }
            }
        }
        Ok(magnitude.iter().zip(&sumsq).map(|(m, s)| m / s.sqrt()).collect())
    }

    /// Apply every step to a tile: `w` in, merged values (unrounded after the last step) out.
    fn apply_steps(&self, r0: usize, n: usize, w: &mut [f32], delta: &mut [f32]) {
        let (cols, len) = (self.cols, n * self.cols);
        for (si, step) in self.job.steps.iter().enumerate() {
            match (step, &self.loaded[si]) {
                (
                    Step::Lora {
                        layout,
                        post_scale,
                        round_delta_first,
                        ..
                    },
                    Some(Loaded::Lora(factors)),
                ) => {
                    // A tile of a stack of experts may span several: each row range gets its expert's factors.
                    let seg_rows = self.rows / factors.len();
                    let mut i0 = 0;
                    while i0 < n {
                        let (seg, local) = ((r0 + i0) / seg_rows, (r0 + i0) % seg_rows);
                        let m = (seg_rows - local).min(n - i0);
                        let span = i0 * cols..(i0 + m) * cols;
                        let (w, delta) = (&mut w[span.clone()], &mut delta[span]);
                        self.apply_lora(
                            &factors[seg],
                            (*layout, *post_scale, *round_delta_first),
                            local,
                            m,
                            w,
                            delta,
                        );
                        i0 += m;
                    }
                }
                (Step::AddVector { .. }, Some(Loaded::Vector(v))) => {
                    for (wv, d) in w[..len].iter_mut().zip(&v[r0 * cols..r0 * cols + len]) {
                        *wv += *d;
                    }
                }
                _ => unreachable!("each step loads what it needs"),
            }
            // Each step is one PEFT merge: its result is rounded to the working dtype.
            if si + 1 < self.job.steps.len() {
                round_to(self.work, &mut w[..len]);
            }
        }
    }

    /// One LoRA step on rows [r0, r0 + n) of a matrix (or of one expert's matrix).
    fn apply_lora(
        &self,
        f: &Factors,
        (layout, s, round_delta_first): (Layout, f32, bool),
        r0: usize,
        n: usize,
        w: &mut [f32],
        delta: &mut [f32],
    ) {
        let (cols, len) = (self.cols, n * self.cols);
        if let Some(scale) = &self.channel_scale {
            lora_delta(f, layout, r0, n, cols, &mut delta[..len]);
            for i in 0..n {
                for j in 0..cols {
                    let k = i * cols + j;
                    let c = if layout == Layout::Rows {
                        scale[r0 + i]
                    } else {
                        scale[j]
                    };
                    w[k] = c * (w[k] + delta[k] * s);
                }
            }
        } else if round_delta_first {
            lora_delta(f, layout, r0, n, cols, &mut delta[..len]);
            for (wv, d) in w[..len].iter_mut().zip(&delta[..len]) {
                *wv += self.work.round_trip(*d * s);
            }
        } else if let Some(packed) = &f.packed {
            // The common case in one pass over the tile, the same bits as the product written out and
            // then added.
            add_lowrank_product(&mut w[..len], &f.b[r0 * f.rank..(r0 + n) * f.rank], packed, s);
        } else {
            lora_delta(f, layout, r0, n, cols, &mut delta[..len]);
            simd::add_scaled(&mut w[..len], &delta[..len], s);
        }
    }

    /// Values the merge made NaN or Inf (`flagged`: the encoder saw some; the base may hold some already):
    /// counted, or refused with safe merge.
    fn check_finite(&self, values: &[f32], flagged: bool, t: FloatType) -> Result<u64> {
        if self.job.steps.is_empty() || !flagged {
            return Ok(0);
        }
        if self.ctx.safe {
            return Err(Error::NonFinite {
                tensor: self.job.out_name.clone(),
                reason: "the merge produced NaN or Inf values; refusing to write them (safe merge)".into(),
            });
        }
        Ok(values
            .iter()
            .filter(|v| !v.is_finite() || t.round_trip(**v).is_infinite())
            .count() as u64)
    }

    fn run(mut self) -> Result<Option<TensorStats>> {
        let (rows, cols) = (self.rows, self.cols);
        let transposed = matches!(self.job.output, Output::FourBit(q) if q.transposed);
        // A transposed 4-bit output (GPT-2 Conv1D) is held whole, then quantized as one run.
        let tile_rows = if transposed { rows.max(1) } else { self.tile_rows() };
        let tile = tile_rows * cols;
        let (mut raw, mut encoded) = (Vec::new(), Vec::new());
        let (mut base, mut w, mut delta) = (vec![0f32; tile], vec![0f32; tile], vec![0f32; tile]);
        let mut out = Vec::new();
        let mut four_bit = match self.job.output {
            Output::FourBit(q) => Some(FourBitSink::new(q, self.job.numel())),
            _ => None,
        };
        let mut qbase = match self.job.output {
            Output::FourBit(q) if self.stats.is_some() => Some(QuantizedBase::new(q, self.job)),
            _ => None,
        };
        let mut nonfinite = 0u64;
        for r0 in (0..rows).step_by(tile_rows) {
            if self.ctx.progress.cancelled() {
                return Err(Error::Interrupted);
            }
            let n = tile_rows.min(rows - r0);
            let len = n * cols;
            self.read(r0, n, &mut raw, &mut base, &mut w)?;
            self.apply_steps(r0, n, &mut w[..len], &mut delta[..len]);
            match (self.job.output, &mut four_bit) {
                (Output::Float(t), _) => {
                    // The report first: the destination may round `w` in place.
                    let rb = self.rounds_base();
                    if let Some(acc) = &mut self.stats {
                        acc.add_float(&base[..len], &w[..len], t, rb);
                    }
                    let flagged =
                        self.ctx
                            .dest
                            .write_float(&self.job.out_name, t, r0 * cols, &mut w[..len], &mut encoded)?;
                    // Rounding to `t` twice is rounding once: the count is the same on rounded values.
                    nonfinite += self.check_finite(&w[..len], flagged, t)?;
                }
                (Output::FourBit(q), Some(sink)) => {
                    if self.stats.is_some() {
                        // The intended change, before rounding: merged minus the base the merge worked on.
                        let rb = self.rounds_base();
                        for ((d, v), b) in delta[..len].iter_mut().zip(&w[..len]).zip(&base[..len]) {
                            *d = v - if rb { self.work.round_trip(*b) } else { *b };
                        }
                    }
                    nonfinite += self.check_finite(&w[..len], simd::any_nonfinite(&w[..len]), q.state_dtype)?;
                    round_to(q.state_dtype, &mut w[..len]);
                    if transposed {
                        let values = transpose(&w[..len], rows, cols);
                        sink.write(self.ctx.dest, &self.job.out_name, 0, &values)?;
                        if let (Some(acc), Some(qb)) = (&mut self.stats, &mut qbase) {
                            let (b, d) = (
                                transpose(&base[..len], rows, cols),
                                transpose(&delta[..len], rows, cols),
                            );
                            qb.account(acc, sink, 0, &b, &d, &mut out);
                        }
                    } else {
                        sink.write(self.ctx.dest, &self.job.out_name, r0 * cols, &w[..len])?;
                        if let (Some(acc), Some(qb)) = (&mut self.stats, &mut qbase) {
                            qb.account(acc, sink, r0 * cols, &base[..len], &delta[..len], &mut out);
                        }
                    }
                }
                _ => unreachable!("copies return early"),
            }
        }
        self.ctx.nonfinite.fetch_add(nonfinite, Ordering::Relaxed);
        let absmax = match four_bit {
            Some(sink) => sink.finish(self.ctx.dest, self.job)?,
            None => vec![],
        };
        let base_absmax = qbase.and_then(|qb| qb.loaded_absmax());
        Ok(self
            .stats
            .map(|acc| acc.finish(&self.job.out_name, &absmax, base_absmax.as_deref())))
    }
}

/// For the report of a 4-bit output: the base as the user will load it. A 4-bit base is loaded as it
/// is; a float base quantized here (`--quantize`) is compared as quantized alone, with its own codes.
struct QuantizedBase {
    q: FourBit,
    /// Quantizing the base alone: its f32 absmax so far, and scratch for its codes.
    own: Option<(Vec<f32>, Vec<u8>, Vec<u8>)>,
    table: [f32; 16],
}

impl QuantizedBase {
    fn new(q: FourBit, job: &Job) -> Self {
        let own = (!matches!(job.origin, Origin::FourBit { .. })).then(|| {
            (
                vec![0f32; job.numel().div_ceil(q.quant.blocksize)],
                Vec::new(),
                Vec::new(),
            )
        });
        QuantizedBase {
            q,
            own,
            table: q.quant.quant_type.table(),
        }
    }

    /// Add a run's elements to the report: `base` as loaded (or as stored, to be quantized alone here),
    /// `delta` the intended change, the sink holding the run's output codes and absmax.
    fn account(
        &mut self,
        acc: &mut Accumulator,
        sink: &FourBitSink,
        start: usize,
        base: &[f32],
        delta: &[f32],
        out: &mut Vec<f32>,
    ) {
        let q = self.q;
        let (bs, sd, dq) = (q.quant.blocksize, q.state_dtype, q.quant.double_quant);
        let len = delta.len();
        out.resize(len, 0.0);
        let b0 = start / bs;
        let t: Vec<f32> = sink.codes[..len].iter().map(|c| self.table[*c as usize]).collect();
        let loaded = |t: &[f32], absmax: &[f32], out: &mut [f32]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = sd.round_trip(t[i] * absmax[b0 + i / bs]);
            }
        };
        match &mut self.own {
            // The output's absmax is final now, so are its loaded values.
            None if !dq => {
                loaded(&t, &sink.absmax, &mut out[..len]);
                acc.add_known(base, delta, &out[..len]);
            }
            None => {
                for r in blocks(len, bs) {
                    acc.add_block(&base[r.clone()], &delta[r.clone()], &t[r]);
                }
            }
            Some((absmax, packed, codes)) => {
                let mut x = base.to_vec();
                round_to(sd, &mut x);
                packed.resize(len.div_ceil(2), 0);
                quantize_run(
                    &x,
                    q.quant.quant_type,
                    bs,
                    packed,
                    &mut absmax[b0..(start + len).div_ceil(bs)],
                    codes,
                );
                let tb: Vec<f32> = codes[..len].iter().map(|c| self.table[*c as usize]).collect();
                if dq {
                    for r in blocks(len, bs) {
                        acc.add_block_pair(&delta[r.clone()], &t[r.clone()], &tb[r]);
                    }
                } else {
                    let mut loaded_base = vec![0f32; len];
                    loaded(&tb, absmax, &mut loaded_base);
                    loaded(&t, &sink.absmax, &mut out[..len]);
                    acc.add_known(&loaded_base, delta, &out[..len]);
                }
            }
        }
    }

    /// The absmax the base quantized alone is loaded with, where its blocks wait for it (double
    /// quantization); otherwise its values were final when accounted.
    fn loaded_absmax(self) -> Option<Vec<f32>> {
        match self.own {
            Some((absmax, _, _)) if self.q.quant.double_quant => Some(loaded_absmax(self.q, &absmax)),
            _ => None,
        }
    }
}

fn blocks(len: usize, bs: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len).step_by(bs).map(move |s| s..(s + bs).min(len))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// Sum of squares of a contiguous row in torch's CPU order for `linalg.norm(dim=1)` on f32: eight
/// lanes accumulate in step, are summed left to right, then the tail is added. Matching the order makes
/// DoRA's norms, and so fp32 DoRA merges, bit-identical to PEFT.
fn torch_row_sumsq(row: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let mut total = lanes.iter().fold(0f32, |t, l| t + l);
    for v in tail {
        total += v * v;
    }
    total
}

/// The delta for rows [r0, r0+n) of the stored weight (before post-scaling).
fn lora_delta(f: &Factors, layout: Layout, r0: usize, n: usize, cols: usize, dst: &mut [f32]) {
    let rank = f.rank;
    match layout {
        Layout::Rows => {
            // W (out, in): rows of B times A.
            let b = MatRef::from_row_major_slice(&f.b[r0 * rank..(r0 + n) * rank], n, rank);
            let a = MatRef::from_row_major_slice(&f.a, rank, cols);
            matmul_into(dst, b, a);
        }
        Layout::Transposed => {
            // W (in, out): rows of A^T times B^T.
            let in_f = f.a.len() / rank.max(1);
            let a_t = MatRef::from_row_major_slice(&f.a, rank, in_f)
                .transpose()
                .subrows(r0, n);
            let b_t = MatRef::from_row_major_slice(&f.b, cols, rank).transpose();
            matmul_into(dst, a_t, b_t);
        }
    }
}
