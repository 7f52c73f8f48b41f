//! What `convert_hf_to_gguf.py` does to each tensor of the architectures lorafast converts: the GGUF
//! name (its `TensorNameMap`), the tensors it drops, and the per-architecture transforms (the rotary
//! row permutation of Llama's q/k, the transpose of GPT-2's Conv1D weights, GPT-OSS's fused experts
//! transposed and their gate/up columns de-interleaved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen2Moe,
    Qwen3Moe,
    GptOss,
    Bert,
    /// `BertForSequenceClassification`: BERT with its pooler and classifier head, which llama.cpp runs
    /// as RANK pooling (`cls`: dense + tanh, then `cls.output`).
    BertClassifier,
    /// `RobertaForSequenceClassification` / `XLMRobertaForSequenceClassification`: BERT's layers under
    /// `roberta.`, position embeddings offset by the pad id, and a two-layer head (`classifier.dense`,
    /// tanh, `classifier.out_proj`) that llama.cpp's RANK pooling runs as `cls`, `cls.output`.
    RobertaClassifier,
    /// `ModernBertForSequenceClassification`: `model.` layers with fused qkv and a GLU `Wi`, and a head
    /// (`head.dense`, GELU, `head.norm`, `classifier`) llama.cpp runs as `cls`, `cls.norm`, `cls.output`.
    ModernBertClassifier,
    Gpt2,
}

/// How a tensor's values are rearranged on the way to GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    None,
    /// Roberta's position embeddings without their first `rows` rows (`RobertaModel.modify_tensors`:
    /// positions start after the pad id, so those rows are never used).
    DropRows {
        rows: usize,
    },
    /// Llama's q/k rows regrouped from HF's rotate-half order to GGML's interleaved pairs, per head.
    Permute {
        heads: usize,
    },
    /// A Conv1D weight stored (in, out), written (out, in).
    Transpose,
    /// GPT-OSS's fused experts `[E, in, out]`, written `[E, out, in]` (`GptOssModel.modify_tensors`
    /// transposes the last two dims). With `split`, `gate_up_proj`: its out rows alternate gate, up; the
    /// even rows are this tensor (`ffn_gate_exps`) and the odd ones the next (`ffn_up_exps`).
    Experts {
        split: bool,
    },
    /// GPT-OSS's fused gate/up bias `[E, 2I]`: each expert's even elements are this tensor
    /// (`ffn_gate_exps.bias`), the odd ones the next (`ffn_up_exps.bias`).
    SplitBias,
}

impl Transform {
    /// Whether the tensor's values go to two GGUF tensors, this one and the next.
    pub fn splits(self) -> bool {
        matches!(self, Transform::Experts { split: true } | Transform::SplitBias)
    }
}

/// The architecture strings the converter dispatches on (`config.json` `architectures[0]`) that lorafast
/// writes, with their GGUF architecture and whether their tensor names lack the `model.` prefix the
/// name map expects.
pub const ARCHITECTURES: [(&str, Arch, bool); 14] = [
    ("LlamaForCausalLM", Arch::Llama, false),
    ("MistralForCausalLM", Arch::Llama, false),
    // Mixtral is llama with experts (`LlamaModel` registers it).
    ("MixtralForCausalLM", Arch::Llama, false),
    ("LlamaModel", Arch::Llama, true),
    ("Qwen2ForCausalLM", Arch::Qwen2, false),
    ("Qwen2Model", Arch::Qwen2, true),
    ("Qwen2MoeForCausalLM", Arch::Qwen2Moe, false),
    ("Qwen3MoeForCausalLM", Arch::Qwen3Moe, false),
    ("GptOssForCausalLM", Arch::GptOss, false),
    ("BertModel", Arch::Bert, false),
    ("BertForSequenceClassification", Arch::BertClassifier, false),
    ("RobertaForSequenceClassification", Arch::RobertaClassifier, false),
    ("XLMRobertaForSequenceClassification", Arch::RobertaClassifier, false),
    ("ModernBertForSequenceClassification", Arch::ModernBertClassifier, false),
    // GPT-2's tensors map (below), but nothing checks them against the converter yet: llama.cpp only
    // converts GPT-2 tokenizers whose pre-tokenizer it knows, so GPT2LMHeadModel is not listed.
];

