//! `lorafast extract`: a LoRA adapter whose B A approximates TUNED - BASE for each targeted weight,
//! by a truncated (randomized) SVD of the difference, with the captured energy reported per module.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::lowrank::{dense_svd, Dense, Factors, RandomizedOptions, Svd};
use super::resize::check_energy;
use super::{
    check_rank, lora_outputs, pack_experts, raw_tensor, set_ranks, tensor_seed, write_adapter, ArithReport,
    ModuleReport, OutTensor, KEY_PREFIX,
};
use crate::core::checkpoint::Checkpoint;
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::experts::{self, targeted_params, wrapper_path, ExpertParam, Landing, ParamLayout};
use crate::core::io::TensorEntry;
use crate::core::layers::is_conv1d;
use crate::core::layers::{is_embedding, is_embedding_or_output, leaf, HEADS};
use crate::core::peft::{AdapterConfig, LayerKind, CONFIG_NAME};
use crate::core::pool;
use crate::core::progress::Progress;
use crate::core::staging::Staging;

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Rank of every module (the cap when `energy` is given).
    pub rank: usize,
    /// Per module, the fewest components holding this share of the difference's energy.
    pub energy: Option<f64>,
    /// Module names (or name suffixes, as PEFT's target_modules); None: every linear layer except heads.
    pub targets: Option<Vec<String>>,
    /// Carry other tensors that differ (norms, heads) into `modules_to_save`.
    pub modules_to_save: bool,
    pub dtype: FloatType,
    pub svd: RandomizedOptions,
    pub threads: Option<usize>,
    pub overwrite: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: 16,
            energy: None,
            targets: None,
            modules_to_save: false,
            dtype: FloatType::F32,
            svd: RandomizedOptions::default(),
            threads: None,
            overwrite: false,
        }
    }
}

struct Target {
    module: String,
    weight: String,
    conv1d: bool,
    /// LoRA layout (out, in).
    rows: usize,
    cols: usize,
}

fn matches(module: &str, name: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

/// The modules of 2-D float weights in `base`, with the ones targeted. Expert weights (`experts`: the
/// tensors the fused parameters cover) are not modules in memory; MoE routers (`routers`) are not
/// `nn.Linear`: neither is a LoRA module.
fn targets(
    base: &Checkpoint,
    tuned: &Checkpoint,
    opts: &ExtractOptions,
    (experts, routers, params): (&BTreeSet<String>, &BTreeSet<String>, &[ExpertTarget]),
) -> Result<(Vec<Target>, Vec<String>)> {
    let model_type = base.model_type();
    let linear: Vec<(&TensorEntry, &str)> = base
        .entries()
        .filter_map(|(_, t)| {
            let module = t.name.strip_suffix(".weight")?;
            (t.shape.len() == 2 && t.float_type().is_some() && !experts.contains(&t.name)).then_some((t, module))
        })
        .collect();
    let all_modules: Vec<String> = linear.iter().map(|(_, m)| m.to_string()).collect();
    let remapped = experts::peft_remapped_leaves(model_type);
    // Routers are not nn.Linear; PEFT would rename a LoRA on a remapped leaf into an expert parameter.
    let is_router = |m: &str| routers.contains(m) || routers.contains(&experts::memory_module(model_type, m));
    let not_lora = |m: &str| is_router(m) || remapped.contains(&leaf(m));
    let chosen: Vec<&(&TensorEntry, &str)> = match &opts.targets {
        None => linear
            .iter()
            .filter(|(_, m)| !is_embedding_or_output(leaf(m)) && !HEADS.contains(&leaf(m)) && !not_lora(m))
            .collect(),
        Some(names) => {
            for name in names {
                let param = params.iter().any(|p| matches(&p.key(), name));
                let hits: Vec<&str> = linear.iter().map(|(_, m)| *m).filter(|m| matches(m, name)).collect();
                if !param && hits.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "target {name:?} matches no 2-D weight in {}",
                        base.dir.display()
                    )));
                }
                // A target that names a router or a remapped leaf: refused, never dropped without a word
                // (a longer name picks the other modules it matches).
                if let Some(first) = hits.iter().find(|m| not_lora(m)) {
                    let why = if is_router(first) {
                        "an MoE router, which transformers 5 builds as a parameter, not an nn.Linear, so PEFT cannot \
                         put a LoRA on it"
                    } else {
                        "a module PEFT renames into an expert parameter when it loads an adapter for this model type \
                         (transformers_weight_conversion), so a LoRA on it would not load"
                    };
                    return Err(Error::InvalidArgument(format!(
                        "target {name:?} matches {first}, {why}; leave it out of --targets and pass \
                         --modules-to-save to carry its change in full"
                    )));
                }
            }
            linear
                .iter()
                .filter(|(_, m)| names.iter().any(|n| matches(m, n)) && !not_lora(m))
                .collect()
        }
    };
    let mut out = Vec::new();
    for (t, module) in chosen {
        if is_embedding(leaf(module)) {
            return Err(Error::unsupported(
                &base.dir,
                format!("module {module}: extract makes LoRA for linear layers; an embedding goes to modules_to_save"),
            ));
        }
        let Some((_, tt)) = tuned.get(&t.name) else {
            return Err(Error::shape(
                *module,
                format!("{} has no tensor {}", tuned.dir.display(), t.name),
            ));
        };
        if tt.shape != t.shape {
            return Err(Error::shape(
                *module,
                format!(
                    "{} is {:?} in {} but {:?} in {}",
                    t.name,
                    t.shape,
                    base.dir.display(),
                    tt.shape,
                    tuned.dir.display()
                ),
            ));
        }
        let conv1d = is_conv1d(model_type, module);
        let (rows, cols) = if conv1d {
            (t.shape[1], t.shape[0])
        } else {
            (t.shape[0], t.shape[1])
        };
        check_rank(module, opts.rank, rows, cols)?;
        out.push(Target {
            module: module.to_string(),
            weight: t.name.clone(),
            conv1d,
            rows,
            cols,
        });
    }
    if out.is_empty() && params.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no linear layer to extract in {}",
            base.dir.display()
        )));
    }
    Ok((out, all_modules))
}

