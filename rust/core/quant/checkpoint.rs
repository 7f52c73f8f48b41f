//! Whole checkpoints: quantize a model folder to the pre-quantized layout transformers + bitsandbytes
//! save (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.*`),
//! and dequantize one back to a plain checkpoint.
//!
//! Quantizing streams each weight in block-aligned chunks. With double quantization the quant-state
//! JSON (and so the file layout) depends on each weight's absmax mean, so a first pass computes only
//! the absmax; the layout is then planned whole and the second pass writes every tensor at its offset.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::nested::{NestedAbsmax, NESTED_BLOCKSIZE};
use super::{
    block_absmax, check_blocksize, dequantize_4bit, quantize_codes, state, Absmax, Input, QuantType, QuantizeOptions,
    Quantized,
};
use crate::core::checkpoint::{Checkpoint, CheckpointWriter};
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::io::{OutputFile, PlannedTensor, SafetensorsFile, TensorEntry};
use crate::core::layers::{is_embedding_or_output, leaf, HEADS, OUTPUTS};
use crate::core::merge::is_conv1d;
use crate::core::pool;
use crate::core::progress::Progress;

/// Elements read per chunk: a multiple of every blocksize.
const CHUNK: usize = 1 << 18;

#[derive(Debug, Clone)]
pub struct QuantizeCheckpointOptions {
    pub quant: QuantizeOptions,
    pub compute_dtype: FloatType,
    /// Weights to quantize and whether each is a GPT-2 Conv1D (quantized transposed, as transformers
    /// does). None: decide from names (2-D weights that are not embeddings, heads or skipped).
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

#[derive(Debug, Clone, Default)]
pub struct QuantizeReport {
    pub output: PathBuf,
    pub tensors_quantized: usize,
    pub tensors_copied: usize,
    pub elements_quantized: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    /// What claiming OUT cleared away (leftovers of killed runs).
    pub warnings: Vec<String>,
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

/// Without transformers at hand: 2-D float weights other than embeddings, output/task heads and skips.
pub fn heuristic_targets(ck: &Checkpoint, skip: &[String]) -> Vec<(String, bool)> {
    // transformers leaves "the module of the last parameter" unquantized, but strips only ".weight" from
    // that parameter's name: a head whose last parameter is a bias (BERT's pooler, biased classifiers)
    // is quantized after all. So heads are kept only when they have no bias.
    let model_type = ck.model_type();
    ck.entries()
        .filter_map(|(_, t)| {
            let module = t.name.strip_suffix(".weight")?;
            let leaf = leaf(module);
            let is_head = HEADS.iter().any(|h| module == *h || module.ends_with(&format!(".{h}")));
            let kept_head = is_head && !ck.contains(&format!("{module}.bias"));
            let quantizable = t.shape.len() == 2
                && t.float_type().is_some()
                && !is_embedding_or_output(leaf)
                && !kept_head
                && !skipped(module, skip);
            quantizable.then(|| (t.name.clone(), is_conv1d(model_type, module)))
        })
        .collect()
}

/// A tensor read as the kernel wants it: raw little-endian values of its float type.
struct Loaded {
    words: Vec<u32>,
    ft: FloatType,
    len: usize,
}

impl Loaded {
    fn input(&self) -> Input<'_> {
        match self.ft {
            FloatType::F32 => Input::F32(&bytemuck::cast_slice(&self.words)[..self.len]),
            FloatType::F16 => Input::F16(&bytemuck::cast_slice(&self.words)[..self.len]),
            FloatType::BF16 => Input::BF16(&bytemuck::cast_slice(&self.words)[..self.len]),
        }
    }
}

fn read_range(file: &SafetensorsFile, entry: &TensorEntry, ft: FloatType, start: usize, len: usize) -> Result<Loaded> {
    let mut words = vec![0u32; (len * ft.size()).div_ceil(4)];
    let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len * ft.size()];
    file.read_bytes(entry, (start * ft.size()) as u64, bytes)?;
    Ok(Loaded { words, ft, len })
}

/// A Conv1D weight (in, out) read whole and transposed to (out, in), as transformers quantizes it.
fn read_transposed(file: &SafetensorsFile, entry: &TensorEntry, ft: FloatType) -> Result<Loaded> {
    let (rows, cols) = (entry.shape[0], entry.shape[1]);
    let src = read_range(file, entry, ft, 0, rows * cols)?;
    let mut out = Loaded {
        words: vec![0u32; src.words.len()],
        ft,
        len: src.len,
    };
    let size = ft.size();
    {
        let (s, d): (&[u8], &mut [u8]) = (
            bytemuck::cast_slice(&src.words),
            bytemuck::cast_slice_mut(&mut out.words),
        );
        for r in 0..rows {
            for c in 0..cols {
                let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
                d[to..to + size].copy_from_slice(&s[from..from + size]);
            }
        }
    }
    Ok(out)
}

