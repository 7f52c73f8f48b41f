"""Write the seed inputs of the fuzz corpora (fuzz/corpus/TARGET/seed-*): small but real files of each
kind, as lorafast's own generators, PEFT and bitsandbytes-compatible quantization write them.

    python fuzz/seeds.py        # then: bash scripts/fuzz.sh TARGET SECONDS

An input holding two files is a 2-byte little-endian length, the first file, then the second (see
rust/core/fuzzing.rs).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import lorafast
from lorafast.synthetic import LlamaShape, make_llama_checkpoint, make_lora_adapter

CORPUS = Path(__file__).parent / "corpus"
SHAPE = LlamaShape(hidden=16, intermediate=24, layers=1, heads=2, kv_heads=1, vocab=32)


def join(first: bytes, second: bytes) -> bytes:
    return struct.pack("<H", len(first)) + first + second


def put(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dtype in ("bf16", "fp16", "fp32"):
            base = make_llama_checkpoint(root / f"base-{dtype}", SHAPE, dtype=dtype)
            put("safetensors_checkpoint", f"single-{dtype}", join(b"", (base / "model.safetensors").read_bytes()))
        sharded = make_llama_checkpoint(root / "sharded", SHAPE, shards=2)
        index = (sharded / "model.safetensors.index.json").read_text()
        first = sorted(sharded.glob("*.safetensors"))[0]
        # The index names two shards; the target writes the second part under the first name.
        index = index.replace(first.name, "model.safetensors")
        put("safetensors_checkpoint", "indexed", join(index.encode(), first.read_bytes()))

        base = root / "base-bf16"
        variants = {
            "plain": {},
            "rslora-patterns": {
                "use_rslora": True,
                "rank_pattern": {"q_proj": 4},
                "alpha_pattern": {r"model\.layers\.0\.mlp\.up_proj": 8},
            },
            "layers-exclude": {"layers_to_transform": [0], "layers_pattern": "layers", "exclude_modules": ["o_proj"]},
            "regex-targets": {"target_modules": r".*\.(q|v)_proj"},
            "modules-to-save": {"modules_to_save": ["lm_head"], "task_type": "SEQ_CLS"},
        }
        for name, extra in variants.items():
            a = make_lora_adapter(root / f"a-{name}", SHAPE, r=4, alpha=8)
            cfg = json.loads((a / "adapter_config.json").read_text())
            cfg.update(extra)
            put("adapter_folder", name, join(json.dumps(cfg).encode(), (a / "adapter_model.safetensors").read_bytes()))

        expert_seeds()
        gguf_seeds()

        for quant_type, dq, bs in (("nf4", True, 64), ("fp4", False, 32), ("nf4", False, 128)):
            q = lorafast.quantize(
                base,
                root / f"q-{quant_type}-{dq}-{bs}",
                quant_type=quant_type,
                blocksize=bs,
                double_quant=dq,
                progress=False,
            ).output
            put(
                "quantized_checkpoint",
                f"{quant_type}-{'dq' if dq else 'plain'}-{bs}",
                join((q / "config.json").read_bytes(), (q / "model.safetensors").read_bytes()),
            )


def expert_seeds() -> None:
    """Adapters in PEFT's target_parameters layout (A [E*r, in], B [out, E*r]; gate_up_proj nested under
    base_layer when both parameters are targeted) for the two checkpoints `expert_adapter` plans against:
    two experts, hidden 8, intermediate 4."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    m = "base_model.model.model.layers.0.mlp.experts"
    gate_up = {f"{m}.base_layer.lora_A.weight": (4, 8), f"{m}.base_layer.lora_B.weight": (8, 4)}
    down = {f"{m}.lora_A.weight": (4, 4), f"{m}.lora_B.weight": (8, 4)}
    q = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (8, 2),
    }
    variants = {
        "experts-both": (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], {**gate_up, **down, **q}, {}),
        "experts-down": (["down_proj"], {k.replace(".base_layer", ""): v for k, v in down.items()}, {}),
        "experts-patterns": (
            ["gate_up_proj", "down_proj"],
            {**gate_up, **down},
            {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"gate_up_proj": 3}, "use_rslora": True},
        ),
        # PEFT 0.18's layout (every 3-D parameter read as (E, in, out)): down_proj's A [E*r, 8], B [4, E*r].
        "experts-peft018": (
            ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            {**gate_up, f"{m}.lora_A.weight": (4, 8), f"{m}.lora_B.weight": (4, 4)},
            {"peft_version": "0.18.1"},
        ),
    }
    for name, (targets, shapes, extra) in variants.items():
        cfg = {
            "peft_type": "LORA",
            "peft_version": "0.21.2",
            "r": 2,
            "lora_alpha": 4,
            "target_parameters": targets,
            "target_modules": ["q_proj"],
        }
        cfg.update(extra)
        tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        put("expert_adapter", name, join(json.dumps(cfg).encode(), save(tensors)))


def gguf_seeds() -> None:
    """One-layer MoE checkpoints as transformers saves them (per-expert Linears, Qwen3-MoE's and Mixtral's
    names; GPT-OSS's fused tensors), two experts, hidden 8, intermediate 4, for `gguf_experts`."""
    import numpy as np
    from safetensors.numpy import save

    common = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    kinds = {
        "qwen3-moe": ("Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), {"num_experts": 2}),
        "mixtral": ("MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), {"num_local_experts": 2}),
    }
    for name, (arch, block, (gate, up, down), extra) in kinds.items():
        p = f"model.layers.0.{block}"
        shapes = {
            "model.embed_tokens.weight": (32, 8),
            "model.layers.0.self_attn.q_proj.weight": (8, 8),
            "model.layers.0.self_attn.k_proj.weight": (4, 8),
            "model.layers.0.input_layernorm.weight": (8,),
            f"{p}.gate.weight": (2, 8),
        }
        for e in range(2):
            shapes.update({f"{p}.experts.{e}.{gate}.weight": (4, 8), f"{p}.experts.{e}.{up}.weight": (4, 8)})
            shapes[f"{p}.experts.{e}.{down}.weight"] = (8, 4)
        cfg = {"architectures": [arch], **common, **extra}
        tensors = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
        put("gguf_experts", name, join(json.dumps(cfg).encode(), save(tensors)))
    # GPT-OSS: fused on disk, [E, in, out], gate/up interleaved, with biases and sinks.
    p = "model.layers.0"
    shapes = {
        "model.embed_tokens.weight": (32, 8),
        f"{p}.self_attn.q_proj.weight": (8, 8),
        f"{p}.self_attn.sinks": (2,),
        f"{p}.mlp.router.weight": (2, 8),
        f"{p}.mlp.router.bias": (2,),
        f"{p}.mlp.experts.gate_up_proj": (2, 8, 8),
        f"{p}.mlp.experts.gate_up_proj_bias": (2, 8),
        f"{p}.mlp.experts.down_proj": (2, 4, 8),
        f"{p}.mlp.experts.down_proj_bias": (2, 8),
    }
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **common, "num_local_experts": 2}
    tensors = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    put("gguf_experts", "gpt-oss", join(json.dumps(cfg).encode(), save(tensors)))


if __name__ == "__main__":
    main()
