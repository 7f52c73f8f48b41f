//! The output, planned whole before any arithmetic: every output tensor, where its values come from,
//! the merge steps applied to them, and how they are written (copied, rounded to a float type, or
//! quantized to 4 bits).
use std::collections::BTreeSet;

use safetensors::Dtype;

use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::experts::ExpertSlice;
use crate::core::io::PlannedTensor;
use crate::core::peft::{Adapter, LayerKind};
use crate::core::quant::checkpoint::{quantize_targets, quantized_names};
use crate::core::quant::nested::NESTED_BLOCKSIZE;
use crate::core::quant::state::quant_state_json;
use crate::core::quant::{Absmax, QuantizeOptions, Quantized};

use super::config::{output_config, HEAD_TASKS};
use super::resolve::{resolve, Contribution, Resolution};
use super::source::Base;
use super::{MergeOptions, Mode};

/// Where a delta lands in the stored weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// W (out, in) += B @ A: nn.Linear, and an lm_head LoRA on a tied embedding.
    Rows,
    /// W (in, out) += (B @ A)^T: GPT-2 Conv1D, and embeddings ((vocab, dim) += (B_emb @ A_emb)^T).
    Transposed,
}

#[derive(Debug, Clone)]
pub struct Part {
    pub adapter: usize,
    pub a: String,
    pub b: String,
    /// A is multiplied by `weight` and then by `scaling`, two f32 roundings as PEFT's `cat` does.
    pub pre_scale: Option<(f32, f32)>,
    /// A LoRA on fused expert parameters: the experts and delta rows this tensor holds.
    pub expert: Option<ExpertSlice>,
}

#[derive(Debug, Clone)]
pub enum Step {
    /// W = round(W + post_scale * sum_parts B (pre_scale A)), one rounding; embeddings round the delta
    /// first (PEFT adds `delta.to(W.dtype)` there); DoRA rescales rows/columns by m / ||W + delta||.
    Lora {
        layout: Layout,
        parts: Vec<Part>,
        post_scale: f32,
        round_delta_first: bool,
        magnitude: Option<(usize, String)>,
    },
    /// b = round(b + coeff * v): `lora_B.bias`.
    AddVector { adapter: usize, key: String, coeff: f32 },
}

/// Where a job's values come from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A base tensor as stored (float values, or bytes to copy).
    Base { shard: usize, name: String },
    /// A base 4-bit weight, dequantized.
    FourBit { weight: String },
    /// A tensor an adapter saved in full.
    Adapter { adapter: usize, key: String },
}

/// How a 4-bit output weight is quantized.
#[derive(Debug, Clone, Copy)]
pub struct FourBit {
    pub quant: QuantizeOptions,
    /// Values are rounded to this type before quantizing, and the quant state records it.
    pub state_dtype: FloatType,
    /// Quantize the transpose (GPT-2 Conv1D, as transformers does).
    pub transposed: bool,
}

/// How a job's output is written.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    /// The source's bytes, unchanged.
    Copy,
    /// The values rounded to this float type (also the type merge arithmetic rounds to).
    Float(FloatType),
    FourBit(FourBit),
}

#[derive(Debug, Clone)]
pub struct Job {
    pub out_shard: usize,
    pub out_name: String,
    pub origin: Origin,
    /// The shape the model sees (for a 4-bit weight: its logical shape, not the packed one).
    pub shape: Vec<usize>,
    pub steps: Vec<Step>,
    pub output: Output,
    pub replaced: bool,
    pub added: bool,
}

