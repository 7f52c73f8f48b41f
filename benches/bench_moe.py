"""Mixture-of-experts benchmark: `lorafast merge` of an expert adapter (PEFT target_parameters) against PEFT's
route and a plain copy, and `lorafast gguf --type q8_0` of the same pair against the converter's route (PEFT
merge, then llama.cpp's convert_hf_to_gguf.py --outtype q8_0), measured in one run.

Generates (once, cached) a ~1.3B-parameter Qwen3-MoE-shaped bf16 checkpoint stored one Linear per expert as
transformers saves it (hidden 1024, 24 layers, 32 experts of intermediate 512, 4 shards) and an r=16 adapter
on q,k,v,o and on every expert's gate_up_proj and down_proj, in PEFT's saved layout (both parameters of an
experts module: gate_up_proj nested under base_layer), with GPT-2's real tokenizer (scripts/gpt2_tokenizer.py:
the Qwen MoE converter reads only a BPE vocabulary whose pre-tokenizer it knows). Each route is the process a
user starts, timed from spawn to exit; routes alternate round by round; medians.

    python benches/bench_moe.py [--runs 5] [--slow-runs 1] [--skip-peft] [--skip-gguf] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CACHE, lorafast_cli, measure_alternating, python_script, table

from lorafast.synthetic import write_safetensors

# GPT-2's vocabulary size, so its tokenizer fits.
HIDDEN, INTER, LAYERS, EXPERTS, HEADS, KV, HEAD_DIM, VOCAB, R = 1024, 512, 24, 32, 16, 4, 64, 50257, 16
ROOT = Path(__file__).resolve().parents[1]
PEFT = (
    "import sys, transformers\nfrom lorafast.reference import peft_merge\n"
    "transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()\n"
    "peft_merge(sys.argv[1], [sys.argv[2]], sys.argv[3])"
)
# The tokenizer travels with the merged model (save_pretrained of the model writes none).
PEFT_GGUF = PEFT + (
    "\nimport shutil\nfor f in ('tokenizer.json', 'tokenizer_config.json'):"
    " shutil.copy(f'{sys.argv[1]}/{f}', sys.argv[3])"
)
LABELS = {
    "lorafast": "`lorafast merge BASE ADAPTER` (Rust, 2 threads)",
    "copy": "`cp -r` of the base folder",
    "peft": "PEFT from_pretrained + merge_and_unload + save_pretrained",
}
GGUF_LABELS = {
    "gguf": "`lorafast gguf BASE ADAPTER --type q8_0`",
    "convert": "convert_hf_to_gguf.py --outtype q8_0, on the merged model",
    "route": "PEFT merge + convert_hf_to_gguf.py --outtype q8_0",
    "copy": "`cp -r` of the base folder",
}


def config() -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "moe_intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HEAD_DIM,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def layer_specs(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}"
    specs = [
        (f"{p}.input_layernorm.weight", (HIDDEN,)),
        (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.k_proj.weight", (KV * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.v_proj.weight", (KV * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
        (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)),
        (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
        (f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)),
    ]
    for e in range(EXPERTS):
        specs += [
            (f"{p}.mlp.experts.{e}.gate_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.experts.{e}.up_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, INTER)),
        ]
    return sorted(specs)


def ensure_model(cache: Path) -> tuple[Path, Path]:
    base, adapter, done = cache / "qwen3-moe-1.3b", cache / "qwen3-moe-adapter-r16", cache / "MOE_READY_V3"
    if done.exists():
        return base, adapter
    t0 = time.perf_counter()
    print(f"generating the MoE benchmark checkpoint in {cache} ...", file=sys.stderr)
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def make(name: str, s: tuple[int, ...]) -> np.ndarray:
        if len(s) == 1:
            return np.ones(s, dtype=np.float32)
        return rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)

    shards = [
        [("model.embed_tokens.weight", (VOCAB, HIDDEN))] + [x for i in range(0, 6) for x in layer_specs(i)],
        [x for i in range(6, 12) for x in layer_specs(i)],
        [x for i in range(12, 18) for x in layer_specs(i)],
        [x for i in range(18, LAYERS) for x in layer_specs(i)]
        + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))],
    ]
    weight_map, total = {}, 0
    for k, specs in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(base / name, specs, make, "bf16")
        for t, s in specs:
            weight_map[t] = name
            total += int(np.prod(s)) * 2
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (base / "config.json").write_text(json.dumps(config(), indent=2))
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpt2_tokenizer import gpt2_tokenizer

    shutil.copytree(gpt2_tokenizer(), base, dirs_exist_ok=True)
    adapter.mkdir(parents=True)
    specs = []
    for i in range(LAYERS):
        m = f"base_model.model.model.layers.{i}"
        for proj, (o, n) in {
            "q_proj": (HEADS * HEAD_DIM, HIDDEN),
            "k_proj": (KV * HEAD_DIM, HIDDEN),
            "v_proj": (KV * HEAD_DIM, HIDDEN),
            "o_proj": (HIDDEN, HEADS * HEAD_DIM),
        }.items():
            specs += [(f"{m}.self_attn.{proj}.lora_A.weight", (R, n)), (f"{m}.self_attn.{proj}.lora_B.weight", (o, R))]
        # PEFT's layout for both parameters of one experts module: gate_up_proj inner (base_layer), down outer.
        specs += [
            (f"{m}.mlp.experts.base_layer.lora_A.weight", (EXPERTS * R, HIDDEN)),
            (f"{m}.mlp.experts.base_layer.lora_B.weight", (2 * INTER, EXPERTS * R)),
            (f"{m}.mlp.experts.lora_A.weight", (EXPERTS * R, INTER)),
            (f"{m}.mlp.experts.lora_B.weight", (HIDDEN, EXPERTS * R)),
        ]

    def factor(name: str, s: tuple[int, ...]) -> np.ndarray:
        scale = 1.0 / np.sqrt(s[1]) if "lora_A" in name else 0.01
        return rng.standard_normal(s, dtype=np.float32) * np.float32(scale)

    write_safetensors(adapter / "adapter_model.safetensors", sorted(specs), factor, "fp32")
    from importlib.metadata import version

    cfg = {
        # PEFT writes it from 0.18; readers need it to tell its expert layouts apart (gate_up_proj is square
        # here: 2 * 512 == 1024). This is the layout of PEFT >= 0.19.
        "peft_version": version("peft"),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": R,
        "lora_alpha": 2 * R,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    done.write_text("ok")
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return base, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs of lorafast and the copy")
    ap.add_argument("--slow-runs", type=int, default=1, help="runs of PEFT's route")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-gguf", action="store_true", help="leave out the GGUF routes")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    base, adapter = ensure_model(CACHE)
    scratch = Path(tempfile.mkdtemp(prefix="lorafast-bench-", dir=CACHE))
    b, a = str(base), str(adapter)
    routes = {
        "lorafast": (lambda out: lorafast_cli("merge", b, a, "-o", str(out), "-q"), args.runs),
        "copy": (lambda out: ["cp", "-r", b, str(out)], args.runs),
    }
    if not args.skip_peft:
        routes["peft"] = (lambda out: python_script(PEFT, b, a, str(out)), args.slow_runs)
    try:
        measure_alternating({"copy": routes["copy"]}, scratch)  # warm the page cache
        warm = measure_alternating(routes, scratch)
        size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
        title = (
            f"Merge of an r=16 adapter on attention and all {EXPERTS} experts x {LAYERS} layers (target_parameters) "
            f"into a ~1.3B Qwen3-MoE-shaped bf16 checkpoint stored per expert ({size:.2f} GB, 4 shards), "
            f"{os.cpu_count()} cores, page cache warm:"
        )
        print(table(warm, LABELS, title, "lorafast", "peft" if "peft" in warm else None))
        if "peft" in warm and warm["peft"].get("stderr"):
            print(f"PEFT route: {warm['peft']['stderr']}")
        results = {"merge": warm}
        if not args.skip_gguf:
            results["gguf"] = gguf_routes(args, b, a, scratch)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gguf_routes(args: argparse.Namespace, b: str, a: str, scratch: Path) -> dict:
    from bench_gguf import llama_cpp_dir, shell

    llama = llama_cpp_dir()
    convert_py, py = str(llama / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"), sys.executable
    merged = scratch / "merged"
    subprocess.run(lorafast_cli("merge", b, a, "-o", str(merged), "-q"), check=True)

    def convert(model: str, out: Path) -> list[list[str]]:
        return [["mkdir", "-p", str(out)], [py, convert_py, model, "--outtype", "q8_0", "--outfile", f"{out}/m.gguf"]]

    routes = {
        "gguf": (
            lambda out: shell(
                ["mkdir", "-p", str(out)], lorafast_cli("gguf", b, a, "-o", f"{out}/m.gguf", "--type", "q8_0", "-q")
            ),
            args.runs,
        ),
        "convert": (lambda out: shell(*convert(str(merged), out)), args.slow_runs),
        "copy": (lambda out: ["cp", "-r", b, str(out)], args.runs),
    }
    if not args.skip_peft:
        routes["route"] = (
            lambda out: shell([py, "-c", PEFT_GGUF, b, a, f"{out}/merged"], *convert(f"{out}/merged", out)),
            args.slow_runs,
        )
    res = measure_alternating(routes, scratch)
    title = f"GGUF q8_0 of the same base and adapter (merged on the fly), {os.cpu_count()} cores, page cache warm:"
    print()
    print(table(res, GGUF_LABELS, title, "gguf", "route" if "route" in res else "convert"))
    return res


if __name__ == "__main__":
    main()
