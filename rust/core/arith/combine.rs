//! `lorafast combine`: the adapter PEFT's `LoraModel.add_weighted_adapter` builds, from adapter files.
//!
//! Same rules as peft 0.21 (`tuners/lora/model.py`): the new rank per method, the factor-wise methods
//! weighting A by sign(c) sqrt|c| and B by sqrt|c| (c = weight * scaling), `cat` stacking the scaled
//! factors, the svd methods taking a truncated SVD of the mixed deltas. Differences, all deliberate:
//! the new scaling is 1 even for rsLoRA inputs, the svd of `svd` is exact on the factors (no dense
//! delta), the svd of pruned deltas is randomized subspace iteration run until the subspace converges (as
//! close to the truncation as an exact float32 SVD), DARE draws its masks from per-tensor seeds, and
//! modules_to_save tensors are carried over from the one adapter that has them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use faer::MatRef;
use rayon::prelude::*;
use serde_json::Value;

use super::lowrank::{dense_svd, svd_of_product, Dense, Factors, RandomizedOptions};
use super::merge_fns::{MajoritySign, MergeFn, Prune};
use super::{
    check_plain_lora, check_rank, copy_side_files, lora_outputs, raw_tensor, read_factors, set_ranks, tensor_seed,
    write_adapter, ArithReport, OutTensor, KEY_PREFIX,
};
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::experts::{targeted_params, wrapper_path, ExpertParam};
use crate::core::linalg::{hstack, matmul_into};
use crate::core::peft::{Adapter, AdapterConfig, LayerKind, LoraModule, CONFIG_NAME};
use crate::core::pool;
use crate::core::progress::Progress;
use crate::core::staging::Staging;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

const METHODS: [(&str, Method); 11] = [
    ("linear", Method::Linear),
    ("cat", Method::Cat),
    ("svd", Method::Svd),
    ("ties", Method::Ties),
    ("ties_svd", Method::TiesSvd),
    ("dare_linear", Method::DareLinear),
    ("dare_ties", Method::DareTies),
    ("dare_linear_svd", Method::DareLinearSvd),
    ("dare_ties_svd", Method::DareTiesSvd),
    ("magnitude_prune", Method::MagnitudePrune),
    ("magnitude_prune_svd", Method::MagnitudePruneSvd),
];

impl Method {
    pub fn parse(name: &str) -> Result<Self> {
        METHODS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                let names: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
                Error::InvalidArgument(format!("unknown method {name:?}; use one of {}", names.join(", ")))
            })
    }

    pub fn name(self) -> &'static str {
        METHODS.iter().find(|(_, m)| *m == self).expect("listed").0
    }

    fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    fn prune(self) -> Prune {
        match self {
            Method::Ties | Method::TiesSvd | Method::MagnitudePrune | Method::MagnitudePruneSvd => Prune::Magnitude,
            Method::DareLinear | Method::DareTies | Method::DareLinearSvd | Method::DareTiesSvd => Prune::Random,
            Method::Linear | Method::Cat | Method::Svd => Prune::None,
        }
    }

    fn ties(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::TiesSvd | Method::DareTies | Method::DareTiesSvd
        )
    }
}

#[derive(Debug, Clone)]
pub struct CombineOptions {
    pub method: Method,
    /// One per adapter; negative subtracts.
    pub weights: Vec<f64>,
    /// Share of values kept by the pruning methods.
    pub density: Option<f64>,
    /// Rank of the svd methods' result (default: the largest input rank).
    pub rank: Option<usize>,
    pub majority_sign: MajoritySign,
    /// Seeds DARE's random masks.
    pub seed: u64,
    /// Quantile at which the svd methods clamp their factors (PEFT's `svd_clamp`).
    pub svd_clamp: Option<f64>,
    pub dtype: FloatType,
    pub threads: Option<usize>,
    pub overwrite: bool,
    /// Accept adapters whose configs name different base models.
    pub allow_different_bases: bool,
}