impl Job {
    /// The type arithmetic rounds to: the output's float type, or a 4-bit output's state dtype.
    pub fn work_type(&self) -> Option<FloatType> {
        match self.output {
            Output::Copy => None,
            Output::Float(t) => Some(t),
            Output::FourBit(q) => Some(q.state_dtype),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The output tensors this job writes. A double-quantized weight's quant state has a length known
    /// only once its absmax is (`json_len` None).
    pub fn planned(&self, copy_dtype: Dtype) -> Vec<(PlannedTensor, bool)> {
        let tensor = |name: String, dtype: Dtype, shape: Vec<usize>| PlannedTensor { name, dtype, shape };
        match self.output {
            Output::Copy => vec![(tensor(self.out_name.clone(), copy_dtype, self.shape.clone()), true)],
            Output::Float(t) => vec![(
                tensor(self.out_name.clone(), t.to_safetensors(), self.shape.clone()),
                true,
            )],
            Output::FourBit(q) => {
                let n = self.numel();
                let nb = n.div_ceil(q.quant.blocksize);
                let dq = q.quant.double_quant;
                let names = quantized_names(&self.out_name, q.quant.quant_type, dq);
                let mut shapes = vec![
                    (Dtype::U8, vec![n.div_ceil(2), 1]),
                    (if dq { Dtype::U8 } else { Dtype::F32 }, vec![nb]),
                    (Dtype::F32, vec![16]),
                ];
                if dq {
                    shapes.push((Dtype::F32, vec![nb.div_ceil(NESTED_BLOCKSIZE)]));
                    shapes.push((Dtype::F32, vec![256]));
                }
                let json = (!dq).then(|| self.state_json(q, None).len());
                shapes.push((Dtype::U8, vec![json.unwrap_or(0)]));
                let last = shapes.len() - 1;
                names
                    .into_iter()
                    .zip(shapes)
                    .enumerate()
                    .map(|(i, (name, (dtype, shape)))| (tensor(name, dtype, shape), i != last || !dq))
                    .collect()
            }
        }
    }

    /// The quant-state JSON of a 4-bit output (`absmax` given for double quantization).
    pub fn state_json(&self, q: FourBit, absmax: Option<&Absmax>) -> String {
        let shape = if q.transposed {
            vec![self.shape[1], self.shape[0]]
        } else {
            self.shape.clone()
        };
        let absmax = absmax.cloned().unwrap_or(Absmax::Plain(vec![]));
        let state = Quantized { packed: vec![], absmax };
        quant_state_json(&state, q.quant.quant_type, q.quant.blocksize, q.state_dtype, &shape)
    }
}

pub struct Plan {
    pub jobs: Vec<Job>,
    pub config: Option<serde_json::Value>,
    pub warnings: Vec<String>,
}

/// Plan the merge of `adapters` (possibly none: plain quantization or dequantization) into `base`.
pub fn plan(base: &Base, adapters: &[Adapter], opts: &MergeOptions) -> Result<Plan> {
    let weights = adapter_weights(adapters.len(), opts.weights.as_deref())?;
    match (&opts.mode, base.is_quantized()) {
        (Mode::Requantize, false) => {
            return Err(Error::InvalidArgument(format!(
                "{}: requantize needs a 4-bit (bitsandbytes) base checkpoint",
                base.ck.dir.display()
            )))
        }
        (Mode::Quantize(_), true) if !adapters.is_empty() => {
            return Err(Error::InvalidArgument(format!(
                "{}: already 4-bit; merge into it with --requantize (or to a float checkpoint)",
                base.ck.dir.display()
            )))
        }
        _ => {}
    }
    let mut res = resolve(base, adapters, &weights)?;
    let mut jobs = base_jobs(base, adapters, &weights, opts, &mut res)?;
    let last = base.ck.shards.len() - 1;
    for (param, ai, key) in std::mem::take(&mut res.added) {
        let st = adapters[ai].file.get(&key).expect("listed");
        let work = st
            .float_type()
            .map(|t| opts.dtype.unwrap_or(base_float(base).unwrap_or(t)));
        jobs.push(Job {
            out_shard: last,
            out_name: param,
            origin: Origin::Adapter { adapter: ai, key },
            shape: st.shape.clone(),
            steps: vec![],
            output: work.map_or(Output::Copy, Output::Float),
            replaced: false,
            added: true,
        });
    }
    let quantize = match &opts.mode {
        Mode::Quantize(q) => Some(q),
        _ => None,
    };
    if let Some(q) = quantize {
        quantize_outputs(base, q, &mut jobs)?;
    }
    let config = output_config(base, adapters, &res, &jobs, opts);
    Ok(Plan {
        jobs,
        config,
        warnings: res.warnings,
    })
}

fn adapter_weights(n: usize, given: Option<&[f32]>) -> Result<Vec<f32>> {
    let weights = match given {
        None => vec![1.0f32; n],
        Some(w) if w.len() == n => w.to_vec(),
        Some(w) => {
            return Err(Error::InvalidArgument(format!(
                "{} weights given for {n} adapter(s); give one weight per adapter",
                w.len()
            )))
        }
    };
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "adapter weight {w} is not a finite number"
        )));
    }
    Ok(weights)
}

