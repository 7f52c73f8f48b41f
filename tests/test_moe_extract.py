"""extract on MoE checkpoint pairs: the expert weights, in the checkpoint's on-disk layout (per expert for
Qwen3-MoE / Mixtral, fused and transposed for GPT-OSS), come back as a target_parameters LoRA, each expert's
delta its own truncated SVD, checked against PEFT's ParamWrapper in float64."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import peft
from helpers import cli_error, no_leftovers
from safetensors.torch import save_file
from test_moe import save_moe
from test_moe_arith import moe_peft_model, param_wrappers

import lorafast
from lorafast.cli import main as cli
from lorafast.reference import load_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

R = 4
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "gpt_oss"])
def moe_tuned(request, tmp_path_factory):
    """BASE, and TUNED = PEFT's merge of a random rank-4 adapter on both expert parameters (down_proj at rank 2)
    and q_proj, saved by transformers (so in the on-disk layout); PEFT's per-expert deltas in float64."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"extract_{arch}")
    base = save_moe(root / "base", arch, "fp32")
    pm = moe_peft_model(base, r=R, lora_alpha=2 * R, target_modules=["q_proj"], rank_pattern={"down_proj": 2})
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)  # a fine-tune-sized change next to the weights
    truth = {}
    with torch.no_grad():
        for key, w in param_wrappers(pm).items():
            truth[key] = w.get_delta_weight("default").double()
    pm.merge_and_unload().save_pretrained(root / "tuned", max_shard_size="100KB")
    return arch, base, root / "tuned", truth


def load_quiet(adapter: Path, base: Path) -> peft.PeftModel:
    """PeftModel.from_pretrained, asserting PEFT warned about no missing or unexpected keys."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=False)
    keys = [str(w.message) for w in caught if "keys" in str(w.message) and "pattern" not in str(w.message)]
    assert not keys, keys
    return pm


def expert_deltas(pm) -> dict:
    with torch.no_grad():
        return {k: w.get_delta_weight("default").double() for k, w in param_wrappers(pm).items()}


def bound(w_tuned: torch.Tensor, delta: torch.Tensor) -> float:
    """What fp32 allows for a recovered delta: TUNED = BASE + delta rounded (eps/2 ||W||) and TUNED - BASE
    rounded (eps/2 ||delta||) perturb the matrix; the truncated SVD of the perturbed matrix is within twice
    the perturbation; the factors rounded to fp32 add about eps ||delta||. Times 2 for the norms' slack."""
    return 2 * EPS * (float(w_tuned.norm()) + 3 * float(delta.norm()))


def tuned_weights(state: dict, key) -> torch.Tensor:
    module, param = key
    return state[f"{module}.{param}"].double()


