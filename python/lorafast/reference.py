"""Reference implementations the Rust merge is measured against.

* :func:`reference_merge`: a pure-Python merge (torch + safetensors, shard by shard), the
  "pure-Python merge" baseline of the benchmarks and an independent oracle in tests.
* :func:`peft_merge`: the usual recipe, ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
  ``save_pretrained`` - the ground truth.
* :func:`compare_checkpoints`: bit-level comparison of two checkpoint folders.

These need torch (``pip install lorafast[torch]``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]
_PREFIX = "base_model.model."


def _shard_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def load_state_dict(folder: PathLike) -> dict[str, Any]:
    """Every tensor of a safetensors model folder (single file or sharded), as torch tensors."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out: dict[str, Any] = {}
    for f in _shard_files(folder):
        out.update(load_file(str(folder / f)))
    return out


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def reference_merge(
    base: PathLike, adapters: Sequence[PathLike], out: PathLike, *, weights: Optional[Sequence[float]] = None
) -> Path:
    """Merge LoRA adapters shard by shard with torch: W += sum_i w_i s_i B_i A_i in fp32, one rounding.

    Handles Linear and GPT-2 Conv1D (fan_in_fan_out) layers, rank/alpha patterns and rsLoRA,
    modules_to_save tensors, lora_bias and DoRA (single adapter) - the plain-LoRA subset of
    :func:`lorafast.merge`, written for clarity rather than speed.
    """
    import torch
    from safetensors.torch import load_file, save_file

    base, out = Path(base), Path(out)
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    conv1d = json.loads((base / "config.json").read_text()).get("model_type") in ("gpt2", "openai-gpt")
    deltas: dict[str, list] = {}  # module -> [(A, B, coeff, magnitude)]
    replace: dict[str, Any] = {}
    for path, w in zip(adapters, weights):
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
        for key, t in tensors.items():
            rest = key[len(_PREFIX) :]
            if rest.endswith(".lora_A.weight"):
                module = rest[: -len(".lora_A.weight")]
                r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
                s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
                b = tensors[f"{_PREFIX}{module}.lora_B.weight"]
                mag = tensors.get(f"{_PREFIX}{module}.lora_magnitude_vector")
                deltas.setdefault(module, []).append((t.float(), b.float(), w, s, mag))
                if f"{_PREFIX}{module}.lora_B.bias" in tensors:
                    replace[f"{module}.bias+"] = tensors[f"{_PREFIX}{module}.lora_B.bias"].float() * (w * s)
            elif ".lora_" not in rest:
                replace[rest.replace(".base_layer.", ".")] = t
    tmp = out.with_name(f".{out.name}.reference-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    for fname in _shard_files(base):
        state = load_file(str(base / fname))
        for name in list(state):
            if name in replace:
                state[name] = replace[name].to(state[name].dtype)
            module = name[: -len(".weight")]
            if name.endswith(".bias") and f"{name[: -len('.bias')]}.bias+" in replace:
                state[name] = (state[name].float() + replace[f"{name[: -len('.bias')]}.bias+"]).to(state[name].dtype)
            if not name.endswith(".weight") or module not in deltas:
                continue
            W = state[name]
            parts = deltas[module]
            fifo = conv1d and module.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")
            if len(parts) == 1 and parts[0][2] == 1.0:
                A, B, _, s, mag = parts[0]
                delta = (B @ A) * s
            else:
                A = torch.cat([p[0] * p[2] * p[3] for p in parts])
                B = torch.cat([p[1] for p in parts], dim=1)
                delta, mag = B @ A, None
            if fifo:
                delta = delta.T
            merged = W.float() + delta
            if mag is not None:
                norm = torch.linalg.norm(merged.T if fifo else merged, dim=1)
                factor = mag.float() / norm
                merged = merged * (factor.view(1, -1) if fifo else factor.view(-1, 1))
            state[name] = merged.to(W.dtype)
        save_file(state, str(tmp / fname), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _model_class(task_type: Optional[str], base: Path):
    import transformers

    if not task_type:
        # No task: the class the base checkpoint was saved as.
        arch = (json.loads((base / "config.json").read_text()).get("architectures") or [None])[0]
        return getattr(transformers, arch, transformers.AutoModel) if arch else transformers.AutoModel
    return {
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "TOKEN_CLS": transformers.AutoModelForTokenClassification,
        "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
    }.get(task_type or "", transformers.AutoModel)


def load_peft_model(base: PathLike, adapters: Sequence[PathLike], *, dtype: Optional[str] = None, **kwargs):
    """The base loaded as the adapter's task class, with every adapter attached (named a0, a1, ...)."""
    import torch
    from peft import PeftModel

    cfg = json.loads((Path(adapters[0]) / "adapter_config.json").read_text())
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: "auto"}[dtype]
    model = _model_class(cfg.get("task_type"), Path(base)).from_pretrained(str(base), dtype=torch_dtype, **kwargs)
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], start=1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
    return model


