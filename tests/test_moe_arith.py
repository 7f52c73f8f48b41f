"""Adapter commands on MoE adapters whose LoRA sits on fused expert parameters (PEFT's target_parameters):
inspect reports each expert's change, checked against PEFT's own ParamWrapper.get_delta_weight in float64."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import peft
from helpers import cli_error, no_leftovers
from test_moe import EXPERTS, per_expert_adapter, save_moe

import lorafast
from lorafast.cli import main as cli

pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

ZEROED = (1, 3)  # experts whose B is zeroed in layer 1's gate_up_proj


def moe_peft_model(base, *, seed=1, **lora):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    lora.setdefault("target_parameters", EXPERTS)
    cfg = peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    return peft.get_peft_model(model, cfg)


def param_wrappers(pm):
    """(module path as lorafast names it, parameter) -> PEFT's ParamWrapper."""
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, peft.tuners.lora.layer.ParamWrapper):
            module = name.removeprefix("base_model.model.")
            while module.endswith(".base_layer"):
                module = module.removesuffix(".base_layer")
            out[(module, mod.parameter_name)] = mod
    return out


@pytest.fixture(scope="module")
def zeroed_adapter(tmp_path_factory):
    """A qwen3_moe adapter on both expert parameters and q_proj, with some experts' B zero, and PEFT's per-expert
    delta norms of it in float64."""
    root = tmp_path_factory.mktemp("inspect")
    base = save_moe(root / "base", "qwen3_moe", "fp32")
    pm = moe_peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"down_proj": 2})
    wrappers = param_wrappers(pm)
    layer1 = wrappers[("model.layers.1.mlp.experts", "gate_up_proj")]
    num_experts = layer1.num_experts
    with torch.no_grad():
        b = layer1.lora_B["default"].weight  # [out, r * E], rank-major: expert e's columns e, e + E, ...
        for e in ZEROED:
            b[:, e::num_experts] = 0
    pm.save_pretrained(root / "adapter")
    pm.double()
    truth = {}
    with torch.no_grad():
        for key, w in wrappers.items():
            delta = w.get_delta_weight("default")  # [E, ., .]
            truth[key] = [float(torch.linalg.matrix_norm(d)) for d in delta]
    return root / "adapter", truth, num_experts


def test_inspect_reports_each_experts_change_as_peft_computes_it(zeroed_adapter):
    adapter, truth, num_experts = zeroed_adapter
    info = lorafast.inspect_adapter(adapter)
    params = {(m["module"], m["param"]): m for m in info["modules"] if m["param"]}
    assert set(params) == set(truth)
    for key, want in truth.items():
        m = params[key]
        assert m["kind"] == "parameter" and len(m["expert_norms"]) == num_experts
        # Both sides are float64 sums over the same float32 factors: they differ by float64 rounding of
        # ||B_e||^2 ||A_e||^2-sized sums (Gram trick vs product), far below 1e-9 of the norms.
        scale = max(want)
        for e, (got, w) in enumerate(zip(m["expert_norms"], want)):
            assert abs(got - w) <= 1e-9 * scale, (key, e, got, w)
        # The experts' deltas are separate matrices: their norms add in squares.
        assert m["delta_norm"] == pytest.approx(sum(x * x for x in want) ** 0.5, rel=1e-9)
    zero = params[("model.layers.1.mlp.experts", "gate_up_proj")]["expert_norms"]
    assert [e for e, x in enumerate(zero) if x == 0.0] == list(ZEROED)
    for key, m in params.items():
        if key != ("model.layers.1.mlp.experts", "gate_up_proj"):
            assert all(x > 0 for x in m["expert_norms"]), key
    plain = [m for m in info["modules"] if not m["param"]]
    assert plain and all(m["expert_norms"] == [] and m["kind"] == "linear" for m in plain)