/// Per-thread buffers, reused from module to module: fresh 100 MB allocations per weight would cost
/// more in page faults than the SVD itself.
#[derive(Default)]
struct Scratch {
    d: Vec<f32>,
    transposed: Vec<f32>,
    raw: [Vec<u16>; 2],
    wide: [Vec<f32>; 2],
}

const CHUNK: usize = 1 << 18;

/// Read `count` values of `entry` from `start` as f32 into `out`.
fn read_f32_chunk(
    ck: &Checkpoint,
    entry: &TensorEntry,
    start: usize,
    raw: &mut Vec<u16>,
    out: &mut [f32],
) -> Result<()> {
    let (shard, _) = ck.get(&entry.name).expect("checked");
    let ft = entry.float_type().expect("float weights only");
    let size = ft.size();
    raw.resize(out.len() * size / 2, 0);
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(raw.as_mut_slice());
    ck.shards[shard].read_bytes(entry, (start * size) as u64, bytes)?;
    match ft {
        FloatType::F32 => ft.decode(bytes, out),
        _ => ft.decode_u16(raw, out),
    }
    Ok(())
}

/// d = TUNED - BASE in f32 for the `n` elements from `from`, chunk by chunk; returns ||d||_F^2.
fn difference(
    base: &Checkpoint,
    tuned: &Checkpoint,
    name: &str,
    from: usize,
    n: usize,
    s: &mut Scratch,
) -> Result<f64> {
    let (_, eb) = base.get(name).expect("checked");
    let (_, et) = tuned.get(name).expect("checked");
    s.d.resize(n, 0.0);
    let mut energy = 0f64;
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let [rb, rt] = &mut s.raw;
        let [wb, wt] = &mut s.wide;
        wb.resize(len, 0.0);
        wt.resize(len, 0.0);
        read_f32_chunk(base, eb, from + start, rb, &mut wb[..len])?;
        read_f32_chunk(tuned, et, from + start, rt, &mut wt[..len])?;
        let out = &mut s.d[start..start + len];
        for ((o, t), b) in out.iter_mut().zip(&wt[..len]).zip(&wb[..len]) {
            *o = t - b;
        }
        energy += sum_squares(out);
    }
    Ok(energy)
}

