"""lorafast's GGUF files run by a real client: llama.cpp itself, through the Python binding shipped in the
same llama-cpp-python sdist (loading the libllama scripts/llama_cpp.sh built), against transformers and
PEFT on the same weights.

Bounds: with f32 weights and an f32 KV cache, llama.cpp and torch differ only in summation order: about
1e-6 relative to the largest logit was measured on this model, and 1e-4 (several hundred fp32 roundings
accumulated over 3 layers of 256-512-term dot products) is asserted. Every other type is run on a model
whose adapter was trained to certainty, with bounds from each type's rounding (see RUNTIME_TYPES) and
every next-token choice kept. The embedding model's f32/f16 files must give sentence embeddings at
cosine >= 0.999 (measured 0.999999); q8_0 and q4_k_m carry their own rounding (measured >= 0.9993 and
>= 0.986), asserted at 0.99 and 0.95."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import minilm_path, save_adapter, save_model, tiny_llama_config

from lorafast import gguf as lgguf

pytestmark = pytest.mark.slow

TOKENS = [1, 5, 9, 17, 33, 60, 100, 7, 200, 3]


def logits(llama_cpp, model, lora=None, tokens=TOKENS):
    """llama.cpp's logits for `tokens`, with an f32 KV cache (its default f16 cache rounds K and V)."""
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
        llm.eval(tokens)
        return np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
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


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """A random tiny Llama whose LoRA adapter was trained (PEFT, 200 AdamW steps) to continue a fixed
    permutation of the vocabulary: the merged model's next token is certain, its top logit ahead of the
    runner-up by more than 0.4 of the largest logit, so the choice is a property of the model
    and not of rounding. Returns (root, base, adapter, a 32-token prompt)."""
    import peft
    import torch
    import transformers
    from test_gguf import LINEARS, with_sentencepiece_tokenizer

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    base = with_sentencepiece_tokenizer(
        save_model(transformers.LlamaForCausalLM, cfg, root / "base", torch.float32), 256
    )
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(256, generator=gen)

    def chains(n: int, length: int = 32) -> torch.Tensor:
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, 256, (n,), generator=gen)
        for i in range(1, length):
            x[:, i] = perm[x[:, i - 1]]
        return x

    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        peft.LoraConfig(r=16, lora_alpha=16, target_modules=LINEARS, task_type="CAUSAL_LM"),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(200):
        x = chains(16)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "adapter")
    return root, base, root / "adapter", chains(1)[0].tolist()


# Bounds on llama.cpp's logits against transformers' f32 logits of the merged model, relative to the
# largest logit (measured on this model in brackets). f32: summation order only [6e-7]. f16 / bf16 /
# q8_0: 8 steps of the weights' relative rounding (2^-11, 2^-8, 2^-7 of a block's largest value), which
# llama.cpp's rounding of activations (to f16 or 8-bit blocks) adds to [2.5e-4, 2.2e-3, 7.7e-3]. The
# K-quants and q4_0 [0.020 q6_k, 0.039 q5_k_m, 0.070 q4_k_m, 0.096 q4_0]: at most 0.2, below half the
# trained model's margin between its first and second choice (> 0.4), so its choices must survive.
RUNTIME_TYPES = {
    "f32": 1e-4,
    "f16": 8 * 2.0**-11,
    "bf16": 8 * 2.0**-8,
    "q8_0": 8 * 2.0**-7,
    "q6_k": 0.1,
    "q5_k_m": 0.15,
    "q4_k_m": 0.2,
    "q4_0": 0.2,
}


@pytest.mark.parametrize("file_type", list(RUNTIME_TYPES))
def test_every_type_keeps_the_merged_models_logits_and_choices(llama_cpp, trained_llama, file_type):
    import torch
    import transformers

    import lorafast

    root, base, adapter, prompt = trained_llama
    merged = root / "merged"
    if not merged.exists():
        lorafast.merge(base, [adapter], merged, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].double().numpy()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = float(((top2[:, 1] - top2[:, 0]) / np.abs(ref).max()).min())
    assert margin > 0.4, f"the trained model is not certain enough for this test (margin {margin:.3f})"
    out = root / f"{file_type}.gguf"
    lgguf.to_gguf(base, [adapter], out, type=file_type, progress=False)
    got = logits(llama_cpp, out, tokens=prompt)
    err = rel_err(got, ref)
    print(f"{file_type}: relative logit error {err:.2e}, margin {margin:.3f}")
    assert err < RUNTIME_TYPES[file_type]
    # The first token has no history; every later one is the permutation's next token.
    assert got[:-1].argmax(-1).tolist() == ref[:-1].argmax(-1).tolist() == prompt[1:]


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