/// Architectures the converter registers that llama.cpp cannot run as transformers does, with why:
/// refused, since no file gives the model's outputs.
pub const NOT_RUNNABLE: [(&str, &str); 1] = [(
    "DistilBertForSequenceClassification",
    "llama.cpp's RANK pooling puts tanh after the head's first layer (pre_classifier), where DistilBERT \
     puts ReLU (llama-graph.cpp, build_pooling), so no GGUF of it gives the model's scores",
)];

/// The GGUF architecture of `hf_arch`, and whether its names lack the `model.` prefix.
pub fn arch_of(hf_arch: &str) -> Option<(Arch, bool)> {
    ARCHITECTURES
        .iter()
        .find(|(name, _, _)| *name == hf_arch)
        .map(|&(_, arch, prefix)| (arch, prefix))
}

/// `arch_of`, or the error naming the model folder and the architectures lorafast converts.
pub fn arch_in(dir: &std::path::Path, hf_arch: &str) -> crate::core::error::Result<(Arch, bool)> {
    if let Some((_, why)) = NOT_RUNNABLE.iter().find(|(name, _)| *name == hf_arch) {
        return Err(crate::core::error::Error::unsupported(
            dir,
            format!("architecture {hf_arch}: {why}"),
        ));
    }
    arch_of(hf_arch).ok_or_else(|| {
        let known: Vec<&str> = ARCHITECTURES.iter().map(|(name, _, _)| *name).collect();
        crate::core::error::Error::unsupported(
            dir,
            format!("architecture {hf_arch}: lorafast writes GGUF for {}", known.join(", ")),
        )
    })
}

impl Arch {
    /// `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::GptOss => "gpt-oss",
            Arch::Bert | Arch::BertClassifier | Arch::RobertaClassifier => "bert",
            Arch::ModernBertClassifier => "modern-bert",
            Arch::Gpt2 => "gpt2",
        }
    }
}

/// The hyperparameters the transforms need.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heads {
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Roberta's position offset: its pad token id + 1 (0 without a pad id, as the converter does).
    pub position_offset: usize,
}

/// The GGUF name and transform of HF tensor `name`; None for a tensor the converter drops; an error
/// (naming the tensor) for one it cannot map.
pub fn map_tensor(
    arch: Arch,
    prefix_model: bool,
    heads: Heads,
    name: &str,
) -> Result<Option<(String, Transform)>, String> {
    // Dropped by every converter class before mapping.
    if name.ends_with(".attention.masked_bias")
        || name.ends_with(".attention.bias")
        || name.ends_with(".rotary_emb.inv_freq")
    {
        return Ok(None);
    }
    // BERT: the converter strips `bert.`, renames gamma/beta and drops what an embedding model does not use.
    let bert_name;
    let name = if matches!(arch, Arch::Bert | Arch::BertClassifier | Arch::RobertaClassifier) {
        let n = if arch == Arch::RobertaClassifier {
            name.strip_prefix("roberta.").unwrap_or(name)
        } else {
            name.strip_prefix("bert.").unwrap_or(name)
        };
        // The converter drops the pooler of a classifier too, but transformers' logits go through it
        // (`BertPooler`: dense + tanh on the CLS row); llama.cpp's RANK pooling applies it as `cls`.
        let pooler = matches!(n, "pooler.dense.weight" | "pooler.dense.bias");
        if n == "embeddings.position_ids"
            || pooler && arch != Arch::BertClassifier
            || n.starts_with("cls.predictions")
            || n.starts_with("cls.seq_relationship")
        {
            return Ok(None);
        }
        bert_name = if let Some(s) = n.strip_suffix(".gamma") {
            format!("{s}.weight")
        } else if let Some(s) = n.strip_suffix(".beta") {
            format!("{s}.bias")
        } else {
            n.to_string()
        };
        bert_name.as_str()
    } else {
        name
    };
    // ModernBERT: the converter strips `model.` before BERT's filter (which drops no ModernBERT tensor).
    let name = if arch == Arch::ModernBertClassifier {
        name.strip_prefix("model.").unwrap_or(name)
    } else {
        name
    };
    if arch == Arch::GptOss {
        if let Some(mapped) = gpt_oss_tensor(name) {
            return Ok(Some(mapped));
        }
    }
    let unmapped = || {
        format!(
            "tensor {name}: llama.cpp's {} architecture has no place for it",
            arch.name()
        )
    };
    let (stem, suffix) = match name.rsplit_once('.') {
        Some((s, x @ ("weight" | "bias"))) => (s, x),
        _ => return Err(unmapped()),
    };
    let mapped = match arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::GptOss => {
            let full = if prefix_model {
                format!("model.{stem}")
            } else {
                stem.to_string()
            };
            llama_name(arch, &full)
        }
        Arch::Bert => bert_tensor(stem),
        Arch::BertClassifier => match stem {
            "pooler.dense" => Some("cls".into()),
            // (the converter's `classifier.out_proj` rename; it makes it only for non-default labels,
            // and the default two labels' `cls` [2, H] does not load in llama.cpp)
            "classifier" => Some("cls.output".into()),
            _ => bert_tensor(stem),
        },
        Arch::ModernBertClassifier => modern_bert_tensor(stem),
        Arch::RobertaClassifier => match stem {
            "classifier.dense" => Some("cls".into()),
            "classifier.out_proj" => Some("cls.output".into()),
            _ => bert_tensor(stem),
        },
        Arch::Gpt2 => {
            if stem.ends_with(".attn") && suffix == "bias" || stem.ends_with(".attn.masked_bias") {
                return Ok(None);
            }
            let stem = stem.strip_prefix("transformer.").unwrap_or(stem);
            gpt2_name(stem)
        }
    };
    let Some(gguf) = mapped else {
        return Err(unmapped());
    };
    let transform = match arch {
        Arch::RobertaClassifier if stem == "embeddings.position_embeddings" && heads.position_offset > 0 => {
            Transform::DropRows {
                rows: heads.position_offset,
            }
        }
        Arch::Llama if stem.ends_with("q_proj") => Transform::Permute { heads: heads.n_head },
        Arch::Llama if stem.ends_with("k_proj") => Transform::Permute {
            heads: if heads.n_head_kv > 0 {
                heads.n_head_kv
            } else {
                heads.n_head
            },
        },
        Arch::Gpt2
            if suffix == "weight"
                && (stem.ends_with(".c_attn") || stem.ends_with(".c_proj") || stem.ends_with(".c_fc")) =>
        {
            Transform::Transpose
        }
        _ => Transform::None,
    };
    Ok(Some((format!("{gguf}.{suffix}"), transform)))
}

