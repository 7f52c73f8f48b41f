//! GGUF output from the streaming engine: the merge runs as it does for a float checkpoint, and each
//! merged tile, on its way out, is renamed, rearranged and encoded as llama.cpp's tools would write the
//! merged model - `convert_hf_to_gguf.py` for f32/f16/bf16/q8_0, that then `llama-quantize` for the
//! 4-bit mixes - into one staging file renamed into place when complete.
//!
//! - `arch`: names, dropped tensors and transforms per architecture.
//! - `types`: each tensor's ggml type (the converter's rules, llama-quantize's mixes).
//! - `quants`: ggml's reference block quantizers.
//! - `file`: the container layout.
//!
//! The key-value metadata (hyperparameters, tokenizer) is built by the Python layer with the `gguf`
//! package and arrives here as bytes.
pub mod arch;
pub mod file;
pub mod lora;
pub mod quants;
pub mod types;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::core::dtype::{simd, FloatType};
use crate::core::error::{Error, Result};
use crate::core::io::{SafetensorsFile, TensorEntry};
use crate::core::linalg;
use crate::core::merge::plan;
use crate::core::merge::sink::Dest;
use crate::core::merge::source::{round_to, Base};
use crate::core::merge::{layout, run_jobs, MergeOptions};
use crate::core::peft::Adapter;
use crate::core::pool;
use crate::core::progress::Progress;
use crate::core::staging::Staging;

use arch::{Arch, Heads, Transform};
use file::{GgufFile, TensorInfo};
use quants::GgmlType;
pub use types::FileType;

#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub file_type: FileType,
    /// Adapter weights, threads, overwrite, safe merge (the output dtype and mode are GGUF's).
    pub merge: MergeOptions,
    /// Vectors the converter computes rather than reads (Llama 3's `rope_freqs.weight`), as (GGUF name,
    /// f32 values): written first, as the converter's `generate_extra_tensors` yields them.
    pub extra: Vec<(String, Vec<f32>)>,
}

/// One tensor of the GGUF file, and where its values come from.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub info: TensorInfo,
    /// The merged model's tensors it is made of (merge job output names): one, or a layer's experts in
    /// expert order for a stacked expert tensor; none for a tensor the converter computes.
    pub sources: Vec<String>,
    /// The merged model's dtype for it (the values the converter would read).
    pub source: FloatType,
    /// The converter's type, which a llama-quantize mix starts from (values are rounded through it).
    pub converted: GgmlType,
    pub transform: Transform,
    /// The merged tensor as rows x cols (a vector is one row; stacked experts are their rows in turn).
    pub rows: usize,
    pub cols: usize,
    /// For a transform that splits its values in two (GPT-OSS's gate/up), the tensor that takes the
    /// second half (its index in the plan).
    pub partner: Option<usize>,
}

/// What the file will hold, in file order.
#[derive(Debug, Clone)]
pub struct GgufPlan {
    pub arch: Arch,
    /// `config.json` `architectures[0]`.
    pub hf_arch: String,
    /// The converter's `--outtype` the tensors start from (the requested one, or for a llama-quantize mix
    /// the model's own dtype).
    pub outtype: FileType,
    pub tensors: Vec<GgufTensor>,
    /// The merged model's config.json (the base's, rewritten by the merge: a task class, an untied or
    /// resized vocabulary, a pad token), which the converter would read.
    pub config: Option<serde_json::Value>,
}

fn config_usize(base: &Base, keys: &[&str]) -> Option<usize> {
    let config = base.ck.config.as_ref()?;
    keys.iter()
        .find_map(|k| config.get(*k).and_then(|v| v.as_u64()))
        .map(|v| v as usize)
}

fn float_type(dtype: safetensors::Dtype) -> Option<FloatType> {
    FloatType::from_safetensors(dtype)
}

