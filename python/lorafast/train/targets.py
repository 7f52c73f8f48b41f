"""`--targets` presets: the module names practitioners target per architecture."""

from __future__ import annotations

from lorafast.errors import InvalidArgumentError

PRESETS: dict[str, dict[str, list[str]]] = {
    "llama-like": {
        "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "attn-mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "gpt2": {"attn": ["c_attn"], "attn-mlp": ["c_attn", "c_proj", "c_fc"]},
    "bert": {"attn": ["query", "key", "value"], "attn-mlp": ["query", "key", "value", "dense"]},
}
FAMILY = {
    "llama": "llama-like",
    "mistral": "llama-like",
    "mixtral": "llama-like",
    "qwen2": "llama-like",
    "qwen3": "llama-like",
    "gemma": "llama-like",
    "gemma2": "llama-like",
    "phi3": "llama-like",
    "gpt2": "gpt2",
    "bert": "bert",
    "roberta": "bert",
}


def resolve_targets(spec: str, model) -> list[str] | str:
    """Preset name, "all-linear" (PEFT resolves it), or comma-separated module names checked against the
    model: an unknown name is an error listing the names the model does have."""
    model_type = getattr(model.config, "model_type", "")
    if spec == "all-linear":
        return "all-linear"
    family = PRESETS.get(FAMILY.get(model_type, ""), {})
    if spec in family:
        return family[spec]
    if spec in ("attn", "attn-mlp"):
        raise InvalidArgumentError(f"no {spec!r} preset for model type {model_type!r}; name the modules explicitly")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    unknown = [n for n in names if n not in leaves and not any(m.endswith(f".{n}") for m, _ in model.named_modules())]
    if unknown:
        import torch

        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
            }
        )
        raise InvalidArgumentError(
            f"unknown target module {unknown[0]!r}; this model's linear modules are: {', '.join(linear)}"
        )
    return names
