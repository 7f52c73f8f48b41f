//! Whole checkpoints in bitsandbytes' pre-quantized layout (`weight`, `weight.absmax`,
//! `weight.quant_map`, `weight.nested_*`, `weight.quant_state.*`): reading quant states, which weights
//! transformers would quantize, and `quantize` / `dequantize` of a whole folder, which run through the
//! merge engine (a merge of no adapter).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::nested::{NestedAbsmax, NESTED_BLOCKSIZE};
use super::{check_blocksize, QuantType, QuantizeOptions};
use crate::core::checkpoint::Checkpoint;
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::layers::{is_conv1d, is_embedding_or_output, is_moe_parameter, leaf, HEADS, OUTPUTS};
use crate::core::merge::{merge, MergeOptions, MergeReport, Mode, QuantizeSpec};
use crate::core::progress::Progress;

#[derive(Debug, Clone)]
pub struct QuantizeCheckpointOptions {
    pub quant: QuantizeOptions,
    /// `bnb_4bit_compute_dtype` (default: the model's dtype).
    pub compute_dtype: Option<FloatType>,
    /// Weights to quantize and whether each is a GPT-2 Conv1D (quantized transposed, as transformers
    /// does). None: decided from names.
    pub targets: Option<Vec<(String, bool)>>,
    /// Written to `llm_int8_skip_modules`; with `targets` None also excluded here.
    pub skip_modules: Vec<String>,
    /// Keep every output layer and task head (classifier, score, ...) in full precision and say so in
    /// `llm_int8_skip_modules`, so that transformers loads the checkpoint under a task class whose
    /// head is new (QLoRA classification: PEFT trains the head in full as modules_to_save).
    pub keep_heads: bool,
    pub threads: Option<usize>,
    pub overwrite: bool,
}

/// Quantize a float checkpoint folder: what `from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))`
/// followed by `save_pretrained` writes, byte for byte.
pub fn quantize_checkpoint(
    base: &Path,
    out: &Path,
    opts: &QuantizeCheckpointOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    check_blocksize(opts.quant.blocksize)?;
    // With explicit targets a partly 4-bit checkpoint is fine: its 4-bit tensors are copied as they are.
    if opts.targets.is_none()
        && Checkpoint::open(base)?
            .tensor_names()
            .any(|n| n.contains(QUANT_STATE_TAG))
    {
        return Err(Error::InvalidArgument(format!(
            "{}: already quantized (use `lorafast dequantize` first)",
            base.display()
        )));
    }
    let skip_modules = skip_list(opts);
    let targets = opts.targets.as_ref().map(|t| {
        t.iter()
            .filter(|(name, _)| {
                !opts.keep_heads || !skipped(name.strip_suffix(".weight").unwrap_or(name), &skip_modules)
            })
            .cloned()
            .collect()
    });
    let merge_opts = MergeOptions {
        threads: opts.threads,
        overwrite: opts.overwrite,
        torch_threads: opts.quant.torch_threads,
        mode: Mode::Quantize(QuantizeSpec {
            quant: opts.quant,
            compute_dtype: opts.compute_dtype,
            targets,
            skip_modules,
        }),
        ..Default::default()
    };
    merge(base, &[], out, &merge_opts, progress)
}

/// Turn a 4-bit checkpoint back into a float one: each weight as `bitsandbytes.functional.dequantize_4bit`
/// returns it (in its quant state's dtype, or `dtype`).
pub fn dequantize_checkpoint(
    qdir: &Path,
    out: &Path,
    dtype: Option<FloatType>,
    threads: Option<usize>,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    if quantized_weights(&Checkpoint::open(qdir)?)?.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no 4-bit (bitsandbytes) weights in this checkpoint",
            qdir.display()
        )));
    }
    let opts = MergeOptions {
        dtype,
        threads,
        overwrite,
        ..Default::default()
    };
    merge(qdir, &Vec::<PathBuf>::new(), out, &opts, progress)
}

/// transformers' `should_convert_module` boundary rule, for plain names: a prefix up to a module
/// boundary, or a suffix.
fn skipped(module: &str, patterns: &[String]) -> bool {
    patterns
        .iter()
        .any(|p| module == p || module.starts_with(&format!("{p}.")) || module.ends_with(p.as_str()))
}

/// The modules left unquantized and listed in `llm_int8_skip_modules`: the caller's, and with
/// `keep_heads` the output layer and every task head first.
fn skip_list(opts: &QuantizeCheckpointOptions) -> Vec<String> {
    let mut skip: Vec<String> = Vec::new();
    if opts.keep_heads {
        skip.extend(OUTPUTS.iter().chain(HEADS.iter()).map(|h| h.to_string()));
    }
    for s in &opts.skip_modules {
        if !skip.contains(s) {
            skip.push(s.clone());
        }
    }
    skip
}

/// The weights transformers would quantize, decided from names (no model code at hand): 2-D float
/// weights other than embeddings, output/task heads and skips. `tensors` are (name, shape, is float);
/// `contains` says whether a tensor exists.
pub fn quantize_targets<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], bool)>,
    contains: impl Fn(&str) -> bool,
    model_type: Option<&str>,
    skip: &[String],
) -> Vec<(String, bool)> {
    // transformers leaves "the module of the last parameter" unquantized, but strips only ".weight" from
    // that parameter's name: a head whose last parameter is a bias (BERT's pooler, biased classifiers)
    // is quantized after all. So heads are kept only when they have no bias.
    tensors
        .filter_map(|(name, shape, float)| {
            let module = name.strip_suffix(".weight")?;
            let leaf = leaf(module);
            let is_head = HEADS.iter().any(|h| module == *h || module.ends_with(&format!(".{h}")));
            let kept_head = is_head && !contains(&format!("{module}.bias"));
            let quantizable = shape.len() == 2
                && float
                && !is_embedding_or_output(leaf)
                && !is_moe_parameter(module)
                && !kept_head
                && !skipped(module, skip);
            quantizable.then(|| (name.to_string(), is_conv1d(model_type, module)))
        })
        .collect()
}