def test_extract_recovers_every_experts_delta_and_peft_loads_it(tmp_path, moe_tuned):
    arch, base, tuned, truth = moe_tuned
    r = lorafast.extract(base, tuned, tmp_path / "out", rank=R, progress=False)
    cfg = json.loads((r.output / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    # The layout's PEFT release, so that readers (lorafast too) tell it from PEFT < 0.19's on square weights.
    assert cfg["peft_version"] == "0.21.2"
    assert "q_proj" in cfg["target_modules"] and not any("expert" in m for m in cfg["target_modules"])
    assert not any(leaf in cfg["target_modules"] for leaf in ("gate", "router")), "routers are not nn.Linear"
    # PEFT's nesting: gate_up_proj (registered first) under base_layer.
    keys = set(_adapter_keys(r.output))
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.weight" in keys
    pm = load_quiet(r.output, base)
    tuned_model = transformers.AutoModelForCausalLM.from_pretrained(str(tuned)).eval()
    tuned_state = tuned_model.state_dict()
    got = expert_deltas(pm)
    assert set(got) == set(truth)
    for key, want in truth.items():
        w = tuned_weights(tuned_state, key)
        for e in range(want.shape[0]):
            err = float((got[key][e] - want[e]).norm())
            assert err <= bound(w[e], want[e]), (key, e, err, bound(w[e], want[e]))
    # Merged, it is the fine-tuned model.
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = pm(ids).logits
        want_logits = tuned_model(ids).logits
    merged = pm.merge_and_unload().state_dict()
    for name, t in tuned_state.items():
        if "experts" in name or "q_proj" in name:
            err = float((merged[name].double() - t.double()).norm())
            # The recovered deltas' bound (||delta|| <= ||t|| here) plus the merge's own rounding.
            tol = bound(t, t) + EPS * float(t.double().norm())
            assert err <= tol, (name, err, tol)
        else:
            assert torch.equal(merged[name], t), name
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)


def _adapter_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_lower_rank_is_each_experts_optimal_truncation(tmp_path, moe_tuned):
    arch, base, tuned, truth = moe_tuned
    # Through the command line, as users run it.
    assert cli(["extract", str(base), str(tuned), "--rank", "1", "-o", str(tmp_path / "out"), "-q"]) == 0
    got = expert_deltas(load_quiet(tmp_path / "out", base))
    tuned_state = transformers.AutoModelForCausalLM.from_pretrained(str(tuned)).state_dict()
    for key, want in truth.items():
        w = tuned_weights(tuned_state, key)
        for e in range(want.shape[0]):
            s = torch.linalg.svdvals(want[e])
            optimal = float(s[1:].norm())  # Eckart-Young: the discarded singular values
            err = float((got[key][e] - want[e]).norm())
            assert abs(err - optimal) <= bound(w[e], want[e]), (key, e, err, optimal)


def test_energy_gives_each_parameter_one_rank(tmp_path, moe_tuned):
    arch, base, tuned, truth = moe_tuned
    r = lorafast.extract(base, tuned, tmp_path / "out", rank=8, energy=0.999999, progress=False)
    ranks = {m.module: m.rank for m in r.modules if ".experts." in m.module}
    assert ranks == {
        **{f"model.layers.{i}.mlp.experts.gate_up_proj": R for i in _moe_layers(arch)},
        **{f"model.layers.{i}.mlp.experts.down_proj": 2 for i in _moe_layers(arch)},
    }
    cfg = json.loads((r.output / "adapter_config.json").read_text())
    assert cfg["rank_pattern"][r"model\.layers\.1\.mlp\.experts\.down_proj"] == 2
    got = expert_deltas(load_quiet(r.output, base))
    for key, want in truth.items():
        assert float((got[key] - want).norm()) <= 1e-5 * float(want.norm()), key


def _moe_layers(arch: str) -> list[int]:
    return [1] if arch == "qwen3_moe" else [0, 1]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A single-file copy of checkpoint `src` with its state dict edited."""
    dst.mkdir()
    state = load_state_dict(src)
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), {"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_bad_moe_pairs_are_one_line_naming_the_tensor(tmp_path, capsys, moe_tuned):
    arch, base, tuned, _ = moe_tuned
    out = str(tmp_path / "out")
    if arch == "gpt_oss":
        name = "model.layers.1.mlp.experts.gate_up_proj"

        def more_experts(s):
            s[name] = torch.cat([s[name], s[name][:1]])

        def bias(s):
            s[f"{name}_bias"] = s[f"{name}_bias"] + 0.1

        bad = _rewrite(tuned, tmp_path / "bias", bias)
        line = cli_error(capsys, "extract", str(base), str(bad), "--rank", "2", "-o", out)
        assert f"{name}_bias" in line and "bias" in line
        no_leftovers(tmp_path)
        shutil.rmtree(bad)
        # An experts module lorafast does not know the orientation of.
        odd = tmp_path / "odd"
        shutil.copytree(base, odd)
        cfg = json.loads((odd / "config.json").read_text())
        cfg["model_type"] = "unknown_moe"
        (odd / "config.json").write_text(json.dumps(cfg))
        line = cli_error(capsys, "extract", str(odd), str(tuned), "--rank", "2", "-o", out)
        assert "unknown expert layout" in line and "model.layers.0.mlp.experts." in line
        no_leftovers(tmp_path)
    else:
        stem = "model.layers.1.mlp.experts" if arch == "qwen3_moe" else "model.layers.1.block_sparse_moe.experts"
        gate = "gate_proj" if arch == "qwen3_moe" else "w1"
        experts = 8 if arch == "qwen3_moe" else 4
        name = f"{stem}.{experts}.{gate}.weight"

        def more_experts(s):
            s[name] = s[f"{stem}.0.{gate}.weight"].clone()

        def unknown(s):
            s[f"{stem}.0.fc1.weight"] = s.pop(f"{stem}.0.{gate}.weight")

        odd = _rewrite(base, tmp_path / "odd", unknown)
        line = cli_error(capsys, "extract", str(odd), str(tuned), "--rank", "2", "-o", out)
        assert "unknown expert layout" in line and f"{stem}.0.fc1.weight" in line
        no_leftovers(tmp_path)
    bad = _rewrite(tuned, tmp_path / "more", more_experts)
    line = cli_error(capsys, "extract", str(base), str(bad), "--rank", "2", "-o", out)
    assert name in line, line
    no_leftovers(tmp_path)


def test_a_changed_router_is_named_not_extracted(tmp_path, capsys, moe_tuned):
    arch, base, tuned, _ = moe_tuned
    router = {
        "qwen3_moe": "model.layers.1.mlp.gate.weight",
        "mixtral": "model.layers.1.block_sparse_moe.gate.weight",
        "gpt_oss": "model.layers.1.mlp.router.weight",
    }[arch]

    def nudge(s):
        s[router] = s[router] + 0.01

    bad = _rewrite(tuned, tmp_path / "tuned", nudge)
    r = lorafast.extract(base, bad, tmp_path / "out", rank=R, progress=False)
    cfg = json.loads((r.output / "adapter_config.json").read_text())
    assert not any(m.endswith(".gate") or m == "gate" for m in cfg["target_modules"])
    assert any(router in w and "--modules-to-save" in w for w in r.warnings), r.warnings
    # Carried in full, under the router's name in memory (Mixtral's mlp.gate), which PEFT loads and a merge
    # puts back where the checkpoint stores it.
    r = lorafast.extract(base, bad, tmp_path / "saved", rank=R, modules_to_save=True, progress=False)
    cfg = json.loads((r.output / "adapter_config.json").read_text())
    in_memory = router.replace("block_sparse_moe", "mlp").removesuffix(".weight")
    assert cfg["modules_to_save"] == [in_memory], cfg["modules_to_save"]
    pm = load_quiet(r.output, base)
    got = dict(pm.merge_and_unload().named_parameters())[in_memory + ".weight"]
    assert torch.equal(got, load_state_dict(bad)[router])
    merged = lorafast.merge(base, [r.output], tmp_path / "merged", progress=False).output
    assert torch.equal(load_state_dict(merged)[router], load_state_dict(bad)[router])
    # A router named in targets is refused, never dropped without a word, alone or beside other targets.
    leaf = router.split(".")[-2]
    for targets in (leaf, f"q_proj,{leaf}"):
        line = cli_error(
            capsys, "extract", str(base), str(bad), "--rank", "2", "--targets", targets, "-o", str(tmp_path / "x")
        )
        assert f'target "{leaf}"' in line and "router" in line and "--modules-to-save" in line, line
        no_leftovers(tmp_path, "x")
    # Explicit targets may name the expert parameters: full module.param names then.
    r = lorafast.extract(base, tuned, tmp_path / "gu", rank=R, targets=["q_proj", "gate_up_proj"], progress=False)
    cfg = json.loads((r.output / "adapter_config.json").read_text())
    layers = [1] if arch == "qwen3_moe" else [0, 1]  # the test's Qwen3-MoE has a dense first layer
    assert cfg["target_parameters"] == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in layers]
    got = expert_deltas(load_quiet(r.output, base))
    assert set(got) == {(f"model.layers.{i}.mlp.experts", "gate_up_proj") for i in layers}


def test_qwen2_moe_shared_experts_are_ordinary_linears(tmp_path):
    """Qwen2-MoE's shared expert is nn.Linear (PEFT does not rename its leaves for this model type): extracted
    into target_modules beside the expert parameters. Rank 1: its shared_expert_gate is [1, H]."""
    base = save_moe(tmp_path / "base", "qwen2_moe", "fp32")
    pm = moe_peft_model(base, r=R, lora_alpha=2 * R, target_modules=["q_proj", "shared_expert.up_proj"])
    with torch.no_grad():
        truth = {k: w.get_delta_weight("default").double() for k, w in param_wrappers(pm).items()}
    pm.merge_and_unload().save_pretrained(tmp_path / "tuned")
    r = lorafast.extract(base, tmp_path / "tuned", tmp_path / "out", rank=1, progress=False)
    cfg = json.loads((r.output / "adapter_config.json").read_text())
    # In full: PEFT >= 0.22 maps a bare up_proj on Qwen2-MoE onto experts.gate_up_proj as well (at rank 2r).
    assert "model.layers.1.mlp.shared_expert.up_proj" in cfg["target_modules"], cfg["target_modules"]
    assert "model.layers.1.mlp.shared_expert_gate" in cfg["target_modules"]
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    got = expert_deltas(load_quiet(r.output, base))
    tuned_state = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tuned")).state_dict()
    for key, want in truth.items():
        w = tuned_weights(tuned_state, key)
        for e in range(want.shape[0]):
            optimal = float(torch.linalg.svdvals(want[e])[1:].norm())
            err = float((got[key][e] - want[e]).norm())
            assert abs(err - optimal) <= bound(w[e], want[e]), (key, e, err, optimal)
