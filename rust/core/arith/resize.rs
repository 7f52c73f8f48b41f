//! `lorafast resize`: re-factor each module's scaling * B A at a lower rank by an exact SVD of the
//! factors, keeping the adapter a plain PEFT LoRA (per-module ranks go to rank_pattern, scaling 1).
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use super::lowrank::{svd_of_product, Factors};
use super::{
    check_plain_lora, check_rank, copy_side_files, lora_outputs, raw_tensor, read_factors, set_ranks, write_adapter,
    ArithReport, ModuleReport, OutTensor,
};
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::peft::{Adapter, LoraModule};
use crate::core::pool;
use crate::core::progress::Progress;
use crate::core::staging::Staging;

#[derive(Debug, Clone, Default)]
pub struct ResizeOptions {
    /// Largest rank kept per module.
    pub rank: Option<usize>,
    /// Keep the fewest components that hold this share of each module's energy (capped by `rank`).
    pub energy: Option<f64>,
    /// Output float type; default: the adapter's own.
    pub dtype: Option<FloatType>,
    pub threads: Option<usize>,
    pub overwrite: bool,
}

pub fn check_energy(energy: Option<f64>) -> Result<()> {
    match energy {
        Some(f) if !(f > 0.0 && f <= 1.0) => {
            Err(Error::InvalidArgument(format!("energy {f} must be a share in (0, 1]")))
        }
        _ => Ok(()),
    }
}

/// A module's (or one expert's) `s * B A` truncated: the factors at rank k and the energy share kept.
fn truncate(
    name: &str,
    b: &[f32],
    mut a: Vec<f32>,
    r: usize,
    s: f32,
    (rows, cols): (usize, usize),
    opts: &ResizeOptions,
) -> Result<(Factors, f64, usize)> {
    a.iter_mut().for_each(|v| *v *= s);
    let svd = svd_of_product(b, &a, rows, r, cols, name)?;
    let cap = opts.rank.unwrap_or(r).min(r);
    let k = match opts.energy {
        Some(share) => svd.rank_for_energy(share, cap),
        None => cap,
    };
    Ok((svd.factors(k, k), svd.energy(k), k))
}

/// The resized factors of one module, and the energy share kept (for a parameter LoRA the smallest over
/// its experts).
fn resize_module(adapter: &Adapter, m: &LoraModule, opts: &ResizeOptions) -> Result<(Factors, f64)> {
    let (rows, cols) = (m.b_shape[0], m.a_shape[1]);
    let name = m.pattern_key();
    if let Some(r) = opts.rank {
        check_rank(&name, r, rows, cols)?;
    }
    let (a, b) = read_factors(adapter, m)?;
    let s = adapter.config.scaling_f64_for(&name) as f32;
    let Some(p) = &m.param else {
        let (f, energy, _) = truncate(&name, &b, a, m.r, s, (rows, cols), opts)?;
        return Ok((f, energy));
    };
    // Each expert's delta truncated on its own; PEFT's layout has one rank per parameter, so every expert
    // gets the largest rank any of them needs, the others zero-padded (their delta unchanged by it).
    let mut per_expert = Vec::with_capacity(p.experts);
    for e in 0..p.experts {
        let (a_e, b_e) = super::expert_factors(&a, &b, m.r, p.experts, e);
        let svd = svd_of_product(
            &b_e,
            &a_e.iter().map(|v| v * s).collect::<Vec<_>>(),
            rows,
            m.r,
            cols,
            &name,
        )?;
        per_expert.push(svd);
    }
    let cap = opts.rank.unwrap_or(m.r).min(m.r);
    let ks: Vec<usize> = per_expert
        .iter()
        .map(|svd| match opts.energy {
            Some(share) => svd.rank_for_energy(share, cap),
            None => cap,
        })
        .collect();
    let k = ks.iter().copied().max().unwrap_or(1);
    // Every expert is written at rank k: report the smallest share kept.
    let factors: Vec<Factors> = per_expert.iter().map(|svd| svd.factors(k, k)).collect();
    let energy = per_expert.iter().map(|svd| svd.energy(k)).fold(1.0f64, f64::min);
    Ok((super::pack_experts(&factors), energy))
}

/// Resize the adapter folder `adapter` into `out`.
pub fn resize(adapter: &Path, out: &Path, opts: &ResizeOptions, progress: &dyn Progress) -> Result<ArithReport> {
    let started = Instant::now();
    if opts.rank.is_none() && opts.energy.is_none() {
        return Err(Error::InvalidArgument("give a rank, an energy share, or both".into()));
    }
    if opts.rank == Some(0) {
        return Err(Error::InvalidArgument("rank must be at least 1".into()));
    }
    check_energy(opts.energy)?;
    let staging = Staging::new(out, &[adapter], opts.overwrite)?;
    let ad = Adapter::open(adapter)?;
    check_plain_lora(&ad, "resized")?;
    let dtype = match opts.dtype {
        Some(t) => t,
        None => ad
            .modules
            .first()
            .and_then(|m| ad.file.get(&m.a)?.float_type())
            .unwrap_or(FloatType::F32),
    };
    let pool = pool::build(opts.threads)?;
    // Progress in bytes of the factors read, the unit every other call reports in.
    let factor_bytes = |m: &LoraModule| (m.r * (m.a_shape[1] + m.b_shape[0]) * 4) as u64;
    progress.start(ad.modules.iter().map(factor_bytes).sum());
    let results: Vec<(Factors, f64)> = pool.install(|| {
        ad.modules
            .par_iter()
            .map(|m| {
                if progress.cancelled() {
                    return Err(Error::Interrupted);
                }
                let r = resize_module(&ad, m, opts)?;
                progress.advance(&m.module, factor_bytes(m));
                Ok(r)
            })
            .collect::<Result<_>>()
    })?;
    let (plain, params): (Vec<_>, Vec<_>) = ad.modules.iter().zip(results).partition(|(m, _)| m.param.is_none());
    let (mut tensors, mut reports) = lora_outputs(
        plain
            .into_iter()
            .map(|(m, (f, e))| (m.module.as_str(), m.kind, f, Some(e))),
        dtype,
    );
    // A parameter LoRA keeps its keys: the nesting of wrappers (`base_layer`) is the same config's.
    for (m, (f, e)) in params {
        let (n_in, n_out) = (f.a.len() / f.rank.max(1), f.b.len() / f.rank.max(1));
        tensors.push(OutTensor::float(m.a.clone(), dtype, vec![f.rank, n_in], &f.a));
        tensors.push(OutTensor::float(m.b.clone(), dtype, vec![n_out, f.rank], &f.b));
        let experts = m.param.as_ref().map_or(1, |p| p.experts);
        reports.push(ModuleReport {
            module: m.pattern_key(),
            rank: f.rank / experts,
            energy: Some(e),
        });
    }
    for s in &ad.saved {
        tensors.push(raw_tensor(
            &ad.file,
            ad.file.get(&s.key).expect("listed"),
            s.key.clone(),
        )?);
    }
    let mut config = ad.config.raw.clone();
    let ranks: Vec<(String, usize)> = reports.iter().map(|r| (r.module.clone(), r.rank)).collect();
    set_ranks(&mut config, &ranks);
    copy_side_files(&ad.dir, &staging.tmp)?;
    let mut warnings = Vec::new();
    let output = write_adapter(staging, &config, tensors, &mut warnings)?;
    Ok(ArithReport {
        output,
        modules: reports,
        saved_tensors: ad.saved.len(),
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}