impl Default for CombineOptions {
    fn default() -> Self {
        CombineOptions {
            method: Method::Svd,
            weights: Vec::new(),
            density: None,
            rank: None,
            majority_sign: MajoritySign::Total,
            seed: 0,
            svd_clamp: None,
            dtype: FloatType::F32,
            threads: None,
            overwrite: false,
            allow_different_bases: false,
        }
    }
}

/// One adapter's LoRA on one module.
struct Part<'a> {
    index: usize,
    adapter: &'a Adapter,
    module: &'a LoraModule,
}

struct Job<'a> {
    /// The module, or `module.param` for a LoRA on a fused experts parameter.
    module: String,
    /// Set for a parameter LoRA: combined expert by expert, as if each were a module LoRA.
    param: Option<(String, ExpertParam)>,
    kind: LayerKind,
    rows: usize,
    cols: usize,
    parts: Vec<Part<'a>>,
}

fn check_options(opts: &CombineOptions, n: usize) -> Result<Method> {
    if n == 0 {
        return Err(Error::InvalidArgument("no adapter given".into()));
    }
    if opts.weights.len() != n {
        return Err(Error::InvalidArgument(format!(
            "{} weight(s) given for {n} adapter(s); give one weight per adapter",
            opts.weights.len()
        )));
    }
    if let Some(w) = opts.weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::InvalidArgument(format!("weight {w} is not a finite number")));
    }
    // PEFT: a single adapter is always combined linearly (it is scaled by its weight).
    let method = if n == 1 { Method::Linear } else { opts.method };
    let prunes = opts.method.prune() != Prune::None;
    match opts.density {
        None if prunes => {
            return Err(Error::InvalidArgument(format!(
                "method {} needs --density (the share of values kept, 0..1)",
                opts.method.name()
            )))
        }
        Some(_) if !prunes => {
            return Err(Error::InvalidArgument(format!(
                "--density applies to the ties, dare and magnitude_prune methods, not {}",
                opts.method.name()
            )))
        }
        Some(d) if !(0.0..=1.0).contains(&d) => {
            return Err(Error::InvalidArgument(format!("density {d} is outside 0..1")))
        }
        _ => {}
    }
    if opts.rank.is_some() && !opts.method.is_svd() {
        return Err(Error::InvalidArgument(format!(
            "--rank applies to the svd methods, not {}",
            opts.method.name()
        )));
    }
    if opts.rank == Some(0) {
        return Err(Error::InvalidArgument("rank must be at least 1".into()));
    }
    if let Some(q) = opts.svd_clamp {
        if !opts.method.is_svd() || !(0.0..=1.0).contains(&q) {
            return Err(Error::InvalidArgument(
                "--svd-clamp is a quantile in 0..1 and applies to the svd methods".into(),
            ));
        }
    }
    Ok(method)
}

/// PEFT's rank of an adapter: r, or the largest rank_pattern value when that is larger.
fn adapter_rank(a: &Adapter) -> usize {
    a.config
        .rank_pattern
        .iter()
        .map(|(_, _, r)| *r)
        .fold(a.config.r, usize::max)
}

fn new_rank(method: Method, adapters: &[Adapter], rank: Option<usize>) -> Result<usize> {
    let ranks: Vec<usize> = adapters.iter().map(adapter_rank).collect();
    Ok(match method {
        Method::Cat => ranks.iter().sum(),
        m if m.is_svd() => rank.unwrap_or_else(|| *ranks.iter().max().expect("non-empty")),
        _ => {
            if let Some((i, r)) = ranks.iter().enumerate().find(|(_, r)| **r != ranks[0]) {
                return Err(Error::adapter(
                    &adapters[i].dir,
                    format!(
                        "has rank {r} but {} has rank {}; method {} needs equal ranks (use cat or svd)",
                        adapters[0].dir.display(),
                        ranks[0],
                        method.name()
                    ),
                ));
            }
            ranks[0]
        }
    })
}

