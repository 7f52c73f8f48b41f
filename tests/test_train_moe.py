"""Training LoRA / QLoRA on MoE models with the fused experts targeted (PEFT target_parameters), end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import peft, with_minilm_tokenizer
from safetensors.torch import load_file, save_file
from test_moe import ARCHS, moe_config

import lorafast
from lorafast import errors
from lorafast.cli import main
from lorafast.train import train
from lorafast.train.targets import resolve_targets

EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_moe(arch: str, **kw):
    cfg = moe_config(arch)
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_and_names_resolve_to_modules_and_expert_parameters(arch):
    model = tiny_moe(arch)
    mods, params = resolve_targets("attn-experts", model)
    assert mods == ATTN and params == EXPERTS
    # the preset's parameters are real 3-D nn.Parameters of the model
    shapes = {n: p.dim() for n, p in model.named_parameters()}
    for p in params:
        hits = [n for n in shapes if n.endswith(p)]
        assert hits and all(shapes[n] == 3 for n in hits), (p, hits)
    mods, params = resolve_targets("attn-mlp", model)
    assert params == EXPERTS and not {"gate", "router", "shared_expert_gate"} & set(mods)
    if arch == "qwen2_moe":  # the shared expert's Linears, by parent: PEFT >= 0.22 maps bare leaves onto experts
        assert mods == [*ATTN, "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
    # PEFT applies them as given: every expert parameter at rank r, each MLP Linear a LoRA of its own.
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=mods, target_parameters=params)
    lora_a = {n: p.shape for n, p in peft.get_peft_model(tiny_moe(arch), cfg).named_parameters() if "lora_A" in n}
    experts = {n: s for n, s in lora_a.items() if ".experts." in n}
    n_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert experts and all(s[0] == 4 * n_experts for s in experts.values()), experts
    if arch == "qwen2_moe":
        assert any("shared_expert.up_proj" in n for n in lora_a)
    assert resolve_targets("q_proj,experts.gate_up_proj", model) == (["q_proj"], ["experts.gate_up_proj"])
    with pytest.raises(errors.InvalidArgumentError, match="unknown target module 'experts.up_proj'.*gate_up_proj"):
        resolve_targets("q_proj,experts.up_proj", model)


def moe_base(tmp_path: Path, arch: str) -> Path:
    model = tiny_moe(arch, vocab_size=30522)
    model.save_pretrained(tmp_path / arch)
    return with_minilm_tokenizer(tmp_path / arch)


def instruction_data(tmp_path: Path) -> Path:
    rows = [
        {"instruction": "name a color", "input": "", "output": "blue"},
        {"instruction": "add the numbers", "input": "2 and 3", "output": "five"},
    ] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows))
    return data


def expert_b_norms(adapter: Path) -> dict[str, float]:
    st = load_file(str(adapter / "adapter_model.safetensors"))
    return {k: float(v.abs().max()) for k, v in st.items() if "experts" in k and "lora_B" in k}


def train_losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_lora_on_experts_trains_merges_and_verifies(tmp_path, capsys):
    base = moe_base(tmp_path, "qwen3_moe")
    data = instruction_data(tmp_path)
    common = dict(model=str(base), data=str(data), task="causal-lm", r=4, epochs=4, batch_size=4, lr=5e-3)
    r = train(**common, out=str(tmp_path / "run"), targets="attn-experts", dropout=0.0, progress=False, merge=True)
    cfg = json.loads((r.adapter / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == EXPERTS and sorted(cfg["target_modules"]) == sorted(ATTN)
    norms = expert_b_norms(r.adapter)
    # LoRA B starts at zero: nonzero B on every expert parameter of the MoE layer (layer 1) means it trained
    assert len(norms) == 2 and all(v > 0 for v in norms.values()), norms
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0], losses
    # train --merge equals lorafast merge, and both equal PeftModel(base, adapter) in logits
    again = lorafast.merge(base, r.adapter, tmp_path / "merged", progress=False).output
    ours, theirs = load_file(str(r.merged / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["verify", str(base), str(r.adapter), str(again)]) == 0
    assert "ok: largest logit difference" in capsys.readouterr().out
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "name a color", "text": "name a color"}))
    preds = tmp_path / "preds.jsonl"
    argv = ["predict", "--model", str(base), "--adapter", f"a={r.adapter}", "--data", str(prompts), "--out", str(preds)]
    assert main(argv) == 0
    assert len(preds.read_text().splitlines()) == 1
    capsys.readouterr()
    # one expert's merged weight off: verify fails in one line
    key = sorted(k for k in theirs if "layers.1.mlp.experts" in k)[0]  # the checkpoint's own expert layout
    theirs[key] += 0.5
    save_file(theirs, str(again / "model.safetensors"), metadata={"format": "pt"})
    assert main(["verify", str(base), str(r.adapter), str(again)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from base + adapter" in err[0], err


def test_experts_with_dropout_are_refused_in_one_line(tmp_path, capsys):
    base = moe_base(tmp_path, "mixtral")
    data = instruction_data(tmp_path)
    argv = ["train", "--model", str(base), "--data", str(data), "--task", "causal-lm", "--out", str(tmp_path / "o")]
    assert main([*argv, "-q", "--targets", "attn-experts"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --dropout 0" in err[0] and "mlp.experts.gate_up_proj" in err[0], err
    assert main([*argv, "-q", "--targets", "q_proj,experts.nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'experts.nope'" in err[0] and "mlp.experts.down_proj" in err[0], err


def test_qlora_on_experts_trains_the_float_experts_in_a_4bit_model(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cache"))
    base = moe_base(tmp_path, "qwen2_moe")
    data = instruction_data(tmp_path)
    r = train(
        model=str(base), data=str(data), out=str(tmp_path / "run"), task="causal-lm", r=4, epochs=4,
        batch_size=4, lr=5e-3, targets="attn-experts", dropout=0.0, qlora=True, progress=False,
    )  # fmt: skip
    cfg = json.loads((r.adapter / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == EXPERTS
    norms = expert_b_norms(r.adapter)
    assert len(norms) == 4 and all(v > 0 for v in norms.values()), norms
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0], losses
