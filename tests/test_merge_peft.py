"""lorafast.merge against PEFT's merge_and_unload + save_pretrained, the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    minilm_path,
    save_adapter,
    save_model,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_qwen2_config,
)
from helpers import assert_matches_peft

import lorafast
from lorafast.reference import load_state_dict, peft_merge, reference_merge

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model_cls, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = model_cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def check(tmp_path, model_cls, base, adapters, *, weights=None, dtype=None, vocab=256, allow_extra=(), **kw):
    ours = lorafast.merge(base, adapters, tmp_path / "ours", weights=weights, dtype=dtype, progress=False).output
    theirs = peft_merge(base, adapters, tmp_path / "peft", weights=weights, dtype=dtype, **kw)
    cmp = assert_matches_peft(ours, theirs, allow_extra=allow_extra)
    base_state = load_state_dict(base)
    base_state.update({k.split(".", 1)[1]: v for k, v in list(base_state.items()) if "." in k})

    def unchanged(k, v):
        b = base_state.get(k, base_state.get(k.split(".", 1)[-1]))
        return b is None or b.shape != v.shape or torch.equal(v.float(), b.float())

    changed = [k for k, v in load_state_dict(ours).items() if not unchanged(k, v)]
    assert changed, "the merge changed nothing: the test adapter is a no-op"
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = logits(model_cls, ours, ids), logits(model_cls, theirs, ids)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
    return ours, cmp


def test_llama_bf16_sharded(tmp_path, llama_bf16, llama_adapter):
    assert (llama_bf16 / "model.safetensors.index.json").exists(), "fixture should be sharded"
    ours, _ = check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [llama_adapter])
    # Same sharding as the base, with a correct index and the format metadata transformers expects.
    base_index = json.loads((llama_bf16 / "model.safetensors.index.json").read_text())
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in load_state_dict(ours).values())
    from safetensors import safe_open

    for shard in set(index["weight_map"].values()):
        with safe_open(str(ours / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_llama_fp16(tmp_path):
    base = save_model(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "base", torch.float16)
    ad = save_adapter(
        transformers.AutoModelForCausalLM, base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL_LINEAR
    )
    check(tmp_path, transformers.AutoModelForCausalLM, base, [ad])


def test_output_dtype_conversion(tmp_path, llama_bf16, llama_adapter):
    ours, _ = check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [llama_adapter], dtype="fp32")
    assert json.loads((ours / "config.json").read_text()).get("dtype", "float32") == "float32"
    assert all(v.dtype == torch.float32 for v in load_state_dict(ours).values())


def test_gpt2_conv1d_causal_lm(tmp_path):
    base = save_model(transformers.GPT2LMHeadModel, tiny_gpt2_config(), tmp_path / "base", torch.float32)
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    check(tmp_path, transformers.AutoModelForCausalLM, base, [ad])


def test_gpt2_sequence_classification_with_saved_head(tmp_path):
    base = save_model(transformers.GPT2LMHeadModel, tiny_gpt2_config(pad_token_id=0), tmp_path / "base", torch.float32)
    ad = save_adapter(
        transformers.AutoModelForSequenceClassification,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        task_type="SEQ_CLS",
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    assert "score" in json.loads((ad / "adapter_config.json").read_text())["modules_to_save"]
    ours, _ = check(tmp_path, transformers.AutoModelForSequenceClassification, base, [ad])
    cfg = json.loads((ours / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    assert len(cfg["id2label"]) == 2


def test_bert_sequence_classification_real_minilm(tmp_path):
    base = minilm_path()
    ad = save_adapter(
        transformers.AutoModelForSequenceClassification,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        task_type="SEQ_CLS",
        target_modules=["query", "value"],
    )
    # MiniLM is a BertModel checkpoint (keys without "bert."); the merged model is BertForSequenceClassification.
    ours, _ = check(
        tmp_path,
        transformers.AutoModelForSequenceClassification,
        base,
        [ad],
        vocab=30522,
        allow_extra=("embeddings.position_ids",),
    )
    assert json.loads((ours / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (ours / "tokenizer.json").exists() and (ours / "vocab.txt").exists()
    tok = transformers.AutoTokenizer.from_pretrained(str(ours))
    assert tok("a real tokenizer")["input_ids"][0] == tok.cls_token_id


def test_rslora_with_rank_and_alpha_patterns(tmp_path, llama_bf16):
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        llama_bf16,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=ALL_LINEAR,
        use_rslora=True,
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12},
        alpha_pattern={"v_proj": 64, "^model.layers.0.self_attn.o_proj": 3},
    )
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"] and cfg["alpha_pattern"]
    check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [ad])


def test_dora(tmp_path, llama_bf16):
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        llama_bf16,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=True,
        randomize=("lora_magnitude",),
    )
    check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [ad])


def test_dora_gpt2_conv1d(tmp_path):
    base = save_model(transformers.GPT2LMHeadModel, tiny_gpt2_config(), tmp_path / "base", torch.float32)
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        randomize=("lora_magnitude",),
    )
    check(tmp_path, transformers.AutoModelForCausalLM, base, [ad])


def test_qwen2_tied_embeddings_biased_projections(tmp_path):
    base = save_model(transformers.Qwen2ForCausalLM, tiny_qwen2_config(), tmp_path / "base", torch.bfloat16)
    assert "lm_head.weight" not in load_state_dict(base), "tied: only the input embedding is stored"
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
    )
    ours, _ = check(tmp_path, transformers.AutoModelForCausalLM, base, [ad])
    assert "lm_head.weight" not in load_state_dict(ours), "still tied"
    assert json.loads((ours / "config.json").read_text()).get("tie_word_embeddings", True) is True


def test_lora_bias_on_biased_projections(tmp_path):
    base = save_model(transformers.Qwen2ForCausalLM, tiny_qwen2_config(), tmp_path / "base", torch.bfloat16)
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj"],
        lora_bias=True,
        randomize=("lora_B",),
    )
    ours, _ = check(tmp_path, transformers.AutoModelForCausalLM, base, [ad])
    base_bias = load_state_dict(base)["model.layers.0.self_attn.q_proj.bias"]
    assert not torch.equal(load_state_dict(ours)["model.layers.0.self_attn.q_proj.bias"], base_bias)


def test_embedding_lora(tmp_path, llama_bf16):
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        llama_bf16,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["embed_tokens", "q_proj"],
    )
    check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [ad])


def test_modules_to_save_lm_head_unties(tmp_path):
    base = save_model(transformers.Qwen2ForCausalLM, tiny_qwen2_config(), tmp_path / "base", torch.bfloat16)
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        randomize=("modules_to_save",),
    )
    ours, _ = check(tmp_path, transformers.AutoModelForCausalLM, base, [ad])
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is False


def test_two_adapters_with_weights(tmp_path, llama_bf16, llama_adapter):
    second = save_adapter(
        transformers.AutoModelForCausalLM,
        llama_bf16,
        tmp_path / "second",
        seed=7,
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [llama_adapter, second], weights=[0.7, -0.4])


def test_single_adapter_weight_scales(tmp_path, llama_bf16, llama_adapter):
    check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [llama_adapter], weights=[0.5])


def test_pure_python_reference_matches_peft(tmp_path, llama_bf16, llama_adapter):
    ref = reference_merge(llama_bf16, [llama_adapter], tmp_path / "ref")
    theirs = peft_merge(llama_bf16, [llama_adapter], tmp_path / "peft")
    assert_matches_peft(ref, theirs)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_bytes(tmp_path, llama_bf16, llama_adapter, threads):
    one = lorafast.merge(llama_bf16, llama_adapter, tmp_path / "one", threads=1, progress=False).output
    many = lorafast.merge(llama_bf16, llama_adapter, tmp_path / "many", threads=threads, progress=False).output
    for f in sorted(p.name for p in one.glob("*.safetensors")):
        assert (one / f).read_bytes() == (many / f).read_bytes(), f


def test_dora_on_embeddings(tmp_path, llama_bf16):
    ad = save_adapter(
        transformers.AutoModelForCausalLM,
        llama_bf16,
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "v_proj"],
        use_dora=True,
        randomize=("lora_magnitude",),
    )
    check(tmp_path, transformers.AutoModelForCausalLM, llama_bf16, [ad])


def test_resized_vocabulary_saved_with_the_adapter(tmp_path, llama_bf16):
    """Tokens added before training: PEFT saves the resized embedding and head in full."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_bf16)
    model.resize_token_embeddings(264)
    pm = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "ad")
    saved = load_state_dict_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.weight") for k in saved), sorted(saved)

    ours = lorafast.merge(llama_bf16, tmp_path / "ad", tmp_path / "ours", progress=False).output
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_bf16)
    base.resize_token_embeddings(264)
    PeftModel.from_pretrained(base, tmp_path / "ad").merge_and_unload().save_pretrained(tmp_path / "peft")
    assert_matches_peft(ours, tmp_path / "peft")
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == 264
    ids = torch.tensor([[1, 5, 260, 263]])
    a = logits(transformers.AutoModelForCausalLM, ours, ids)
    b = logits(transformers.AutoModelForCausalLM, tmp_path / "peft", ids)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def load_state_dict_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))
