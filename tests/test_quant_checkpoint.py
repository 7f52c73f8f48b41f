"""`lorafast quantize` / `dequantize` against transformers + bitsandbytes on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import save_model, tiny_gpt2_config, tiny_llama_config, tiny_qwen2_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorafast
from lorafast import errors
from lorafast.cli import main
from lorafast.reference import load_state_dict

F = pytest.importorskip("bitsandbytes.functional")

# bitsandbytes' AVX512-BF16 CPU forward needs in_features divisible by the blocksize: 192-wide MLPs.
CASES = {
    "llama": (transformers.LlamaForCausalLM, lambda: tiny_llama_config(intermediate_size=192), torch.bfloat16),
    "qwen2-tied": (transformers.Qwen2ForCausalLM, lambda: tiny_qwen2_config(intermediate_size=192), torch.bfloat16),
    "gpt2": (transformers.GPT2LMHeadModel, tiny_gpt2_config, torch.float32),
}


def bnb_save(base: Path, out: Path, **kw) -> Path:
    cfg = BitsAndBytesConfig(load_in_4bit=True, **kw)
    AutoModelForCausalLM.from_pretrained(str(base), quantization_config=cfg, device_map="cpu").save_pretrained(out)
    return out


def logits(folder: Path, ids) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu").eval()(ids).logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "qt,dq,bs", [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 32)], ids=["nf4-dq-64", "fp4-128", "nf4-32"]
)
def test_quantized_checkpoint_is_byte_identical(tmp_path, case, qt, dq, bs):
    cls, config, dtype = CASES[case]
    base = save_model(cls, config(), tmp_path / "base", dtype)
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}["bf16" if dtype == torch.bfloat16 else "fp32"]
    # transformers' BitsAndBytesConfig has no blocksize option: it always quantizes with 64.
    if bs != 64:
        # Each stored weight is bitsandbytes' own quantization at that blocksize, state included.
        ours = lorafast.quantize(base, tmp_path / "ours", quant_type=qt, double_quant=dq, blocksize=bs, progress=False)
        st, orig = load_state_dict(ours.output), load_state_dict(base)
        weights = [k[: -len(f".quant_state.bitsandbytes__{qt}")] for k in st if k.endswith(f"__{qt}")]
        assert weights
        for w in weights:
            src = orig[w].T.contiguous() if case == "gpt2" else orig[w]
            packed, state = F.quantize_4bit(src, blocksize=bs, quant_type=qt, compress_statistics=dq)
            assert torch.equal(st[w], packed), w
            for k, v in state.as_dict(packed=True).items():
                assert torch.equal(st[f"{w}.{k}"], v), (w, k)
        return
    theirs = bnb_save(
        base, tmp_path / "bnb", bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=compute
    )
    ours = lorafast.quantize(base, tmp_path / "ours", quant_type=qt, double_quant=dq, progress=False).output
    a, b = load_state_dict(ours), load_state_dict(theirs)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k
    # Single-file checkpoints: the whole file, byte for byte.
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    qc_ours = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert qc_ours == json.loads((theirs / "config.json").read_text())["quantization_config"]
    # transformers loads it with no quantization_config argument, with the same logits.
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


def test_skip_modules(tmp_path):
    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(intermediate_size=192), tmp_path / "base", torch.bfloat16
    )
    theirs = bnb_save(
        base,
        tmp_path / "bnb",
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head", "down_proj"],
    )
    ours = lorafast.quantize(base, tmp_path / "ours", skip_modules=["down_proj"], progress=False).output
    a, b = load_state_dict(ours), load_state_dict(theirs)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_equals_bitsandbytes(tmp_path, case):
    cls, config, dtype = CASES[case]
    base = save_model(cls, config(), tmp_path / "base", dtype)
    q = lorafast.quantize(base, tmp_path / "q", progress=False).output
    dq = lorafast.dequantize(q, tmp_path / "dq", progress=False).output
    deq, qsd, orig = load_state_dict(dq), load_state_dict(q), load_state_dict(base)
    assert sorted(deq) == sorted(orig), "a normal checkpoint with the base's tensor names"
    assert "quantization_config" not in json.loads((dq / "config.json").read_text())
    for k, t in deq.items():
        assert t.shape == orig[k].shape and t.dtype == orig[k].dtype, k
        qs_key = f"{k}.quant_state.bitsandbytes__nf4"
        if qs_key not in qsd:
            assert torch.equal(t, orig[k]), k
            continue
        state = F.QuantState.from_dict(
            {kk.split(f"{k}.")[1]: v for kk, v in qsd.items() if kk.startswith(f"{k}.")}, device="cpu"
        )
        expected = F.dequantize_4bit(qsd[k], state).reshape(state.shape)
        if case == "gpt2":
            expected = expected.T  # Conv1D stores (in, out); bitsandbytes quantized the transpose
        assert torch.equal(t.view(torch.uint8), expected.contiguous().view(torch.uint8)), k
    # The dequantized model runs like the 4-bit one.
    ids = torch.randint(0, 200, (1, 10))
    a, b = logits(dq, ids), logits(q, ids)
    assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_cli_quantize_dequantize_and_errors(tmp_path, capsys):
    base = save_model(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "base", torch.bfloat16)
    assert main(["quantize", str(base), "-o", str(tmp_path / "q"), "--quant-type", "fp4", "--blocksize", "128"]) == 0
    assert "quantized 21 weights" in capsys.readouterr().out
    assert main(["dequantize", str(tmp_path / "q"), "-o", str(tmp_path / "dq"), "--dtype", "fp32"]) == 0
    assert all(v.dtype == torch.float32 for v in load_state_dict(tmp_path / "dq").values())
    # Bad input: one line, non-zero exit, nothing left behind.
    for argv, needle in [
        (["quantize", str(base), "-o", str(tmp_path / "q")], "already exists"),
        (["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "qq")], "already quantized"),
        (["dequantize", str(base), "-o", str(tmp_path / "x")], "no 4-bit"),
        (["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "x")], "missing"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "qq").exists()
    with pytest.raises(errors.InvalidArgumentError, match="blocksize 48"):
        lorafast.quantize(base, tmp_path / "y", blocksize=48, progress=False)


@pytest.mark.parametrize("case", list(CASES) + ["bert-minilm", "gpt2-seq-cls", "bert-seq-cls"])
def test_name_plan_equals_transformers_plan(tmp_path, case):
    """The fast name rule finds exactly the weights transformers quantizes, for each tested architecture."""
    from conftest import minilm_path

    from lorafast import _core
    from lorafast.quant import NAME_PLAN_MODEL_TYPES, plan_targets

    if case == "bert-minilm":
        base = minilm_path()
    elif case == "gpt2-seq-cls":
        base = save_model(transformers.GPT2ForSequenceClassification, tiny_gpt2_config(), tmp_path / "b", torch.float32)
    elif case == "bert-seq-cls":
        config = transformers.AutoConfig.from_pretrained(minilm_path(), num_labels=3)
        base = save_model(transformers.BertForSequenceClassification, config, tmp_path / "b", torch.float32)
    else:
        cls, config, dtype = CASES[case]
        base = save_model(cls, config(), tmp_path / "base", dtype)
    assert json.loads((base / "config.json").read_text())["model_type"] in NAME_PLAN_MODEL_TYPES
    exact = sorted(plan_targets(base))
    names = _core.quantize_checkpoint(
        base, tmp_path / "q", quant_type="nf4", blocksize=64, double_quant=True, compute_dtype="fp32", targets=None
    )
    stored = load_state_dict(names.output)
    found = sorted((k[: -len(".quant_state.bitsandbytes__nf4")]) for k in stored if k.endswith("__nf4"))
    assert found == [name for name, _ in exact]


def test_merge_into_4bit_base_matches_float_reference(tmp_path):
    """QLoRA: merge into a 4-bit base = bitsandbytes' dequantize_4bit(W) + delta (fp32), rounded once."""
    from conftest import save_adapter

    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(intermediate_size=192), tmp_path / "base", torch.bfloat16
    )
    q = lorafast.quantize(base, tmp_path / "q4", progress=False).output
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = save_adapter(
        transformers.AutoModelForCausalLM, base, tmp_path / "ad", r=8, lora_alpha=16, target_modules=targets
    )
    merged = lorafast.merge(q, adapter, tmp_path / "merged", progress=False).output
    assert not [p for p in tmp_path.iterdir() if "lorafast-dequant" in p.name], "temporary folder left behind"
    out, qsd = load_state_dict(merged), load_state_dict(q)
    ad = load_state_dict_file(adapter / "adapter_model.safetensors")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    checked = 0
    for k, t in out.items():
        if not k.endswith(".weight") or f"{k}.quant_state.bitsandbytes__nf4" not in qsd:
            continue
        state = F.QuantState.from_dict(
            {kk.split(f"{k}.")[1]: v for kk, v in qsd.items() if kk.startswith(f"{k}.")}, device="cpu"
        )
        w = F.dequantize_4bit(qsd[k], state).reshape(state.shape)
        module = k[: -len(".weight")]
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in ad:
            delta = (ad[f"base_model.model.{module}.lora_B.weight"] @ ad[a_key]) * 2.0
            expected = (w.float() + delta).to(torch.bfloat16)
            diff = (t.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.999, k
            checked += 1
        else:
            assert torch.equal(t, w), k  # untouched weights: exactly the dequantized ones
    assert checked == 3 * 3  # 3 layers x 3 targets
    ids = torch.randint(0, 200, (1, 8))
    assert torch.isfinite(logits(merged, ids)).all()


def load_state_dict_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_merge_into_4bit_base_and_requantize(tmp_path):
    """--requantize: changed weights quantized again from their fp32 merged values with the base's settings
    (bitsandbytes' own quantization of dequantize_4bit(W) + delta), untouched 4-bit weights byte for byte."""
    from conftest import save_adapter

    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(intermediate_size=192), tmp_path / "base", torch.bfloat16
    )
    q = lorafast.quantize(base, tmp_path / "q4", progress=False).output
    adapter = save_adapter(
        transformers.AutoModelForCausalLM,
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
    )
    out = lorafast.merge(q, adapter, tmp_path / "rq", requantize=True, progress=False).output
    assert not [p for p in tmp_path.iterdir() if "lorafast-dequant" in p.name]
    qsd, rsd = load_state_dict(q), load_state_dict(out)
    ad = load_state_dict_file(adapter / "adapter_model.safetensors")
    assert sorted(qsd) == sorted(rsd), "the same 4-bit layout"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((q / "config.json").read_text())["quantization_config"]
    changed = 0
    for k in rsd:
        if not k.endswith(".quant_state.bitsandbytes__nf4"):
            continue
        w = k.split(".quant_state.")[0]
        module = w[: -len(".weight")]
        a_key = f"base_model.model.{module}.lora_A.weight"
        group = [n for n in rsd if n == w or n.startswith(f"{w}.")]
        if a_key not in ad:
            assert all(torch.equal(rsd[n], qsd[n]) for n in group), w  # untouched: copied byte for byte
            continue
        changed += 1
        state = F.QuantState.from_dict({n.split(f"{w}.")[1]: qsd[n] for n in group if n != w}, device="cpu")
        merged = (
            F.dequantize_4bit(qsd[w], state).reshape(state.shape).float()
            + (ad[f"base_model.model.{module}.lora_B.weight"] @ ad[a_key]) * 2.0
        )
        packed, ref_state = F.quantize_4bit(merged, blocksize=64, quant_type="nf4", compress_statistics=True)
        # The fp32 products may differ from torch's in the last bit; codes then differ only near thresholds.
        assert (rsd[w] != packed).float().mean() < 0.01, w
        assert json.loads(bytes(rsd[k].numpy()))["dtype"] == "float32"  # as PEFT's merge into Linear4bit
    assert changed == 3 * 2
    ids = torch.randint(0, 200, (1, 8))
    assert torch.isfinite(logits(out, ids)).all()
    with pytest.raises(errors.InvalidArgumentError, match="4-bit"):
        lorafast.merge(base, adapter, tmp_path / "x", requantize=True, progress=False)


def test_corrupt_4bit_checkpoints_get_one_line_errors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(intermediate_size=192), tmp_path / "base", torch.bfloat16
    )
    q = lorafast.quantize(base, tmp_path / "q", progress=False).output
    st = load_file(str(q / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    broken = dict(st, **{key: torch.frombuffer(bytearray(b"{not json"), dtype=torch.uint8)})
    (tmp_path / "bad1").mkdir()
    save_file(broken, str(tmp_path / "bad1" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "bad1" / "config.json").write_text((q / "config.json").read_text())
    assert main(["dequantize", str(tmp_path / "bad1"), "-o", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "not JSON" in err[0], err
    # Packed codes that do not fit the shape the state records.
    w = "model.layers.0.self_attn.q_proj.weight"
    broken = dict(st, **{w: st[w][:-8].clone()})
    (tmp_path / "bad2").mkdir()
    save_file(broken, str(tmp_path / "bad2" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "bad2" / "config.json").write_text((q / "config.json").read_text())
    with pytest.raises(errors.CheckpointError, match=f"does not fit the .* packed bytes of {w}"):
        lorafast.dequantize(tmp_path / "bad2", tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
