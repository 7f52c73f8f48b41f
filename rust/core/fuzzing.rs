//! Entry points for the coverage-guided fuzzers in `fuzz/` and for the replay of their corpora that
//! `cargo test` runs. Each feeds arbitrary bytes, as the files a user might hand lorafast, to the code
//! that reads untrusted input: safetensors headers and shard indexes, `adapter_config.json` with the
//! adapter file it describes, bitsandbytes quant states with the 4-bit tensors they describe, and the
//! MoE checkpoints whose experts the GGUF writer stacks.
//! Returning - with a result or a clean error - is success; a panic, hang or runaway allocation is a bug.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use crate::core::checkpoint::{Checkpoint, INDEX_NAME, SINGLE_NAME};
use crate::core::gguf::{self, FileType, GgufOptions};
use crate::core::merge::plan::plan;
use crate::core::merge::source::Base;
use crate::core::merge::MergeOptions;
use crate::core::peft::{Adapter, CONFIG_NAME, WEIGHTS_NAME};
use crate::core::progress::Silent;
use crate::core::quant::checkpoint::{dequantize_checkpoint, quantized_weights};

/// A fuzz target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The fuzz targets, by the name of their corpus folder under `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 5] = [
    ("safetensors_checkpoint", safetensors_checkpoint),
    ("adapter_folder", adapter_folder),
    ("quantized_checkpoint", quantized_checkpoint),
    ("expert_adapter", expert_adapter),
    ("gguf_experts", gguf_experts),
];

/// Inputs with two files: a 2-byte little-endian length, the first file, then the second.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (&[], data);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

