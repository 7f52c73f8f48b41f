//! Merging LoRA adapters into a base checkpoint, streamed tensor by tensor, exact to PEFT's
//! `merge_and_unload`: deltas computed in f32 and rounded once to the output dtype.
//!
//! The output is planned whole (names, dtypes, shapes, shards) before any arithmetic, written into a
//! temporary folder beside OUT, and renamed into place only when complete.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use faer::MatRef;
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::Value;

use crate::core::checkpoint::{Checkpoint, CheckpointWriter};
use crate::core::dtype::{simd, FloatType};
use crate::core::error::{Error, Result};
use crate::core::io::{OutputFile, PlannedTensor, SafetensorsFile, TensorEntry};
use crate::core::linalg::{hstack, matmul_into};
use crate::core::peft::{Adapter, LayerKind};
use crate::core::pool;
use crate::core::progress::Progress;

/// Elements per tile: a tile of the base weight, its f32 delta and its output fit in L2 together.
const TILE_ELEMS: usize = 1 << 16;

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
    /// Base tensors whose merged result is written in f32, unrounded (for re-quantizing a 4-bit base).
    pub f32_outputs: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    pub output: PathBuf,
    pub tensors_total: usize,
    pub tensors_merged: usize,
    pub tensors_replaced: usize,
    pub tensors_added: usize,
    pub tensors_copied: usize,
    pub bytes_written: u64,
    pub seconds: f64,
    pub nonfinite_values: u64,
    pub warnings: Vec<String>,
}

/// Where a delta lands in the stored weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// W (out, in) += B @ A: nn.Linear, and an lm_head LoRA on a tied embedding.
    Rows,
    /// W (in, out) += (B @ A)^T: GPT-2 Conv1D, and embeddings ((vocab, dim) += (B_emb @ A_emb)^T).
    Transposed,
}

#[derive(Debug, Clone)]
struct Part {
    adapter: usize,
    a: String,
    b: String,
    /// A is multiplied by `weight` and then by `scaling`, two f32 roundings as PEFT's `cat` does.
    pre_scale: Option<(f32, f32)>,
}

#[derive(Debug, Clone)]
enum Step {
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

#[derive(Debug, Clone)]
enum Source {
    Base { shard: usize, name: String },
    Adapter { adapter: usize, key: String },
}

#[derive(Debug, Clone)]
struct Job {
    out_shard: usize,
    out_name: String,
    source: Source,
    /// Float type arithmetic rounds to (and the output is written in); None for non-float tensors.
    work: Option<FloatType>,
    shape: Vec<usize>,
    steps: Vec<Step>,
    replaced: bool,
    added: bool,
}

impl Job {
    fn out_dtype(&self, source_dtype: Dtype) -> Dtype {
        self.work.map_or(source_dtype, FloatType::to_safetensors)
    }
}

struct Plan {
    jobs: Vec<Job>,
    shard_names: Vec<String>,
    config: Option<Value>,
    warnings: Vec<String>,
}

/// GPT-2-family models store these projections as Conv1D, (in, out): PEFT forces fan_in_fan_out there.
pub fn is_conv1d(model_type: Option<&str>, module: &str) -> bool {
    let family = matches!(
        model_type,
        Some("gpt2" | "openai-gpt" | "imagegpt" | "decision_transformer")
    );
    let leaf = module.rsplit('.').next().unwrap_or(module);
    family && matches!(leaf, "c_attn" | "c_proj" | "c_fc" | "q_attn")
}

const INPUT_EMBEDDINGS: [&str; 7] = [
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "embeddings.word_embeddings.weight",
];
const OUTPUT_HEADS: [&str; 3] = ["lm_head", "embed_out", "output"];

/// Resolves PEFT module paths to base tensor names, tolerating the `base_model_prefix` being present on
/// one side only (e.g. `bert.encoder...` in the adapter, `encoder...` in a BertModel checkpoint).
struct Resolver<'a> {
    base: &'a Checkpoint,
    suffix_index: HashMap<String, Vec<&'a str>>,
}