/// Run `f` over a weight in block-aligned chunks (the whole of a transposed Conv1D at once).
fn for_chunks(
    file: &SafetensorsFile,
    entry: &TensorEntry,
    ft: FloatType,
    conv1d: bool,
    mut f: impl FnMut(usize, Input<'_>) -> Result<()>,
) -> Result<()> {
    if conv1d {
        let t = read_transposed(file, entry, ft)?;
        return f(0, t.input());
    }
    let n = entry.numel();
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let t = read_range(file, entry, ft, start, len)?;
        f(start, t.input())?;
        start += len;
    }
    Ok(())
}

fn absmax_of(file: &SafetensorsFile, entry: &TensorEntry, ft: FloatType, conv1d: bool, bs: usize) -> Result<Vec<f32>> {
    let mut absmax = Vec::with_capacity(entry.numel().div_ceil(bs));
    let mut x = vec![0f32; bs];
    for_chunks(file, entry, ft, conv1d, |_, input| {
        for start in (0..input.len()).step_by(bs) {
            let len = bs.min(input.len() - start);
            input.load(start, &mut x[..len]);
            absmax.push(block_absmax(&x[..len], len < bs).0);
        }
        Ok(())
    })?;
    Ok(absmax)
}

/// What is known about one weight before its data is written.
struct Target {
    conv1d: bool,
    ft: FloatType,
    /// Shape recorded in the quant state (transposed for Conv1D).
    shape: Vec<usize>,
    json: String,
}

