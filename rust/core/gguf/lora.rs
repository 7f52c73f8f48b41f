//! A PEFT LoRA adapter as the GGUF file llama.cpp applies at run time (`--lora`), as
//! `convert_lora_to_gguf.py` writes it: each module's A and B under the base tensor's GGUF name plus
//! `.lora_a` / `.lora_b`, B's rows permuted like the base weight's (Llama q/k), the embedding's A
//! transposed; in the adapter file's order.
use std::path::Path;
use std::time::Instant;

use crate::core::checkpoint::Checkpoint;
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::linalg;
use crate::core::peft::Adapter;
use crate::core::staging::Staging;

use super::arch::{self, Heads, Transform};
use super::file::GgufFile;
use super::file::TensorInfo;
use super::types::{converter_type, FileType};
use super::GgufReport;

/// One tensor of the adapter file.
#[derive(Debug, Clone)]
pub struct LoraTensor {
    pub info: TensorInfo,
    /// The adapter tensor it comes from.
    pub key: String,
    pub transform: Transform,
}

#[derive(Debug, Clone)]
pub struct LoraPlan {
    /// `general.architecture`.
    pub arch: &'static str,
    pub lora_alpha: f64,
    pub tensors: Vec<LoraTensor>,
}

fn config_usize(ck: &Checkpoint, keys: &[&str]) -> Option<usize> {
    let c = ck.config.as_ref()?;
    keys.iter().find_map(|k| c.get(*k)?.as_u64()).map(|v| v as usize)
}

/// What llama.cpp's LoRA format can say: one alpha for all modules, scaling alpha / r. Anything else would
/// run with another scale than PEFT's, so it is refused rather than written wrong.
fn check_expressible(adapter: &Adapter) -> Result<()> {
    let c = &adapter.config;
    let why = if c.use_dora {
        Some("DoRA (llama.cpp's LoRA format has no magnitude vectors)")
    } else if c.use_rslora {
        Some("rsLoRA (llama.cpp scales by alpha / r, not alpha / sqrt(r))")
    } else if !c.alpha_pattern.is_empty() {
        Some("per-module alpha (alpha_pattern; llama.cpp's format has one alpha)")
    } else if c.lora_bias {
        Some("lora_bias (llama.cpp's format has no LoRA bias)")
    } else if adapter.modules.iter().any(|m| m.param.is_some()) {
        Some("LoRA on expert parameters (target_parameters; llama.cpp's LoRA format has no per-expert factors)")
    } else if !adapter.saved.is_empty() {
        Some("tensors saved in full (modules_to_save or new embeddings; llama.cpp applies only A and B)")
    } else {
        None
    };
    match why {
        Some(w) => Err(Error::unsupported(
            &adapter.dir,
            format!("{w}: merge it instead (lorafast gguf BASE ADAPTER)"),
        )),
        None => Ok(()),
    }
}

fn plan_all(adapter: &Adapter, base: &Checkpoint, outtype: FileType) -> Result<LoraPlan> {
    check_expressible(adapter)?;
    if outtype.is_quantize_mix() {
        return Err(Error::InvalidArgument(format!(
            "a LoRA GGUF is f32, f16, bf16 or q8_0 (as convert_lora_to_gguf.py writes it), not {outtype:?}"
        )));
    }
    let hf_arch = base
        .architecture()
        .ok_or_else(|| Error::json(base.dir.join("config.json"), "no architectures entry"))?;
    let (arch, prefix_model) = arch::arch_in(&base.dir, hf_arch)?;
    let n_head = config_usize(base, &["n_heads", "num_attention_heads"]).unwrap_or(0);
    let heads = Heads {
        n_head,
        n_head_kv: config_usize(base, &["n_kv_heads", "num_key_value_heads"]).unwrap_or(n_head),
        position_offset: 0, // (position embeddings take no LoRA)
    };
    // The converter walks the adapter file in its stored order, pairing A and B by base tensor.
    let mut entries: Vec<_> = adapter.file.tensors().iter().collect();
    entries.sort_by_key(|e| e.offset);
    let mut pairs: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    for e in entries {
        let key = &e.name;
        let (is_a, is_b) = (
            key.contains(".lora_A.weight") || key.contains(".lora_embedding_A"),
            key.contains(".lora_B.weight") || key.contains(".lora_embedding_B"),
        );
        if !is_a && !is_b {
            continue; // check_expressible refused everything else an adapter file holds
        }
        let base_name = key
            .replace("base_model.model.", "")
            .replace(".lora_A.weight", ".weight")
            .replace(".lora_B.weight", ".weight")
            .replace(".lora_embedding_A", ".weight")
            .replace(".lora_embedding_B", ".weight");
        let i = match pairs.iter().position(|(n, _, _)| *n == base_name) {
            Some(i) => i,
            None => {
                pairs.push((base_name, None, None));
                pairs.len() - 1
            }
        };
        if is_a {
            pairs[i].1 = Some(key.clone());
        } else {
            pairs[i].2 = Some(key.clone());
        }
    }
    let mut tensors = Vec::new();
    for (base_name, a, b) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::adapter(
                &adapter.dir,
                format!("{base_name}: lora_A and lora_B must both be present"),
            ));
        };
        let Some((gguf, transform)) =
            arch::map_tensor(arch, prefix_model, heads, &base_name).map_err(|r| Error::unsupported(&adapter.dir, r))?
        else {
            continue;
        };
        if transform == Transform::Transpose {
            return Err(Error::unsupported(
                &adapter.dir,
                format!("{base_name}: Conv1D adapters are not written as GGUF"),
            ));
        }
        let shape_of = |k: &str| adapter.file.get(k).expect("listed").shape.clone();
        let (mut a_shape, b_shape) = (shape_of(&a), shape_of(&b));
        let embedding = gguf == "token_embd.weight";
        if embedding {
            a_shape.reverse();
        }
        for (suffix, key, shape, t) in [
            (
                "lora_a",
                &a,
                a_shape,
                if embedding {
                    Transform::Transpose
                } else {
                    Transform::None
                },
            ),
            ("lora_b", &b, b_shape, transform),
        ] {
            let name = format!("{gguf}.{suffix}");
            let ty = converter_type(&name, &shape, outtype);
            tensors.push(LoraTensor {
                info: TensorInfo {
                    name,
                    shape,
                    ty,
                    trim_dims: false,
                },
                key: key.clone(),
                transform: t,
            });
        }
    }
    Ok(LoraPlan {
        arch: arch.name(),
        lora_alpha: adapter.config.lora_alpha,
        tensors,
    })
}