/// Plan the merge (as a float checkpoint in the model's dtypes) and the GGUF file it becomes.
fn plan_all(base: &Base, adapters: &[Adapter], opts: &GgufOptions) -> Result<(GgufPlan, plan::Plan)> {
    let dir = &base.ck.dir;
    let merge_opts = MergeOptions {
        dtype: None,
        mode: crate::core::merge::Mode::Float,
        stats: false,
        ..opts.merge.clone()
    };
    let merge_plan = plan::plan(base, adapters, &merge_opts)?;
    // The merged model's architecture: a task adapter rewrites it (BertModel -> BertForSequenceClassification).
    let merged_arch = merge_plan
        .config
        .as_ref()
        .and_then(|c| c.get("architectures")?.get(0)?.as_str().map(str::to_string));
    let hf_arch = merged_arch
        .or_else(|| base.ck.architecture().map(str::to_string))
        .ok_or_else(|| {
            Error::json(
                dir.join("config.json"),
                "no architectures entry: cannot tell the GGUF architecture",
            )
        })?;
    let (arch, prefix_model) = arch::arch_in(dir, &hf_arch)?;
    let n_head = config_usize(base, &["n_heads", "num_attention_heads", "n_head"]).unwrap_or(0);
    let heads = Heads {
        n_head,
        n_head_kv: config_usize(base, &["n_kv_heads", "num_key_value_heads"]).unwrap_or(n_head),
        position_offset: config_usize(base, &["pad_token_id"]).map_or(0, |p| p + 1),
    };
    if arch == Arch::Llama && n_head == 0 {
        return Err(Error::json(
            dir.join("config.json"),
            "no num_attention_heads: cannot permute q/k for llama.cpp",
        ));
    }
    let planned = layout::planned(base, adapters, &merge_plan.jobs);
    // The converter reads shards in file-name order and each shard's tensors sorted by name.
    let mut order: Vec<usize> = (0..merge_plan.jobs.len()).collect();
    let shard_name = |i: usize| {
        base.ck
            .shard_names
            .get(merge_plan.jobs[i].out_shard)
            .map(String::as_str)
            .unwrap_or("")
    };
    order.sort_by(|&a, &b| {
        (shard_name(a), &merge_plan.jobs[a].out_name).cmp(&(shard_name(b), &merge_plan.jobs[b].out_name))
    });
    let mut tensors: Vec<GgufTensor> = opts
        .extra
        .iter()
        .map(|(name, values)| GgufTensor {
            info: TensorInfo {
                name: name.clone(),
                shape: vec![values.len()],
                ty: GgmlType::F32,
                trim_dims: false,
            },
            sources: Vec::new(), // no merge job writes it
            source: FloatType::F32,
            converted: GgmlType::F32,
            transform: Transform::None,
            rows: 1,
            cols: values.len(),
            partner: None,
        })
        .collect();
    let float_source = |i: usize| -> Result<(FloatType, usize, usize)> {
        let (name, out) = (&merge_plan.jobs[i].out_name, &planned[i][0].0);
        let source = float_type(out.dtype).ok_or_else(|| {
            Error::unsupported(
                dir,
                format!("tensor {name}: dtype {:?} has no GGUF float type", out.dtype),
            )
        })?;
        match out.shape.as_slice() {
            [n] => Ok((source, 1, *n)),
            [r, c] => Ok((source, *r, *c)),
            other => Err(Error::unsupported(
                dir,
                format!("tensor {name}: shape {other:?}; lorafast's GGUF writer takes vectors and matrices"),
            )),
        }
    };
    // The converter's expert count (Qwen2MoeModel: num_local_experts or num_experts; LlamaModel, for
    // Mixtral: num_local_experts).
    let n_experts = match arch {
        Arch::Llama => config_usize(base, &["num_local_experts"]),
        _ => config_usize(base, &["num_local_experts", "num_experts"]),
    };
    // A layer's expert matrices as read, (slot, expert) -> (job, stacked tensor's name), until the layer
    // has all of them: then the converter yields its three stacked tensors.
    let mut experts: BTreeMap<usize, LayerExperts> = BTreeMap::new();
    for i in order {
        let job = &merge_plan.jobs[i];
        if let Some(x) = arch::expert_tensor(arch, &job.out_name) {
            let n = n_experts.filter(|&n| x.expert < n).ok_or_else(|| {
                Error::json(
                    dir.join("config.json"),
                    format!(
                        "tensor {}: expert {} but the config's expert count is {:?} (num_local_experts / num_experts)",
                        job.out_name, x.expert, n_experts
                    ),
                )
            })?;
            let layer = experts.entry(x.layer).or_default();
            layer.insert((x.slot, x.expert), (i, x.gguf_name));
            if layer.len() < 3 * n {
                continue;
            }
            let layer = experts.remove(&x.layer).expect("present");
            for slot in 0..3 {
                // 3 * n distinct (slot < 3, expert < n) keys: every one is there.
                let jobs: Vec<usize> = (0..n).map(|e| layer[&(slot, e)].0).collect();
                let first = float_source(jobs[0])?;
                for &j in &jobs {
                    if float_source(j)? != first || first.1 == 1 {
                        return Err(Error::unsupported(
                            dir,
                            format!(
                                "tensor {}: not a matrix of the dtype and shape of {} (the converter stacks them)",
                                merge_plan.jobs[j].out_name, merge_plan.jobs[jobs[0]].out_name
                            ),
                        ));
                    }
                }
                let (source, rows, cols) = first;
                let name = layer[&(slot, 0)].1.clone();
                tensors.push(GgufTensor {
                    info: TensorInfo {
                        name,
                        shape: vec![n, rows, cols],
                        ty: GgmlType::F32,
                        trim_dims: false,
                    },
                    sources: jobs.iter().map(|&j| merge_plan.jobs[j].out_name.clone()).collect(),
                    source,
                    converted: GgmlType::F32,
                    transform: Transform::None,
                    rows: n * rows,
                    cols,
                    partner: None,
                });
            }
            continue;
        }
        let Some((gguf_name, transform)) = arch::map_tensor(arch, prefix_model, heads, &job.out_name)
            .map_err(|reason| Error::unsupported(dir, reason))?
        else {
            continue;
        };
        let out = &planned[i][0].0;
        let (source, rows, cols) = match (transform, out.shape.as_slice()) {
            // (the dtype check of float_source, on the shape it does not take)
            (Transform::Experts { .. }, &[e, a, b]) => {
                let as_matrix = float_type(out.dtype).map(|s| (s, e * a, b));
                as_matrix.ok_or_else(|| {
                    Error::unsupported(
                        dir,
                        format!("tensor {}: dtype {:?} has no GGUF float type", job.out_name, out.dtype),
                    )
                })?
            }
            (Transform::Experts { .. }, other) => {
                return Err(Error::unsupported(
                    dir,
                    format!(
                        "tensor {}: shape {other:?}, not fused experts [E, in, out]",
                        job.out_name
                    ),
                ))
            }
            _ => float_source(i)?,
        };
        let shape = match (transform, out.shape.as_slice()) {
            (Transform::Transpose, _) => vec![cols, rows],
            (Transform::Experts { split }, &[e, a, b]) => vec![e, if split { b / 2 } else { b }, a],
            (Transform::SplitBias, &[e, b]) => vec![e, b / 2],
            (Transform::DropRows { rows: k }, &[r, c]) if r > k => vec![r - k, c],
            (Transform::DropRows { rows: k }, other) => {
                return Err(Error::unsupported(
                    dir,
                    format!(
                        "tensor {}: shape {other:?}, but the converter drops its first {k} rows (pad_token_id + 1)",
                        job.out_name
                    ),
                ))
            }
            _ => out.shape.clone(),
        };
        if transform.splits() && (cols % 2 != 0 || out.shape.len() == 1) {
            return Err(Error::unsupported(
                dir,
                format!(
                    "tensor {}: shape {:?}; GPT-OSS's gate/up columns alternate, so they come in pairs per expert",
                    job.out_name, out.shape
                ),
            ));
        }
        if let Transform::Permute { heads } = transform {
            let n = if out.shape.len() == 1 { cols } else { rows };
            if heads == 0 || n % (2 * heads) != 0 {
                return Err(Error::unsupported(
                    dir,
                    format!(
                        "tensor {}: {n} rows do not split into {heads} heads of rotary pairs",
                        job.out_name
                    ),
                ));
            }
        }
        tensors.push(GgufTensor {
            info: TensorInfo {
                name: gguf_name,
                shape,
                ty: GgmlType::F32,
                trim_dims: false,
            },
            sources: vec![job.out_name.clone()],
            source,
            converted: GgmlType::F32,
            transform,
            rows,
            cols,
            partner: None,
        });
        if transform.splits() {
            // The up half, yielded right after the gate half; its values come with the gate's tiles.
            let gate = tensors.last().expect("just pushed").clone();
            tensors.push(GgufTensor {
                info: TensorInfo {
                    name: arch::split_partner(&gate.info.name),
                    ..gate.info
                },
                sources: Vec::new(),
                transform: Transform::None,
                ..gate
            });
        }
    }
    if let Some((layer, got)) = experts.first_key_value() {
        return Err(Error::unsupported(
            dir,
            format!(
                "layer {layer}: {} of the {} expert matrices the converter stacks (it refuses such a model)",
                got.len(),
                3 * n_experts.unwrap_or(0)
            ),
        ));
    }
    let outtype = if opts.file_type.is_quantize_mix() {
        // llama-quantize starts from the converter's output in the model's own dtype.
        match tensors.iter().find(|t| t.info.shape.len() >= 2).map(|t| t.source) {
            Some(FloatType::BF16) => FileType::BF16,
            Some(FloatType::F16) => FileType::F16,
            _ => FileType::F32,
        }
    } else {
        opts.file_type
    };
    for t in &mut tensors {
        t.converted = types::converter_type(&t.info.name, &t.info.shape, outtype);
        t.info.ty = t.converted;
    }
    if opts.file_type.is_quantize_mix() {
        let names: Vec<&str> = tensors.iter().map(|t| t.info.name.as_str()).collect();
        let order = types::quantize_order(&names);
        let n_layer = config_usize(base, &["n_layers", "num_hidden_layers", "n_layer", "num_layers"]).unwrap_or(0);
        let mut mix = types::QuantizeMix::new(
            opts.file_type,
            arch,
            &names,
            n_layer,
            heads.n_head,
            heads.n_head_kv,
            n_experts.unwrap_or(0),
        );
        let mut reordered = Vec::with_capacity(tensors.len());
        for i in order {
            let mut t = tensors[i].clone();
            t.info.ty = mix.next(&t.info.name, &t.info.shape, t.converted);
            t.info.trim_dims = true;
            reordered.push(t);
        }
        tensors = reordered;
    }
    for i in 0..tensors.len() {
        if tensors[i].transform.splits() {
            let name = arch::split_partner(&tensors[i].info.name);
            tensors[i].partner = tensors.iter().position(|t| t.info.name == name);
        }
    }
    Ok((
        GgufPlan {
            arch,
            hf_arch,
            outtype,
            tensors,
            config: merge_plan.config.clone(),
        },
        merge_plan,
    ))
}