fn quantized_names(weight: &str, qt: QuantType, double_quant: bool) -> Vec<String> {
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

pub fn quantize_checkpoint(
    base: &Path,
    out: &Path,
    opts: &QuantizeCheckpointOptions,
    progress: &dyn Progress,
) -> Result<QuantizeReport> {
    let started = Instant::now();
    let q = opts.quant;
    check_blocksize(q.blocksize)?;
    let mut writer = CheckpointWriter::new(out, &[base], opts.overwrite)?;
    let ck = Checkpoint::open(base)?;
    // With explicit targets a partly 4-bit checkpoint is fine: its 4-bit tensors are copied as they are.
    if opts.targets.is_none() && ck.tensor_names().any(|n| n.contains(".quant_state.")) {
        return Err(Error::InvalidArgument(format!(
            "{}: already quantized (use `lorafast dequantize` first)",
            base.display()
        )));
    }
    let skip_modules = skip_list(opts);
    let targets = match &opts.targets {
        Some(t) if opts.keep_heads => t
            .iter()
            .filter(|(name, _)| !skipped(name.strip_suffix(".weight").unwrap_or(name), &skip_modules))
            .cloned()
            .collect(),
        Some(t) => t.clone(),
        None => heuristic_targets(&ck, &skip_modules),
    };
    if targets.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no linear weight to quantize",
            base.display()
        )));
    }
    let pool = pool::build(opts.threads)?;
    let lookup = |name: &str| -> Result<(usize, &TensorEntry, FloatType)> {
        let (si, e) = ck
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("{}: no tensor {name} to quantize", base.display())))?;
        let ft = e.float_type().filter(|_| e.shape.len() == 2).ok_or_else(|| {
            Error::unsupported(
                &ck.shards[si].path,
                format!(
                    "tensor {name} ({:?}, shape {:?}) is not a float matrix",
                    e.dtype, e.shape
                ),
            )
        })?;
        Ok((si, e, ft))
    };
    // Pass 1: the quant state of every weight (needs the absmax mean when double-quantizing).
    let planned: Vec<(String, Target)> = pool.install(|| {
        targets
            .par_iter()
            .map(|(name, conv1d)| {
                let (si, e, ft) = lookup(name)?;
                let shape = if *conv1d {
                    vec![e.shape[1], e.shape[0]]
                } else {
                    e.shape.clone()
                };
                let absmax = if q.double_quant {
                    Absmax::Nested(NestedAbsmax::quantize(
                        &absmax_of(&ck.shards[si], e, ft, *conv1d, q.blocksize)?,
                        q.torch_threads,
                    ))
                } else {
                    Absmax::Plain(vec![])
                };
                let json = state::quant_state_json(
                    &Quantized { packed: vec![], absmax },
                    q.quant_type,
                    q.blocksize,
                    ft,
                    &shape,
                );
                Ok((
                    name.clone(),
                    Target {
                        conv1d: *conv1d,
                        ft,
                        shape,
                        json,
                    },
                ))
            })
            .collect::<Result<_>>()
    })?;
    let planned: HashMap<String, Target> = planned.into_iter().collect();

    // Plan every shard's layout.
    for (si, shard) in ck.shards.iter().enumerate() {
        let mut tensors = Vec::new();
        for e in shard.tensors() {
            match planned.get(&e.name) {
                None => tensors.push(PlannedTensor {
                    name: e.name.clone(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                }),
                Some(t) => {
                    let n: usize = t.shape.iter().product();
                    let nb = n.div_ceil(q.blocksize);
                    let names = quantized_names(&e.name, q.quant_type, q.double_quant);
                    let mut shapes = vec![
                        (Dtype::U8, vec![n.div_ceil(2), 1]),
                        (if q.double_quant { Dtype::U8 } else { Dtype::F32 }, vec![nb]),
                        (Dtype::F32, vec![16]),
                    ];
                    if q.double_quant {
                        shapes.push((Dtype::F32, vec![nb.div_ceil(NESTED_BLOCKSIZE)]));
                        shapes.push((Dtype::F32, vec![256]));
                    }
                    shapes.push((Dtype::U8, vec![t.json.len()]));
                    for (name, (dtype, shape)) in names.into_iter().zip(shapes) {
                        tensors.push(PlannedTensor { name, dtype, shape });
                    }
                }
            }
        }
        writer.add_shard(&ck.shard_names[si], &tensors)?;
    }
    writer.start(progress)?;

    // Pass 2: write everything.
    let jobs: Vec<(usize, &TensorEntry)> = ck.entries().collect();
    pool.install(|| {
        jobs.par_iter().try_for_each(|(si, e)| {
            if progress.cancelled() {
                return Err(Error::Interrupted);
            }
            let (file, out) = (&ck.shards[*si], writer.shard(*si));
            match planned.get(&e.name) {
                None => out.copy_from(&e.name, file, e)?,
                Some(t) => write_quantized(file, e, t, &q, out)?,
            }
            progress.advance(&e.name, e.len);
            Ok(())
        })
    })?;
    let config = ck.config.clone().map(|mut c| {
        c["quantization_config"] = bnb_config(&q, opts.compute_dtype, &skip_modules);
        c
    });
    let warnings = writer.notices();
    let (output, bytes_written) = writer.finish(ck.sharded, &ck.dir, |_| Ok(()), config.as_ref())?;
    Ok(QuantizeReport {
        output,
        tensors_quantized: planned.len(),
        tensors_copied: jobs.len() - planned.len(),
        elements_quantized: planned.values().map(|t| t.shape.iter().product::<usize>() as u64).sum(),
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

fn write_quantized(
    file: &SafetensorsFile,
    e: &TensorEntry,
    t: &Target,
    q: &QuantizeOptions,
    out: &OutputFile,
) -> Result<()> {
    let n = e.numel();
    let bs = q.blocksize;
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    let mut packed = Vec::new();
    for_chunks(file, e, t.ft, t.conv1d, |start, input| {
        packed.resize(input.len().div_ceil(2), 0);
        quantize_codes(
            input,
            q.quant_type,
            bs,
            &mut packed,
            &mut absmax[start / bs..(start + input.len()).div_ceil(bs)],
        );
        out.write_at(&e.name, (start / 2) as u64, &packed)
    })?;
    let names = quantized_names(&e.name, q.quant_type, q.double_quant);
    let f32_bytes = |v: &[f32]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
    let absmax = if q.double_quant {
        Absmax::Nested(NestedAbsmax::quantize(&absmax, q.torch_threads))
    } else {
        Absmax::Plain(absmax)
    };
    let json = state::quant_state_json(
        &Quantized {
            packed: vec![],
            absmax: absmax.clone(),
        },
        q.quant_type,
        bs,
        t.ft,
        &t.shape,
    );
    if json != t.json {
        return Err(Error::InvalidArgument(format!(
            "{}: tensor {} changed while it was being quantized",
            file.path.display(),
            e.name
        )));
    }
    match &absmax {
        Absmax::Plain(a) => out.write_at(&names[1], 0, &f32_bytes(a))?,
        Absmax::Nested(nested) => {
            out.write_at(&names[1], 0, &nested.codes)?;
            out.write_at(&names[3], 0, &f32_bytes(&nested.nested_absmax))?;
            out.write_at(&names[4], 0, &f32_bytes(&nested.code))?;
        }
    }
    out.write_at(&names[2], 0, &f32_bytes(&q.quant_type.table()))?;
    out.write_at(names.last().expect("quant state"), 0, json.as_bytes())
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

pub fn read_state(ck: &Checkpoint, key: &str) -> Result<StoredState> {
    let (si, e) = ck.get(key).expect("listed");
    let file = &ck.shards[si];
    let mut bytes = vec![0u8; e.len as usize];
    file.read_bytes(e, 0, &mut bytes)?;
    let bad = |why: String| Error::Safetensors {
        path: file.path.clone(),
        reason: format!("tensor {key}: {why}"),
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|err| bad(format!("quant state is not JSON ({err})")))?;
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("quant state lacks {k}")))
    };
    let quant_type = QuantType::parse(s("quant_type")?)?;
    let dtype = FloatType::parse(s("dtype")?).ok_or_else(|| bad(format!("unknown dtype {:?}", v["dtype"])))?;
    let blocksize = v
        .get("blocksize")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("quant state lacks blocksize".into()))? as usize;
    check_blocksize(blocksize)?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| bad("quant state lacks a shape".into()))?;
    let nested_offset = v.get("nested_offset").and_then(Value::as_f64).map(|x| x as f32);
    // The shape must describe the packed weight beside it: two codes a byte, and no overflow on the way.
    let weight = key.split(QUANT_STATE_TAG).next().unwrap_or(key);
    let numel = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    let packed = ck.get(weight).map(|(_, e)| e.len);
    match (numel, packed) {
        (Some(n), Some(len)) if n > 0 && n.div_ceil(2) as u64 == len && n.checked_mul(4).is_some() => {}
        (_, None) => return Err(bad(format!("no packed weight {weight} beside it"))),
        _ => {
            return Err(bad(format!(
                "quant state shape {shape:?} does not fit the {} packed bytes of {weight}",
                packed.unwrap_or(0)
            )))
        }
    }
    Ok(StoredState {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested_offset,
    })
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

