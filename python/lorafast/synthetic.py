"""Generated Llama-shaped checkpoints and LoRA adapters (numpy only), for the demo and benchmarks.

Files are written tensor by tensor, so even the ~1.1B-parameter benchmark model is generated in
bounded memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

_DTYPES = {"bf16": ("BF16", 2), "fp16": ("F16", 2), "fp32": ("F32", 4)}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        return to_bf16_bits(x).tobytes()
    if dtype == "fp16":
        return x.astype(np.float16).tobytes()
    return x.astype(np.float32).tobytes()


def write_safetensors(
    path: Path,
    specs: Sequence[tuple[str, tuple[int, ...]]],
    make: Callable[[str, tuple[int, ...]], np.ndarray],
    dtype: str,
    metadata: Optional[dict] = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by ``make(name, shape)``."""
    st_dtype, size = _DTYPES[dtype]
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape in specs:
            f.write(_encode(make(name, shape), dtype))


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 1024

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


BENCH_SHAPE = LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_linear_shapes(s: LlamaShape) -> dict[str, tuple[int, int]]:
    kv = s.kv_heads * s.head_dim
    return {
        "q_proj": (s.hidden, s.hidden),
        "k_proj": (kv, s.hidden),
        "v_proj": (kv, s.hidden),
        "o_proj": (s.hidden, s.hidden),
        "gate_proj": (s.intermediate, s.hidden),
        "up_proj": (s.intermediate, s.hidden),
        "down_proj": (s.hidden, s.intermediate),
    }


def _module_path(layer: int, proj: str) -> str:
    part = "self_attn" if proj in LINEAR[:4] else "mlp"
    return f"model.layers.{layer}.{part}.{proj}"


def make_llama_checkpoint(
    out: os.PathLike, shape: LlamaShape = LlamaShape(), *, dtype: str = "bf16", shards: int = 1, seed: int = 0
) -> Path:
    """A random Llama-shaped checkpoint folder that ``transformers`` loads as ``LlamaForCausalLM``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lin = llama_linear_shapes(shape)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (shape.vocab, shape.hidden))]]
    for i in range(shape.layers):
        layer = [(f"model.layers.{i}.input_layernorm.weight", (shape.hidden,))]
        layer += [(f"{_module_path(i, p)}.weight", lin[p]) for p in LINEAR]
        layer.append((f"model.layers.{i}.post_attention_layernorm.weight", (shape.hidden,)))
        groups.append(layer)
    groups.append([("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))])
    # Split the groups into `shards` files of about equal size.
    sizes = [sum(int(np.prod(s)) for _, s in g) for g in groups]
    target = sum(sizes) / shards
    files: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0.0
    for g, n in zip(groups, sizes):
        if acc >= target * len(files) and len(files) < shards:
            files.append([])
        files[-1].extend(g)
        acc += n

    def make(name: str, s: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)
        return rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)

    names = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    )
    weight_map, total = {}, 0
    size = _DTYPES[dtype][1]
    for fname, specs in zip(names, files):
        write_safetensors(out / fname, specs, make, dtype)
        for n, s in specs:
            weight_map[n] = fname
            total += int(np.prod(s)) * size
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_lora_adapter(
    out: os.PathLike,
    shape: LlamaShape = LlamaShape(),
    *,
    r: int = 16,
    alpha: float = 32,
    targets: Iterable[str] = LINEAR,
    seed: int = 1,
    use_rslora: bool = False,
) -> Path:
    """A PEFT LoRA adapter folder (fp32, as PEFT saves) for a :func:`make_llama_checkpoint` model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lin = llama_linear_shapes(shape)
    targets = list(targets)
    specs = []
    for i in range(shape.layers):
        for p in targets:
            o, n = lin[p]
            key = f"base_model.model.{_module_path(i, p)}"
            specs += [(f"{key}.lora_A.weight", (r, n)), (f"{key}.lora_B.weight", (o, r))]

    def make(name: str, s: tuple[int, ...]) -> np.ndarray:
        # Non-zero B (a trained adapter, not a fresh one) so the merge changes the weights.
        scale = 1.0 / np.sqrt(s[1]) if name.endswith("lora_A.weight") else 0.01
        return rng.standard_normal(s, dtype=np.float32) * np.float32(scale)

    write_safetensors(out / "adapter_model.safetensors", specs, make, "fp32")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
