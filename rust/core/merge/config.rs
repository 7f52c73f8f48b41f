//! The output's config.json (and tokenizer files): what the merged model is - its dtype, a task class
//! and labels for a new head, an untied or resized vocabulary, the pad token a trainer chose - and
//! whether and how it is quantized.
use std::path::Path;

use serde_json::Value;

use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};
use crate::core::peft::Adapter;
use crate::core::quant::checkpoint::bnb_config;

use super::plan::Job;
use super::resolve::Resolution;
use super::source::Base;
use super::{MergeOptions, Mode};

pub const HEAD_TASKS: [(&str, &str); 3] = [
    ("SEQ_CLS", "ForSequenceClassification"),
    ("TOKEN_CLS", "ForTokenClassification"),
    ("QUESTION_ANS", "ForQuestionAnswering"),
];

/// The base's config.json, rewritten for what the output is.
pub fn output_config(
    base: &Base,
    adapters: &[Adapter],
    res: &Resolution,
    jobs: &[Job],
    opts: &MergeOptions,
) -> Option<Value> {
    let mut c = base.ck.config.clone()?;
    if let Some(t) = opts.dtype {
        set_dtype(&mut c, t);
    }
    if res.untied {
        c["tie_word_embeddings"] = Value::Bool(false);
    }
    if let Some(v) = res.vocab_size {
        c["vocab_size"] = Value::from(v);
    }
    let task = adapters.iter().find_map(|a| a.config.task_type.as_deref());
    if let Some((task, suffix)) = HEAD_TASKS.iter().find(|(t, _)| Some(*t) == task) {
        if jobs.iter().any(|j| j.added) {
            to_task_class(&mut c, task, suffix, jobs);
        }
    }
    // A trainer that had to choose a pad token (GPT-2 has none) saved it with the adapter's tokenizer;
    // the merged model needs its id to run on padded batches (sequence classification above all).
    if c.get("pad_token_id").is_none_or(Value::is_null) {
        if let Some(id) = adapters.iter().find_map(|a| pad_token_id(&a.dir)) {
            c["pad_token_id"] = Value::from(id);
        }
    }
    match &opts.mode {
        // The output is float: it is no longer a bitsandbytes checkpoint.
        Mode::Float => {
            if let Some(obj) = c.as_object_mut() {
                obj.remove("quantization_config");
            }
        }
        // Re-quantized with the base's own settings: its quantization_config stands.
        Mode::Requantize => {}
        Mode::Quantize(q) => {
            let compute = q
                .compute_dtype
                .unwrap_or_else(|| config_dtype(&c).unwrap_or(FloatType::F32));
            c["quantization_config"] = bnb_config(&q.quant, compute, &q.skip_modules);
        }
    }
    Some(c)
}

/// The dtype a config.json declares (`dtype`, or transformers 4's `torch_dtype`).
fn config_dtype(c: &Value) -> Option<FloatType> {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| c.get(*k).and_then(Value::as_str))
        .and_then(FloatType::parse)
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

/// The id of the pad token a tokenizer saved in `dir` declares, found among its special tokens
/// (`tokenizer_config.json`'s `added_tokens_decoder`, or `tokenizer.json`'s `added_tokens`).
fn pad_token_id(dir: &Path) -> Option<u64> {
    let read = |name: &str| -> Option<Value> { serde_json::from_slice(&std::fs::read(dir.join(name)).ok()?).ok() };
    let content =
        |v: &Value| -> Option<String> { v.as_str().or_else(|| v.get("content")?.as_str()).map(str::to_string) };
    let config = read("tokenizer_config.json")?;
    let pad = content(config.get("pad_token")?)?;
    if let Some(decoder) = config.get("added_tokens_decoder").and_then(Value::as_object) {
        if let Some((id, _)) = decoder
            .iter()
            .find(|(_, t)| content(t).as_deref() == Some(pad.as_str()))
        {
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

/// The files of a saved tokenizer (transformers' and sentencepiece's).
pub const TOKENIZER_FILES: [&str; 9] = [
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

/// An adapter trained with added tokens ships its tokenizer: it wins over the base's.
pub fn copy_tokenizer_files(adapter: &Path, to: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = adapter.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}
