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
    /// ||scaling * B A||_F: how much the adapter changes this module.
    pub delta_norm: f64,
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
        modules.push(ModuleSummary {
            module: m.module.clone(),
            kind: if m.kind == crate::core::peft::LayerKind::Embedding {
                "embedding"
            } else {
                "linear"
            },
            r: m.r,
            scaling: m.scaling,
            delta_norm: m.scaling.abs() as f64 * lowrank_frobenius(&fa, &fb, m.r),
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