def test_inspect_cli_prints_per_expert_summary_and_full_json(zeroed_adapter, capsys):
    adapter, truth, num_experts = zeroed_adapter
    assert cli(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("model.layers.1.mlp.experts.gate_up_proj "))
    assert f"{num_experts} experts" in line and f"unchanged: {len(ZEROED)}" in line
    want = truth[("model.layers.1.mlp.experts", "gate_up_proj")]
    top = max(range(num_experts), key=lambda e: want[e])
    assert f"top: {top} (" in line
    down = next(x for x in out.splitlines() if x.strip().startswith("model.layers.1.mlp.experts.down_proj "))
    assert "unchanged" not in down
    assert cli(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    got = {(m["module"], m["param"]): m["expert_norms"] for m in info["modules"] if m["param"]}
    assert {k: len(v) for k, v in got.items()} == {k: num_experts for k in truth}


def test_inspect_of_a_per_expert_linear_adapter_lists_each_expert_module(tmp_path, capsys):
    base = save_moe(tmp_path / "base", "qwen3_moe", "fp32")
    ad = per_expert_adapter(base, tmp_path / "ad", "qwen3_moe", rslora=False)
    info = lorafast.inspect_adapter(ad)
    names = {m["module"] for m in info["modules"]}
    assert "model.layers.1.mlp.experts.0.gate_proj" in names and "model.layers.1.mlp.experts.7.down_proj" in names
    assert all(m["param"] is None and m["expert_norms"] == [] for m in info["modules"])
    assert cli(["inspect", str(ad), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "per expert" not in out and ".experts." in out


# ----------------------------------------------------------------------------------------------- resize
EPS32 = torch.finfo(torch.float32).eps


def expert_deltas(base, adapter) -> dict:
    """(module, parameter) -> PEFT's own per-expert deltas [E, ., .] of the adapter, in float64."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    pm = peft.PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=False)
    with torch.no_grad():
        return {k: w.get_delta_weight("default").double() for k, w in param_wrappers(pm).items()}


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def moe_adapter(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"resize_{request.param}")
    base = save_moe(root / "base", request.param, "fp32")
    pm = moe_peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(root / "adapter")
    return base, root / "adapter", expert_deltas(base, root / "adapter")


def test_resize_at_or_above_the_rank_is_exact_per_expert_and_loads_in_peft(tmp_path, moe_adapter):
    base, adapter, truth = moe_adapter
    report = lorafast.resize(adapter, tmp_path / "out", rank=6, progress=False)
    got = expert_deltas(base, report.output)  # PeftModel.from_pretrained loads it
    assert set(got) == set(truth)
    for key, d in truth.items():
        # The factors re-derived from an SVD of fp32 factors and rounded to fp32: a few eps of each expert's
        # delta per rank component.
        tol = 8 * EPS32 * 4 * torch.linalg.matrix_norm(d).max()
        assert float((got[key] - d).abs().max()) <= tol, key
    mods = {m.module: m for m in report.modules}
    assert mods["model.layers.1.mlp.experts.gate_up_proj"].rank == 4
    assert all(m.energy == pytest.approx(1.0, abs=1e-9) for m in report.modules)


def test_resize_truncates_each_expert_optimally(tmp_path, moe_adapter):
    base, adapter, truth = moe_adapter
    report = lorafast.resize(adapter, tmp_path / "out", rank=2, progress=False)
    got = expert_deltas(base, report.output)
    for key, d in truth.items():
        for e in range(d.shape[0]):
            s = torch.linalg.svdvals(d[e])
            tail = float(s[2:].norm())
            err = float(torch.linalg.matrix_norm(got[key][e] - d[e]))
            # Eckart-Young: the best rank-2 error is the discarded singular values' norm; fp32 factors add
            # rounding of a few eps of ||delta_e|| per component.
            assert abs(err - tail) <= 8 * EPS32 * 4 * float(s.norm()), (key, e, err, tail)
    energies = {m.module: m.energy for m in report.modules}
    for (module, param), d in truth.items():
        kept = min(float((torch.linalg.svdvals(x)[:2] ** 2).sum() / (x**2).sum()) for x in d)
        assert energies[f"{module}.{param}"] == pytest.approx(kept, rel=1e-6)


def test_resize_by_energy_takes_the_largest_rank_any_expert_needs(tmp_path, moe_adapter):
    base, adapter, truth = moe_adapter
    share = 0.9
    report = lorafast.resize(adapter, tmp_path / "out", energy=share, progress=False)
    got = expert_deltas(base, report.output)
    mods = {m.module: m for m in report.modules}
    for (module, param), d in truth.items():
        needed = []
        for x in d:
            s2 = torch.linalg.svdvals(x) ** 2
            cum = torch.cumsum(s2, 0) / s2.sum()
            needed.append(int((cum < share).sum()) + 1)
        k = min(max(needed), 4)
        m = mods[f"{module}.{param}"]
        assert m.rank == k, (module, param, needed)
        assert m.energy >= share - 1e-6
        assert got[(module, param)].shape == d.shape


# ---------------------------------------------------------------------------------------------- combine
# PEFT's add_weighted_adapter refuses target_parameters adapters (peft/tuners/lora/model.py,
# _check_add_weighted_adapter: "add_weighted_adapter does not support targeting nn.Parameter"), so the oracle is
# the per-expert float64 truth: sum_i w_i delta_i,e for every expert e.


@pytest.fixture(scope="module")
def moe_two(tmp_path_factory):
    """Two qwen3_moe adapters: both on the experts and q_proj (ranks 4 and 2), the second on v_proj too; and a
    gpt_oss pair where the adapters target different expert parameters (the combined nesting differs)."""
    root = tmp_path_factory.mktemp("combine")
    base = save_moe(root / "base", "qwen3_moe", "fp32")
    moe_peft_model(base, seed=1, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(root / "a")
    moe_peft_model(base, seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "b")
    return base, [root / "a", root / "b"]


def module_deltas(base, adapter) -> dict:
    """Every LoRA'd module's and expert parameter's delta in float64, from PEFT's own layers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    pm = peft.PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=False)
    out = {}
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if isinstance(mod, peft.tuners.lora.layer.ParamWrapper):
                key = name.removeprefix("base_model.model.")
                while key.endswith(".base_layer"):
                    key = key.removesuffix(".base_layer")
                out[f"{key}.{mod.parameter_name}"] = mod.get_delta_weight("default").double()
            elif isinstance(mod, peft.tuners.lora.layer.Linear):
                out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").double()
    return out


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_combine_is_exact_per_expert(tmp_path, moe_two, method):
    base, ads = moe_two
    w = [0.7, -1.3]
    if method == "linear":
        # linear's (sum sgn(c_i) sqrt|c_i| A_i)(sum sqrt|c_i| B_i) is the weighted sum of the deltas when both are
        # one adapter ((sqrt|c1| - sqrt|c2|)(sqrt|c1| + sqrt|c2|) = c1 + c2), and it needs equal ranks.
        ads = [ads[0], ads[0]]
    report = lorafast.combine(ads, tmp_path / "out", weights=w, method=method, progress=False)
    got = module_deltas(base, report.output)  # loads in PEFT
    parts = [module_deltas(base, a) for a in ads]
    want = {}
    for wi, p in zip(w, parts):
        for k, d in p.items():
            want[k] = want.get(k, 0) + wi * d
    assert set(got) >= set(want)
    for k, d in want.items():
        r = 6 if method == "cat" else 4
        # fp32 factors (scaled once or twice in fp32) of rank r: a few eps of the parts' sizes per component.
        size = sum(abs(wi) * float(p[k].abs().max()) for wi, p in zip(w, parts) if k in p)
        assert float((got[k] - d).abs().max()) <= 8 * EPS32 * r * size, k


def test_combine_svd_per_expert_is_the_truncation_of_each_experts_sum(tmp_path, moe_two):
    base, ads = moe_two
    w = [1.0, 0.5]
    report = lorafast.combine(ads, tmp_path / "out", weights=w, method="svd", rank=3, progress=False)
    got = module_deltas(base, report.output)
    parts = [module_deltas(base, a) for a in ads]
    for k in [k for k in got if k.endswith("_proj") and ".experts." in k]:
        want = sum(wi * p[k] for wi, p in zip(w, parts) if k in p)
        for e in range(want.shape[0]):
            s = torch.linalg.svdvals(want[e])
            err = float(torch.linalg.matrix_norm(got[k][e] - want[e]))
            assert abs(err - float(s[3:].norm())) <= 8 * EPS32 * 6 * float(s.norm()), (k, e)
    assert {m.rank for m in report.modules} == {3}


def test_combine_of_different_expert_parameters_nests_as_peft(tmp_path):
    base = save_moe(tmp_path / "base", "gpt_oss", "fp32")
    moe_peft_model(base, seed=1, r=2, lora_alpha=4, target_parameters=["mlp.experts.gate_up_proj"]).save_pretrained(
        tmp_path / "a"
    )
    moe_peft_model(base, seed=2, r=2, lora_alpha=4, target_parameters=["mlp.experts.down_proj"]).save_pretrained(
        tmp_path / "b"
    )
    report = lorafast.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "out", method="cat", progress=False)
    got = module_deltas(base, report.output)
    a, b = module_deltas(base, tmp_path / "a"), module_deltas(base, tmp_path / "b")
    assert set(got) == set(a) | set(b)
    for k, d in {**a, **b}.items():
        assert float((got[k] - d).abs().max()) <= 8 * EPS32 * 4 * float(d.abs().max()), k
    # What PEFT itself saves for the combined config: same keys.
    cfg = json.loads((report.output / "adapter_config.json").read_text())
    pm = moe_peft_model(base, r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_parameters=cfg["target_parameters"])
    pm.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    want_keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert set(load_file(str(report.output / "adapter_model.safetensors"))) == want_keys


def test_combine_refuses_mixed_expert_layouts_and_counts(tmp_path, capsys, moe_two):
    base, ads = moe_two
    per = per_expert_adapter(base, tmp_path / "per", "qwen3_moe", rslora=False)
    line = cli_error(capsys, "combine", str(ads[0]), str(per), "-o", str(tmp_path / "out"), "--method", "cat")
    assert "mlp.experts" in line and "per-expert" in line
    no_leftovers(tmp_path)
    other = save_moe(tmp_path / "base2", "qwen2_moe", "fp32")  # 4 experts, not 8
    moe_peft_model(other, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "c")
    line = cli_error(
        capsys, "combine", str(ads[0]), str(tmp_path / "c"), "-o", str(tmp_path / "out"), "--method", "cat",
        "--allow-different-bases",
    )  # fmt: skip
    assert "experts" in line
    no_leftovers(tmp_path)


class _Experts(torch.nn.Module):
    """One Linear per expert: each expert's (A_e, B_e) as an ordinary LoRA module for PEFT."""

    def __init__(self, experts: int, n_in: int, n_out: int):
        super().__init__()
        self.e = torch.nn.ModuleList(torch.nn.Linear(n_in, n_out, bias=False) for _ in range(experts))


@pytest.mark.parametrize(("method", "kw"), [("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.4})])
def test_combine_per_expert_is_add_weighted_adapter_on_each_expert_as_a_module(tmp_path, moe_two, method, kw):
    """The defined semantics, checked with PEFT as the oracle: its add_weighted_adapter on a model whose expert e
    is a Linear carrying (A_e, B_e) of each adapter."""
    base, _ = moe_two
    ads = []
    for i, seed in enumerate([5, 6]):
        moe_peft_model(base, seed=seed, r=4, lora_alpha=8).save_pretrained(tmp_path / f"a{i}")
        ads.append(tmp_path / f"a{i}")
    w = [1.0, -0.6]
    report = lorafast.combine(ads, tmp_path / "out", weights=w, method=method, progress=False, **kw)
    got = module_deltas(base, report.output)
    key = ("model.layers.1.mlp.experts", "gate_up_proj")
    factors = []
    for a in ads:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
        wr = param_wrappers(peft.PeftModel.from_pretrained(model, str(a)))[key]
        factors.append((wr.lora_A["default"].weight.detach(), wr.lora_B["default"].weight.detach()))
    experts, r = wr.num_experts, 4
    n_in, n_out = factors[0][0].shape[1], factors[0][1].shape[0]
    toy = peft.get_peft_model(
        _Experts(experts, n_in, n_out),
        peft.LoraConfig(r=r, lora_alpha=8, target_modules=["0", "1", "2", "3", "4", "5", "6", "7"]),
        adapter_name="x0",
    )
    toy.add_adapter("x1", peft.LoraConfig(r=r, lora_alpha=8, target_modules=["0", "1", "2", "3", "4", "5", "6", "7"]))
    with torch.no_grad():
        for i, (a, b) in enumerate(factors):
            for e in range(experts):
                lin = toy.base_model.model.e[e]
                lin.lora_A[f"x{i}"].weight.copy_(a[e * r : (e + 1) * r])
                lin.lora_B[f"x{i}"].weight.copy_(b[:, e::experts])
    toy.add_weighted_adapter(["x0", "x1"], w, "c", combination_type=method, **kw)
    delta = got[f"{key[0]}.{key[1]}"]
    # PEFT's (A, B) of the new adapter in fp32 and ours from the same fp32 rules: equal up to rounding of rank-r
    # products of the factors' size.
    for e in range(experts):
        want = toy.base_model.model.e[e].get_delta_weight("c").double()
        ours = delta[e] if delta[e].shape == want.shape else delta[e].T
        assert float((ours - want).abs().max()) <= 8 * EPS32 * r * float(want.abs().max()), e