fn check_bases(adapters: &[Adapter]) -> Result<()> {
    let norm = |a: &Adapter| {
        a.config
            .base_model_name_or_path
            .as_deref()
            .map(|s| s.trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
    };
    let Some(first) = norm(&adapters[0]) else {
        return Ok(());
    };
    for a in &adapters[1..] {
        if let Some(other) = norm(a).filter(|o| *o != first) {
            return Err(Error::adapter(
                a.dir.join(CONFIG_NAME),
                format!(
                    "was trained on {other:?} but {} on {first:?}; adapters for different bases cannot be \
                     combined (pass --allow-different-bases if both name the same model)",
                    adapters[0].dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Every module any adapter has, with the adapters on it in order; shapes must agree.
fn jobs<'a>(adapters: &'a [Adapter]) -> Result<Vec<Job<'a>>> {
    let mut by_module: BTreeMap<String, Job<'a>> = BTreeMap::new();
    for (index, adapter) in adapters.iter().enumerate() {
        for m in &adapter.modules {
            let (rows, cols) = (m.b_shape[0], m.a_shape[1]);
            let name = m.pattern_key();
            let job = by_module.entry(name.clone()).or_insert_with(|| Job {
                module: name.clone(),
                param: m.param.clone().map(|p| (m.module.clone(), p)),
                kind: m.kind,
                rows,
                cols,
                parts: Vec::new(),
            });
            if job.kind != m.kind || (job.rows, job.cols) != (rows, cols) {
                let first = &job.parts[0];
                return Err(Error::shape(
                    &m.module,
                    format!(
                        "{} has a {rows} x {cols} {:?} LoRA here but {} a {} x {} {:?} one: adapters for different bases",
                        adapter.dir.display(),
                        m.kind,
                        first.adapter.dir.display(),
                        job.rows,
                        job.cols,
                        job.kind
                    ),
                ));
            }
            if let (Some((_, want)), Some(got)) = (&job.param, &m.param) {
                if want.experts != got.experts {
                    return Err(Error::shape(
                        &name,
                        format!(
                            "{} has a LoRA on {} experts here but {} one on {}: adapters for different bases",
                            adapter.dir.display(),
                            got.experts,
                            job.parts[0].adapter.dir.display(),
                            want.experts
                        ),
                    ));
                }
            }
            job.parts.push(Part {
                index,
                adapter,
                module: m,
            });
        }
    }
    let jobs: Vec<Job<'a>> = by_module.into_values().collect();
    // A fused experts LoRA and per-expert Linear LoRAs (`experts.{e}.gate_proj`) on the same experts would
    // be two layouts of one weight: PEFT converts the latter on load, lorafast does not mix them.
    for j in &jobs {
        let Some((module, _)) = &j.param else { continue };
        let inner = format!("{module}.");
        if let Some(other) = jobs.iter().find(|o| {
            o.param.is_none()
                && o.module
                    .strip_prefix(&inner)
                    .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_digit()))
        }) {
            let who = |job: &Job| job.parts[0].adapter.dir.display().to_string();
            return Err(Error::unsupported(
                &j.module,
                format!(
                    "{} has a target_parameters LoRA here but {} a per-expert LoRA on {}; convert one layout first",
                    who(j),
                    who(other),
                    other.module
                ),
            ));
        }
    }
    Ok(jobs)
}

/// Zero-pad factors of rank `r` to `to` (PEFT writes them into a zeroed adapter of the new rank).
fn pad(mut a: Vec<f32>, b: Vec<f32>, r: usize, to: usize) -> Factors {
    if r == to {
        return Factors { b, a, rank: r };
    }
    let (cols, rows) = (a.len() / r.max(1), b.len() / r.max(1));
    a.resize(to * cols, 0.0);
    let b = hstack(&[(r, &b)], rows, to);
    Factors { b, a, rank: to }
}

/// The parts' factors stacked: A_i times x_i then y_i (`scales(part)` = (x_i, y_i), two f32 roundings)
/// one under the other, B_i side by side, so that B @ A = sum_i B_i (A_i x_i y_i). Returns (A, B, rank).
fn stack(
    job: &Job,
    loaded: &[(Vec<f32>, Vec<f32>)],
    scales: impl Fn(&Part) -> (f32, f32),
) -> (Vec<f32>, Vec<f32>, usize) {
    let r_sum: usize = job.parts.iter().map(|p| p.module.r).sum();
    let mut a = Vec::with_capacity(r_sum * job.cols);
    for (p, (pa, _)) in job.parts.iter().zip(loaded) {
        let (x, y) = scales(p);
        a.extend(pa.iter().map(|v| (v * x) * y));
    }
    let blocks: Vec<(usize, &[f32])> = job
        .parts
        .iter()
        .zip(loaded)
        .map(|(p, (_, pb))| (p.module.r, pb.as_slice()))
        .collect();
    (a, hstack(&blocks, job.rows, r_sum), r_sum)
}

/// torch.quantile(x, q) with linear interpolation.
fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = values.to_vec();
    v.sort_by(f32::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    (v[lo] as f64 + (v[hi] as f64 - v[lo] as f64) * (pos - lo as f64)) as f32
}

fn combine_module(job: &Job, method: Method, opts: &CombineOptions, rank: usize) -> Result<(Factors, Option<f64>)> {
    let loaded: Vec<(Vec<f32>, Vec<f32>)> = job
        .parts
        .iter()
        .map(|p| read_factors(p.adapter, p.module))
        .collect::<Result<_>>()?;
    let Some((_, p)) = &job.param else {
        return combine_factors(job, loaded, &job.module, method, opts, rank);
    };
    // PEFT's rules applied to each expert's (A_e, B_e) as to a module LoRA, repacked into the fused layout.
    let mut per_expert = Vec::with_capacity(p.experts);
    let mut energy: Option<f64> = None;
    for e in 0..p.experts {
        let loaded_e: Vec<(Vec<f32>, Vec<f32>)> = job
            .parts
            .iter()
            .zip(&loaded)
            .map(|(part, (a, b))| super::expert_factors(a, b, part.module.r, p.experts, e))
            .collect();
        let (f, en) = combine_factors(job, loaded_e, &format!("{}:expert{e}", job.module), method, opts, rank)?;
        energy = en.map(|x| energy.map_or(x, |y| y.min(x)));
        per_expert.push(f);
    }
    Ok((super::pack_experts(&per_expert), energy))
}

/// One module's (or one expert's) combination from the parts' factors; `seed_name` keys its random draws.
fn combine_factors(
    job: &Job,
    loaded: Vec<(Vec<f32>, Vec<f32>)>,
    seed_name: &str,
    method: Method,
    opts: &CombineOptions,
    rank: usize,
) -> Result<(Factors, Option<f64>)> {
    let weight = |p: &Part| opts.weights[p.index];
    let scaling = |p: &Part| p.adapter.config.scaling_f64_for(&p.module.pattern_key());
    let (m, n) = (job.rows, job.cols);
    if method == Method::Cat {
        // A_i * weight * scaling (two f32 roundings, as torch does), stacked; B_i side by side.
        let (a, b, r_sum) = stack(job, &loaded, |p| (weight(p) as f32, scaling(p) as f32));
        return Ok((pad(a, b, r_sum, rank), None));
    }
    let merge_fn = MergeFn {
        prune: method.prune(),
        ties: method.ties(),
        density: opts.density.unwrap_or(1.0),
        majority: opts.majority_sign,
    };
    let seeds = |label: &str| -> Vec<u32> {
        job.parts
            .iter()
            .map(|p| tensor_seed(opts.seed, seed_name, label, p.index))
            .collect()
    };
    if !method.is_svd() {
        let r = job.parts[0].module.r;
        if let Some(p) = job.parts.iter().find(|p| p.module.r != r) {
            return Err(Error::shape(
                &job.module,
                format!(
                    "rank {} in {} but {r} in {}; method {} needs equal ranks",
                    p.module.r,
                    p.adapter.dir.display(),
                    job.parts[0].adapter.dir.display(),
                    method.name()
                ),
            ));
        }
        // c = weight * scaling in f64; A gets sign(c) sqrt|c|, B gets sqrt|c|, then f32 like torch.tensor.
        let c: Vec<f64> = job.parts.iter().map(|p| weight(p) * scaling(p)).collect();
        let wa: Vec<f32> = c.iter().map(|c| (c.abs().sqrt() * c.signum_nonneg()) as f32).collect();
        let wb: Vec<f32> = c.iter().map(|c| c.abs().sqrt() as f32).collect();
        let (a_list, b_list): (Vec<_>, Vec<_>) = loaded.into_iter().unzip();
        let a = merge_fn.apply(a_list, &wa, &seeds("A"));
        let b = merge_fn.apply(b_list, &wb, &seeds("B"));
        return Ok((pad(a, b, r, rank), None));
    }
    check_rank(&job.module, rank, m, n)?;
    let svd = if method == Method::Svd {
        // Sum w_i (s_i B_i A_i) is the product of the stacked factors: its SVD needs no dense delta.
        let (a, b, r_sum) = stack(job, &loaded, |p| ((weight(p) * scaling(p)) as f32, 1.0));
        svd_of_product(&b, &a, m, r_sum, n, &job.module)?
    } else {
        // Dense deltas (B @ A) * scaling, pruned and mixed with the plain weights, then a truncated SVD.
        let deltas: Vec<Vec<f32>> = job
            .parts
            .iter()
            .zip(&loaded)
            .map(|(p, (pa, pb))| {
                let r = p.module.r;
                let mut d = vec![0f32; m * n];
                matmul_into(
                    &mut d,
                    MatRef::from_row_major_slice(pb, m, r),
                    MatRef::from_row_major_slice(pa, r, n),
                );
                let s = scaling(p) as f32;
                d.iter_mut().for_each(|v| *v *= s);
                d
            })
            .collect();
        let w: Vec<f32> = job.parts.iter().map(|p| weight(p) as f32).collect();
        let mixed = merge_fn.apply(deltas, &w, &seeds("delta"));
        let total: f64 = mixed.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        // Stands in for PEFT's exact torch.linalg.svd: iterate until the subspace itself has converged.
        let exactish = RandomizedOptions {
            oversample: rank.max(16),
            tol: 0.0,
            max_iters: 60,
            converge_subspace: true,
        };
        let dense = Dense {
            values: &mixed,
            rows: m,
            cols: n,
            total_energy: total,
        };
        let seed = tensor_seed(opts.seed, seed_name, "svd", 0);
        dense_svd(dense, rank, &exactish, seed, &job.module)?
    };
    let mut f = svd.factors(rank, rank);
    if let Some(q) = opts.svd_clamp {
        let all: Vec<f32> = f.b.iter().chain(&f.a).copied().collect();
        let hi = quantile(&all, q);
        f.b.iter_mut().chain(f.a.iter_mut()).for_each(|v| *v = v.clamp(-hi, hi));
    }
    Ok((f, Some(svd.energy(rank))))
}

trait SignumNonneg {
    fn signum_nonneg(self) -> f64;
}

impl SignumNonneg for f64 {
    /// PEFT's `1 if c >= 0 else -1`.
    fn signum_nonneg(self) -> f64 {
        if self >= 0.0 {
            1.0
        } else {
            -1.0
        }
    }
}

/// The new adapter's config: the first adapter's, with PEFT's union of targets and one rank.
fn new_config(adapters: &[Adapter], rank: usize, modules: &[String], warnings: &mut Vec<String>) -> Result<Value> {
    let mut config = adapters[0].config.raw.clone();
    let targets: Vec<&Value> = adapters.iter().map(|a| &a.config.raw["target_modules"]).collect();
    config["target_modules"] = if targets.iter().all(|t| t.is_string()) {
        let joined: Vec<String> = targets
            .iter()
            .map(|t| format!("({})", t.as_str().expect("checked")))
            .collect();
        Value::from(joined.join("|"))
    } else if targets.iter().all(|t| t.is_array() || t.is_null()) {
        let mut names: Vec<String> = targets
            .iter()
            .filter_map(|t| t.as_array())
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        Value::from(names)
    } else {
        return Err(Error::InvalidArgument(
            "the adapters' target_modules mix lists and regex strings; PEFT cannot combine those either".into(),
        ));
    };
    // The union of target_parameters, like target_modules: PEFT wraps what either adapter wrapped.
    let mut params: Vec<String> = adapters
        .iter()
        .flat_map(|a| a.config.target_parameters.clone())
        .collect();
    params.sort();
    params.dedup();
    if !params.is_empty() {
        config["target_parameters"] = Value::from(params);
    }
    let mut to_save: Vec<String> = adapters.iter().flat_map(|a| a.config.modules_to_save.clone()).collect();
    to_save.sort();
    to_save.dedup();
    config["modules_to_save"] = if to_save.is_empty() {
        Value::Null
    } else {
        Value::from(to_save)
    };
    for field in ["layers_to_transform", "layers_pattern", "exclude_modules"] {
        if adapters.iter().any(|a| a.config.raw[field] != config[field]) {
            warnings.push(format!(
                "the adapters disagree on {field}; the combined adapter has none"
            ));
            config[field] = Value::Null;
        }
    }
    config["lora_bias"] = Value::Bool(false);
    let ranks: Vec<(String, usize)> = modules.iter().map(|m| (m.clone(), rank)).collect();
    set_ranks(&mut config, &ranks);
    Ok(config)
}

/// Full tensors (modules_to_save...) from the adapters; a tensor in two adapters cannot be combined.
fn saved_tensors(adapters: &[Adapter]) -> Result<Vec<OutTensor>> {
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut out = Vec::new();
    for a in adapters {
        for s in &a.saved {
            if let Some(first) = seen.insert(&s.key, &a.dir) {
                return Err(Error::adapter(
                    &a.dir,
                    format!(
                        "tensor {} is also saved in {} (modules_to_save in more than one adapter cannot be combined)",
                        s.key,
                        first.display()
                    ),
                ));
            }
            out.push(raw_tensor(&a.file, a.file.get(&s.key).expect("listed"), s.key.clone())?);
        }
    }
    Ok(out)
}

/// Expert-parameter LoRAs are combined factor by factor, in the layout they are stored in, which the
/// output keeps (the first adapter's `peft_version`): refuse adapters whose PEFT releases lay them out
/// differently (PEFT < 0.19 reads a 3-D parameter's in and out the other way round, `experts::ParamLayout`).
fn check_param_layouts(adapters: &[Adapter]) -> Result<()> {
    let with_params: Vec<&Adapter> = adapters
        .iter()
        .filter(|a| {
            a.modules
                .iter()
                .any(|m| m.param.as_ref().is_some_and(|p| p.experts > 1))
        })
        .collect();
    let Some(first) = with_params.first() else {
        return Ok(());
    };
    let version = |a: &Adapter| {
        a.config
            .raw
            .get("peft_version")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if let Some(other) = with_params
        .iter()
        .find(|a| a.config.param_layout != first.config.param_layout)
    {
        return Err(Error::unsupported(
            other.weights_path(),
            format!(
                "expert LoRAs written by PEFT {} and by PEFT {} ({}) are laid out differently (PEFT < 0.19 reads a \
                 3-D parameter's in and out the other way round), so their factors cannot be combined; merge the \
                 adapters together into the base instead (lorafast merge BASE A B), which reads each as written",
                version(first).unwrap_or_else(|| "(no peft_version)".into()),
                version(other).unwrap_or_else(|| "(no peft_version)".into()),
                first.weights_path().display(),
            ),
        ));
    }
    Ok(())
}

/// Combine `adapters` into one PEFT LoRA adapter folder `out`.
pub fn combine(
    adapters: &[PathBuf],
    out: &Path,
    opts: &CombineOptions,
    progress: &dyn Progress,
) -> Result<ArithReport> {
    let started = Instant::now();
    let method = check_options(opts, adapters.len())?;
    let inputs: Vec<&Path> = adapters.iter().map(PathBuf::as_path).collect();
    let staging = Staging::new(out, &inputs, opts.overwrite)?;
    let opened: Vec<Adapter> = adapters.iter().map(|p| Adapter::open(p)).collect::<Result<_>>()?;
    for a in &opened {
        check_plain_lora(a, "combined")?;
    }
    if !opts.allow_different_bases {
        check_bases(&opened)?;
    }
    check_param_layouts(&opened)?;
    let rank = new_rank(method, &opened, opts.rank)?;
    let jobs = jobs(&opened)?;
    let mut warnings = Vec::new();
    if opts.density.is_some_and(|d| d >= 1.0) {
        warnings.push("density >= 1: nothing is pruned".into());
    }
    let modules: Vec<String> = jobs.iter().map(|j| j.module.clone()).collect();
    let config = new_config(&opened, rank, &modules, &mut warnings)?;
    let saved = saved_tensors(&opened)?;
    progress.start(
        jobs.iter()
            .map(|j| ((j.rows + j.cols) * rank * opts.dtype.size()) as u64)
            .sum(),
    );
    let pool = pool::build(opts.threads)?;
    let results: Vec<(Factors, Option<f64>)> = pool.install(|| {
        jobs.par_iter()
            .map(|job| {
                if progress.cancelled() {
                    return Err(Error::Interrupted);
                }
                let r = combine_module(job, method, opts, rank)?;
                progress.advance(&job.module, ((job.rows + job.cols) * rank * opts.dtype.size()) as u64);
                Ok(r)
            })
            .collect::<Result<_>>()
    })?;
    let (plain, params): (Vec<_>, Vec<_>) = jobs.iter().zip(results).partition(|(j, _)| j.param.is_none());
    let (mut tensors, mut reports) = lora_outputs(
        plain.into_iter().map(|(j, (f, e))| (j.module.as_str(), j.kind, f, e)),
        opts.dtype,
    );
    // Parameter LoRAs under the wrapper path PEFT gives them for the combined config (its nesting can differ
    // from an input's when the adapters targeted different parameters of one module).
    let parsed = AdapterConfig::from_value(&staging.tmp.join(CONFIG_NAME), config.clone())?;
    for (j, (f, e)) in params {
        let Some((module, p)) = &j.param else { continue };
        let targeted = targeted_params(&parsed, module);
        if !targeted.contains(&p.name) {
            return Err(Error::unsupported(
                &j.module,
                format!("the combined target_parameters ({targeted:?}) do not select this parameter"),
            ));
        }
        let wrapper = wrapper_path(module, &p.name, &targeted);
        let (n_in, n_out) = (f.a.len() / f.rank.max(1), f.b.len() / f.rank.max(1));
        let (ka, kb) = (
            format!("{KEY_PREFIX}{wrapper}.lora_A.weight"),
            format!("{KEY_PREFIX}{wrapper}.lora_B.weight"),
        );
        tensors.push(OutTensor::float(ka, opts.dtype, vec![f.rank, n_in], &f.a));
        tensors.push(OutTensor::float(kb, opts.dtype, vec![n_out, f.rank], &f.b));
        reports.push(super::ModuleReport {
            module: j.module.clone(),
            rank: f.rank / p.experts.max(1),
            energy: e,
        });
    }
    let saved_count = saved.len();
    tensors.extend(saved);
    copy_side_files(&opened[0].dir, &staging.tmp)?;
    debug_assert!(tensors.iter().all(|t| t.name.starts_with(KEY_PREFIX)));
    let output = write_adapter(staging, &config, tensors, &mut warnings)?;
    Ok(ArithReport {
        output,
        modules: reports,
        saved_tensors: saved_count,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}