enum Resolved {
    /// Same name, or the base lacks / has an extra first path component.
    Found(String),
    /// An output-embedding LoRA on a tied model: the delta lands in the input embedding.
    Tied(String),
    Missing,
}

impl<'a> Resolver<'a> {
    fn new(base: &'a Checkpoint) -> Self {
        let mut suffix_index: HashMap<String, Vec<&str>> = HashMap::new();
        for name in base.tensor_names() {
            if let Some((_, rest)) = name.split_once('.') {
                suffix_index.entry(rest.to_string()).or_default().push(name);
            }
        }
        Resolver { base, suffix_index }
    }

    fn find(&self, param: &str) -> Option<String> {
        if self.base.contains(param) {
            return Some(param.to_string());
        }
        if let Some((_, rest)) = param.split_once('.') {
            if self.base.contains(rest) {
                return Some(rest.to_string());
            }
        }
        match self.suffix_index.get(param).map(Vec::as_slice) {
            Some([one]) => Some(one.to_string()),
            _ => None,
        }
    }

    fn weight(&self, module: &str) -> Resolved {
        if let Some(k) = self.find(&format!("{module}.weight")) {
            return Resolved::Found(k);
        }
        let leaf = module.rsplit('.').next().unwrap_or(module);
        if OUTPUT_HEADS.contains(&leaf) {
            if let Some(k) = INPUT_EMBEDDINGS.iter().find(|k| self.base.contains(k)) {
                return Resolved::Tied(k.to_string());
            }
        }
        Resolved::Missing
    }
}

fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

const HEAD_TASKS: [(&str, &str); 3] = [
    ("SEQ_CLS", "ForSequenceClassification"),
    ("TOKEN_CLS", "ForTokenClassification"),
    ("QUESTION_ANS", "ForQuestionAnswering"),
];