fn is_aux(name: &str) -> bool {
    [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"]
        .iter()
        .any(|s| name.ends_with(s))
        || name.contains(QUANT_STATE_TAG)
}

/// Dequantize one stored weight to `st.dtype` bytes, in its stored (out, in) layout; streamed in chunks
/// through `sink(start_element, bytes)`.
pub fn dequantize_weight(
    ck: &Checkpoint,
    weight: &str,
    st: &StoredState,
    mut sink: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<()> {
    let absmax = stored_absmax(ck, weight, st)?;
    let (si, e) = ck.get(weight).expect("listed");
    let n: usize = st.shape.iter().product();
    if e.len as usize != n.div_ceil(2) || absmax.len() != n.div_ceil(st.blocksize) {
        return Err(Error::Safetensors {
            path: ck.shards[si].path.clone(),
            reason: format!(
                "tensor {weight}: {} packed bytes and {} absmax values do not fit shape {:?}",
                e.len,
                absmax.len(),
                st.shape
            ),
        });
    }
    let mut start = 0;
    let mut packed = vec![0u8; CHUNK / 2];
    while start < n {
        let len = CHUNK.min(n - start);
        let p = &mut packed[..len.div_ceil(2)];
        ck.shards[si].read_bytes(e, (start / 2) as u64, p)?;
        let bytes = dequantize_4bit(
            p,
            &absmax[start / st.blocksize..],
            st.quant_type,
            st.blocksize,
            len,
            st.dtype,
        )?;
        sink(start, &bytes)?;
        start += len;
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct DequantizeOptions {
    pub dtype: Option<FloatType>,
    pub threads: Option<usize>,
    pub overwrite: bool,
    /// Dequantize only these weights, keeping every other 4-bit weight (and the config's
    /// quantization_config) as it is. None: all of them.
    pub only: Option<Vec<String>>,
}

pub fn dequantize_checkpoint(
    qdir: &Path,
    out: &Path,
    opts: &DequantizeOptions,
    progress: &dyn Progress,
) -> Result<QuantizeReport> {
    let started = Instant::now();
    let mut writer = CheckpointWriter::new(out, &[qdir], opts.overwrite)?;
    let ck = Checkpoint::open(qdir)?;
    let mut states = quantized_weights(&ck)?;
    if states.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no 4-bit (bitsandbytes) weights in this checkpoint",
            qdir.display()
        )));
    }
    if let Some(only) = &opts.only {
        if let Some(missing) = only.iter().find(|w| !states.contains_key(*w)) {
            return Err(Error::InvalidArgument(format!(
                "{}: {missing} is not a 4-bit weight",
                qdir.display()
            )));
        }
        states.retain(|w, _| only.contains(w));
    }
    // The auxiliary tensors of the weights being dequantized are dropped; others stay.
    let dropped = |name: &str| is_aux(name) && states.keys().any(|w| name.starts_with(&format!("{w}.")));
    let pool = pool::build(opts.threads)?;
    let model_type = ck.model_type().map(str::to_string);
    let conv1d = |w: &str| is_conv1d(model_type.as_deref(), w.strip_suffix(".weight").unwrap_or(w));
    for (si, shard) in ck.shards.iter().enumerate() {
        let mut tensors = Vec::new();
        for e in shard.tensors() {
            if let Some(st) = states.get(&e.name) {
                let mut shape = st.shape.clone();
                if conv1d(&e.name) && shape.len() == 2 {
                    shape.swap(0, 1);
                }
                tensors.push(PlannedTensor {
                    name: e.name.clone(),
                    dtype: opts.dtype.unwrap_or(st.dtype).to_safetensors(),
                    shape,
                });
            } else if !dropped(&e.name) {
                let dtype = match (e.float_type(), opts.dtype) {
                    (Some(_), Some(d)) => d.to_safetensors(),
                    _ => e.dtype,
                };
                tensors.push(PlannedTensor {
                    name: e.name.clone(),
                    dtype,
                    shape: e.shape.clone(),
                });
            }
        }
        writer.add_shard(&ck.shard_names[si], &tensors)?;
    }
    writer.start(progress)?;
    let jobs: Vec<(usize, &TensorEntry)> = ck.entries().filter(|(_, e)| !dropped(&e.name)).collect();
    pool.install(|| {
        jobs.par_iter().try_for_each(|(si, e)| {
            if progress.cancelled() {
                return Err(Error::Interrupted);
            }
            let out = writer.shard(*si);
            match states.get(&e.name) {
                Some(st) => {
                    let target = opts.dtype.unwrap_or(st.dtype);
                    let transpose = conv1d(&e.name) && st.shape.len() == 2;
                    let mut whole = if transpose {
                        Vec::with_capacity(st.shape.iter().product::<usize>() * target.size())
                    } else {
                        vec![]
                    };
                    dequantize_weight(&ck, &e.name, st, |start, bytes| {
                        let bytes = convert(bytes, st.dtype, target);
                        if transpose {
                            whole.extend_from_slice(&bytes);
                            Ok(())
                        } else {
                            out.write_at(&e.name, (start * target.size()) as u64, &bytes)
                        }
                    })?;
                    if transpose {
                        out.write_at(
                            &e.name,
                            0,
                            &transpose_bytes(&whole, st.shape[0], st.shape[1], target.size()),
                        )?;
                    }
                }
                None => match (e.float_type(), opts.dtype) {
                    (Some(src), Some(dst)) if src != dst && !is_aux(&e.name) => {
                        let mut bytes = vec![0u8; e.len as usize];
                        ck.shards[*si].read_bytes(e, 0, &mut bytes)?;
                        out.write_at(&e.name, 0, &convert(&bytes, src, dst))?;
                    }
                    _ => out.copy_from(&e.name, &ck.shards[*si], e)?,
                },
            }
            progress.advance(&e.name, e.len);
            Ok(())
        })
    })?;
    let config = ck.config.clone().map(|mut c| {
        if let (Some(obj), None) = (c.as_object_mut(), &opts.only) {
            obj.remove("quantization_config");
        }
        if let Some(d) = opts.dtype {
            c["dtype"] = Value::String(d.torch_name().into());
        }
        c
    });
    let warnings = writer.notices();
    let (output, bytes_written) = writer.finish(ck.sharded, &ck.dir, |_| Ok(()), config.as_ref())?;
    Ok(QuantizeReport {
        output,
        tensors_quantized: states.len(),
        tensors_copied: jobs.len() - states.len(),
        elements_quantized: states.values().map(|s| s.shape.iter().product::<usize>() as u64).sum(),
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Float bytes of one type re-encoded as another (round to nearest even).
fn convert(bytes: &[u8], from: FloatType, to: FloatType) -> Vec<u8> {
    if from == to {
        return bytes.to_vec();
    }
    let mut vals = vec![0f32; bytes.len() / from.size()];
    from.decode(bytes, &mut vals);
    let mut out = vec![0u8; vals.len() * to.size()];
    to.encode(&vals, &mut out);
    out
}

fn transpose_bytes(src: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
            out[to..to + size].copy_from_slice(&src[from..from + size]);
        }
    }
    out
}