def peft_merge(
    base: PathLike,
    adapters: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Optional[Sequence[float]] = None,
    dtype: Optional[str] = None,
    **kwargs,
) -> Path:
    """PEFT's own recipe. Several adapters (or a weight) are combined with ``add_weighted_adapter``
    (``combination_type="cat"``, exact) before ``merge_and_unload``.

    ``add_weighted_adapter`` creates the combined adapter in the model's dtype: on a bf16 model PEFT
    rounds the scaled factors to bf16 and the delta again before adding it. That double rounding is
    not the target (fp32 delta, one rounding), so for a combination the model is loaded in fp32,
    merged there, and rounded once to the checkpoint's dtype when saved.
    """
    import torch

    combine = len(adapters) > 1 or (weights is not None and list(weights) != [1.0])
    model = load_peft_model(base, adapters, dtype="fp32" if combine else dtype, **kwargs)
    if combine:
        names = [f"a{i}" for i in range(len(adapters))]
        w = list(weights) if weights is not None else [1.0] * len(adapters)
        model.add_weighted_adapter(names, w, "combined", combination_type="cat")
        model.set_adapter("combined")
    merged = model.merge_and_unload()
    if combine:
        stored = load_state_dict(base)
        target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype or "")
        with torch.no_grad():
            for name, p in list(merged.named_parameters()) + list(merged.named_buffers()):
                if p.is_floating_point():
                    keep = target or next(
                        (v.dtype for k, v in stored.items() if k.endswith(name) or name.endswith(k)), p.dtype
                    )
                    p.data = p.data.to(keep)
        merged.config.dtype = target or next(iter(stored.values())).dtype
    merged.save_pretrained(str(out))
    return Path(out)


def _ordered_bits(t):
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        i = t.contiguous().view(torch.int16).to(torch.int64)
        mag = i & 0x7FFF
    elif t.dtype == torch.float32:
        i = t.contiguous().view(torch.int32).to(torch.int64)
        mag = i & 0x7FFFFFFF
    else:
        return None
    return torch.where(i < 0, -mag, mag)


def compare_checkpoints(a: PathLike, b: PathLike) -> dict[str, Any]:
    """Bit-level comparison of the tensors two folders share.

    Returns ``{"only_a", "only_b", "tensors": {name: {"equal_fraction", "max_ulp", "dtype_a", "dtype_b"}}}``.
    ULP distances are in the units of the stored dtype.
    """
    import torch

    sa, sb = load_state_dict(a), load_state_dict(b)
    result: dict[str, Any] = {
        "only_a": sorted(set(sa) - set(sb)),
        "only_b": sorted(set(sb) - set(sa)),
        "tensors": {},
    }
    for name in sorted(set(sa) & set(sb)):
        x, y = sa[name], sb[name]
        entry: dict[str, Any] = {
            "dtype_a": str(x.dtype),
            "dtype_b": str(y.dtype),
            "shape_equal": x.shape == y.shape,
        }
        if x.dtype == y.dtype and x.shape == y.shape:
            ox, oy = _ordered_bits(x), _ordered_bits(y)
            if ox is None:
                entry["equal_fraction"] = float(torch.equal(x, y))
                entry["max_ulp"] = 0 if torch.equal(x, y) else None
            else:
                d = (ox - oy).abs()
                entry["equal_fraction"] = float((d == 0).double().mean()) if d.numel() else 1.0
                entry["max_ulp"] = int(d.max()) if d.numel() else 0
        result["tensors"][name] = entry
    return result
