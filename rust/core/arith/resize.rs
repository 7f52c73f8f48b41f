//! `lorafast resize`: re-factor each module's scaling * B A at a lower rank by an exact SVD of the
//! factors, keeping the adapter a plain PEFT LoRA (per-module ranks go to rank_pattern, scaling 1).
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use super::lowrank::{svd_of_product, Factors};
use super::{
    check_plain_lora, check_rank, copy_side_files, lora_outputs, raw_tensor, read_factors, set_ranks, write_adapter,
    ArithReport,
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

fn resize_module(adapter: &Adapter, m: &LoraModule, opts: &ResizeOptions) -> Result<(Factors, f64)> {
    let (rows, cols) = (m.b_shape[0], m.a_shape[1]);
    if let Some(r) = opts.rank {
        check_rank(&m.module, r, rows, cols)?;
    }
    let (mut a, b) = read_factors(adapter, m)?;
    let s = adapter.config.scaling_f64_for(&m.module) as f32;
    a.iter_mut().for_each(|v| *v *= s);
    let svd = svd_of_product(&b, &a, rows, m.r, cols, &m.module)?;
    let cap = opts.rank.unwrap_or(m.r).min(m.r);
    let k = match opts.energy {
        Some(share) => svd.rank_for_energy(share, cap),
        None => cap,
    };
    Ok((svd.factors(k, k), svd.energy(k)))
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
    let (mut tensors, reports) = lora_outputs(
        ad.modules
            .iter()
            .zip(results)
            .map(|(m, (f, e))| (m.module.as_str(), m.kind, f, Some(e))),
        dtype,
    );
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
