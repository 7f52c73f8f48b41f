"""lorafast's GGUF files run by a real client: llama.cpp itself, through the Python binding shipped in the
same llama-cpp-python sdist (loading the libllama scripts/llama_cpp.sh built), against transformers and
PEFT on the same weights.

Bounds: with f32 weights and an f32 KV cache, llama.cpp and torch differ only in summation order: about
1e-6 relative to the largest logit was measured on this model, and 1e-4 (several hundred fp32 roundings
accumulated over 3 layers of 256-512-term dot products) is asserted. The embedding model's f32/f16 files
must give sentence embeddings at cosine >= 0.999 (measured 0.999999); q8_0 and q4_k_m carry their own
rounding (measured >= 0.9993 and >= 0.986), asserted at 0.99 and 0.95."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from conftest import minilm_path, save_adapter, save_model, tiny_llama_config

from lorafast import gguf as lgguf

pytestmark = pytest.mark.slow

TOKENS = [1, 5, 9, 17, 33, 60, 100, 7, 200, 3]


@pytest.fixture(scope="module")
def llama_cpp(llama_cpp_dir):
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama_cpp_dir / "build" / "bin")
    sys.path.insert(0, str(llama_cpp_dir))
    import llama_cpp

    return llama_cpp


def logits(llama_cpp, model, lora=None):
    """llama.cpp's logits for TOKENS, with an f32 KV cache (its default f16 cache rounds K and V)."""
    llm = llama_cpp.Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=0,
        type_v=0,
    )
    try:
        llm.eval(TOKENS)
        return np.asarray(llm.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        llm.close()


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    import transformers
    from test_gguf import LINEARS, with_sentencepiece_tokenizer

    root = tmp_path_factory.mktemp("runtime")
    cfg = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    base = with_sentencepiece_tokenizer(
        save_model(transformers.LlamaForCausalLM, cfg, root / "base", torch.float32), 256
    )
    adapter = save_adapter(
        transformers.AutoModelForCausalLM, base, root / "adapter", target_modules=LINEARS, r=4, lora_alpha=8
    )
    return root, base, adapter


def test_merged_f32_gguf_gives_transformers_logits(llama_cpp, tiny_llama):
    import torch
    import transformers

    import lorafast

    root, base, adapter = tiny_llama
    merged = lorafast.merge(base, [adapter], root / "merged", progress=False).output
    lgguf.to_gguf(base, [adapter], root / "m.gguf", type="f32", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    assert rel_err(logits(llama_cpp, root / "m.gguf"), ref) < 1e-4


def test_base_plus_gguf_lora_gives_peft_logits(llama_cpp, tiny_llama):
    import peft
    import torch
    import transformers

    root, base, adapter = tiny_llama
    lgguf.to_gguf(base, [], root / "base.gguf", type="f32", progress=False)
    lgguf.lora_to_gguf(adapter, base, root / "adapter.gguf")
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    assert rel_err(logits(llama_cpp, root / "base.gguf", root / "adapter.gguf"), ref) < 1e-4


@pytest.mark.parametrize("file_type,bound", [("f32", 0.999), ("f16", 0.999), ("q8_0", 0.99), ("q4_k_m", 0.95)])
def test_minilm_gguf_gives_transformers_embeddings(llama_cpp, tmp_path, file_type, bound):
    import torch
    import transformers

    lgguf.to_gguf(minilm_path(), [], tmp_path / "e.gguf", type=file_type, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = transformers.AutoModel.from_pretrained(minilm_path())
    llm = llama_cpp.Llama(model_path=str(tmp_path / "e.gguf"), embedding=True, verbose=False, n_threads=2, n_ctx=128)
    try:
        for text in ["A movie I would happily watch again.", "terrible, boring and far too long", "the fox"]:
            enc = tok(text, return_tensors="pt")
            assert llm.tokenize(text.encode(), add_bos=True) == enc["input_ids"][0].tolist()
            got = np.asarray(llm.embed(text, normalize=False), dtype=np.float64)
            with torch.no_grad():
                ref = model(**enc).last_hidden_state[0].mean(0).double().numpy()  # the GGUF says mean pooling
            assert got @ ref / np.linalg.norm(got) / np.linalg.norm(ref) >= bound
    finally:
        llm.close()