/// The GGUF file `merge` + convert would write, without writing it (for the metadata, which needs the
/// tensor list: parameter count, file type).
pub fn plan(base: &Path, adapters: &[PathBuf], opts: &GgufOptions) -> Result<GgufPlan> {
    let base = Base::open(base)?;
    let adapters: Vec<Adapter> = adapters.iter().map(|p| Adapter::open(p)).collect::<Result<_>>()?;
    Ok(plan_all(&base, &adapters, opts)?.0)
}

#[derive(Debug, Clone, Default)]
pub struct GgufReport {
    pub output: PathBuf,
    pub tensors: usize,
    /// Tensors per ggml type name, in first-seen order.
    pub types: Vec<(String, usize)>,
    pub bytes_written: u64,
    pub seconds: f64,
    pub nonfinite_values: u64,
    pub warnings: Vec<String>,
}

/// Merge `adapters` into `base` and write the result as the GGUF file `out`, with the key-value section
/// `kv` (`n_kv` pairs, GGUF-encoded).
pub fn write(
    base: &Path,
    adapters: &[PathBuf],
    out: &Path,
    kv: &[u8],
    n_kv: u64,
    opts: &GgufOptions,
    progress: &dyn Progress,
) -> Result<GgufReport> {
    let started = Instant::now();
    let inputs: Vec<&Path> = std::iter::once(base)
        .chain(adapters.iter().map(PathBuf::as_path))
        .collect();
    let staging = Staging::new_file(out, &inputs, opts.merge.overwrite)?;
    let base = Base::open(base)?;
    let adapters: Vec<Adapter> = adapters.iter().map(|p| Adapter::open(p)).collect::<Result<_>>()?;
    let (gplan, merge_plan) = plan_all(&base, &adapters, opts)?;
    let infos: Vec<TensorInfo> = gplan.tensors.iter().map(|t| t.info.clone()).collect();
    let out = GgufFile::create(staging, kv, n_kv, &infos, started)?;
    let dest = GgufDest {
        out: &out,
        by_name: gplan
            .tensors
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                // A stacked tensor's experts follow one another, each rows/len of its rows.
                let part = t.rows * t.cols / t.sources.len().max(1);
                t.sources
                    .iter()
                    .enumerate()
                    .map(move |(k, s)| (s.clone(), (i, k * part)))
            })
            .collect(),
        tensors: &gplan.tensors,
        held: Mutex::new(HashMap::new()),
        held_heads: Mutex::new(HashMap::new()),
        held_experts: Mutex::new(HashMap::new()),
    };
    for (name, values) in &opts.extra {
        let i = gplan
            .tensors
            .iter()
            .position(|t| &t.info.name == name)
            .expect("planned");
        let mut bytes = vec![0u8; gplan.tensors[i].info.nbytes() as usize];
        gplan.tensors[i].info.ty.encode_row(values, &mut bytes);
        out.put(out.offsets[i], &bytes)?;
    }
    let planned = layout::planned(&base, &adapters, &merge_plan.jobs);
    progress.start(planned.iter().flatten().map(|(t, _)| t.byte_len() as u64).sum());
    let pool = pool::build(opts.merge.threads)?;
    let merge_opts = MergeOptions {
        stats: false,
        ..opts.merge.clone()
    };
    let (nonfinite, _) = run_jobs(
        &base,
        &adapters,
        &merge_plan.jobs,
        &planned,
        &merge_opts,
        &pool,
        progress,
        &dest,
    )?;
    out.finish(merge_plan.warnings, nonfinite)
}

