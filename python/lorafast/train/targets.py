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


def expert_parameters(model) -> list[str]:
    """The fused 3-D expert weights of an MoE model as PEFT `target_parameters` suffixes
    ("mlp.experts.gate_up_proj"), read from the model's own nn.Parameters; routers are 2-D and never listed."""
    found = set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.dim() == 3 and "experts" in parts:
            i = parts.index("experts")
            found.add(".".join(parts[max(i - 1, 0) :]))
    return sorted(found)


def resolve_targets(spec: str, model) -> tuple[list[str] | str, list[str]]:
    """(target_modules, target_parameters) for a preset name, "all-linear" (PEFT resolves it), or comma-separated
    module / expert-parameter names checked against the model: an unknown name is an error listing the names the
    model does have. Presets on an MoE model ("attn-experts", "attn-mlp") add its fused expert parameters; the
    router is never a preset target."""
    model_type = getattr(model.config, "model_type", "")
    experts = expert_parameters(model)
    if spec == "all-linear":
        return "all-linear", []
    family = PRESETS.get(FAMILY.get(model_type, ""), {})
    attn = PRESETS["llama-like"]["attn"]
    if experts and spec in ("attn-experts", "attn-mlp"):
        linear = _linear_leaves(model)
        mods = [m for m in attn if m in linear]
        if spec == "attn-mlp":  # shared experts / dense layers' MLP Linears (not routers: gate, router, *_gate)
            mods += _qualified_mlp_linears(model)
        return mods, experts
    if spec in family:
        return family[spec], []
    if spec in ("attn", "attn-mlp", "attn-experts"):
        raise InvalidArgumentError(f"no {spec!r} preset for model type {model_type!r}; name the modules explicitly")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    params = [n for n in names if any(e == n or e.endswith(f".{n}") for e in experts)]
    names = [n for n in names if n not in params]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    unknown = [n for n in names if n not in leaves and not any(m.endswith(f".{n}") for m, _ in model.named_modules())]
    if unknown:
        have = f"this model's linear modules are: {', '.join(sorted(_linear_leaves(model)))}"
        if experts:
            have += f"; its expert parameters: {', '.join(experts)}"
        raise InvalidArgumentError(f"unknown target module {unknown[0]!r}; {have}")
    return names, params


def _linear_leaves(model) -> set[str]:
    import torch

    return {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")
    }


def _qualified_mlp_linears(model) -> list[str]:
    """The MLP Linears beside an MoE block's experts (a shared expert, a dense layer's MLP) by parent and leaf
    (`shared_expert.up_proj`): PEFT >= 0.22 maps a bare `up_proj` on these models onto the experts'
    `gate_up_proj` as well, at twice the rank (`_convert_peft_config_moe`); a qualified name stays a module."""
    import torch

    names = []
    for n, m in model.named_modules():
        parts = n.split(".")
        if isinstance(m, torch.nn.Linear) and len(parts) >= 2 and parts[-1] in ("gate_proj", "up_proj", "down_proj"):
            names.append(".".join(parts[-2:]))
    order = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
    return sorted(set(names), key=lambda q: (q.split(".")[0], order[q.split(".")[1]]))
