//! What is in a checkpoint or an adapter, for `lorafast inspect`.
use std::path::Path;

use crate::core::checkpoint::Checkpoint;
use crate::core::error::Result;
use crate::core::linalg::lowrank_frobenius;
use crate::core::peft::Adapter;

#[derive(Debug, Clone)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct CheckpointSummary {
    pub shards: Vec<String>,
    pub tensors: Vec<TensorSummary>,
    pub parameters: u64,
    pub total_bytes: u64,
    /// bitsandbytes 4-bit weights (those with a quant state).
    pub quantized_weights: usize,
}

#[derive(Debug, Clone)]
pub struct ModuleSummary {
    pub module: String,
    pub kind: &'static str,
    pub r: usize,
    pub scaling: f32,
    /// ||scaling * B A||_F: how much the adapter changes this module (all experts together).
    pub delta_norm: f64,
    /// The wrapped parameter of a `target_parameters` LoRA (`gate_up_proj`), None for a module LoRA.
    pub param: Option<String>,
    /// A parameter LoRA's ||scaling * B_e A_e||_F for each expert e: which experts the adapter moved.
    /// Empty for a module LoRA.
    pub expert_norms: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub config: serde_json::Value,
    pub trainable_parameters: u64,
    pub file_bytes: u64,
    pub modules: Vec<ModuleSummary>,
    pub saved_tensors: Vec<String>,
    pub ignored_modules: Vec<String>,
    /// The label count of a classification head saved with the adapter (its smallest saved matrix).
    pub num_labels: Option<usize>,
}

pub fn checkpoint(dir: &Path) -> Result<CheckpointSummary> {
    let ck = Checkpoint::open(dir)?;
    let tensors: Vec<TensorSummary> = ck
        .entries()
        .map(|(_, t)| TensorSummary {
            name: t.name.clone(),
            dtype: format!("{:?}", t.dtype),
            shape: t.shape.clone(),
            bytes: t.len,
        })
        .collect();
    Ok(CheckpointSummary {
        quantized_weights: crate::core::quant::checkpoint::quantized_weights(&ck)?.len(),
        parameters: ck.entries().map(|(_, t)| t.numel() as u64).sum(),
        total_bytes: ck.total_bytes(),
        shards: ck.shard_names.clone(),
        tensors,
    })
}

pub fn adapter(dir: &Path) -> Result<AdapterSummary> {
    let a = Adapter::open(dir)?;
    let mut modules = Vec::with_capacity(a.modules.len());
    for m in &a.modules {
        let (fa, fb) = (a.file.read_f32(&m.a)?, a.file.read_f32(&m.b)?);
        let expert_norms: Vec<f64> = match &m.param {
            Some(p) => (0..p.experts)
                .map(|e| m.scaling.abs() as f64 * lowrank_frobenius_expert(&fa, &fb, m.r, p.experts, e))
                .collect(),
            None => Vec::new(),
        };
        modules.push(ModuleSummary {
            module: m.module.clone(),
            kind: if m.param.is_some() {
                "parameter"
            } else if m.kind == crate::core::peft::LayerKind::Embedding {
                "embedding"
            } else {
                "linear"
            },
            r: m.r,
            scaling: m.scaling,
            // The experts' deltas are separate matrices, so their norms add in squares (the product of
            // the fused factors would mix experts).
            delta_norm: match &m.param {
                Some(_) => expert_norms.iter().map(|x| x * x).sum::<f64>().sqrt(),
                None => m.scaling.abs() as f64 * lowrank_frobenius(&fa, &fb, m.r),
            },
            param: m.param.as_ref().map(|p| p.name.clone()),
            expert_norms,
        });
    }
    let file_bytes = std::fs::metadata(a.weights_path())
        .map_err(|e| crate::core::Error::io(a.weights_path(), e))?
        .len();
    Ok(AdapterSummary {
        config: a.config.raw.clone(),
        trainable_parameters: a.file.tensors().iter().map(|t| t.numel() as u64).sum(),
        file_bytes,
        modules,
        saved_tensors: a.saved.iter().map(|s| s.key.clone()).collect(),
        ignored_modules: a.ignored_modules.clone(),
        num_labels: a
            .saved
            .iter()
            .filter(|s| s.param.ends_with(".weight"))
            .filter_map(|s| a.file.get(&s.key).map(|t| t.shape.clone()))
            .filter(|shape| shape.len() == 2)
            .map(|shape| shape[0])
            .min(),
    })
}

/// ||B_e A_e||_F of expert `e` of a parameter LoRA: A `[E*r, in]` holds expert e's A in rows
/// `e*r..(e+1)*r` (expert-major), B `[out, E*r]` its B in columns `e, e+E, ...` (rank-major), as
/// PEFT's `ParamWrapper.get_delta_weight` reshapes them.
fn lowrank_frobenius_expert(a: &[f32], b: &[f32], r: usize, experts: usize, e: usize) -> f64 {
    let width = r * experts;
    if width == 0 {
        return 0.0;
    }
    let n = a.len() / width;
    let a_e = &a[e * r * n..(e + 1) * r * n];
    let b_e: Vec<f32> = b
        .chunks_exact(width)
        .flat_map(|row| (0..r).map(move |k| row[k * experts + e]))
        .collect();
    lowrank_frobenius(a_e, &b_e, r)
}