/// `blk.{N}.` plus the rest, for names `{prefix}{N}.{rest}`.
fn block<'a>(stem: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = stem.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

fn llama_name(arch: Arch, stem: &str) -> Option<String> {
    let top = match stem {
        "model.embed_tokens" => Some("token_embd"),
        "lm_head" => Some("output"),
        "model.norm" => Some("output_norm"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let (n, rest) = block(stem, "model.layers.")?;
    let moe = matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::GptOss);
    let t = match rest {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        // GPT-OSS's tensor list has ATTN_POST_NORM where the others have FFN_NORM.
        "post_attention_layernorm" if arch == Arch::GptOss => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        // The MoE architectures' tensor lists have no dense FFN (a dense layer does not convert).
        "mlp.gate_proj" if !moe => "ffn_gate",
        "mlp.up_proj" if !moe => "ffn_up",
        "mlp.down_proj" if !moe => "ffn_down",
        // The router, and Qwen2-MoE's shared expert with its gate (the architectures whose tensor lists
        // have them).
        "mlp.gate" if !matches!(arch, Arch::Llama | Arch::GptOss) => "ffn_gate_inp",
        "mlp.router" if arch == Arch::GptOss => "ffn_gate_inp",
        "block_sparse_moe.gate" if arch == Arch::Llama => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" if arch == Arch::Qwen2Moe => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" if arch == Arch::Qwen2Moe => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" if arch == Arch::Qwen2Moe => "ffn_down_shexp",
        "mlp.shared_expert_gate" if arch == Arch::Qwen2Moe => "ffn_gate_inp_shexp",
        "self_attn.q_norm" if arch == Arch::Qwen3Moe => "attn_q_norm",
        "self_attn.k_norm" if arch == Arch::Qwen3Moe => "attn_k_norm",
        _ => return None,
    };
    Some(format!("blk.{n}.{t}"))
}

/// GPT-OSS's tensors without a `.weight` / `.bias` name (`GptOssModel.filter_tensors` / `modify_tensors`
/// rename them before the name map): the fused experts, their biases and the attention sinks.
fn gpt_oss_tensor(name: &str) -> Option<(String, Transform)> {
    let (n, rest) = block(name, "model.layers.")?;
    let (t, transform) = match rest {
        "mlp.experts.gate_up_proj" => ("ffn_gate_exps.weight", Transform::Experts { split: true }),
        "mlp.experts.gate_up_proj_bias" => ("ffn_gate_exps.bias", Transform::SplitBias),
        "mlp.experts.down_proj" => ("ffn_down_exps.weight", Transform::Experts { split: false }),
        "mlp.experts.down_proj_bias" => ("ffn_down_exps.bias", Transform::None),
        "self_attn.sinks" => ("attn_sinks.weight", Transform::None),
        _ => return None,
    };
    Some((format!("blk.{n}.{t}"), transform))
}

/// The name of the second tensor a splitting transform writes (gate's partner, up).
pub fn split_partner(gguf_name: &str) -> String {
    gguf_name.replace(".ffn_gate_exps.", ".ffn_up_exps.")
}

/// One expert's matrix of a per-expert checkpoint, which the converter stacks with its layer's other
/// experts into one 3-D tensor (`blk.{layer}.ffn_{gate,up,down}_exps.weight`, expert-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTensor {
    pub layer: usize,
    pub expert: usize,
    /// Where the stacked tensor comes in the converter's output among the layer's three: it yields
    /// them in this order once the layer's last expert tensor has been read.
    pub slot: usize,
    pub gguf_name: String,
}