pub fn quantized_names(weight: &str, qt: QuantType, double_quant: bool) -> Vec<String> {
    let mut v = vec![
        weight.to_string(),
        format!("{weight}.absmax"),
        format!("{weight}.quant_map"),
    ];
    if double_quant {
        v.push(format!("{weight}.nested_absmax"));
        v.push(format!("{weight}.nested_quant_map"));
    }
    v.push(format!("{weight}.quant_state.bitsandbytes__{}", qt.name()));
    v
}

/// `BitsAndBytesConfig.to_dict()` as transformers 5 writes it into config.json.
pub fn bnb_config(q: &QuantizeOptions, compute: FloatType, skip: &[String]) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": q.quant_type.name(),
        "bnb_4bit_use_double_quant": q.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": if skip.is_empty() { Value::Null } else { json!(skip) },
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

/// The quant state of one 4-bit weight of a pre-quantized checkpoint.
#[derive(Debug, Clone)]
pub struct StoredState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: FloatType,
    pub shape: Vec<usize>,
    pub nested_offset: Option<f32>,
}

const QUANT_STATE_TAG: &str = ".quant_state.bitsandbytes__";

/// A quant state's JSON (`QuantState.as_dict(packed=True)`'s `quant_state.bitsandbytes__*` bytes); the
/// error says what is wrong with it.
pub fn parse_state(bytes: &[u8]) -> std::result::Result<StoredState, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|err| format!("quant state is not JSON ({err})"))?;
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("quant state lacks {k}"))
    };
    let quant_type = QuantType::parse(s("quant_type")?).map_err(|e| e.to_string())?;
    let dtype = FloatType::parse(s("dtype")?).ok_or_else(|| format!("unknown dtype {:?}", v["dtype"]))?;
    let blocksize = v
        .get("blocksize")
        .and_then(Value::as_u64)
        .ok_or_else(|| "quant state lacks blocksize".to_string())? as usize;
    check_blocksize(blocksize).map_err(|e| e.to_string())?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| "quant state lacks a shape".to_string())?;
    let nested_offset = v.get("nested_offset").and_then(Value::as_f64).map(|x| x as f32);
    Ok(StoredState {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested_offset,
    })
}

pub fn read_state(ck: &Checkpoint, key: &str) -> Result<StoredState> {
    let (si, e) = ck.get(key).expect("listed");
    let file = &ck.shards[si];
    let mut bytes = vec![0u8; e.len as usize];
    file.read_bytes(e, 0, &mut bytes)?;
    let bad = |why: String| Error::Safetensors {
        path: file.path.clone(),
        reason: format!("tensor {key}: {why}"),
    };
    let state = parse_state(&bytes).map_err(bad)?;
    // The shape must describe the packed weight beside it: two codes a byte, and no overflow on the way.
    let weight = key.split(QUANT_STATE_TAG).next().unwrap_or(key);
    let numel = state.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    let packed = ck.get(weight).map(|(_, e)| e.len);
    match (numel, packed) {
        (Some(n), Some(len)) if n > 0 && n.div_ceil(2) as u64 == len && n.checked_mul(4).is_some() => Ok(state),
        (_, None) => Err(bad(format!("no packed weight {weight} beside it"))),
        _ => Err(bad(format!(
            "quant state shape {:?} does not fit the {} packed bytes of {weight}",
            state.shape,
            packed.unwrap_or(0)
        ))),
    }
}

fn read_f32_tensor(ck: &Checkpoint, name: &str) -> Result<Vec<f32>> {
    let (si, _) = ck.get(name).ok_or_else(|| Error::Safetensors {
        path: ck.dir.clone(),
        reason: format!("missing tensor {name}"),
    })?;
    ck.shards[si].read_f32(name)
}

/// The f32 absmax of a stored weight (undoing double quantization with the stored map).
pub fn stored_absmax(ck: &Checkpoint, weight: &str, st: &StoredState) -> Result<Vec<f32>> {
    let name = format!("{weight}.absmax");
    match st.nested_offset {
        None => read_f32_tensor(ck, &name),
        Some(offset) => {
            let (si, e) = ck.get(&name).ok_or_else(|| Error::Safetensors {
                path: ck.dir.clone(),
                reason: format!("missing tensor {name}"),
            })?;
            let mut codes = vec![0u8; e.len as usize];
            ck.shards[si].read_bytes(e, 0, &mut codes)?;
            let nested = NestedAbsmax {
                codes,
                nested_absmax: read_f32_tensor(ck, &format!("{weight}.nested_absmax"))?,
                offset,
                code: read_f32_tensor(ck, &format!("{weight}.nested_quant_map"))?,
            };
            if nested.code.len() != 256 || nested.nested_absmax.len() < nested.codes.len().div_ceil(NESTED_BLOCKSIZE) {
                return Err(Error::Safetensors {
                    path: ck.dir.clone(),
                    reason: format!("tensor {weight}: inconsistent double-quant state"),
                });
            }
            Ok(nested.dequantize())
        }
    }
}

/// The 4-bit weights of a checkpoint: weight name -> its quant state.
pub fn quantized_weights(ck: &Checkpoint) -> Result<BTreeMap<String, StoredState>> {
    let mut out = BTreeMap::new();
    for name in ck.tensor_names() {
        if let Some((weight, _)) = name.split_once(QUANT_STATE_TAG) {
            out.insert(weight.to_string(), read_state(ck, name)?);
        }
    }
    Ok(out)
}
