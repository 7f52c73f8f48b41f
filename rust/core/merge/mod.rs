//! The streaming engine: one pass from the base (and adapters) to the output, for every merge - and
//! for plain quantization and dequantization, which are merges of no adapter.
//!
//! - `source`: a base tensor's values, from a float tensor or a 4-bit weight dequantized exactly.
//! - `resolve` and `plan`: where each adapter tensor lands (PEFT's rules), and every output tensor's
//!   origin, merge steps and output (copied, rounded to a float type, or quantized to 4 bits).
//! - `job`: one tensor's work, tile by tile: deltas in f32 with one rounding, exact to PEFT.
//! - `sink`: values rounded to a float type, or quantized to NF4/FP4 byte-identical to bitsandbytes.
//! - `layout`: the output written straight into its shards, or through a scratch file when quant-state
//!   lengths are known only at the end (double quantization).
//! - `stats`: what the merge kept, per merged weight.
//!
//! The output goes to a staging folder beside OUT and is renamed into place only when complete.
pub mod config;
mod job;
pub(crate) mod layout;
pub mod plan;
mod resolve;
pub(crate) mod sink;
pub mod source;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;

use crate::core::checkpoint::CheckpointWriter;
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::peft::Adapter;
use crate::core::pool;
use crate::core::progress::Progress;
use crate::core::quant::QuantizeOptions;

use layout::{Deferred, Direct};
use plan::{Output, Plan};
use source::Base;
pub use stats::TensorStats;

/// What the output is.
#[derive(Debug, Clone, Default)]
pub enum Mode {
    /// A float checkpoint (from a float or a 4-bit base).
    #[default]
    Float,
    /// A 4-bit base merged back into 4 bits with its own settings: the weights the adapters change are
    /// re-quantized from their f32 merged values, every other 4-bit weight is copied byte for byte.
    Requantize,
    /// A float base merged and quantized in the same pass.
    Quantize(QuantizeSpec),
}

#[derive(Debug, Clone)]
pub struct QuantizeSpec {
    pub quant: QuantizeOptions,
    /// `bnb_4bit_compute_dtype` (default: the model's dtype).
    pub compute_dtype: Option<FloatType>,
    /// Weights to quantize, and whether each is a GPT-2 Conv1D; None: decided by name.
    pub targets: Option<Vec<(String, bool)>>,
    /// Left unquantized, and written to `llm_int8_skip_modules`.
    pub skip_modules: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// One weight per adapter (default 1.0 each): W + sum_i w_i * scaling_i * B_i A_i.
    pub weights: Option<Vec<f32>>,
    /// Output float dtype (default: each tensor keeps its own).
    pub dtype: Option<FloatType>,
    pub threads: Option<usize>,
    /// Refuse to write a merged tensor holding NaN or Inf.
    pub safe_merge: bool,
    /// Replace OUT if it exists.
    pub overwrite: bool,
    pub mode: Mode,
    /// torch's intra-op thread count, whose summation order the double-quantization offset follows.
    pub torch_threads: usize,
    /// Compute the per-tensor report.
    pub stats: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    pub output: PathBuf,
    pub tensors_total: usize,
    pub tensors_merged: usize,
    pub tensors_replaced: usize,
    pub tensors_added: usize,
    pub tensors_copied: usize,
    pub tensors_quantized: usize,
    /// 4-bit weights written as float.
    pub tensors_dequantized: usize,
    pub elements_quantized: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub nonfinite_values: u64,
    pub warnings: Vec<String>,
    /// What the merge kept, per merged weight (with `stats`).
    pub tensors: Vec<TensorStats>,
}

/// Merge `adapters` (none: quantize or dequantize only) into the checkpoint folder `base`, writing the
/// folder `out`.
pub fn merge(
    base: &Path,
    adapters: &[PathBuf],
    out: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = Instant::now();
    let inputs: Vec<&Path> = std::iter::once(base)
        .chain(adapters.iter().map(PathBuf::as_path))
        .collect();
    let mut writer = CheckpointWriter::new(out, &inputs, opts.overwrite)?;
    let base = Base::open(base)?;
    let adapters: Vec<Adapter> = adapters.iter().map(|p| Adapter::open(p)).collect::<Result<_>>()?;
    let plan = plan::plan(&base, &adapters, opts)?;
    let pool = pool::build(opts.threads)?;
    let planned = layout::planned(&base, &adapters, &plan.jobs);
    let run_all = |dest: &dyn sink::Dest| run_jobs(&base, &adapters, &plan.jobs, &planned, opts, &pool, progress, dest);
    let shard_names = &base.ck.shard_names;
    let deferred = plan
        .jobs
        .iter()
        .any(|j| matches!(j.output, Output::FourBit(q) if q.quant.double_quant));
    let (nonfinite, stats) = if deferred {
        let scratch = Deferred::new(writer.dir(), &plan.jobs, &planned)?;
        let total: u64 = planned.iter().flatten().map(|(t, _)| t.byte_len() as u64).sum();
        writer.check_space(total + scratch.size())?;
        progress.start(total);
        let (nonfinite, stats) = run_all(&scratch)?;
        let (scratch, states) = scratch.into_states();
        let shard_of = layout::lay_out(&mut writer, shard_names, &plan.jobs, &planned, &states)?;
        let direct = Direct {
            writer: &writer,
            shard_of,
        };
        pool.install(|| scratch.fill(&direct, &states, &plan.jobs, &planned, &base, &adapters))?;
        (nonfinite, stats)
    } else {
        let shard_of = layout::lay_out(&mut writer, shard_names, &plan.jobs, &planned, &Default::default())?;
        writer.start(progress)?;
        run_all(&Direct {
            writer: &writer,
            shard_of,
        })?
    };
    finish(writer, &base, &adapters, plan, nonfinite, stats, started)
}