/// The stacked tensor HF tensor `name` belongs to, for the architectures the converter stacks.
pub fn expert_tensor(arch: Arch, name: &str) -> Option<ExpertTensor> {
    let stem = name.strip_suffix(".weight")?;
    let (layer, rest) = block(stem, "model.layers.")?;
    // Qwen2MoeModel.modify_tensors yields down, gate, up; LlamaModel (Mixtral) w1, w2, w3.
    let (experts, kinds): (&str, &[(&str, &str)]) = match arch {
        Arch::Qwen2Moe | Arch::Qwen3Moe => (
            "mlp.experts.",
            &[
                ("down_proj", "ffn_down_exps"),
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
            ],
        ),
        Arch::Llama => (
            "block_sparse_moe.experts.",
            &[("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")],
        ),
        _ => return None,
    };
    let (e, kind) = rest.strip_prefix(experts)?.split_once('.')?;
    let slot = kinds.iter().position(|(k, _)| *k == kind)?;
    Some(ExpertTensor {
        layer,
        expert: e.parse().ok()?,
        slot,
        gguf_name: format!("blk.{layer}.{}.weight", kinds[slot].1),
    })
}

fn bert_tensor(stem: &str) -> Option<String> {
    let top = match stem {
        "embeddings.word_embeddings" => Some("token_embd"),
        "embeddings.position_embeddings" => Some("position_embd"),
        "embeddings.token_type_embeddings" => Some("token_types"),
        "embeddings.LayerNorm" => Some("token_embd_norm"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let (n, rest) = block(stem, "encoder.layer.")?;
    let t = match rest {
        "attention.self.query" => "attn_q",
        "attention.self.key" => "attn_k",
        "attention.self.value" => "attn_v",
        "attention.output.dense" => "attn_output",
        "attention.output.LayerNorm" => "attn_output_norm",
        "intermediate.dense" => "ffn_up",
        "output.dense" => "ffn_down",
        "output.LayerNorm" => "layer_output_norm",
        _ => return None,
    };
    Some(format!("blk.{n}.{t}"))
}

fn modern_bert_tensor(stem: &str) -> Option<String> {
    let top = match stem {
        "embeddings.tok_embeddings" => Some("token_embd"),
        "embeddings.norm" => Some("token_embd_norm"),
        "final_norm" => Some("output_norm"),
        "head.dense" => Some("cls"),
        "head.norm" => Some("cls.norm"),
        // (the converter's `classifier.out_proj` rename, which it makes only for non-default labels:
        // with the default two it maps `classifier` to `cls` as well, beside head.dense)
        "classifier" => Some("cls.output"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let (n, rest) = block(stem, "layers.")?;
    let t = match rest {
        "attn_norm" => "attn_norm",
        "attn.Wqkv" => "attn_qkv",
        "attn.Wo" => "attn_output",
        "mlp_norm" => "ffn_norm",
        "mlp.Wi" => "ffn_up",
        "mlp.Wo" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{t}"))
}

fn gpt2_name(stem: &str) -> Option<String> {
    let top = match stem {
        "wte" => Some("token_embd"),
        "wpe" => Some("position_embd"),
        "ln_f" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.into());
    }
    let (n, rest) = block(stem, "h.")?;
    let t = match rest {
        "ln_1" => "attn_norm",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "ln_2" => "ffn_norm",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{n}.{t}"))
}

/// The destination row of source row `r` under Llama's permutation: within each head of `hd` rows,
/// HF keeps the two rotary halves apart (row j*hd/2 + i), GGML interleaves them (row 2i + j).
pub fn permuted_row(r: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let (h, within) = (r / hd, r % hd);
    let half = hd / 2;
    let (j, i) = (within / half, within % half);
    h * hd + 2 * i + j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_the_converters_reshape() {
        // W.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(W.shape): output row h*hd + 2i + j is
        // input row h*hd + j*hd/2 + i.
        let (rows, heads) = (24, 3);
        let hd = rows / heads;
        let mut seen = vec![false; rows];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let src = h * hd + j * hd / 2 + i;
                    assert_eq!(permuted_row(src, rows, heads), h * hd + 2 * i + j);
                    seen[h * hd + 2 * i + j] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn names() {
        let h = Heads {
            n_head: 4,
            n_head_kv: 2,
            position_offset: 2,
        };
        let m = |a, n| map_tensor(a, false, h, n).unwrap();
        assert_eq!(
            m(Arch::Llama, "model.layers.10.self_attn.k_proj.weight"),
            Some(("blk.10.attn_k.weight".into(), Transform::Permute { heads: 2 }))
        );
        assert_eq!(m(Arch::Llama, "model.layers.1.rotary_emb.inv_freq"), None);
        assert_eq!(
            m(Arch::Qwen2, "model.layers.0.self_attn.q_proj.bias"),
            Some(("blk.0.attn_q.bias".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::Bert, "encoder.layer.5.output.LayerNorm.bias"),
            Some(("blk.5.layer_output_norm.bias".into(), Transform::None))
        );
        assert_eq!(m(Arch::Bert, "pooler.dense.weight"), None);
        assert_eq!(
            m(Arch::BertClassifier, "bert.pooler.dense.weight"),
            Some(("cls.weight".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::BertClassifier, "classifier.bias"),
            Some(("cls.output.bias".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::RobertaClassifier, "roberta.embeddings.position_embeddings.weight"),
            Some(("position_embd.weight".into(), Transform::DropRows { rows: 2 }))
        );
        assert_eq!(
            m(Arch::RobertaClassifier, "classifier.dense.weight"),
            Some(("cls.weight".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::RobertaClassifier, "classifier.out_proj.bias"),
            Some(("cls.output.bias".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::Gpt2, "h.3.mlp.c_fc.weight"),
            Some(("blk.3.ffn_up.weight".into(), Transform::Transpose))
        );
        assert_eq!(
            m(Arch::Gpt2, "h.3.mlp.c_fc.bias"),
            Some(("blk.3.ffn_up.bias".into(), Transform::None))
        );
        assert_eq!(m(Arch::Gpt2, "h.3.attn.bias"), None);
        assert!(map_tensor(Arch::Llama, false, h, "model.layers.0.mlp.experts.weight").is_err());
        assert_eq!(
            m(Arch::GptOss, "model.layers.3.mlp.experts.gate_up_proj"),
            Some(("blk.3.ffn_gate_exps.weight".into(), Transform::Experts { split: true }))
        );
        assert_eq!(
            m(Arch::GptOss, "model.layers.3.mlp.experts.gate_up_proj_bias"),
            Some(("blk.3.ffn_gate_exps.bias".into(), Transform::SplitBias))
        );
        assert_eq!(split_partner("blk.3.ffn_gate_exps.bias"), "blk.3.ffn_up_exps.bias");
        assert_eq!(
            m(Arch::GptOss, "model.layers.1.self_attn.sinks"),
            Some(("blk.1.attn_sinks.weight".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::GptOss, "model.layers.1.mlp.router.bias"),
            Some(("blk.1.ffn_gate_inp.bias".into(), Transform::None))
        );
        assert_eq!(
            m(Arch::GptOss, "model.layers.1.post_attention_layernorm.weight"),
            Some(("blk.1.post_attention_norm.weight".into(), Transform::None))
        );
        // no q/k permutation: GptOssModel is a TextModel, not a LlamaModel
        assert_eq!(
            m(Arch::GptOss, "model.layers.1.self_attn.q_proj.weight"),
            Some(("blk.1.attn_q.weight".into(), Transform::None))
        );
        assert_eq!(
            map_tensor(Arch::Llama, true, h, "layers.2.mlp.down_proj.weight").unwrap(),
            Some(("blk.2.ffn_down.weight".into(), Transform::None))
        );
    }
}
