//! What a module is, told from its name alone (no model code at hand): embeddings, output layers, heads.

/// Embedding tables: lookups, not linear maps.
pub const EMBEDDINGS: [&str; 9] = [
    "embed_tokens",
    "wte",
    "wpe",
    "shared",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "embed_in",
];

/// Language-model output layers (often tied to the embedding).
pub const OUTPUTS: [&str; 3] = ["lm_head", "embed_out", "output"];

/// Task heads trained in full (PEFT's modules_to_save for classification and QA).
pub const HEADS: [&str; 3] = ["score", "classifier", "qa_outputs"];

/// The last component of a module path.
pub fn leaf(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// An embedding table, by its leaf name.
pub fn is_embedding(leaf: &str) -> bool {
    EMBEDDINGS.contains(&leaf) || leaf.contains("embed")
}

/// An embedding table, or an output layer, by its leaf name.
pub fn is_embedding_or_output(leaf: &str) -> bool {
    is_embedding(leaf) || OUTPUTS.contains(&leaf)
}

/// GPT-2-family models store these projections as Conv1D, (in, out): PEFT forces fan_in_fan_out there,
/// and transformers quantizes their transpose.
pub fn is_conv1d(model_type: Option<&str>, module: &str) -> bool {
    let family = matches!(
        model_type,
        Some("gpt2" | "openai-gpt" | "imagegpt" | "decision_transformer")
    );
    family && matches!(leaf(module), "c_attn" | "c_proj" | "c_fc" | "q_attn")
}

/// Mixture-of-experts parameters that transformers 5 holds outside any `nn.Linear`, so bitsandbytes
/// leaves them in float: the experts (fused into `experts.gate_up_proj` / `down_proj` parameters even
/// when stored one Linear per expert) and the routers (`*TopKRouter` modules: `mlp.gate`,
/// `block_sparse_moe.gate`, `mlp.router`).
pub fn is_moe_parameter(module: &str) -> bool {
    let parent = module.rsplit_once('.').map_or("", |(p, _)| p);
    module.contains(".experts.")
        || module.ends_with(".experts")
        || (leaf(module) == "gate" && matches!(leaf(parent), "mlp" | "block_sparse_moe"))
        || (leaf(module) == "router" && leaf(parent) == "mlp")
}