/// Sum of squares in f64 with eight independent accumulators (one serial chain would be latency-bound).
fn sum_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|v| (*v as f64) * (*v as f64)).sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += (*v as f64) * (*v as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

fn extract_module(
    base: &Checkpoint,
    tuned: &Checkpoint,
    t: &Target,
    opts: &ExtractOptions,
    s: &mut Scratch,
) -> Result<(Factors, f64)> {
    let n = base.get(&t.weight).expect("checked").1.numel();
    let total = difference(base, tuned, &t.weight, 0, n, s)?;
    let d = if t.conv1d {
        // Conv1D stores (in, out); LoRA works on (out, in).
        s.transposed.resize(s.d.len(), 0.0);
        for i in 0..t.cols {
            for j in 0..t.rows {
                s.transposed[j * t.cols + i] = s.d[i * t.rows + j];
            }
        }
        &s.transposed
    } else {
        &s.d
    };
    if !total.is_finite() {
        let i = d.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::NonFinite {
            tensor: t.weight.clone(),
            reason: format!("the difference is not finite at element {i}"),
        });
    }
    if total == 0.0 {
        let k = 1;
        return Ok((
            Factors {
                b: vec![0.0; t.rows * k],
                a: vec![0.0; k * t.cols],
                rank: k,
            },
            1.0,
        ));
    }
    let seed = tensor_seed(0, &t.module, "extract", 0);
    let dense = Dense {
        values: d,
        rows: t.rows,
        cols: t.cols,
        total_energy: total,
    };
    let svd = dense_svd(dense, opts.rank, &opts.svd, seed, &t.module)?;
    let k = match opts.energy {
        Some(share) => svd.rank_for_energy(share, opts.rank),
        None => opts.rank,
    };
    Ok((svd.factors(k, k), svd.energy(k)))
}

/// True when the tensor differs between the two checkpoints (shape, dtype or any byte).
fn differs(base: &Checkpoint, tuned: &Checkpoint, name: &str) -> Result<bool> {
    let (ts, tt) = tuned.get(name).expect("listed");
    let Some((bs, bt)) = base.get(name) else {
        return Ok(true);
    };
    if bt.shape != tt.shape || bt.dtype != tt.dtype {
        return Ok(true);
    }
    const CHUNK: u64 = 8 << 20;
    let mut x = vec![0u8; CHUNK.min(tt.len) as usize];
    let mut y = x.clone();
    let mut at = 0;
    while at < tt.len {
        let n = CHUNK.min(tt.len - at) as usize;
        base.shards[bs].read_bytes(bt, at, &mut x[..n])?;
        tuned.shards[ts].read_bytes(tt, at, &mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(true);
        }
        at += n as u64;
    }
    Ok(false)
}

fn task_type(ck: &Checkpoint) -> Value {
    let arch = ck.architecture().unwrap_or("");
    let task = [
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ]
    .iter()
    .find(|(suffix, _)| arch.ends_with(suffix));
    task.map_or(Value::Null, |(_, t)| Value::from(*t))
}

