"""`lorafast gguf` for mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral) with LoRA on the experts
merged on the fly: byte-identical to llama.cpp's convert_hf_to_gguf.py on the merged checkpoint (experts
stacked per layer into 3-D tensors, router f32), and run by llama.cpp against transformers.

The Qwen MoE converters read a byte-level BPE vocabulary, which llama.cpp accepts only when it knows the
tokenizer's pre-tokenizer (by the hash of its ids for a fixed text): those models get GPT-2's real
tokenizer, rebuilt from the ranks file whisper's PyPI sdist ships (scripts/gpt2_tokenizer.py); Mixtral a
sentencepiece one trained here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import peft
from helpers import cli_error, no_leftovers
from test_gguf import MIXES, assert_same_file, convert, llama_quantize, with_sentencepiece_tokenizer
from test_gguf_runtime import TOKENS, logits, rel_err
from test_moe import EXPERTS

import lorafast
from lorafast import gguf as lgguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning"),
]


# GptOssConfig's default rope (transformers 5.25), as the released checkpoints have it.
GPT_OSS_ROPE = dict(
    rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
    original_max_position_embeddings=4096, rope_theta=150000.0,
)  # fmt: skip


def moe_config(arch: str, vocab: int, **kw):
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen3_moe":
        specific = dict(
            intermediate_size=96, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16
        )  # fmt: skip
        cls = transformers.Qwen3MoeConfig
    elif arch == "qwen2_moe":
        specific = dict(
            intermediate_size=96, moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
        cls = transformers.Qwen2MoeConfig
    elif arch == "gpt_oss":
        # (bf16 experts, as a dequantized or fine-tuned GPT-OSS is saved; the MXFP4 checkpoints are issue 20's)
        specific = dict(
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
        cls = transformers.GptOssConfig
    else:
        specific = dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralConfig
    return cls(**{**common, **specific, **kw})


def save_moe_model(folder: Path, arch: str, dtype, gpt2: Path, **kw) -> Path:
    """A tiny MoE checkpoint (sharded) with a tokenizer llama.cpp's converter reads for the architecture."""
    folder.mkdir(parents=True)
    if arch == "mixtral":
        with_sentencepiece_tokenizer(folder, 256)
        transformers.LlamaTokenizer(vocab_file=str(folder / "tokenizer.model")).save_pretrained(folder)
        vocab = 256
    else:
        shutil.copytree(gpt2, folder, dirs_exist_ok=True)
        vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(arch, vocab, **kw)).to(dtype)
    model.save_pretrained(folder, max_shard_size="200KB")
    return folder