/// The inverse of [`split`], for writing seeds.
pub fn join(first: &[u8], second: &[u8]) -> Vec<u8> {
    let n = u16::try_from(first.len()).expect("first part under 64 KiB");
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// An empty folder for this thread's current input, under the temporary directory.
fn scratch() -> PathBuf {
    SCRATCH.with(|s| {
        let dir = s
            .borrow_mut()
            .get_or_insert_with(|| {
                std::env::temp_dir().join(format!(
                    "lorafast-fuzz-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ))
            })
            .clone();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("in")).expect("temporary directory is writable");
        dir
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("temporary directory is writable");
}

/// Elements read back per tensor at most, so that a large valid file does not slow the fuzzer down.
const READ_LIMIT: usize = 1 << 16;

/// A model folder: the first part (if any) as `model.safetensors.index.json`, the second as the shard
/// it names (`model.safetensors`); then every float tensor read back.
pub fn safetensors_checkpoint(data: &[u8]) {
    let (index, file) = split(data);
    let dir = scratch().join("in");
    write(&dir, SINGLE_NAME, file);
    if !index.is_empty() {
        write(&dir, INDEX_NAME, index);
    }
    if let Ok(ck) = Checkpoint::open(&dir) {
        for (si, t) in ck.entries() {
            if t.float_type().is_some() && t.numel() <= READ_LIMIT {
                let values = ck.shards[si].read_f32(&t.name).expect("a validated tensor reads back");
                assert_eq!(values.len(), t.numel());
            }
        }
        let _ = crate::core::inspect::checkpoint(&dir);
    }
}

/// An adapter folder: `adapter_config.json` and `adapter_model.safetensors`; then the LoRA factors read
/// and the per-module rank and scaling rules applied.
pub fn adapter_folder(data: &[u8]) {
    let (config, weights) = split(data);
    let dir = scratch().join("in");
    write(&dir, CONFIG_NAME, config);
    write(&dir, WEIGHTS_NAME, weights);
    if let Ok(adapter) = Adapter::open(&dir) {
        for m in &adapter.modules {
            assert_eq!(m.a_shape[0], m.r * m.param.as_ref().map_or(1, |p| p.experts));
            let _ = adapter.config.alpha_for(&m.module);
            if m.a_shape.iter().product::<usize>() <= READ_LIMIT {
                adapter.file.read_f32(&m.a).expect("a validated tensor reads back");
            }
        }
        let _ = crate::core::inspect::adapter(&dir);
    }
}

/// The two mixture-of-experts checkpoints `expert_adapter` plans against (written once per thread): one
/// stored per expert (Qwen3-MoE's layout) and one fused (GPT-OSS's), two experts, hidden 8, intermediate 4.
fn moe_bases() -> [PathBuf; 2] {
    let root = scratch().with_extension("moe");
    let bases = [root.join("per_expert"), root.join("fused")];
    if !bases[1].join(SINGLE_NAME).exists() {
        let mut rows: Vec<(String, Vec<usize>)> = vec![("model.layers.0.self_attn.q_proj.weight".into(), vec![8, 8])];
        for e in 0..2 {
            for (n, shape) in [("gate_proj", [4, 8]), ("up_proj", [4, 8]), ("down_proj", [8, 4])] {
                rows.push((format!("model.layers.0.mlp.experts.{e}.{n}.weight"), shape.to_vec()));
            }
        }
        let fused = vec![
            ("model.layers.0.self_attn.q_proj.weight".to_string(), vec![8, 8]),
            ("model.layers.0.mlp.experts.gate_up_proj".to_string(), vec![2, 8, 8]),
            ("model.layers.0.mlp.experts.down_proj".to_string(), vec![2, 4, 8]),
        ];
        for (dir, (model_type, tensors)) in bases.iter().zip([("qwen3_moe", rows), ("gpt_oss", fused)]) {
            std::fs::create_dir_all(dir).expect("temporary directory is writable");
            write(
                dir,
                "config.json",
                format!(r#"{{"model_type": "{model_type}"}}"#).as_bytes(),
            );
            write(dir, SINGLE_NAME, &zero_safetensors(&tensors));
        }
    }
    bases
}

/// A safetensors file of f32 zeros.
fn zero_safetensors(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let n = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let head = serde_json::Value::Object(header).to_string().into_bytes();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(head);
    out.resize(out.len() + offset, 0);
    out
}

/// An adapter folder (as in `adapter_folder`) planned for a merge into a per-expert and a fused MoE
/// checkpoint: `target_parameters`, the nesting of parameter wrappers, expert counts and layouts.
pub fn expert_adapter(data: &[u8]) {
    // First: finding the bases empties this input's folder.
    let bases = moe_bases();
    let (config, weights) = split(data);
    let dir = scratch().join("in");
    write(&dir, CONFIG_NAME, config);
    write(&dir, WEIGHTS_NAME, weights);
    for base in bases {
        let (Ok(base), Ok(adapter)) = (Base::open(&base), Adapter::open(&dir)) else {
            continue;
        };
        let _ = plan(&base, &[adapter], &MergeOptions::default());
    }
}

/// A model folder (`config.json`, `model.safetensors`) planned as GGUF with a llama-quantize mix: the
/// architecture and expert count from the config, each layer's expert matrices stacked (names, expert
/// indices, shapes and dtypes that must agree), and every tensor's type chosen.
pub fn gguf_experts(data: &[u8]) {
    let (config, file) = split(data);
    let dir = scratch().join("in");
    write(&dir, "config.json", config);
    write(&dir, SINGLE_NAME, file);
    let opts = GgufOptions {
        file_type: FileType::Q4KM,
        merge: MergeOptions::default(),
        extra: Vec::new(),
    };
    if let Ok(p) = gguf::plan(&dir, &[], &opts) {
        // A splitting tensor (GPT-OSS's gate/up) and its partner each hold half of the merged values.
        let halves: Vec<usize> = p.tensors.iter().filter_map(|t| t.partner).collect();
        for (i, t) in p.tensors.iter().enumerate() {
            let parts = if t.transform.splits() || halves.contains(&i) {
                2
            } else {
                1
            };
            assert_eq!(
                t.rows * t.cols,
                parts * t.info.shape.iter().product::<usize>(),
                "{}",
                t.info.name
            );
            if t.transform.splits() {
                let partner = &p.tensors[t.partner.expect("a split tensor has its partner")];
                assert_eq!(partner.info.shape, t.info.shape, "{}", t.info.name);
            }
        }
    }
}

/// A pre-quantized 4-bit checkpoint: `config.json` and `model.safetensors` with quant states; then
/// every quant state parsed and the checkpoint dequantized.
pub fn quantized_checkpoint(data: &[u8]) {
    let (config, file) = split(data);
    let root = scratch();
    let dir = root.join("in");
    write(&dir, "config.json", config);
    write(&dir, SINGLE_NAME, file);
    let Ok(ck) = Checkpoint::open(&dir) else {
        return;
    };
    if quantized_weights(&ck).is_err() {
        return;
    }
    let _ = dequantize_checkpoint(&dir, &root.join("out"), None, Some(1), true, &Silent);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzers kept (fuzz/corpus/TARGET/*) still runs clean.
    #[test]
    fn fuzz_corpora_replay_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus");
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.expect("corpus entry").path())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "{}: empty corpus", dir.display());
            for f in files {
                let data = std::fs::read(&f).expect("corpus file");
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    panic!("{} panics on {}", name, f.display());
                }
            }
        }
    }

    /// The two MoE bases `expert_adapter` plans against, and the adapter folder of an expert seed.
    fn expert_seed(seed: &str) -> ([PathBuf; 2], PathBuf) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/expert_adapter");
        let data = std::fs::read(root.join(seed)).expect("seed");
        // (before the adapter is written: making the bases clears the scratch folder)
        let bases = moe_bases();
        let (config, weights) = split(&data);
        let dir = scratch().join("in");
        write(&dir, CONFIG_NAME, config);
        write(&dir, WEIGHTS_NAME, weights);
        (bases, dir)
    }

    /// The expert seeds reach the planner: both layouts accept them (the fuzzer starts deep, not at a
    /// parse error).
    #[test]
    fn expert_seeds_plan_against_both_layouts() {
        let (bases, dir) = expert_seed("seed-experts-both");
        for base in bases {
            let base = Base::open(&base).expect("base");
            let adapter = Adapter::open(&dir).expect("adapter");
            let p = plan(&base, &[adapter], &MergeOptions::default()).expect("plans");
            assert!(p.jobs.iter().filter(|j| !j.steps.is_empty()).count() >= 3);
        }
    }

    /// The PEFT 0.18 seed reaches the unswapped reading: it plans against the per-expert Qwen3-MoE base, its
    /// down_proj factors read the other way round.
    #[test]
    fn old_peft_seed_plans_unswapped() {
        use crate::core::merge::plan::Step;
        let (bases, dir) = expert_seed("seed-experts-peft018");
        let base = Base::open(&bases[0]).expect("base");
        let adapter = Adapter::open(&dir).expect("adapter");
        let p = plan(&base, &[adapter], &MergeOptions::default()).expect("plans");
        let unswapped = p
            .jobs
            .iter()
            .flat_map(|j| j.steps.iter())
            .filter_map(|s| match s {
                Step::Lora { parts, .. } => Some(parts),
                _ => None,
            })
            .flatten()
            .filter(|p| p.expert.as_ref().is_some_and(|e| e.unswapped))
            .count();
        assert!(unswapped >= 4, "{unswapped}");
    }

    /// The GGUF seeds reach the stacking: Qwen3-MoE and Mixtral checkpoints plan with stacked experts, a
    /// GPT-OSS one with its fused experts transposed and split.
    #[test]
    fn gguf_seeds_stack_experts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf_experts");
        for seed in ["seed-qwen3-moe", "seed-mixtral", "seed-gpt-oss"] {
            let data = std::fs::read(root.join(seed)).expect("seed");
            let (config, file) = split(&data);
            let dir = scratch().join("in");
            write(&dir, "config.json", config);
            write(&dir, SINGLE_NAME, file);
            let opts = GgufOptions {
                file_type: FileType::Q4KM,
                merge: MergeOptions::default(),
                extra: Vec::new(),
            };
            let p = gguf::plan(&dir, &[], &opts).expect("plans");
            let stacked = p.tensors.iter().find(|t| t.info.name == "blk.0.ffn_down_exps.weight");
            assert_eq!(stacked.map(|t| t.info.shape.clone()), Some(vec![2, 8, 4]), "{seed}");
            let up = p.tensors.iter().find(|t| t.info.name == "blk.0.ffn_up_exps.weight");
            assert_eq!(up.map(|t| t.info.shape.clone()), Some(vec![2, 4, 8]), "{seed}");
        }
    }

    #[test]
    fn split_and_join_round_trip() {
        let joined = join(b"abc", b"defg");
        assert_eq!(split(&joined), (&b"abc"[..], &b"defg"[..]));
        assert_eq!(split(&[5]), (&b""[..], &[5u8][..]));
        assert_eq!(split(&[200, 0, 1]), (&[1u8][..], &b""[..]));
    }
}