fn plan(base: &Checkpoint, adapters: &[Adapter], opts: &MergeOptions) -> Result<Plan> {
    let n = adapters.len();
    let weights = match &opts.weights {
        None => vec![1.0f32; n],
        Some(w) if w.len() == n => w.clone(),
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
    let resolver = Resolver::new(base);
    let model_type = base.model_type();
    let mut warnings = Vec::new();

    // Per base tensor: (adapter, module index, layout, kind) of each LoRA that lands in it.
    let mut contributions: BTreeMap<String, Vec<(usize, usize, Layout)>> = BTreeMap::new();
    let mut bias_adds: BTreeMap<String, Vec<Step>> = BTreeMap::new();
    let mut replacements: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut added: Vec<(String, usize, String)> = Vec::new();
    let mut prefix: Option<String> = None;
    let mut vocab_size: Option<usize> = None;

    for (ai, adapter) in adapters.iter().enumerate() {
        let path = adapter.weights_path();
        for m in &adapter.ignored_modules {
            warnings.push(format!(
                "{}: module {m} has LoRA tensors but the config does not target it; ignored (as PEFT does)",
                path.display()
            ));
        }
        if adapter.modules.is_empty() {
            return Err(Error::adapter(
                &adapter.dir,
                "the adapter holds no LoRA module that its config targets",
            ));
        }
        let mut resolved_any = false;
        let mut missing = Vec::new();
        for (mi, m) in adapter.modules.iter().enumerate() {
            let (key, tied) = match resolver.weight(&m.module) {
                Resolved::Found(k) => (k, false),
                Resolved::Tied(k) => (k, true),
                Resolved::Missing => {
                    missing.push(m.module.clone());
                    continue;
                }
            };
            resolved_any = true;
            // The adapter names modules with a prefix the base lacks: remember it for renaming heads.
            if !tied && !key.starts_with(&m.module) {
                if let Some((head, rest)) = m.module.split_once('.') {
                    if key.starts_with(rest) {
                        prefix.get_or_insert_with(|| head.to_string());
                    }
                }
            }
            let (_, entry) = base.get(&key).expect("resolved names exist");
            let (out_f, in_f) = (m.b_shape[0], m.a_shape[1]);
            if entry.float_type().is_none() {
                return Err(Error::unsupported(
                    &base.dir,
                    format!("module {}: base tensor {key} has dtype {:?}; merging needs a float (or 4-bit, see `lorafast dequantize`) weight", m.module, entry.dtype),
                ));
            }
            let ws = &entry.shape;
            let layout = match m.kind {
                LayerKind::Embedding if ws[..] == [in_f, out_f] => Layout::Transposed,
                LayerKind::Linear if is_conv1d(model_type, &m.module) && ws[..] == [in_f, out_f] => Layout::Transposed,
                LayerKind::Linear if !is_conv1d(model_type, &m.module) && ws[..] == [out_f, in_f] => Layout::Rows,
                LayerKind::Linear if adapter.config.fan_in_fan_out && ws[..] == [in_f, out_f] => Layout::Transposed,
                _ => {
                    let kind = if m.kind == LayerKind::Embedding {
                        "embedding"
                    } else {
                        "linear"
                    };
                    return Err(Error::shape(
                        &m.module,
                        format!(
                            "{}: {kind} LoRA with A {} and B {} does not fit base tensor {key} of shape {}",
                            path.display(),
                            shape_str(&m.a_shape),
                            shape_str(&m.b_shape),
                            shape_str(ws)
                        ),
                    ));
                }
            };
            contributions.entry(key.clone()).or_default().push((ai, mi, layout));
            if let Some(bias) = &m.bias {
                let bias_key = resolver.find(&format!("{}.bias", m.module)).ok_or_else(|| {
                    Error::shape(
                        &m.module,
                        "the adapter has lora_B.bias (lora_bias=true) but the base layer has no bias",
                    )
                })?;
                bias_adds.entry(bias_key).or_default().push(Step::AddVector {
                    adapter: ai,
                    key: bias.clone(),
                    coeff: weights[ai] * m.scaling,
                });
            }
        }
        if !resolved_any {
            return Err(Error::adapter(
                &adapter.dir,
                format!(
                    "the adapter targets no module of the base {} (e.g. {}.weight is not in it)",
                    base.dir.display(),
                    missing[0]
                ),
            ));
        }
        if let Some(m) = missing.first() {
            return Err(Error::shape(
                m,
                format!(
                    "{}: the base {} has no tensor {m}.weight",
                    path.display(),
                    base.dir.display()
                ),
            ));
        }
        for saved in &adapter.saved {
            let module = saved.param.rsplit_once('.').map_or(saved.param.as_str(), |(m, _)| m);
            let target = match resolver.find(&saved.param) {
                Some(k) => k,
                None if adapter.config.is_module_to_save(module) => {
                    added.push((saved.param.clone(), ai, saved.key.clone()));
                    continue;
                }
                None => {
                    warnings.push(format!(
                        "{}: tensor {} names no parameter of the base; ignored (as PEFT does)",
                        path.display(),
                        saved.key
                    ));
                    continue;
                }
            };
            if let Some((other, _)) = replacements.insert(target.clone(), (ai, saved.key.clone())) {
                return Err(Error::InvalidArgument(format!(
                    "tensor {target} is saved in full by both {} and {}; merge them separately",
                    adapters[other].dir.display(),
                    adapter.dir.display()
                )));
            }
            let (_, entry) = base.get(&target).expect("resolved");
            let st = adapter.file.get(&saved.key).expect("listed");
            // A resized vocabulary is the one shape change PEFT saves in full (embeddings, output head).
            let vocab_tensor = INPUT_EMBEDDINGS.contains(&target.as_str())
                || OUTPUT_HEADS.iter().any(|h| target.starts_with(&format!("{h}.")));
            if st.shape != entry.shape {
                if !(vocab_tensor && st.shape.len() == 2 && st.shape[1] == entry.shape[1]) {
                    return Err(Error::shape(
                        module,
                        format!(
                            "{}: saved tensor {} has shape {} but the base tensor {target} has {}",
                            path.display(),
                            saved.key,
                            shape_str(&st.shape),
                            shape_str(&entry.shape)
                        ),
                    ));
                }
                vocab_size = Some(st.shape[0]);
            }
        }
    }
    for (name, _, _) in &added {
        if let Some(other) = added.iter().filter(|(n, _, _)| n == name).nth(1) {
            return Err(Error::InvalidArgument(format!(
                "tensor {name} is saved in full by more than one adapter ({})",
                adapters[other.1].dir.display()
            )));
        }
    }

    // A task head (classification, QA) that the base lacks: the output is that task's model class.
    let task = adapters.iter().find_map(|a| a.config.task_type.as_deref());
    let head_task = HEAD_TASKS
        .iter()
        .find(|(t, _)| Some(*t) == task)
        .filter(|_| !added.is_empty());
    let rename = |k: &str| -> String {
        match (&prefix, head_task) {
            (Some(p), Some(_)) if !k.starts_with(&format!("{p}.")) => format!("{p}.{k}"),
            _ => k.to_string(),
        }
    };
    let is_lm_head = |k: &str| k.starts_with("lm_head.") || k.starts_with("cls.") || k.starts_with("embed_out.");

    // Jobs, shard by shard, in file order.
    let mut jobs = Vec::new();
    for (si, shard) in base.shards.iter().enumerate() {
        for entry in shard.tensors() {
            let name = &entry.name;
            if head_task.is_some() && is_lm_head(name) {
                continue;
            }
            let replaced = replacements.get(name);
            let (source, src_type, shape) = match replaced {
                Some((ai, key)) => {
                    let st = adapters[*ai].file.get(key).expect("listed");
                    (
                        Source::Adapter {
                            adapter: *ai,
                            key: key.clone(),
                        },
                        st.float_type(),
                        st.shape.clone(),
                    )
                }
                None => (
                    Source::Base {
                        shard: si,
                        name: name.clone(),
                    },
                    entry.float_type(),
                    entry.shape.clone(),
                ),
            };
            let mut steps = lora_steps(
                name,
                contributions.get(name).map(Vec::as_slice).unwrap_or(&[]),
                adapters,
                &weights,
            )?;
            steps.extend(bias_adds.remove(name).unwrap_or_default());
            jobs.push(Job {
                out_shard: si,
                out_name: rename(name),
                source,
                work: src_type.map(|t| {
                    if opts.f32_outputs.iter().any(|n| n == name) {
                        FloatType::F32
                    } else {
                        opts.dtype.unwrap_or(t)
                    }
                }),
                shape,
                steps,
                replaced: replaced.is_some(),
                added: false,
            });
        }
    }
    let last = base.shards.len() - 1;
    let mut untied = false;
    for (param, ai, key) in added {
        let st = adapters[ai].file.get(&key).expect("listed");
        untied |= OUTPUT_HEADS.iter().any(|h| param == format!("{h}.weight"));
        jobs.push(Job {
            out_shard: last,
            out_name: param,
            source: Source::Adapter { adapter: ai, key },
            work: st
                .float_type()
                .map(|t| opts.dtype.unwrap_or(base_float(base).unwrap_or(t))),
            shape: st.shape.clone(),
            steps: vec![],
            replaced: false,
            added: true,
        });
    }

    let config = base.config.clone().map(|mut c| {
        if let Some(t) = opts.dtype {
            set_dtype(&mut c, t);
        }
        if untied {
            c["tie_word_embeddings"] = Value::Bool(false);
        }
        if let Some(v) = vocab_size {
            c["vocab_size"] = Value::from(v);
        }
        if let Some((task, suffix)) = head_task {
            to_task_class(&mut c, task, suffix, &jobs);
        }
        // A trainer that had to choose a pad token (GPT-2 has none) saved it with the adapter's tokenizer;
        // the merged model needs its id to run on padded batches (sequence classification above all).
        if c.get("pad_token_id").map_or(true, Value::is_null) {
            if let Some(id) = adapters.iter().find_map(|a| pad_token_id(&a.dir)) {
                c["pad_token_id"] = Value::from(id);
            }
        }
        c
    });
    Ok(Plan {
        jobs,
        shard_names: base.shard_names.clone(),
        config,
        warnings,
    })
}

/// The float type most of the base is stored in (what PEFT's model would be loaded as).
fn base_float(base: &Checkpoint) -> Option<FloatType> {
    let mut bytes: BTreeMap<Dtype, u64> = BTreeMap::new();
    for (_, t) in base.entries() {
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
fn lora_steps(
    tensor: &str,
    contribs: &[(usize, usize, Layout)],
    adapters: &[Adapter],
    weights: &[f32],
) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for layout in [Layout::Transposed, Layout::Rows] {
        for embedding in [true, false] {
            let group: Vec<_> = contribs
                .iter()
                .filter(|(ai, mi, l)| {
                    *l == layout && (adapters[*ai].modules[*mi].kind == LayerKind::Embedding) == embedding
                })
                .collect();
            if group.is_empty() {
                continue;
            }
            let dora: Vec<_> = group
                .iter()
                .filter(|(ai, mi, _)| adapters[*ai].modules[*mi].magnitude.is_some())
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
                .map(|(ai, mi, _)| {
                    let m = &adapters[*ai].modules[*mi];
                    Part {
                        adapter: *ai,
                        a: m.a.clone(),
                        b: m.b.clone(),
                        pre_scale: (!single).then_some((weights[*ai], m.scaling)),
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

fn set_dtype(config: &mut Value, t: FloatType) {
    let mut set = false;
    for key in ["torch_dtype", "dtype"] {
        if config.get(key).is_some() {
            config[key] = Value::String(t.torch_name().into());
            set = true;
        }
    }
    if !set {
        config["dtype"] = Value::String(t.torch_name().into());
    }
}

/// Rewrite a base model's config as the task model PEFT trained (e.g. LlamaForCausalLM -> ...ForSequenceClassification).
fn to_task_class(config: &mut Value, task: &str, suffix: &str, jobs: &[Job]) {
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !arch.ends_with(suffix) {
        let stem = [
            "ForCausalLM",
            "LMHeadModel",
            "ForMaskedLM",
            "ForPreTraining",
            "ForConditionalGeneration",
            "Model",
        ]
        .iter()
        .find_map(|s| arch.strip_suffix(s))
        .unwrap_or(&arch);
        if !stem.is_empty() {
            config["architectures"] = serde_json::json!([format!("{stem}{suffix}")]);
        }
    }
    if task == "QUESTION_ANS" {
        return;
    }
    let head = jobs
        .iter()
        .filter(|j| j.added && j.out_name.ends_with(".weight") && j.shape.len() == 2)
        .min_by_key(|j| j.shape[0]);
    if let Some(h) = head {
        let n = h.shape[0];
        let current = config.get("id2label").and_then(Value::as_object).map_or(0, |m| m.len());
        if current != n {
            let id2label: serde_json::Map<String, Value> = (0..n)
                .map(|i| (i.to_string(), Value::String(format!("LABEL_{i}"))))
                .collect();
            let label2id: serde_json::Map<String, Value> =
                (0..n).map(|i| (format!("LABEL_{i}"), Value::from(i))).collect();
            config["id2label"] = Value::Object(id2label);
            config["label2id"] = Value::Object(label2id);
        }
    }
}

/// Merge `adapters` into the checkpoint folder `base`, writing the folder `out`.
pub fn merge(
    base: &Path,
    adapters: &[PathBuf],
    out: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = Instant::now();
    if adapters.is_empty() {
        return Err(Error::InvalidArgument("no adapter given".into()));
    }
    let inputs: Vec<&Path> = std::iter::once(base)
        .chain(adapters.iter().map(PathBuf::as_path))
        .collect();
    let mut writer = CheckpointWriter::new(out, &inputs, opts.overwrite)?;
    let base_ck = Checkpoint::open(base)?;
    let adapters: Vec<Adapter> = adapters.iter().map(|p| Adapter::open(p)).collect::<Result<_>>()?;
    let plan = plan(&base_ck, &adapters, opts)?;
    let pool = pool::build(opts.threads)?;

    // Lay out every output shard before computing anything.
    let source_entry = |job: &Job| -> (&SafetensorsFile, &TensorEntry) {
        match &job.source {
            Source::Base { shard, name } => (
                &base_ck.shards[*shard],
                base_ck.shards[*shard].get(name).expect("planned"),
            ),
            Source::Adapter { adapter, key } => (
                &adapters[*adapter].file,
                adapters[*adapter].file.get(key).expect("planned"),
            ),
        }
    };
    for (si, shard_name) in plan.shard_names.iter().enumerate() {
        let planned: Vec<PlannedTensor> = plan
            .jobs
            .iter()
            .filter(|j| j.out_shard == si)
            .map(|j| PlannedTensor {
                name: j.out_name.clone(),
                dtype: j.out_dtype(source_entry(j).1.dtype),
                shape: j.shape.clone(),
            })
            .collect();
        writer.add_shard(shard_name, &planned)?;
    }
    writer.start(progress)?;

    let nonfinite = AtomicU64::new(0);
    let ctx = Ctx {
        adapters: &adapters,
        safe: opts.safe_merge,
        nonfinite: &nonfinite,
        progress,
    };
    pool.install(|| {
        plan.jobs.par_iter().try_for_each(|job| {
            if progress.cancelled() {
                return Err(Error::Interrupted);
            }
            let (file, entry) = source_entry(job);
            run_job(&ctx, job, file, entry, writer.shard(job.out_shard))?;
            progress.advance(
                &job.out_name,
                PlannedTensor {
                    name: String::new(),
                    dtype: job.out_dtype(entry.dtype),
                    shape: job.shape.clone(),
                }
                .byte_len() as u64,
            );
            Ok(())
        })
    })?;
    let tokenizers = |dir: &Path| adapters.iter().try_for_each(|a| copy_tokenizer_files(&a.dir, dir));
    let mut warnings = writer.notices();
    warnings.extend(plan.warnings);
    let (output, bytes_written) = writer.finish(base_ck.sharded, &base_ck.dir, tokenizers, plan.config.as_ref())?;
    let count = |f: fn(&Job) -> bool| plan.jobs.iter().filter(|j| f(j)).count();
    Ok(MergeReport {
        output,
        tensors_total: plan.jobs.len(),
        tensors_merged: count(|j| !j.steps.is_empty()),
        tensors_replaced: count(|j| j.replaced),
        tensors_added: count(|j| j.added),
        tensors_copied: count(|j| j.steps.is_empty() && !j.replaced && !j.added),
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        nonfinite_values: nonfinite.into_inner(),
        warnings,
    })
}

struct Ctx<'a> {
    adapters: &'a [Adapter],
    safe: bool,
    nonfinite: &'a AtomicU64,
    progress: &'a dyn Progress,
}

/// A LoRA step's factors, loaded once per tensor: B_cat (out x R) and A_cat (R x in), A pre-scaled.
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
}

fn load_factors(adapters: &[Adapter], parts: &[Part]) -> Result<Factors> {
    let rank: usize = parts
        .iter()
        .map(|p| adapters[p.adapter].file.get(&p.a).expect("listed").shape[0])
        .sum();
    let mut a = Vec::new();
    let mut b_parts = Vec::new();
    for p in parts {
        let file = &adapters[p.adapter].file;
        let mut pa = file.read_f32(&p.a)?;
        if let Some((w, s)) = p.pre_scale {
            pa.iter_mut().for_each(|v| *v = (*v * w) * s);
        }
        a.extend(pa);
        b_parts.push((file.get(&p.b).expect("listed").shape[1], file.read_f32(&p.b)?));
    }
    let out = b_parts[0].1.len() / b_parts[0].0;
    let blocks: Vec<(usize, &[f32])> = b_parts.iter().map(|(r, pb)| (*r, pb.as_slice())).collect();
    let b = hstack(&blocks, out, rank);
    Ok(Factors { a, b, rank })
}

/// One merged, converted or copied tensor.
fn run_job(ctx: &Ctx, job: &Job, file: &SafetensorsFile, entry: &TensorEntry, out: &OutputFile) -> Result<()> {
    let src = entry.float_type();
    let work = match (job.work, src) {
        (Some(w), Some(s)) if w != s || !job.steps.is_empty() => (w, s),
        _ => return out.copy_from(&job.out_name, file, entry),
    };
    let (work, src) = work;
    let cols = *job.shape.last().unwrap_or(&1);
    let rows = entry.numel().checked_div(cols).unwrap_or(0);
    if job.steps.iter().any(|s| matches!(s, Step::Lora { .. })) && job.shape.len() != 2 {
        return Err(Error::shape(
            &job.out_name,
            format!("LoRA target has shape {}, expected a matrix", shape_str(&job.shape)),
        ));
    }
    // Factors and vectors for every step, read once for the tensor.
    let mut factors = Vec::new();
    let mut vectors = Vec::new();
    let mut magnitude = None;
    for step in &job.steps {
        match step {
            Step::Lora {
                parts, magnitude: m, ..
            } => {
                factors.push(Some(load_factors(ctx.adapters, parts)?));
                vectors.push(None);
                if let Some((ai, key)) = m {
                    magnitude = Some(ctx.adapters[*ai].file.read_f32(key)?);
                }
            }
            Step::AddVector { adapter, key, coeff } => {
                let v = ctx.adapters[*adapter].file.read_f32(key)?;
                if v.len() != entry.numel() {
                    return Err(Error::shape(
                        key,
                        format!(
                            "bias delta has {} values, base tensor {} has {}",
                            v.len(),
                            job.out_name,
                            entry.numel()
                        ),
                    ));
                }
                factors.push(None);
                vectors.push(Some(v.into_iter().map(|x| x * coeff).collect::<Vec<f32>>()));
            }
        }
    }
    let tile_rows = (TILE_ELEMS / cols.max(1)).max(1);
    // u32-backed so the byte buffers can be viewed as u16 / f32 without copies.
    let mut raw = vec![0u32; (tile_rows * cols * src.size()).div_ceil(4)];
    let mut w = vec![0f32; tile_rows * cols];
    let mut delta = vec![0f32; tile_rows * cols];
    let mut encoded = vec![0u32; (tile_rows * cols * work.size()).div_ceil(4)];

    // DoRA needs the norm of every output channel of W + delta before it can scale any element.
    let channel_scale = match (&magnitude, job.steps.first()) {
        (Some(m), Some(Step::Lora { layout, post_scale, .. })) => {
            let f = factors[0].as_ref().expect("lora step");
            let channels = if *layout == Layout::Rows { rows } else { cols };
            if m.len() != channels {
                return Err(Error::shape(
                    &job.out_name,
                    format!("DoRA magnitude has {} values for {channels} output channels", m.len()),
                ));
            }
            let mut sumsq = vec![0f32; channels];
            for r0 in (0..rows).step_by(tile_rows) {
                let n = tile_rows.min(rows - r0);
                read_tile(file, entry, src, work, r0, n, cols, &mut raw, &mut w)?;
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
            Some(m.iter().zip(&sumsq).map(|(m, s)| m / s.sqrt()).collect::<Vec<f32>>())
        }
        _ => None,
    };

    let mut nonfinite = 0u64;
    for r0 in (0..rows).step_by(tile_rows) {
        if ctx.progress.cancelled() {
            return Err(Error::Interrupted);
        }
        let n = tile_rows.min(rows - r0);
        let len = n * cols;
        read_tile(file, entry, src, work, r0, n, cols, &mut raw, &mut w)?;
        for (si, step) in job.steps.iter().enumerate() {
            let last = si + 1 == job.steps.len();
            match step {
                Step::Lora {
                    layout,
                    post_scale,
                    round_delta_first,
                    ..
                } => {
                    let f = factors[si].as_ref().expect("lora step");
                    lora_delta(f, *layout, r0, n, cols, &mut delta[..len]);
                    let s = *post_scale;
                    if let Some(scale) = &channel_scale {
                        for i in 0..n {
                            for j in 0..cols {
                                let k = i * cols + j;
                                let c = if *layout == Layout::Rows {
                                    scale[r0 + i]
                                } else {
                                    scale[j]
                                };
                                w[k] = c * (w[k] + delta[k] * s);
                            }
                        }
                    } else if *round_delta_first {
                        for (wv, d) in w[..len].iter_mut().zip(&delta[..len]) {
                            *wv += work.round_trip(*d * s);
                        }
                    } else {
                        simd::add_scaled(&mut w[..len], &delta[..len], s);
                    }
                }
                Step::AddVector { .. } => {
                    let v = vectors[si].as_ref().expect("vector step");
                    for (wv, d) in w[..len].iter_mut().zip(&v[r0 * cols..r0 * cols + len]) {
                        *wv += *d;
                    }
                }
            }
            // Each step is one PEFT merge: its result is rounded to the working dtype.
            if !last {
                round_to(work, &mut w[..len]);
            }
        }
        let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut encoded)[..len * work.size()];
        if work.encode_checked(&w[..len], bytes) && !job.steps.is_empty() {
            // Rare: count what the merge made non-finite (the base may hold some already).
            nonfinite += w[..len]
                .iter()
                .filter(|v| !v.is_finite() || work.round_trip(**v).is_infinite())
                .count() as u64;
            if ctx.safe {
                return Err(Error::NonFinite {
                    tensor: job.out_name.clone(),
                    reason: "the merge produced NaN or Inf values; refusing to write them (safe merge)".into(),
                });
            }
        }
        out.write_at(&job.out_name, (r0 * cols * work.size()) as u64, bytes)?;
    }
    ctx.nonfinite.fetch_add(nonfinite, Ordering::Relaxed);
    Ok(())
}

/// Read rows [r0, r0+n) of a float tensor into `w` as f32, rounded to the working dtype (PEFT loads the
/// base in the dtype it merges in).
#[allow(clippy::too_many_arguments)]
fn read_tile(
    file: &SafetensorsFile,
    entry: &TensorEntry,
    src: FloatType,
    work: FloatType,
    r0: usize,
    n: usize,
    cols: usize,
    raw: &mut [u32],
    w: &mut [f32],
) -> Result<()> {
    let len = n * cols;
    let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(raw)[..len * src.size()];
    file.read_bytes(entry, (r0 * cols * src.size()) as u64, bytes)?;
    match src {
        FloatType::F32 => w[..len].copy_from_slice(bytemuck::cast_slice(bytes)),
        _ => src.decode_u16(bytemuck::cast_slice(bytes), &mut w[..len]),
    }
    if work != src && work != FloatType::F32 {
        round_to(work, &mut w[..len]);
    }
    Ok(())
}

fn round_to(t: FloatType, w: &mut [f32]) {
    match t {
        FloatType::F32 => {}
        FloatType::BF16 => simd::round_bf16(w),
        FloatType::F16 => w.iter_mut().for_each(|v| *v = t.round_trip(*v)),
    }
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

/// The id of the pad token a tokenizer saved in `dir` declares, found among its special tokens
/// (`tokenizer_config.json`'s `added_tokens_decoder`, or `tokenizer.json`'s `added_tokens`).
fn pad_token_id(dir: &Path) -> Option<u64> {
    let read = |name: &str| -> Option<Value> { serde_json::from_slice(&std::fs::read(dir.join(name)).ok()?).ok() };
    let content = |v: &Value| -> Option<String> {
        v.as_str()
            .or_else(|| v.get("content")?.as_str())
            .map(str::to_string)
    };
    let config = read("tokenizer_config.json")?;
    let pad = content(config.get("pad_token")?)?;
    if let Some(decoder) = config.get("added_tokens_decoder").and_then(Value::as_object) {
        if let Some((id, _)) = decoder.iter().find(|(_, t)| content(t).as_deref() == Some(pad.as_str())) {
            return id.parse().ok();
        }
    }
    read("tokenizer.json")?
        .get("added_tokens")?
        .as_array()?
        .iter()
        .find(|t| content(t).as_deref() == Some(pad.as_str()))?
        .get("id")?
        .as_u64()
}

/// An adapter trained with added tokens ships its tokenizer: it wins over the base's.
fn copy_tokenizer_files(adapter: &Path, to: &Path) -> Result<()> {
    const NAMES: [&str; 9] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
    ];
    for name in NAMES {
        let src = adapter.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}