/// Whether `bytes` in `src` encode to the same bytes in GGUF type `ty`: an f32 or f16 tensor kept in its
/// type is copied by the converter; bf16 goes through f32 and back, which changes only NaNs (quieted).
fn same_encoding(src: FloatType, ty: GgmlType, bytes: &[u8]) -> bool {
    match (src, ty) {
        (FloatType::F32, GgmlType::F32) | (FloatType::F16, GgmlType::F16) => true,
        // (no early exit: the scan vectorizes, and a NaN is rare)
        (FloatType::BF16, GgmlType::BF16) => !bytes.chunks_exact(2).fold(false, |nan, h| {
            nan | (u16::from_le_bytes([h[0], h[1]]) & 0x7fff > 0x7f80)
        }),
        _ => false,
    }
}

/// Receives the merged model's tensors, tile by tile in its float encoding, and writes their GGUF form.
struct GgufDest<'a> {
    out: &'a GgufFile,
    /// Merged tensor -> (GGUF tensor, the element of it where the merged tensor starts).
    by_name: HashMap<String, (usize, usize)>,
    tensors: &'a [GgufTensor],
    /// Transposed tensors are gathered whole before their rows exist: tensor -> (values, filled).
    held: Mutex<HashMap<usize, (Vec<f32>, usize)>>,
    /// Heads of permuted tensors split across tiles: (tensor, head) -> (encoded rows, rows filled).
    held_heads: Mutex<HashMap<(usize, usize), HeldHead>>,
    /// Experts of GPT-OSS's fused tensors split across tiles: (tensor, expert) -> (values, filled).
    held_experts: Mutex<HashMap<(usize, usize), HeldValues>>,
}