def save_expert_adapter(base: Path, folder: Path) -> Path:
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj"],
        target_parameters=EXPERTS,
    )
    peft.get_peft_model(model, cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"])
def moe_bf16(request, tmp_path_factory, gpt2_tokenizer_dir):
    root = tmp_path_factory.mktemp(request.param)
    base = save_moe_model(root / "base", request.param, torch.bfloat16, gpt2_tokenizer_dir)
    adapter = save_expert_adapter(base, root / "adapter")
    merged = lorafast.merge(base, [adapter], root / "merged", progress=False).output
    return request.param, base, adapter, merged


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0", *MIXES])
def test_moe_gguf_is_byte_identical_to_the_converter(llama_cpp_dir, moe_bf16, tmp_path, file_type):
    arch, base, adapter, merged = moe_bf16
    theirs = convert(llama_cpp_dir, merged, "bf16" if file_type in MIXES else file_type, tmp_path / "t.gguf", "tiny")
    if file_type in MIXES:
        theirs = llama_quantize(llama_cpp_dir, theirs, tmp_path / "theirs-q.gguf", MIXES[file_type])
    ours = tmp_path / "ours.gguf"
    report = lgguf.to_gguf(base, [adapter], ours, type=file_type, name="tiny", progress=False)
    assert_same_file(ours, theirs)
    import gguf

    reader = gguf.GGUFReader(ours)
    names = {t.name: t for t in reader.tensors}
    pre = bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode()
    assert pre == ("default" if arch == "mixtral" else "gpt-2"), pre
    n_experts = 8 if arch == "qwen3_moe" else 4
    # Stacked experts (GGUF dims reversed: in, out, experts), router f32.
    assert list(names["blk.1.ffn_gate_exps.weight"].shape) == [64, 64, n_experts]
    assert list(names["blk.1.ffn_down_exps.weight"].shape) == [64, 64, n_experts]
    assert names["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert report.tensors == len(names)


def test_moe_gguf_reads_config_and_tokenizer_without_torch(moe_bf16, tmp_path):
    """The hyperparameters and the vocabulary come from config.json and tokenizer.json (or tokenizer.model)
    directly: transformers, and torch with it, is never imported (its import is most of the time and
    memory the command would take otherwise)."""
    import subprocess
    import sys

    arch, base, adapter, _ = moe_bf16
    out = tmp_path / "m.gguf"
    code = (
        "import sys, lorafast.gguf as g;"
        f"g.to_gguf({str(base)!r}, [{str(adapter)!r}], {str(out)!r}, type='q8_0', progress=False);"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
    assert out.is_file()


def test_moe_gguf_runs_in_llama_cpp(llama_cpp, tmp_path, gpt2_tokenizer_dir):
    """f32 weights, f32 KV cache: llama.cpp's logits equal transformers' on the merged model up to summation
    order (test_gguf_runtime's bound: 1e-4 of the largest logit), and the adapter moved them well beyond it.
    Every expert is used for every token (num_experts_per_tok = the expert count) so that a routing tie
    cannot pick other experts on the two sides."""
    for arch in ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"):
        n = 8 if arch == "qwen3_moe" else 4
        kw: dict = {"num_experts_per_tok": n}
        if arch == "gpt_oss":
            # GPT-OSS's yarn without truncating the correction range (truncate: false), which llama.cpp's
            # ggml_rope_yarn_corr_dims always does (floor / ceil): that alone puts its logits 6e-4 off
            # transformers'. The file is the converter's either way (the converter does not read the key).
            assert moe_config(arch, 256).rope_parameters == GPT_OSS_ROPE
            kw["rope_parameters"] = dict(GPT_OSS_ROPE, truncate=True)
        base = save_moe_model(tmp_path / arch / "base", arch, torch.float32, gpt2_tokenizer_dir, **kw)
        adapter = save_expert_adapter(base, tmp_path / arch / "adapter")
        ours = tmp_path / arch / "merged.gguf"
        lgguf.to_gguf(base, [adapter], ours, type="f32", progress=False)
        merged = lorafast.merge(base, [adapter], tmp_path / arch / "merged", progress=False).output
        tokens = [t % 256 for t in TOKENS]

        def run(folder, tokens=tokens):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            with torch.no_grad():
                return model(torch.tensor([tokens])).logits[0].double().numpy()

        ref = run(merged)
        assert rel_err(logits(llama_cpp, ours, tokens=tokens), ref) < 1e-4, arch
        assert rel_err(run(base), ref) > 1e-2, f"{arch}: the adapter must move the logits for the check to mean much"


def test_expert_lora_as_gguf_lora_is_refused(moe_bf16, tmp_path, capsys):
    _, base, adapter, _ = moe_bf16
    line = cli_error(capsys, "gguf-lora", str(adapter), "--base", str(base), "-o", str(tmp_path / "a.gguf"))
    assert "target_parameters" in line and "merge it instead" in line, line
    no_leftovers(tmp_path)


def test_dense_layer_in_a_qwen_moe_is_refused_as_the_converter_does(tmp_path, gpt2_tokenizer_dir, capsys):
    """llama.cpp's qwen3moe has no dense FFN tensors: a model with dense layers (mlp_only_layers) does not
    convert, and lorafast says which tensor in one line."""
    base = save_moe_model(tmp_path / "base", "qwen3_moe", torch.bfloat16, gpt2_tokenizer_dir, mlp_only_layers=[0])
    line = cli_error(capsys, "gguf", str(base), "-o", str(tmp_path / "out.gguf"))
    assert "model.layers.0.mlp" in line and "qwen3moe" in line, line
    assert not (tmp_path / "out.gguf").exists()
