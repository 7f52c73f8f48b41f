//! Adapter arithmetic on files: combine adapters as PEFT's `add_weighted_adapter` does, extract a LoRA
//! from a base / fine-tuned pair, and resize an adapter's rank. Every result is a PEFT LoRA adapter folder.
pub mod combine;
pub mod extract;
pub mod lowrank;
pub mod merge_fns;
pub mod resize;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use crate::core::checkpoint::write_file;
use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::io::{OutputFile, PlannedTensor, SafetensorsFile, TensorEntry};
use crate::core::peft::{Adapter, LayerKind, LoraModule, CONFIG_NAME, WEIGHTS_NAME};
use crate::core::staging::Staging;
use lowrank::Factors;

pub use combine::{combine, CombineOptions, Method};
pub use extract::{extract, ExtractOptions};
pub use resize::{resize, ResizeOptions};

const KEY_PREFIX: &str = "base_model.model.";

/// What one output module became.
#[derive(Debug, Clone)]
pub struct ModuleReport {
    pub module: String,
    pub rank: usize,
    /// Share of the module's delta (Frobenius energy) that the written factors hold; None where the
    /// method does not approximate (cat, linear...).
    pub energy: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct ArithReport {
    pub output: PathBuf,
    pub modules: Vec<ModuleReport>,
    /// Full tensors carried over (modules_to_save and the like).
    pub saved_tensors: usize,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

/// One tensor of the adapter file being written.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OutTensor {
    pub fn float(name: String, t: FloatType, shape: Vec<usize>, values: &[f32]) -> Self {
        let mut bytes = vec![0u8; values.len() * t.size()];
        t.encode(values, &mut bytes);
        OutTensor {
            name,
            dtype: t.to_safetensors(),
            shape,
            bytes,
        }
    }
}

/// A tensor copied byte for byte from an input file, under `name`.
pub fn raw_tensor(file: &SafetensorsFile, entry: &TensorEntry, name: String) -> Result<OutTensor> {
    let mut bytes = vec![0u8; entry.len as usize];
    file.read_bytes(entry, 0, &mut bytes)?;
    Ok(OutTensor {
        name,
        dtype: entry.dtype,
        shape: entry.shape.clone(),
        bytes,
    })
}

/// The (A, B) tensor names PEFT saves for `module`.
pub fn lora_keys(module: &str, kind: LayerKind) -> (String, String) {
    match kind {
        LayerKind::Linear => (
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
        ),
        LayerKind::Embedding => (
            format!("{KEY_PREFIX}{module}.lora_embedding_A"),
            format!("{KEY_PREFIX}{module}.lora_embedding_B"),
        ),
    }
}

/// The LoRA tensors of every written module (A (r, in) and B (out, r), in `t`) and their reports.
pub fn lora_outputs<'a>(
    modules: impl Iterator<Item = (&'a str, LayerKind, Factors, Option<f64>)>,
    t: FloatType,
) -> (Vec<OutTensor>, Vec<ModuleReport>) {
    let mut tensors = Vec::new();
    let mut reports = Vec::new();
    for (module, kind, f, energy) in modules {
        let (ka, kb) = lora_keys(module, kind);
        let r = f.rank;
        let (n_in, n_out) = (f.a.len() / r.max(1), f.b.len() / r.max(1));
        tensors.push(OutTensor::float(ka, t, vec![r, n_in], &f.a));
        tensors.push(OutTensor::float(kb, t, vec![n_out, r], &f.b));
        reports.push(ModuleReport {
            module: module.to_string(),
            rank: r,
            energy,
        });
    }
    (tensors, reports)
}

/// A module's factors as f32: (A (r x in), B (out x r)).
pub fn read_factors(adapter: &Adapter, m: &LoraModule) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((adapter.file.read_f32(&m.a)?, adapter.file.read_f32(&m.b)?))
}