/// One layer's expert matrices read so far: (slot, expert) -> (merge job, stacked tensor's GGUF name).
type LayerExperts = HashMap<(usize, usize), (usize, String)>;

/// Values gathered so far, and how many of them are filled.
type HeldValues = (Vec<f32>, usize);

/// A head's encoded rows, and how many of them are filled.
type HeldHead = (Vec<u8>, usize);

impl GgufDest<'_> {
    fn put(&self, at: u64, bytes: &[u8]) -> Result<()> {
        self.out.put(at, bytes)
    }

    /// Expert `e` of GPT-OSS's fused tensor `i` (its `[in, out]` matrix, or its bias row), whole: written
    /// transposed, and for gate/up split between this tensor and its partner.
    fn put_expert(&self, i: usize, e: usize, slab: &[f32]) -> Result<()> {
        let t = &self.tensors[i];
        let ty = t.info.ty;
        let write = |tensor: usize, rows: &[f32], width: usize| -> Result<()> {
            let ty = self.tensors[tensor].info.ty;
            let n_rows = rows.len() / width;
            let mut out = vec![0u8; ty.row_bytes(width) * n_rows];
            ty.encode_row(rows, &mut out);
            self.put(self.out.offsets[tensor] + (e * out.len()) as u64, &out)
        };
        let halves = |v: &[f32], width: usize| -> (Vec<f32>, Vec<f32>) {
            // rows (of `width`) alternate: even rows to the first half, odd to the second
            let (mut even, mut odd) = (Vec::with_capacity(v.len() / 2), Vec::with_capacity(v.len() / 2));
            for (r, row) in v.chunks_exact(width).enumerate() {
                if r % 2 == 0 {
                    even.extend_from_slice(row)
                } else {
                    odd.extend_from_slice(row)
                }
            }
            (even, odd)
        };
        let partner = || t.partner.expect("planned with its partner");
        match t.transform {
            Transform::Experts { split } => {
                let per_in = t.rows / t.info.shape[0];
                let tr = linalg::transpose(slab, per_in, t.cols); // [out, in]
                if !split {
                    return write(i, &tr, per_in);
                }
                let (gate, up) = halves(&tr, per_in);
                write(i, &gate, per_in)?;
                write(partner(), &up, per_in)
            }
            Transform::SplitBias => {
                let (gate, up) = halves(slab, 1);
                write(i, &gate, gate.len())?;
                write(partner(), &up, up.len())
            }
            _ => unreachable!("only GPT-OSS's expert transforms gather experts ({ty:?})"),
        }
    }

    /// Values `[start, start + values.len())` of tensor `i` in the merged model's order.
    fn values(&self, i: usize, start: usize, values: &mut [f32]) -> Result<()> {
        let t = &self.tensors[i];
        // The converter's output rounds; a llama-quantize mix reads those rounded values.
        match t.converted {
            GgmlType::F16 if t.source != FloatType::F16 => {
                values.iter_mut().for_each(|v| *v = FloatType::F16.round_trip(*v))
            }
            GgmlType::BF16 if t.source != FloatType::BF16 => {
                values.iter_mut().for_each(|v| *v = FloatType::BF16.round_trip(*v))
            }
            _ => {}
        }
        let ty = t.info.ty;
        let offset = self.out.offsets[i];
        match t.transform {
            Transform::None => {
                let cols = t.cols;
                let mut out = vec![0u8; ty.row_bytes(cols) * (values.len() / cols)];
                ty.encode_row(values, &mut out);
                self.put(offset + (start / cols * ty.row_bytes(cols)) as u64, &out)
            }
            Transform::DropRows { rows: skip } => {
                // Whole rows arrive (as for Transform::None); those before `skip` are not written.
                let cols = t.cols;
                let (first_row, n_rows) = (start / cols, values.len() / cols);
                let from = skip.saturating_sub(first_row).min(n_rows);
                let mut out = vec![0u8; ty.row_bytes(cols) * (n_rows - from)];
                ty.encode_row(&values[from * cols..], &mut out);
                let at = (first_row + from).saturating_sub(skip) * ty.row_bytes(cols);
                self.put(offset + at as u64, &out)
            }
            Transform::Permute { heads } => {
                // A matrix permutes rows; a bias (one row) permutes its elements. Rows stay within their
                // head, so each head is encoded into one buffer and written at once (a head split across
                // tiles waits in `held_heads` for its other rows).
                let (n, width) = if t.rows == 1 { (t.cols, 1) } else { (t.rows, t.cols) };
                let row_bytes = ty.row_bytes(width);
                let hd = n / heads;
                let (r0, r1) = (start / width, start / width + values.len() / width);
                for h in r0 / hd..r1.div_ceil(hd) {
                    let (a, b) = (r0.max(h * hd), r1.min((h + 1) * hd));
                    let encode = |buf: &mut [u8]| {
                        for r in a..b {
                            let dst = arch::permuted_row(r, n, heads) - h * hd;
                            let row = &values[(r - r0) * width..(r - r0 + 1) * width];
                            ty.encode_row(row, &mut buf[dst * row_bytes..(dst + 1) * row_bytes]);
                        }
                    };
                    let at = offset + (h * hd * row_bytes) as u64;
                    if b - a == hd {
                        let mut whole = vec![0u8; hd * row_bytes];
                        encode(&mut whole);
                        self.put(at, &whole)?;
                        continue;
                    }
                    let whole = {
                        let mut held = self.held_heads.lock().expect("never poisoned");
                        let entry = held.entry((i, h)).or_insert_with(|| (vec![0u8; hd * row_bytes], 0));
                        encode(&mut entry.0);
                        entry.1 += b - a;
                        if entry.1 < hd {
                            continue;
                        }
                        held.remove(&(i, h)).expect("present").0
                    };
                    self.put(at, &whole)?;
                }
                Ok(())
            }
            Transform::Experts { .. } | Transform::SplitBias => {
                // Each expert's values are gathered whole (a tile may hold part of one, or several),
                // then written in GGUF's order.
                let n_experts = t.info.shape[0];
                let per = t.rows * t.cols / n_experts;
                let mut at = 0;
                while at < values.len() {
                    let (e, within) = ((start + at) / per, (start + at) % per);
                    let n = (per - within).min(values.len() - at);
                    let slab = &values[at..at + n];
                    at += n;
                    let whole = if n == per {
                        slab.to_vec()
                    } else {
                        let mut held = self.held_experts.lock().expect("never poisoned");
                        let (buf, filled) = held.entry((i, e)).or_insert_with(|| (vec![0f32; per], 0));
                        buf[within..within + n].copy_from_slice(slab);
                        *filled += n;
                        if *filled < per {
                            continue;
                        }
                        held.remove(&(i, e)).expect("present").0
                    };
                    self.put_expert(i, e, &whole)?;
                }
                Ok(())
            }
            Transform::Transpose => {
                let numel = t.rows * t.cols;
                let whole = {
                    let mut held = self.held.lock().expect("never poisoned");
                    let (buf, filled) = held.entry(i).or_insert_with(|| (vec![0f32; numel], 0));
                    buf[start..start + values.len()].copy_from_slice(values);
                    *filled += values.len();
                    if *filled < numel {
                        return Ok(());
                    }
                    held.remove(&i).expect("present").0
                };
                let tr = linalg::transpose(&whole, t.rows, t.cols);
                let mut out = vec![0u8; ty.row_bytes(t.rows) * t.cols];
                ty.encode_row(&tr, &mut out);
                self.put(offset, &out)
            }
        }
    }
}

