//! `lorafast extract`: a LoRA adapter whose B A approximates TUNED - BASE for each targeted weight,
//! by a truncated (randomized) SVD of the difference, with the captured energy reported per module.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::lowrank::{dense_svd, Dense, Factors, RandomizedOptions};
use super::resize::check_energy;
use super::{check_rank, lora_outputs, raw_tensor, set_ranks, tensor_seed, write_adapter, ArithReport, KEY_PREFIX};
use crate::core::checkpoint::Checkpoint;
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::io::TensorEntry;
use crate::core::layers::is_conv1d;
use crate::core::layers::{is_embedding, is_embedding_or_output, leaf, HEADS};
use crate::core::peft::LayerKind;
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

/// The modules of 2-D float weights in `base`, with the ones targeted.
fn targets(base: &Checkpoint, tuned: &Checkpoint, opts: &ExtractOptions) -> Result<(Vec<Target>, Vec<String>)> {
    let model_type = base.model_type();
    let linear: Vec<(&TensorEntry, &str)> = base
        .entries()
        .filter_map(|(_, t)| {
            let module = t.name.strip_suffix(".weight")?;
            (t.shape.len() == 2 && t.float_type().is_some()).then_some((t, module))
        })
        .collect();
    let all_modules: Vec<String> = linear.iter().map(|(_, m)| m.to_string()).collect();
    let chosen: Vec<&(&TensorEntry, &str)> = match &opts.targets {
        None => linear
            .iter()
            .filter(|(_, m)| !is_embedding_or_output(leaf(m)) && !HEADS.contains(&leaf(m)))
            .collect(),
        Some(names) => {
            for name in names {
                if !linear.iter().any(|(_, m)| matches(m, name)) {
                    return Err(Error::InvalidArgument(format!(
                        "target {name:?} matches no 2-D weight in {}",
                        base.dir.display()
                    )));
                }
            }
            linear
                .iter()
                .filter(|(_, m)| names.iter().any(|n| matches(m, n)))
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
    if out.is_empty() {
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

/// d = TUNED - BASE in f32, chunk by chunk; returns ||d||_F^2.
fn difference(base: &Checkpoint, tuned: &Checkpoint, name: &str, s: &mut Scratch) -> Result<f64> {
    let (_, eb) = base.get(name).expect("checked");
    let (_, et) = tuned.get(name).expect("checked");
    let n = eb.numel();
    s.d.resize(n, 0.0);
    let mut energy = 0f64;
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let [rb, rt] = &mut s.raw;
        let [wb, wt] = &mut s.wide;
        wb.resize(len, 0.0);
        wt.resize(len, 0.0);
        read_f32_chunk(base, eb, start, rb, &mut wb[..len])?;
        read_f32_chunk(tuned, et, start, rt, &mut wt[..len])?;
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
    let total = difference(base, tuned, &t.weight, s)?;
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
    let (targets, all_modules) = targets(&base_ck, &tuned_ck, opts)?;
    let pool = pool::build(opts.threads)?;
    progress.start(targets.iter().map(|t| (t.rows * t.cols) as u64).sum());
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

    let mut warnings = Vec::new();
    let targeted: BTreeSet<&str> = targets.iter().map(|t| t.module.as_str()).collect();
    let mut changed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in tuned_ck.tensor_names() {
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        if name.ends_with(".weight") && targeted.contains(module) {
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
            to_save.push((*module).clone());
            let prefix = format!("{module}.");
            for name in tuned_ck
                .tensor_names()
                .filter(|n| n.strip_prefix(&prefix).is_some_and(|p| !p.contains('.')))
            {
                let (shard, entry) = tuned_ck.get(name).expect("listed");
                saved.push(raw_tensor(
                    &tuned_ck.shards[shard],
                    entry,
                    format!("{KEY_PREFIX}{name}"),
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
    let saved_count = saved.len();
    tensors.extend(saved);

    // Leaf names when they pick exactly the extracted modules, else the full module names.
    let leaves: BTreeSet<&str> = targets.iter().map(|t| leaf(&t.module)).collect();
    let by_leaf = all_modules
        .iter()
        .filter(|m| leaves.contains(leaf(m)))
        .all(|m| targeted.contains(m.as_str()));
    let target_modules: Vec<&str> = if by_leaf {
        leaves.into_iter().collect()
    } else {
        targeted.iter().copied().collect()
    };
    let mut config = json!({
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