/// The per-tensor seed of a randomized step: the low 32 bits (all mt19937 uses) of FNV-1a over
/// "{seed}:{module}:{label}:{index}". Independent of thread scheduling and of the other modules.
pub fn tensor_seed(seed: u64, module: &str, label: &str, index: usize) -> u32 {
    let text = format!("{seed}:{module}:{label}:{index}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        h ^= byte as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

/// Refuse what adapter arithmetic cannot express as a plain LoRA adapter.
pub fn check_plain_lora(adapter: &Adapter, what: &str) -> Result<()> {
    let weights = adapter.weights_path();
    if let Some(m) = adapter.modules.iter().find(|m| m.magnitude.is_some()) {
        return Err(Error::unsupported(
            &weights,
            format!("module {}: DoRA adapters cannot be {what} (the magnitude vector is not linear in B A); merge them instead", m.module),
        ));
    }
    if let Some(m) = adapter.modules.iter().find(|m| m.bias.is_some()) {
        return Err(Error::unsupported(
            &weights,
            format!("module {}: lora_bias adapters cannot be {what}", m.module),
        ));
    }
    Ok(())
}

/// Expert `e`'s factors of a parameter LoRA: A `[E*r, in]` holds them in rows `e*r..(e+1)*r`
/// (expert-major), B `[out, E*r]` in columns `e, e+E, ...` (rank-major), as PEFT's
/// `ParamWrapper.get_delta_weight` reshapes them. Returns (A_e `[r, in]`, B_e `[out, r]`).
pub fn expert_factors(a: &[f32], b: &[f32], r: usize, experts: usize, e: usize) -> (Vec<f32>, Vec<f32>) {
    let width = r * experts;
    let n = a.len() / width.max(1);
    let a_e = a[e * r * n..(e + 1) * r * n].to_vec();
    let b_e = b
        .chunks_exact(width.max(1))
        .flat_map(|row| (0..r).map(move |k| row[k * experts + e]))
        .collect();
    (a_e, b_e)
}

/// The inverse of [`expert_factors`]: every expert's factors of one rank `k` packed into PEFT's fused
/// layout, A `[E*k, in]` and B `[out, E*k]` (as a [`Factors`] of rank `E*k`).
pub fn pack_experts(per_expert: &[Factors]) -> Factors {
    let experts = per_expert.len();
    let k = per_expert.first().map_or(0, |f| f.rank);
    let width = k * experts;
    let out = per_expert.first().map_or(0, |f| f.b.len() / k.max(1));
    let a: Vec<f32> = per_expert.iter().flat_map(|f| f.a.iter().copied()).collect();
    let mut b = vec![0f32; out * width];
    for (e, f) in per_expert.iter().enumerate() {
        for i in 0..out {
            for j in 0..k {
                b[i * width + j * experts + e] = f.b[i * k + j];
            }
        }
    }
    Factors { b, a, rank: width }
}

/// Write `adapter_model.safetensors` and `adapter_config.json` (plus any side files already in the
/// staging folder) and move the folder into place. What claiming the folder cleared away goes first into
/// `warnings`.
pub fn write_adapter(
    staging: Staging,
    config: &Value,
    tensors: Vec<OutTensor>,
    warnings: &mut Vec<String>,
) -> Result<PathBuf> {
    warnings.splice(0..0, staging.notices.iter().cloned());
    let planned: Vec<PlannedTensor> = tensors
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    staging.check_space(tensors.iter().map(|t| t.bytes.len() as u64).sum())?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = OutputFile::create(&staging.tmp.join(WEIGHTS_NAME), &planned, &metadata)?;
    for t in &tensors {
        file.write_at(&t.name, 0, &t.bytes)?;
    }
    file.finish()?;
    let text = serde_json::to_string_pretty(config).expect("json values serialize");
    write_file(&staging.tmp.join(CONFIG_NAME), text.as_bytes())?;
    staging.commit()
}

/// Config fields every arithmetic output sets: the largest rank as `r`, the others in `rank_pattern` under
/// their full module names (dots escaped: PEFT matches the keys as regexes), and scaling alpha / r = 1.
pub fn set_ranks(config: &mut Value, ranks: &[(String, usize)]) {
    let r = ranks.iter().map(|(_, k)| *k).max().unwrap_or(1).max(1);
    let pattern: serde_json::Map<String, Value> = ranks
        .iter()
        .filter(|(_, k)| *k != r)
        .map(|(m, k)| (m.replace('.', r"\."), Value::from(*k)))
        .collect();
    config["r"] = Value::from(r);
    config["lora_alpha"] = Value::from(r);
    config["rank_pattern"] = Value::Object(pattern.clone());
    config["alpha_pattern"] = Value::Object(pattern);
    // Scaling stays alpha / r = 1: rsLoRA would make it sqrt(r) (PEFT's add_weighted_adapter bug).
    config["use_rslora"] = Value::Bool(false);
    config["use_dora"] = Value::Bool(false);
}

/// Check a rank against a module's matrix and say which module when it does not fit.
pub fn check_rank(module: &str, rank: usize, rows: usize, cols: usize) -> Result<()> {
    if rank > rows.min(cols) {
        return Err(Error::shape(
            module,
            format!("rank {rank} is larger than the matrix ({rows} x {cols}) allows"),
        ));
    }
    Ok(())
}

/// Files that are not part of the adapter itself (tokenizers, model cards) are carried over.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    crate::core::checkpoint::copy_side_files(from, to)?;
    let stale = to.join(CONFIG_NAME);
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_experts_inverts_splitting_them() {
        let (experts, r, n_in, n_out) = (3, 2, 5, 4);
        let a: Vec<f32> = (0..experts * r * n_in).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n_out * experts * r).map(|i| -(i as f32)).collect();
        let per: Vec<Factors> = (0..experts)
            .map(|e| {
                let (a_e, b_e) = expert_factors(&a, &b, r, experts, e);
                Factors {
                    b: b_e,
                    a: a_e,
                    rank: r,
                }
            })
            .collect();
        // Expert 1's B is columns 1 and 4 of B's first row: rank-major.
        assert_eq!(&per[1].b[..2], &[b[1], b[1 + experts]]);
        assert_eq!(&per[2].a[..n_in], &a[2 * r * n_in..(2 * r + 1) * n_in]);
        let packed = pack_experts(&per);
        assert_eq!((packed.a, packed.b, packed.rank), (a, b, experts * r));
    }
}