impl Dest for GgufDest<'_> {
    fn write(&self, tensor: &str, at: u64, bytes: &[u8]) -> Result<()> {
        let Some(&(i, first)) = self.by_name.get(tensor) else {
            return Ok(()); // a tensor the converter drops
        };
        let t = &self.tensors[i];
        let src = t.source;
        if t.transform == Transform::None && same_encoding(src, t.info.ty, bytes) {
            // The converter's output holds these bytes unchanged: write them as they are.
            return self.put(self.out.offsets[i] + (first * src.size()) as u64 + at, bytes);
        }
        let mut values = vec![0f32; bytes.len() / src.size()];
        src.decode(bytes, &mut values);
        self.values(i, first + at as usize / src.size(), &mut values)
    }

    fn copy(&self, tensor: &str, file: &SafetensorsFile, entry: &TensorEntry) -> Result<()> {
        let Some(&(i, _)) = self.by_name.get(tensor) else {
            return Ok(());
        };
        let t = &self.tensors[i];
        let size = t.source.size();
        let rows = t.rows / t.sources.len().max(1);
        // Whole rows at a time, about 64 Ki elements.
        let chunk_rows = ((1 << 16) / t.cols.max(1)).max(1);
        let mut bytes = Vec::new();
        for r0 in (0..rows).step_by(chunk_rows) {
            let n = chunk_rows.min(rows - r0);
            bytes.resize(n * t.cols * size, 0);
            file.read_bytes(entry, (r0 * t.cols * size) as u64, &mut bytes)?;
            self.write(tensor, (r0 * t.cols * size) as u64, &bytes)?;
        }
        Ok(())
    }

    fn state(&self, _tensor: &str, _json: &str) -> Result<()> {
        unreachable!("a GGUF merge has float outputs only")
    }

    fn write_float(
        &self,
        tensor: &str,
        t: FloatType,
        start: usize,
        values: &mut [f32],
        buf: &mut Vec<u8>,
    ) -> Result<bool> {
        let Some(&(i, first)) = self.by_name.get(tensor) else {
            return Ok(false); // a tensor the converter drops
        };
        let g = &self.tensors[i];
        let start = first + start;
        if g.transform == Transform::None && GgmlType::of_float(t) == g.info.ty {
            // The converter keeps the merged model's bytes (merged NaNs are all quiet: no scan).
            buf.resize(values.len() * t.size(), 0);
            let nonfinite = t.encode_checked(values, buf);
            self.put(self.out.offsets[i] + (start * t.size()) as u64, buf)?;
            return Ok(nonfinite);
        }
        // The merged model's values, as rounded to its dtype, without encoding and decoding them.
        let nonfinite = match t {
            FloatType::BF16 => simd::round_bf16_checked(values),
            _ => {
                round_to(t, values);
                simd::any_nonfinite(values)
            }
        };
        self.values(i, start, values)?;
        Ok(nonfinite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A permuted tensor written in tiles that split heads, in any order, gives the bytes of one
    /// whole-tensor tile.
    #[test]
    fn permuted_heads_split_across_tiles_are_written_whole() {
        let (rows, cols, heads) = (24, 4, 3); // head_dim 8
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32 * 0.25 - 7.0).collect();
        let write = |tiles: &[(usize, usize)]| -> Vec<u8> {
            let dir = tempfile::tempdir().unwrap();
            let out_path = dir.path().join("t.gguf");
            let tensor = GgufTensor {
                info: TensorInfo {
                    name: "blk.0.attn_q.weight".into(),
                    shape: vec![rows, cols],
                    ty: GgmlType::F32,
                    trim_dims: false,
                },
                sources: vec!["q".into()],
                source: FloatType::F32,
                converted: GgmlType::F32,
                transform: Transform::Permute { heads },
                rows,
                cols,
                partner: None,
            };
            let staging = Staging::new_file(&out_path, &[], false).unwrap();
            let out = GgufFile::create(staging, &[], 0, std::slice::from_ref(&tensor.info), Instant::now()).unwrap();
            let tensors = [tensor];
            let dest = GgufDest {
                out: &out,
                by_name: HashMap::new(),
                tensors: &tensors,
                held: Mutex::new(HashMap::new()),
                held_heads: Mutex::new(HashMap::new()),
                held_experts: Mutex::new(HashMap::new()),
            };
            for &(r0, r1) in tiles {
                let mut v = values[r0 * cols..r1 * cols].to_vec();
                dest.values(0, r0 * cols, &mut v).unwrap();
            }
            assert!(dest.held_heads.lock().unwrap().is_empty());
            let offset = out.offsets[0] as usize;
            out.finish(vec![], 0).unwrap();
            std::fs::read(&out_path).unwrap()[offset..offset + rows * cols * 4].to_vec()
        };
        let whole = write(&[(0, rows)]);
        let expect: Vec<u8> = (0..rows)
            .flat_map(|dst| {
                let src = (0..rows).find(|&r| arch::permuted_row(r, rows, heads) == dst).unwrap();
                values[src * cols..(src + 1) * cols]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>()
            })
            .collect();
        assert_eq!(whole, expect);
        assert_eq!(write(&[(0, 5), (5, 13), (13, 24)]), whole);
        assert_eq!(write(&[(13, 24), (5, 13), (0, 5)]), whole);
        assert_eq!(write(&[(16, 24), (0, 3), (8, 16), (3, 8)]), whole);
    }

    /// GPT-OSS's fused gate_up_proj `[E, in, 2I]` written in tiles that split experts, in any order:
    /// each expert transposed, its even out rows in the gate tensor and odd ones in the up tensor.
    #[test]
    fn fused_experts_split_across_tiles_are_transposed_and_deinterleaved() {
        let (e, inp, out2) = (3, 4, 6); // I = 3
        let values: Vec<f32> = (0..e * inp * out2).map(|v| v as f32 - 20.0).collect();
        let write = |tiles: &[(usize, usize)]| -> (Vec<f32>, Vec<f32>) {
            let dir = tempfile::tempdir().unwrap();
            let out_path = dir.path().join("t.gguf");
            let gate = GgufTensor {
                info: TensorInfo {
                    name: "blk.0.ffn_gate_exps.weight".into(),
                    shape: vec![e, out2 / 2, inp],
                    ty: GgmlType::F32,
                    trim_dims: false,
                },
                sources: vec!["g".into()],
                source: FloatType::F32,
                converted: GgmlType::F32,
                transform: Transform::Experts { split: true },
                rows: e * inp,
                cols: out2,
                partner: Some(1),
            };
            let up = GgufTensor {
                info: TensorInfo {
                    name: "blk.0.ffn_up_exps.weight".into(),
                    ..gate.info.clone()
                },
                transform: Transform::None,
                partner: None,
                ..gate.clone()
            };
            let infos = [gate.info.clone(), up.info.clone()];
            let staging = Staging::new_file(&out_path, &[], false).unwrap();
            let out = GgufFile::create(staging, &[], 0, &infos, Instant::now()).unwrap();
            let tensors = [gate, up];
            let dest = GgufDest {
                out: &out,
                by_name: HashMap::new(),
                tensors: &tensors,
                held: Mutex::new(HashMap::new()),
                held_heads: Mutex::new(HashMap::new()),
                held_experts: Mutex::new(HashMap::new()),
            };
            for &(a, b) in tiles {
                let mut v = values[a..b].to_vec();
                dest.values(0, a, &mut v).unwrap();
            }
            assert!(dest.held_experts.lock().unwrap().is_empty());
            let offsets = (out.offsets[0] as usize, out.offsets[1] as usize);
            out.finish(vec![], 0).unwrap();
            let bytes = std::fs::read(&out_path).unwrap();
            let n = values.len() / 2;
            let f = |at: usize| -> Vec<f32> {
                bytes[at..at + 4 * n]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            (f(offsets.0), f(offsets.1))
        };
        // gate[x][i][h] = W[x][h][2i], up[x][i][h] = W[x][h][2i + 1] (the converter's transpose, ::2, 1::2)
        let expect = |parity: usize| -> Vec<f32> {
            let mut v = Vec::new();
            for x in 0..e {
                for i in 0..out2 / 2 {
                    for h in 0..inp {
                        v.push(values[(x * inp + h) * out2 + 2 * i + parity]);
                    }
                }
            }
            v
        };
        let whole = write(&[(0, values.len())]);
        assert_eq!(whole, (expect(0), expect(1)));
        let per = inp * out2;
        assert_eq!(write(&[(0, 5), (5, per + 7), (per + 7, values.len())]), whole);
        assert_eq!(
            write(&[(2 * per + 1, values.len()), (per, 2 * per + 1), (0, per)]),
            whole
        );
    }

    #[test]
    fn bytes_pass_through_only_where_the_converter_keeps_them() {
        let bf16 = |v: &[u16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
        assert!(same_encoding(
            FloatType::BF16,
            GgmlType::BF16,
            &bf16(&[0x3f80, 0xff80, 0x7f80])
        ));
        // A bf16 NaN without the quiet bit: the converter's f32 -> bf16 rounding sets it.
        let snan = bf16(&[0x7f81]);
        assert!(!same_encoding(FloatType::BF16, GgmlType::BF16, &snan));
        assert_eq!(quants::bf16_bits(f32::from_bits(0x7f81_0000)), 0x7fc1);
        assert!(same_encoding(FloatType::F16, GgmlType::F16, &snan));
        assert!(!same_encoding(FloatType::BF16, GgmlType::F16, &bf16(&[0x3f80])));
    }
}