/// Extract a LoRA adapter from the checkpoint folders `base` and `tuned` into `out`.
pub fn extract(
    base: &Path,
    tuned: &Path,
    out: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ArithReport> {
    let started = Instant::now();
    if opts.rank == 0 {
        return Err(Error::InvalidArgument("rank must be at least 1".into()));
    }
    check_energy(opts.energy)?;
    let staging = Staging::new(out, &[base, tuned], opts.overwrite)?;
    let base_ck = Checkpoint::open(base)?;
    let tuned_ck = Checkpoint::open(tuned)?;
    let (params, expert_tensors, routers) = expert_targets(&base_ck, &tuned_ck, opts)?;
    let (targets, all_modules) = targets(&base_ck, &tuned_ck, opts, (&expert_tensors, &routers, &params))?;
    let pool = pool::build(opts.threads)?;
    let expert_size = |t: &ExpertTarget| (t.rows * t.cols) as u64;
    progress.start(
        targets.iter().map(|t| (t.rows * t.cols) as u64).sum::<u64>()
            + params
                .iter()
                .map(|t| expert_size(t) * t.param.experts as u64)
                .sum::<u64>(),
    );
    let results: Vec<(Factors, f64)> = pool.install(|| {
        targets
            .par_iter()
            .map_init(Scratch::default, |scratch, t| {
                if progress.cancelled() {
                    return Err(Error::Interrupted);
                }
                let r = extract_module(&base_ck, &tuned_ck, t, opts, scratch)?;
                progress.advance(&t.module, (t.rows * t.cols) as u64);
                Ok(r)
            })
            .collect::<Result<_>>()
    })?;
    // Expert by expert: each its own SVD, as an ordinary module would get.
    let jobs: Vec<(usize, usize)> = params
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (0..t.param.experts).map(move |e| (i, e)))
        .collect();
    let expert_svds: Vec<Option<Svd>> = pool.install(|| {
        jobs.par_iter()
            .map_init(Scratch::default, |scratch, &(i, e)| {
                if progress.cancelled() {
                    return Err(Error::Interrupted);
                }
                let t = &params[i];
                let r = extract_expert(&base_ck, &tuned_ck, t, e, opts, scratch)?;
                progress.advance(&t.key(), expert_size(t));
                Ok(r)
            })
            .collect::<Result<_>>()
    })?;

    let mut warnings = Vec::new();
    let targeted: BTreeSet<&str> = targets.iter().map(|t| t.module.as_str()).collect();
    let mut changed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in tuned_ck.tensor_names() {
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        if (name.ends_with(".weight") && targeted.contains(module)) || expert_tensors.contains(name) {
            continue;
        }
        if differs(&base_ck, &tuned_ck, name)? {
            changed.entry(module.to_string()).or_default().push(name.to_string());
        }
    }
    let mut saved = Vec::new();
    let mut to_save = Vec::new();
    if let Some((module, names)) = changed.iter().find(|(m, _)| targeted.contains(m.as_str())) {
        warnings.push(format!(
            "{} of a targeted module ({module}) changed; a LoRA cannot carry it",
            names[0]
        ));
    }
    let carried: Vec<(&String, &Vec<String>)> =
        changed.iter().filter(|(m, _)| !targeted.contains(m.as_str())).collect();
    if opts.modules_to_save {
        for (module, _) in &carried {
            // PEFT names it as the module is named in memory (Mixtral's router: `mlp.gate`, not the
            // checkpoint's `block_sparse_moe.gate`).
            let in_memory = experts::memory_module(base_ck.model_type(), module);
            to_save.push(in_memory.clone());
            let prefix = format!("{module}.");
            for (name, param) in tuned_ck
                .tensor_names()
                .filter_map(|n| n.strip_prefix(&prefix).filter(|p| !p.contains('.')).map(|p| (n, p)))
            {
                let (shard, entry) = tuned_ck.get(name).expect("listed");
                saved.push(raw_tensor(
                    &tuned_ck.shards[shard],
                    entry,
                    format!("{KEY_PREFIX}{in_memory}.{param}"),
                )?);
            }
        }
    } else if let Some((_, names)) = carried.first() {
        warnings.push(format!(
            "{} other module(s) differ between the checkpoints (first: {}); pass --modules-to-save to carry them",
            carried.len(),
            names[0]
        ));
    }

    let (mut tensors, reports) = lora_outputs(
        targets
            .iter()
            .zip(results)
            .map(|(t, (f, e))| (t.module.as_str(), LayerKind::Linear, f, Some(e))),
        opts.dtype,
    );
    // Parameter LoRAs under the wrapper path PEFT gives them (`base_layer` nesting when a module has two).
    let mut param_names: Vec<String> = Vec::new();
    let mut reports = reports;
    if !params.is_empty() {
        // The shortest target that picks exactly these parameters: `mlp.experts.gate_up_proj` style.
        let short = |t: &ExpertTarget| {
            let parts: Vec<&str> = t.module.rsplit('.').take(2).collect();
            format!("{}.{}.{}", parts.get(1).copied().unwrap_or(""), parts[0], t.param.name)
                .trim_start_matches('.')
                .to_string()
        };
        let shorts: BTreeSet<String> = params.iter().map(short).collect();
        param_names = if opts.targets.is_none() {
            shorts.into_iter().collect()
        } else {
            params.iter().map(ExpertTarget::key).collect()
        };
    }
    let parsed = AdapterConfig::from_value(
        Path::new(CONFIG_NAME),
        json!({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_parameters": param_names}),
    )?;
    let mut svds = expert_svds.into_iter();
    for t in &params {
        let mine: Vec<Option<Svd>> = svds.by_ref().take(t.param.experts).collect();
        let (f, energy, k) = pack_parameter(t, &mine, opts);
        let wrapper = wrapper_path(&t.module, &t.param.name, &targeted_params(&parsed, &t.module));
        tensors.push(OutTensor::float(
            format!("{KEY_PREFIX}{wrapper}.lora_A.weight"),
            opts.dtype,
            vec![f.rank, t.cols],
            &f.a,
        ));
        tensors.push(OutTensor::float(
            format!("{KEY_PREFIX}{wrapper}.lora_B.weight"),
            opts.dtype,
            vec![t.rows, f.rank],
            &f.b,
        ));
        reports.push(ModuleReport {
            module: t.key(),
            rank: k,
            energy: Some(energy),
        });
    }
    let saved_count = saved.len();
    tensors.extend(saved);

    // Leaf names when they pick exactly the extracted modules, else the full module names.
    let leaves: BTreeSet<&str> = targets.iter().map(|t| leaf(&t.module)).collect();
    // A leaf PEFT's MoE conversion would map onto expert parameters is written in full.
    let converted = experts::peft_converted_leaves(base_ck.model_type());
    let by_leaf = !leaves.iter().any(|l| converted.contains(l))
        && all_modules
            .iter()
            .filter(|m| leaves.contains(leaf(m)))
            .all(|m| targeted.contains(m.as_str()));
    let target_modules: Vec<&str> = if by_leaf {
        leaves.into_iter().collect()
    } else {
        targeted.iter().copied().collect()
    };
    let mut config = json!({
        // PEFT records the release that wrote an adapter (from 0.18); readers need it to tell the expert
        // layouts of PEFT < 0.19 and >= 0.19 apart. lorafast writes the layout of the release it is tested on.
        "peft_version": PEFT_LAYOUT_VERSION,
        "peft_type": "LORA",
        "task_type": task_type(&base_ck),
        "base_model_name_or_path": base.to_string_lossy(),
        "target_modules": target_modules,
        "modules_to_save": if to_save.is_empty() { Value::Null } else { Value::from(to_save) },
        "fan_in_fan_out": targets.iter().any(|t| t.conv1d),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "exclude_modules": null,
    });
    if !param_names.is_empty() {
        config["target_parameters"] = Value::from(param_names);
    }
    let ranks: Vec<(String, usize)> = reports.iter().map(|r| (r.module.clone(), r.rank)).collect();
    set_ranks(&mut config, &ranks);
    let output = write_adapter(staging, &config, tensors, &mut warnings)?;
    Ok(ArithReport {
        output,
        modules: reports,
        saved_tensors: saved_count,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// The PEFT release whose adapter layout `extract` writes (the one the tests load its output with).
pub const PEFT_LAYOUT_VERSION: &str = "0.21.2";

/// A fused expert parameter to extract as a `target_parameters` LoRA: each expert's delta as PEFT's
/// `ParamWrapper` sees it (`[out, in]`, `rows` x `cols`), assembled from the tensors in `landings`.
struct ExpertTarget {
    /// The experts module's path in memory (Mixtral: `mlp`, not `block_sparse_moe`).
    module: String,
    param: ExpertParam,
    rows: usize,
    cols: usize,
    landings: Vec<Landing>,
}

impl ExpertTarget {
    fn key(&self) -> String {
        format!("{}.{}", self.module, self.param.name)
    }
}

/// `m.{e}.{leaf}.weight` with `m` an experts module: (m, e, leaf).
fn per_expert_weight(name: &str) -> Option<(&str, usize, &str)> {
    let module = name.strip_suffix(".weight")?;
    let (rest, leaf) = module.rsplit_once('.')?;
    let (m, e) = rest.rsplit_once('.')?;
    let e: usize = e.parse().ok()?;
    (m == "experts" || m.ends_with(".experts")).then_some((m, e, leaf))
}

/// `m.param` with `m` an experts module: (m, param).
fn fused_tensor(name: &str) -> Option<(&str, &str)> {
    let (m, param) = name.rsplit_once('.')?;
    (m == "experts" || m.ends_with(".experts")).then_some((m, param))
}

/// The fused expert parameters of an MoE checkpoint pair (empty for other models), the stored tensors
/// they cover, and the router modules (not `nn.Linear` in transformers 5, so never a LoRA target).
fn expert_targets(
    base: &Checkpoint,
    tuned: &Checkpoint,
    opts: &ExtractOptions,
) -> Result<(Vec<ExpertTarget>, BTreeSet<String>, BTreeSet<String>)> {
    let model_type = base.model_type();
    let known = experts::transposed(model_type).is_some();
    // (disk module, param) -> (expert count, names in split order, in, out)
    let mut found: BTreeMap<(String, &'static str), (usize, usize, usize)> = BTreeMap::new();
    let mut covered = BTreeSet::new();
    for (_, t) in base.entries() {
        if t.float_type().is_none() {
            continue;
        }
        if let Some((m, e, leaf)) = per_expert_weight(&t.name).filter(|_| known && t.shape.len() == 2) {
            let Some((param, names)) = experts::fused_param(leaf) else {
                return Err(Error::unsupported(
                    &t.name,
                    format!(
                        "unknown expert layout: {leaf} is not a per-expert weight lorafast knows for model_type \
                         {model_type:?} (gate_proj/up_proj/down_proj, w1/w3/w2)"
                    ),
                ));
            };
            covered.insert(t.name.clone());
            let (i, h) = (t.shape[0], t.shape[1]);
            let (n_in, n_out) = if param == "down_proj" {
                (h, i)
            } else {
                (h, i * names.len())
            };
            let slot = found.entry((m.to_string(), param)).or_insert((0, n_in, n_out));
            slot.0 = slot.0.max(e + 1);
            continue;
        }
        let Some((m, param)) = fused_tensor(&t.name).filter(|_| t.shape.len() >= 2) else {
            continue;
        };
        if param.ends_with("_bias") {
            covered.insert(t.name.clone());
            if tuned.get(&t.name).is_some() && differs(base, tuned, &t.name)? {
                return Err(Error::unsupported(
                    &t.name,
                    "the expert bias changed; a target_parameters LoRA cannot carry it (extract the weights of a \
                     model whose expert biases are unchanged)",
                ));
            }
            continue;
        }
        if t.shape.len() != 3 {
            continue;
        }
        let (param, transposed) = match (param, experts::transposed(model_type)) {
            ("gate_up_proj", Some(tr)) => ("gate_up_proj", tr),
            ("down_proj", Some(tr)) => ("down_proj", tr),
            _ => {
                return Err(Error::unsupported(
                    &t.name,
                    format!(
                        "unknown expert layout: a {:?} expert tensor {param} for model_type {model_type:?} \
                         (lorafast knows gate_up_proj and down_proj of {})",
                        t.shape, "qwen2/3-moe, mixtral, gpt_oss and the other transformers-5 experts modules"
                    ),
                ))
            }
        };
        covered.insert(t.name.clone());
        let (n_in, n_out) = if transposed {
            (t.shape[1], t.shape[2])
        } else {
            (t.shape[2], t.shape[1])
        };
        found.insert((m.to_string(), param), (t.shape[0], n_in, n_out));
    }
    // Per-expert weights of the tuned checkpoint beyond the base's experts.
    for name in tuned.tensor_names() {
        if let Some((m, e, leaf)) = per_expert_weight(name).filter(|_| known) {
            if let Some((param, _)) = experts::fused_param(leaf) {
                if let Some((count, _, _)) = found.get(&(m.to_string(), param)) {
                    if e >= *count {
                        return Err(Error::shape(
                            name,
                            format!(
                                "{} has expert tensor {name} but {} has {count} experts in {m}",
                                tuned.dir.display(),
                                base.dir.display()
                            ),
                        ));
                    }
                }
            }
        }
    }
    let find_in = |ck: &Checkpoint, n: &str| ck.get(n).map(|(_, t)| (t.name.clone(), t.shape.clone()));
    let mut out = Vec::new();
    let mut routers = BTreeSet::new();
    for ((disk, param), (count, n_in, n_out)) in found {
        let module = experts::memory_module(model_type, &disk);
        let p = ExpertParam {
            name: param.to_string(),
            experts: count,
        };
        let key = format!("{module}.{param}");
        // The routers beside the experts, whether or not the experts are targeted.
        if let Some(parent) = disk.strip_suffix(".experts") {
            for r in ["gate", "router"] {
                routers.insert(format!("{parent}.{r}"));
            }
        }
        if let Some(names) = &opts.targets {
            if !names.iter().any(|n| matches(&key, n)) {
                continue;
            }
        }
        let find_base = |n: &str| find_in(base, n);
        let landings = experts::locate(model_type, &module, &p, (n_in, n_out), ParamLayout::Swapped, &find_base)?;
        for (name, _, _) in &landings {
            let (_, bt) = base.get(name).expect("located");
            let Some((_, tt)) = tuned.get(name) else {
                return Err(Error::shape(
                    &key,
                    format!("{} has no tensor {name}", tuned.dir.display()),
                ));
            };
            if tt.shape != bt.shape {
                return Err(Error::shape(
                    &key,
                    format!(
                        "{name} is {:?} in {} but {:?} in {} (a different expert count or size)",
                        bt.shape,
                        base.dir.display(),
                        tt.shape,
                        tuned.dir.display()
                    ),
                ));
            }
        }
        check_rank(&key, opts.rank, n_out, n_in)?;
        out.push(ExpertTarget {
            module,
            param: p,
            rows: n_out,
            cols: n_in,
            landings,
        });
    }
    Ok((out, covered, routers))
}

/// Expert `e`'s delta `[out, in]` (PEFT's orientation) into `delta`; returns its squared norm.
fn expert_delta(
    base: &Checkpoint,
    tuned: &Checkpoint,
    t: &ExpertTarget,
    e: usize,
    s: &mut Scratch,
    delta: &mut Vec<f32>,
) -> Result<f64> {
    let (rows, cols) = (t.rows, t.cols);
    delta.clear();
    delta.resize(rows * cols, 0.0);
    for (name, transposed, slice) in &t.landings {
        match slice.expert {
            Some(x) if x != e => continue,
            Some(_) => {
                let (_, entry) = base.get(name).expect("located");
                difference(base, tuned, name, 0, entry.numel(), s)?;
                delta[slice.rows.start * cols..slice.rows.end * cols].copy_from_slice(&s.d);
            }
            None => {
                let n = rows * cols;
                difference(base, tuned, name, e * n, n, s)?;
                if *transposed {
                    // Stored [in, out]: PEFT's delta is its transpose.
                    for i in 0..cols {
                        for j in 0..rows {
                            delta[j * cols + i] = s.d[i * rows + j];
                        }
                    }
                } else {
                    delta.copy_from_slice(&s.d);
                }
            }
        }
    }
    Ok(sum_squares(delta))
}

/// One expert's truncated SVD (None: its delta is zero).
fn extract_expert(
    base: &Checkpoint,
    tuned: &Checkpoint,
    t: &ExpertTarget,
    e: usize,
    opts: &ExtractOptions,
    s: &mut Scratch,
) -> Result<Option<Svd>> {
    let mut delta = std::mem::take(&mut s.transposed);
    let total = expert_delta(base, tuned, t, e, s, &mut delta)?;
    let key = t.key();
    let result = if !total.is_finite() {
        let i = delta.iter().position(|v| !v.is_finite()).unwrap_or(0);
        Err(Error::NonFinite {
            tensor: format!("{key} (expert {e})"),
            reason: format!("the difference is not finite at element {i}"),
        })
    } else if total == 0.0 {
        Ok(None)
    } else {
        let dense = Dense {
            values: &delta,
            rows: t.rows,
            cols: t.cols,
            total_energy: total,
        };
        let seed = tensor_seed(0, &key, "extract", e);
        dense_svd(dense, opts.rank, &opts.svd, seed, &key).map(Some)
    };
    s.transposed = delta;
    result
}

/// Every expert's factors at the parameter's one rank (the largest any expert needs under `energy`),
/// packed into PEFT's layout, and the smallest energy share kept over the experts.
fn pack_parameter(t: &ExpertTarget, svds: &[Option<Svd>], opts: &ExtractOptions) -> (Factors, f64, usize) {
    let k = svds
        .iter()
        .flatten()
        .map(|svd| match opts.energy {
            Some(share) => svd.rank_for_energy(share, opts.rank),
            None => opts.rank,
        })
        .max()
        .unwrap_or(1);
    let per_expert: Vec<Factors> = svds
        .iter()
        .map(|svd| match svd {
            Some(svd) => svd.factors(k, k),
            None => Factors {
                b: vec![0.0; t.rows * k],
                a: vec![0.0; k * t.cols],
                rank: k,
            },
        })
        .collect();
    let energy = svds
        .iter()
        .map(|svd| svd.as_ref().map_or(1.0, |svd| svd.energy(k)))
        .fold(1.0f64, f64::min);
    (pack_experts(&per_expert), energy, k)
}