/// Run every job on `pool`, each writing to `dest`: the values not finite, and the per-weight stats.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_jobs(
    base: &Base,
    adapters: &[Adapter],
    jobs: &[plan::Job],
    planned: &[Vec<(crate::core::io::PlannedTensor, bool)>],
    opts: &MergeOptions,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    dest: &dyn sink::Dest,
) -> Result<(u64, Vec<TensorStats>)> {
    let nonfinite = AtomicU64::new(0);
    let stats = Mutex::new(Vec::new());
    let ctx = job::Ctx {
        base,
        adapters,
        safe: opts.safe_merge,
        stats: opts.stats,
        nonfinite: &nonfinite,
        progress,
        dest,
    };
    pool.install(|| {
        jobs.par_iter().zip(planned).try_for_each(|(job, outs)| {
            if progress.cancelled() {
                return Err(Error::Interrupted);
            }
            if let Some(s) = job::run(&ctx, job)? {
                stats.lock().expect("never poisoned").push(s);
            }
            progress.advance(&job.out_name, outs.iter().map(|(t, _)| t.byte_len() as u64).sum());
            Ok(())
        })
    })?;
    Ok((nonfinite.into_inner(), stats.into_inner().expect("never poisoned")))
}

fn finish(
    writer: CheckpointWriter,
    base: &Base,
    adapters: &[Adapter],
    plan: Plan,
    nonfinite_values: u64,
    mut tensors: Vec<TensorStats>,
    started: Instant,
) -> Result<MergeReport> {
    let tokenizers = |dir: &Path| {
        adapters
            .iter()
            .try_for_each(|a| config::copy_tokenizer_files(&a.dir, dir))
    };
    let mut warnings = writer.notices();
    warnings.extend(plan.warnings);
    warnings.extend(retention_warning(&tensors, &plan.jobs));
    let (output, bytes_written) = writer.finish(base.ck.sharded, &base.ck.dir, tokenizers, plan.config.as_ref())?;
    let jobs = &plan.jobs;
    let count = |f: &dyn Fn(&plan::Job) -> bool| jobs.iter().filter(|j| f(j)).count();
    // Report in the model's order, whatever order the threads finished in.
    let order: std::collections::HashMap<&str, usize> =
        jobs.iter().enumerate().map(|(i, j)| (j.out_name.as_str(), i)).collect();
    tensors.sort_by_key(|t| order.get(t.name.as_str()).copied().unwrap_or(usize::MAX));
    let quantized = |j: &plan::Job| matches!(j.output, Output::FourBit(_));
    Ok(MergeReport {
        output,
        tensors_total: jobs.len(),
        tensors_merged: count(&|j| !j.steps.is_empty()),
        tensors_replaced: count(&|j| j.replaced),
        tensors_added: count(&|j| j.added),
        tensors_copied: count(&|j| matches!(j.output, Output::Copy)),
        tensors_quantized: count(&quantized),
        tensors_dequantized: count(&|j| matches!(j.origin, plan::Origin::FourBit { .. }) && !quantized(j)),
        elements_quantized: jobs.iter().filter(|j| quantized(j)).map(|j| j.numel() as u64).sum(),
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        nonfinite_values,
        warnings,
        tensors,
    })
}

/// Rounding can erase a small change: a 4-bit output rounds each weight to one of 16 levels per block,
/// a bf16 one to 8 significant bits. Say so when most merged weights kept less than half of theirs.
fn retention_warning(tensors: &[TensorStats], jobs: &[plan::Job]) -> Option<String> {
    let lost = tensors.iter().filter(|t| t.retention < 0.5).count();
    if tensors.is_empty() || 2 * lost <= tensors.len() {
        return None;
    }
    let four_bit = jobs
        .iter()
        .any(|j| !j.steps.is_empty() && matches!(j.output, Output::FourBit(_)));
    let instead = if four_bit {
        "merge to a bf16 (or fp32) checkpoint instead of 4-bit, or keep the adapter separate"
    } else {
        "merge to fp32 (--dtype fp32), or keep the adapter separate"
    };
    let mut kept: Vec<f64> = tensors.iter().map(|t| t.retention).collect();
    kept.sort_by(f64::total_cmp);
    Some(format!(
        "the output keeps less than half of the adapters' change in {lost} of {} merged weights (median {:.1}%): \
         rounding erased it; {instead}",
        tensors.len(),
        100.0 * kept[kept.len() / 2]
    ))
}