pub fn plan(adapter: &Path, base: &Path, outtype: FileType) -> Result<LoraPlan> {
    plan_all(&Adapter::open(adapter)?, &Checkpoint::open(base)?, outtype)
}

/// Write the adapter `adapter` (for the base model folder `base`) as the LoRA GGUF file `out`.
pub fn write(
    adapter: &Path,
    base: &Path,
    out: &Path,
    kv: &[u8],
    n_kv: u64,
    outtype: FileType,
    overwrite: bool,
) -> Result<GgufReport> {
    let started = Instant::now();
    let staging = Staging::new_file(out, &[adapter, base], overwrite)?;
    let adapter = Adapter::open(adapter)?;
    let lplan = plan_all(&adapter, &Checkpoint::open(base)?, outtype)?;
    let infos: Vec<TensorInfo> = lplan.tensors.iter().map(|t| t.info.clone()).collect();
    let out = GgufFile::create(staging, kv, n_kv, &infos, started)?;
    for (t, &offset) in lplan.tensors.iter().zip(&out.offsets) {
        let entry = adapter.file.get(&t.key).expect("planned");
        let src = FloatType::from_safetensors(entry.dtype).ok_or_else(|| {
            Error::adapter(
                &adapter.dir,
                format!("tensor {}: dtype {:?} is not a float type", t.key, entry.dtype),
            )
        })?;
        let mut raw = vec![0u8; entry.len as usize];
        adapter.file.read_bytes(entry, 0, &mut raw)?;
        let mut values = vec![0f32; entry.numel()];
        src.decode(&raw, &mut values);
        let (rows, cols) = match entry.shape.as_slice() {
            [r, c] => (*r, *c),
            other => {
                return Err(Error::adapter(
                    &adapter.dir,
                    format!("tensor {}: shape {other:?} is not a matrix", t.key),
                ))
            }
        };
        let values = match t.transform {
            Transform::None => values,
            Transform::Transpose => linalg::transpose(&values, rows, cols),
            Transform::Permute { heads } => {
                let mut p = vec![0f32; values.len()];
                for r in 0..rows {
                    let d = arch::permuted_row(r, rows, heads);
                    p[d * cols..(d + 1) * cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
                }
                p
            }
            Transform::DropRows { .. } => {
                return Err(Error::unsupported(
                    &adapter.dir,
                    format!(
                        "tensor {}: a LoRA on position embeddings has no llama.cpp LoRA form",
                        t.key
                    ),
                ))
            }
            Transform::Experts { .. } | Transform::SplitBias => {
                return Err(Error::unsupported(
                    &adapter.dir,
                    format!(
                        "tensor {}: LoRA on fused experts has no llama.cpp LoRA form: merge it instead",
                        t.key
                    ),
                ))
            }
        };
        let row_len = *t.info.shape.last().expect("a matrix");
        let ty = t.info.ty;
        let mut bytes = vec![0u8; ty.row_bytes(row_len) * (values.len() / row_len)];
        ty.encode_row(&values, &mut bytes);
        out.put(offset, &bytes)?;
    }
    out.finish(vec![], 0)
}
