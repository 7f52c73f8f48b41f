"""`lorafast gguf` against llama.cpp's own tools, as vendored in the llama-cpp-python sdist: for f32 /
f16 / bf16 / q8_0 the file must be byte-identical to `convert_hf_to_gguf.py --outtype T`; for the 4-bit
mixes, to llama-quantize (`llama_model_quantize`, the function the tool calls) applied to the converter's
output in the model's own dtype. Every metadata key and value, tensor name, type, shape and byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import minilm_path

from lorafast import gguf as lgguf

CONVERTER_TYPES = ["f32", "f16", "bf16", "q8_0"]
MIXES = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

QUANTIZE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[4])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), p))
"""


def convert(llama_cpp_dir: Path, model: Path, outtype: str, out: Path, name: str | None = None) -> Path:
    """convert_hf_to_gguf.py as users run it (its vendored gguf-py first on the path)."""
    script = llama_cpp_dir / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    extra = ["--model-name", name] if name else []
    run = subprocess.run(
        [sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(out), *extra],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def llama_quantize(llama_cpp_dir: Path, src: Path, out: Path, ftype: int) -> Path:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_cpp_dir / "build" / "bin")}
    run = subprocess.run(
        [sys.executable, "-c", QUANTIZE, str(llama_cpp_dir), str(src), str(out), str(ftype)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def assert_same_file(ours: Path, theirs: Path) -> None:
    a, b = ours.read_bytes(), theirs.read_bytes()
    if a == b:
        return
    import gguf

    ra, rb = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ka, kb = list(ra.fields), list(rb.fields)
    assert ka == kb, f"key order differs: {ka} vs {kb}"
    for k in ka:
        fa, fb = ra.fields[k], rb.fields[k]
        assert [bytes(p) for p in fa.parts] == [bytes(p) for p in fb.parts], f"key {k} differs"
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert (ta.name, ta.tensor_type, list(ta.shape)) == (tb.name, tb.tensor_type, list(tb.shape))
        assert bytes(ta.data) == bytes(tb.data), f"tensor {ta.name} ({ta.tensor_type.name}) differs"
    pytest.fail(f"{ours.name}: files differ outside keys and tensors ({len(a)} vs {len(b)} bytes)")


@pytest.fixture(scope="module")
def minilm_converted(llama_cpp_dir, tmp_path_factory):
    """The converter's outputs for the real MiniLM (a BertModel, f32 weights), once per type."""
    out = tmp_path_factory.mktemp("converter")
    model = minilm_path()
    return {t: convert(llama_cpp_dir, model, t, out / f"{t}.gguf") for t in CONVERTER_TYPES}


@pytest.mark.slow
@pytest.mark.parametrize("file_type", CONVERTER_TYPES + list(MIXES))
def test_minilm_is_byte_identical_to_llama_cpp(llama_cpp_dir, minilm_converted, tmp_path, file_type):
    if file_type in MIXES:
        # llama-quantize starts from the converter's output in the model's own dtype (f32 here).
        theirs = llama_quantize(llama_cpp_dir, minilm_converted["f32"], tmp_path / "theirs.gguf", MIXES[file_type])
    else:
        theirs = minilm_converted[file_type]
    report = lgguf.to_gguf(minilm_path(), [], tmp_path / "ours.gguf", type=file_type, progress=False)
    assert report.tensors == 101
    assert_same_file(tmp_path / "ours.gguf", theirs)


def test_unsupported_architecture_is_one_line(tmp_path):
    import json

    from lorafast.errors import UnsupportedError
    from lorafast.synthetic import make_llama_checkpoint

    model = make_llama_checkpoint(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="architecture FalconForCausalLM"):
        lgguf.to_gguf(model, [], tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


# Every key the metadata reads from the config dict.
READ_KEYS = [
    *("n_layers", "num_hidden_layers", "n_layer", "num_layers", "max_position_embeddings", "n_ctx"),
    *("n_positions", "max_length", "max_sequence_length", "model_max_length", "hidden_size", "n_embd", "dim"),
    *("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner"),
    *("hidden_dim", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "n_kv_heads"),
    *("is_causal", "rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"),
    *("head_dim", "classifier_pooling", "vocab_size", "vocab_size_per_layer_input", "type_vocab_size"),
    *("id2label", "_rope"),
    # the mixture-of-experts keys
    *("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "num_experts_per_token"),
    *("top_k_experts", "n_group", "topk_group", "score_function", "scoring_func", "score_func"),
    *("moe_router_activation", "moe_router_activation_func", "expert_selection_fn"),
    *("moe_intermediate_size", "shared_expert_intermediate_size"),
]
# Keys only one architecture's metadata reads.
READ_KEYS_OF = {"gpt_oss": ["sliding_window"]}
CONFIGS = [
    {"model_type": "llama"},
    {"model_type": "mistral"},
    {"model_type": "qwen2"},
    {"model_type": "bert"},
    {"model_type": "bert", "hidden_size": 384, "num_attention_heads": 12, "id2label": {"0": "neg", "1": "pos"}},
    {"model_type": "bert", "num_labels": 3, "layer_norm_eps": 1e-5},
    {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": None},
    {"model_type": "llama", "head_dim": 96, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "vocab_size": 49152},
    {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6},
    {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 8192},
    {
        "model_type": "llama",
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        "original_max_position_embeddings": 4096,
    },
    {
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}},
    {"model_type": "mistral", "head_dim": None, "sliding_window": None, "max_position_embeddings": 32768},
    {"model_type": "qwen2", "num_key_value_heads": None, "use_sliding_window": True, "rope_theta": 1e6},
    {"model_type": "qwen2", "partial_rotary_factor": 0.5, "num_hidden_layers": 3},
    {"model_type": "qwen2_moe"},
    {"model_type": "qwen2_moe", "num_key_value_heads": None, "num_experts": 8, "rope_theta": 1e6},
    {"model_type": "qwen2_moe", "shared_expert_intermediate_size": 64, "moe_intermediate_size": 32},
    {"model_type": "qwen3_moe"},
    {"model_type": "qwen3_moe", "num_experts": 8, "head_dim": 64, "num_experts_per_tok": 2},
    {"model_type": "qwen3_moe", "num_local_experts": 16, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"model_type": "mixtral"},
    {"model_type": "mixtral", "head_dim": None, "num_experts": 4},
    {"model_type": "mixtral", "num_local_experts": 4, "rope_theta": 1e4, "head_dim": 32},
    {"model_type": "mixtral", "rope_parameters": {"rope_type": "default"}},
    {"model_type": "gpt_oss"},
    {"model_type": "gpt_oss", "num_experts": 4, "sliding_window": 4, "head_dim": 16, "hidden_size": 64},
    {"model_type": "gpt_oss", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "truncate": True}},
    {"model_type": "gpt_oss", "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0}},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}" for k in c))
def test_config_defaults_match_transformers(tmp_path, config):
    """The hyperparameters read without transformers (its class defaults, derived head_dim and kv heads,
    rope keys gathered) equal those of `AutoConfig.to_dict()`, which the converter reads."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    light = lgguf._config_dict_light(json.loads(json.dumps(config)))
    assert light is not None
    theirs = lgguf._normalized(lgguf._config_dict_transformers(tmp_path))
    ours = lgguf._normalized(light)
    for key in READ_KEYS + READ_KEYS_OF.get(config["model_type"], []):
        assert (key in ours, ours.get(key)) == (key in theirs, theirs.get(key)), key


def test_configs_the_defaults_do_not_cover_go_to_transformers():
    assert lgguf._config_dict_light({"model_type": "gemma"}) is None
    assert lgguf._config_dict_light({"model_type": "llama", "rope_scaling": {"rope_type": "longrope"}}) is None
    assert lgguf._config_dict_light({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}) is None
    assert lgguf._config_dict_light({"model_type": "llava", "text_config": {"model_type": "llama"}}) is None
    # a field transformers types `int` set to None: transformers refuses it, the converter reads the json
    assert lgguf._config_dict_light({"model_type": "mixtral", "num_key_value_heads": None}) is None
    assert lgguf._config_dict_light({"model_type": "qwen3_moe", "num_experts": None}) is None
    assert lgguf._config_dict_light({"model_type": "gpt_oss", "head_dim": None}) is None


def with_sentencepiece_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A sentencepiece tokenizer.model trained here on generated text (Llama's tokenizer format)."""
    import numpy as np
    import sentencepiece as spm

    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lines = [" ".join("".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(12)) for _ in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    return folder


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Llama 3's rope scaling: the converter adds rope_freqs.weight (one factor per rotary frequency).
LLAMA3_ROPE = dict(
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3"])
def test_merged_model_is_byte_identical_to_llama_cpp(llama_cpp_dir, tmp_path, arch):
    """Adapters merged on the fly give the file llama.cpp's tools make from the merged checkpoint: Llama
    (q/k rows permuted, untied output), Qwen2 (q/k/v biases, tied embeddings), Llama 3 (rope_freqs),
    K-quant sized rows."""
    import torch
    import transformers
    from conftest import save_adapter, save_model, tiny_llama_config, tiny_qwen2_config

    import lorafast

    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen2":
        cfg = tiny_qwen2_config(**shape)
    else:
        cfg = tiny_llama_config(**shape, **(LLAMA3_ROPE if arch == "llama3" else {}))
    auto = transformers.AutoModelForCausalLM
    cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    base = with_sentencepiece_tokenizer(save_model(cls, cfg, tmp_path / "a" / "model", torch.bfloat16), 256)
    adapter = save_adapter(auto, base, tmp_path / "adapter", target_modules=LINEARS, r=4, lora_alpha=8)
    merged = lorafast.merge(base, [adapter], tmp_path / "b" / "model", progress=False).output
    types = ["f32", "bf16", "q8_0", "q4_k_m"] if arch == "llama3" else CONVERTER_TYPES + list(MIXES)
    for file_type in types:
        outtype = file_type if file_type in CONVERTER_TYPES else "bf16"
        theirs = convert(llama_cpp_dir, merged, outtype, tmp_path / "theirs.gguf", name="tiny")
        if file_type in MIXES:
            theirs = llama_quantize(llama_cpp_dir, theirs, tmp_path / "theirs-q.gguf", MIXES[file_type])
        ours = tmp_path / f"{file_type}.gguf"
        lgguf.to_gguf(base, [adapter], ours, type=file_type, name="tiny", progress=False)
        assert_same_file(ours, theirs)


@pytest.mark.slow
def test_tokenizer_saved_with_the_adapter_wins(llama_cpp_dir, tmp_path):
    """A trainer that added a pad token and a chat template saved its tokenizer beside the adapter: the
    GGUF carries that tokenizer and the merged config (pad_token_id), as the converter reads them from
    the merged folder - not the base's."""
    import torch
    import transformers
    from conftest import save_adapter, save_model, tiny_llama_config

    import lorafast

    cfg = tiny_llama_config(hidden_size=256, intermediate_size=512)
    base = with_sentencepiece_tokenizer(
        save_model(transformers.LlamaForCausalLM, cfg, tmp_path / "a" / "model", torch.bfloat16), 256
    )
    adapter = save_adapter(transformers.AutoModelForCausalLM, base, tmp_path / "adapter", target_modules=["q_proj"])
    shutil.copy(base / "tokenizer.model", adapter / "tokenizer.model")
    (adapter / "added_tokens.json").write_text(json.dumps({"<pad>": 3}))
    (adapter / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "pad_token": "<pad>",
                "added_tokens_decoder": {"3": {"content": "<pad>", "special": True}},
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            }
        )
    )
    merged = lorafast.merge(base, [adapter], tmp_path / "b" / "model", progress=False).output
    assert json.loads((merged / "config.json").read_text())["pad_token_id"] == 3
    theirs = convert(llama_cpp_dir, merged, "f16", tmp_path / "theirs.gguf", name="tiny")
    ours = lgguf.to_gguf(base, [adapter], tmp_path / "ours.gguf", type="f16", name="tiny", progress=False).output
    assert_same_file(ours, theirs)
    import gguf

    fields = gguf.GGUFReader(ours).fields
    assert "tokenizer.chat_template" in fields and "tokenizer.ggml.padding_token_id" in fields
    assert not (base / "tokenizer_config.json").exists()  # the base folder was only read


@pytest.mark.slow
def test_four_bit_base_is_dequantized_exactly(llama_cpp_dir, tmp_path):
    """A bitsandbytes 4-bit base (with an adapter) gives the GGUF of its float merge, as the merge does."""
    import torch
    import transformers
    from conftest import save_adapter, save_model, tiny_llama_config

    import lorafast

    cfg = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    base = save_model(transformers.LlamaForCausalLM, cfg, tmp_path / "base", torch.bfloat16)
    with_sentencepiece_tokenizer(base, 256)
    adapter = save_adapter(
        transformers.AutoModelForCausalLM, base, tmp_path / "adapter", target_modules=LINEARS, r=4, lora_alpha=8
    )
    qbase = lorafast.quantize(base, tmp_path / "a" / "model", progress=False).output
    merged = lorafast.merge(qbase, [adapter], tmp_path / "b" / "model", progress=False).output
    for file_type in ("q8_0", "q4_k_m"):
        theirs = convert(llama_cpp_dir, merged, "q8_0" if file_type == "q8_0" else "bf16", tmp_path / "t.gguf")
        if file_type in MIXES:
            theirs = llama_quantize(llama_cpp_dir, theirs, tmp_path / "tq.gguf", MIXES[file_type])
        ours = tmp_path / f"{file_type}.gguf"
        lgguf.to_gguf(qbase, [adapter], ours, type=file_type, progress=False)
        assert_same_file(ours, theirs)


def convert_lora(llama_cpp_dir: Path, adapter: Path, base: Path, outtype: str, out: Path) -> Path:
    script = llama_cpp_dir / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py"
    run = subprocess.run(
        [sys.executable, str(script), str(adapter), "--base", str(base), "--outtype", outtype, "--outfile", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_adapter_is_byte_identical_to_convert_lora_to_gguf(llama_cpp_dir, tmp_path, arch):
    import torch
    import transformers
    from conftest import save_adapter, save_model, tiny_llama_config, tiny_qwen2_config

    cfg = tiny_llama_config() if arch == "llama" else tiny_qwen2_config()
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    base = save_model(cls, cfg, tmp_path / "base", torch.bfloat16)
    adapter = save_adapter(
        transformers.AutoModelForCausalLM, base, tmp_path / "adapter", target_modules=LINEARS, r=8, lora_alpha=16
    )
    for file_type in CONVERTER_TYPES:
        theirs = convert_lora(llama_cpp_dir, adapter, base, file_type, tmp_path / f"theirs-{file_type}.gguf")
        ours = tmp_path / f"{file_type}.gguf"
        report = lgguf.lora_to_gguf(adapter, base, ours, type=file_type)
        assert report.tensors == 2 * len(LINEARS) * cfg.num_hidden_layers
        assert_same_file(ours, theirs)


def test_lora_adapters_llama_cpp_cannot_express_are_refused(tmp_path):
    import torch
    import transformers
    from conftest import save_adapter, save_model, tiny_llama_config

    from lorafast.errors import UnsupportedError

    base = save_model(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "base", torch.float32)
    auto = transformers.AutoModelForCausalLM
    for kw, why in [({"use_rslora": True}, "rsLoRA"), ({"use_dora": True}, "DoRA")]:
        adapter = save_adapter(auto, base, tmp_path / f"a-{why}", target_modules=["q_proj"], r=4, **kw)
        with pytest.raises(UnsupportedError, match=why):
            lgguf.lora_to_gguf(adapter, base, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()


def test_bulk_array_encoding_is_ggufs():
    """The vocabulary arrays packed in bulk give GGUFWriter's bytes; other lists are left to it."""
    import gguf

    w = gguf.GGUFWriter(None, "llama")
    tokens = ["<s>", "▁the", "é", "\n", "", "🙂"] * 20
    pieces = [t.encode("utf-8") for t in tokens]  # the sentencepiece path's tokens are bytes
    cases = [
        tokens,
        pieces,
        pieces[:3] + tokens[3:],
        [0.5, -1e-3, 3.25, -0.0] * 20,
        [1, 2, -7, 2**31 - 1] * 20,
        [gguf.TokenType.NORMAL] * 70,
    ]
    for val in cases:
        theirs = w._pack_val(val, gguf.GGUFValueType.ARRAY, add_vtype=True)
        assert lgguf._pack_array_fast(val) == theirs
    for val in ([True] * 70, [1, 2.0] * 40, [2**31] * 70, ["a"] * 10, [1e39] * 70):
        assert lgguf._pack_array_fast(val) is None