/// One job per base tensor (a 4-bit weight with its auxiliary tensors counting as one), in file order.
fn base_jobs(
    base: &Base,
    adapters: &[Adapter],
    weights: &[f32],
    opts: &MergeOptions,
    res: &mut Resolution,
) -> Result<Vec<Job>> {
    let task = adapters.iter().find_map(|a| a.config.task_type.as_deref());
    let head_task = HEAD_TASKS
        .iter()
        .find(|(t, _)| Some(*t) == task)
        .filter(|_| !res.added.is_empty());
    let rename = |k: &str| -> String {
        match (&res.prefix, head_task) {
            (Some(p), Some(_)) if !k.starts_with(&format!("{p}.")) => format!("{p}.{k}"),
            _ => k.to_string(),
        }
    };
    let is_lm_head = |k: &str| k.starts_with("lm_head.") || k.starts_with("cls.") || k.starts_with("embed_out.");
    let requantize = matches!(opts.mode, Mode::Requantize);
    let mut jobs = Vec::new();
    // 4-bit weights copied as they are, with their auxiliary tensors (which may come first in the file).
    let untouched = |w: &str| !res.contributions.contains_key(w) && !res.replacements.contains_key(w);
    let copied_4bit: BTreeSet<&str> = base
        .quant
        .keys()
        .filter(|w| matches!(opts.mode, Mode::Quantize(_)) || (requantize && untouched(w)))
        .map(String::as_str)
        .collect();
    for (si, shard) in base.ck.shards.iter().enumerate() {
        for entry in shard.tensors() {
            let name = &entry.name;
            if head_task.is_some() && is_lm_head(name) {
                continue;
            }
            if let Some(owner) = base.aux_owner(name) {
                if copied_4bit.contains(owner) {
                    jobs.push(copy_job(si, name, rename(name), entry.shape.clone()));
                }
                continue;
            }
            let replaced = res.replacements.get(name).cloned();
            let contribs = res.contributions.get(name).map(Vec::as_slice).unwrap_or(&[]);
            let mut steps = lora_steps(name, contribs, adapters, weights)?;
            steps.extend(res.bias_adds.remove(name).unwrap_or_default());
            let four_bit = base.quant.get(name);
            let job = match (replaced, four_bit) {
                (Some((ai, key)), _) => {
                    let st = adapters[ai].file.get(&key).expect("listed");
                    let work = st.float_type().map(|t| opts.dtype.unwrap_or(t));
                    Job {
                        out_shard: si,
                        out_name: rename(name),
                        origin: Origin::Adapter { adapter: ai, key },
                        shape: st.shape.clone(),
                        steps,
                        output: work.map_or(Output::Copy, Output::Float),
                        replaced: true,
                        added: false,
                    }
                }
                (None, Some(st)) if copied_4bit.contains(name.as_str()) => {
                    // An untouched 4-bit weight stays as it is, byte for byte, with its quant state.
                    copy_job(si, name, rename(name), entry.shape.clone())
                        .with_steps_checked(&steps, st.quant_type.name())?
                }
                (None, Some(st)) => {
                    let output = if requantize {
                        // Re-quantized from the unrounded (f32) merged values, with the base's settings.
                        Output::FourBit(FourBit {
                            quant: QuantizeOptions {
                                quant_type: st.quant_type,
                                blocksize: st.blocksize,
                                double_quant: st.nested_offset.is_some(),
                                torch_threads: opts.torch_threads,
                            },
                            state_dtype: FloatType::F32,
                            transposed: base.transposed(name),
                        })
                    } else {
                        Output::Float(opts.dtype.unwrap_or(st.dtype))
                    };
                    Job {
                        out_shard: si,
                        out_name: rename(name),
                        origin: Origin::FourBit { weight: name.clone() },
                        shape: base.logical_shape(name, entry),
                        steps,
                        output,
                        replaced: false,
                        added: false,
                    }
                }
                (None, None) => {
                    let work = entry.float_type().map(|t| opts.dtype.unwrap_or(t));
                    let output = match work {
                        Some(w) if w != entry.float_type().expect("float") || !steps.is_empty() => Output::Float(w),
                        _ if !steps.is_empty() => {
                            return Err(Error::unsupported(
                                &base.ck.dir,
                                format!(
                                    "tensor {name} has dtype {:?}; merging needs a float weight",
                                    entry.dtype
                                ),
                            ))
                        }
                        _ => Output::Copy,
                    };
                    Job {
                        out_shard: si,
                        out_name: rename(name),
                        origin: Origin::Base {
                            shard: si,
                            name: name.clone(),
                        },
                        shape: entry.shape.clone(),
                        steps,
                        output,
                        replaced: false,
                        added: false,
                    }
                }
            };
            jobs.push(job);
        }
    }
    Ok(jobs)
}

fn copy_job(shard: usize, name: &str, out_name: String, shape: Vec<usize>) -> Job {
    Job {
        out_shard: shard,
        out_name,
        origin: Origin::Base {
            shard,
            name: name.to_string(),
        },
        shape,
        steps: vec![],
        output: Output::Copy,
        replaced: false,
        added: false,
    }
}

impl Job {
    /// A copy must not be asked to change anything.
    fn with_steps_checked(self, steps: &[Step], kind: &str) -> Result<Self> {
        if steps.is_empty() {
            Ok(self)
        } else {
            Err(Error::InvalidArgument(format!(
                "tensor {} is {kind} and the adapters change it: merge with --requantize or to a float output",
                self.out_name
            )))
        }
    }
}

/// `--quantize`: the float weights `lorafast quantize` would quantize in the merged model become 4-bit
/// outputs, quantized from their values rounded to the output dtype (what the merged checkpoint holds).
fn quantize_outputs(base: &Base, q: &super::QuantizeSpec, jobs: &mut [Job]) -> Result<()> {
    let names: BTreeSet<&str> = jobs.iter().map(|j| j.out_name.as_str()).collect();
    let targets = match &q.targets {
        Some(t) => t.clone(),
        None => {
            let tensors = jobs.iter().map(|j| {
                let float = matches!(j.output, Output::Float(_))
                    || matches!(&j.origin, Origin::Base { name, .. } if base.ck.get(name).is_some_and(|(_, e)| e.float_type().is_some()));
                (j.out_name.as_str(), j.shape.as_slice(), float)
            });
            quantize_targets(tensors, |n| names.contains(n), base.ck.model_type(), &q.skip_modules)
        }
    };
    if targets.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no linear weight to quantize",
            base.ck.dir.display()
        )));
    }
    for (name, conv1d) in targets {
        let job = jobs.iter_mut().find(|j| j.out_name == name).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: no tensor {name} to quantize", base.ck.dir.display()))
        })?;
        let ft = match (&job.output, &job.origin) {
            (Output::Float(t), _) => Some(*t),
            (Output::Copy, Origin::Base { name, .. }) => base.ck.get(name).and_then(|(_, e)| e.float_type()),
            _ => None,
        };
        let ft = ft.filter(|_| job.shape.len() == 2).ok_or_else(|| {
            Error::unsupported(
                &base.ck.dir,
                format!("tensor {name} is not a float matrix; it cannot be quantized"),
            )
        })?;
        job.output = Output::FourBit(FourBit {
            quant: q.quant,
            state_dtype: ft,
            transposed: conv1d,
        });
    }
    Ok(())
}

/// The float type most of the base is stored in (what PEFT's model would be loaded as).
fn base_float(base: &Base) -> Option<FloatType> {
    let mut bytes: std::collections::BTreeMap<Dtype, u64> = Default::default();
    for (_, t) in base.ck.entries() {
        if t.float_type().is_some() {
            *bytes.entry(t.dtype).or_default() += t.len;
        }
    }
    bytes
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .and_then(|(d, _)| FloatType::from_safetensors(d))
}

/// Group the LoRA contributions to one tensor into merge steps. One adapter with weight 1 is PEFT's
/// `merge_and_unload` exactly: (B @ A) * s. Several adapters (or a weight) follow PEFT's exact `cat`
/// combination: B_cat @ [w_i s_i A_i], then one rounding.
fn lora_steps(tensor: &str, contribs: &[Contribution], adapters: &[Adapter], weights: &[f32]) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for layout in [Layout::Transposed, Layout::Rows] {
        for embedding in [true, false] {
            let group: Vec<_> = contribs
                .iter()
                .filter(|(ai, mi, l, _)| {
                    *l == layout && (adapters[*ai].modules[*mi].kind == LayerKind::Embedding) == embedding
                })
                .collect();
            if group.is_empty() {
                continue;
            }
            let dora: Vec<_> = group
                .iter()
                .filter(|(ai, mi, _, _)| adapters[*ai].modules[*mi].magnitude.is_some())
                .collect();
            if !dora.is_empty() && (group.len() > 1 || weights[group[0].0] != 1.0) {
                let m = &adapters[dora[0].0].modules[dora[0].1].module;
                return Err(Error::unsupported(
                    &adapters[dora[0].0].dir,
                    format!("module {m}: a DoRA adapter can only be merged on its own with weight 1 (tensor {tensor})"),
                ));
            }
            let single = group.len() == 1 && weights[group[0].0] == 1.0;
            let parts = group
                .iter()
                .map(|(ai, mi, _, expert)| {
                    let m = &adapters[*ai].modules[*mi];
                    Part {
                        adapter: *ai,
                        a: m.a.clone(),
                        b: m.b.clone(),
                        pre_scale: (!single).then_some((weights[*ai], m.scaling)),
                        expert: expert.clone(),
                    }
                })
                .collect();
            let first = &adapters[group[0].0].modules[group[0].1];
            steps.push(Step::Lora {
                layout,
                parts,
                post_scale: if single { first.scaling } else { 1.0 },
                round_delta_first: embedding && dora.is_empty(),
                magnitude: first.magnitude.clone().map(|k| (group[0].0, k)),
            });
        }
    }
    Ok(steps)
}
