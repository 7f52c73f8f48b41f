"""combine / extract / resize against PEFT: add_weighted_adapter is the oracle for combine, exact SVDs
in torch for extract and resize, and every output must load with PeftModel.from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_adapter, save_model, tiny_llama_config

import lorafast
from lorafast.arith import METHODS
from lorafast.cli import main as cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CausalLM = transformers.AutoModelForCausalLM


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path_factory.mktemp("base"), torch.float32
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base) -> list[Path]:
    """Two rank-8 adapters with different alphas and targets (one also on the embedding), and a rank-4
    rsLoRA one."""
    d = tmp_path_factory.mktemp("adapters")
    return [
        save_adapter(CausalLM, base, d / "a", seed=1, r=8, lora_alpha=16, target_modules=ALL),
        save_adapter(
            CausalLM, base, d / "b", seed=2, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"]
        ),
        save_adapter(
            CausalLM, base, d / "c", seed=3, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"]
        ),
    ]


def fnv_seed(seed: int, module: str, label: str, index: int) -> int:
    """lorafast's per-tensor DARE seed (FNV-1a 64 folded to 32 bits), written out independently."""
    h = 0xCBF29CE484222325
    for byte in f"{seed}:{module}:{label}:{index}".encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def peft_combine(base: Path, adapters, weights, method, monkeypatch=None, seed=0, **kw) -> dict:
    """PEFT's add_weighted_adapter on a fp32 model; the new adapter's state dict as PEFT saves it.
    With monkeypatch, DARE's masks are seeded per tensor the way lorafast seeds them, so the random
    methods can be compared too."""
    model = CausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="x0")
    names = ["x0"]
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"x{i}")
        names.append(f"x{i}")
    if monkeypatch is not None:
        _seed_dare_like_lorafast(pm, names, seed, monkeypatch)
    pm.add_weighted_adapter(names, weights, "comb", combination_type=method, **kw)
    return get_peft_model_state_dict(pm, adapter_name="comb")


def _seed_dare_like_lorafast(pm, names, seed, monkeypatch) -> None:
    from peft.tuners.lora.model import LoraModel
    from peft.utils import merge_utils

    module_names = {id(m): n for n, m in pm.base_model.model.named_modules()}
    plan: list[tuple[str, int, str]] = []  # (label, adapter index, module) of each random_pruning call

    def expect(adapters, target, labels):
        valid = [i for i, a in enumerate(adapters) if a in target.lora_A or a in target.lora_embedding_A]
        plan[:] = [(label, i, module_names[id(target)]) for label in labels for i in valid]

    factor_wise = LoraModel._generalized_task_arithmetic_weighted_adapter
    svd_wise = LoraModel._svd_generalized_task_arithmetic_weighted_adapter

    def factor_wrapper(self, combination_type, adapters, weights, target, *args, **kw):
        expect(adapters, target, ["A", "B"])
        return factor_wise(self, combination_type, adapters, weights, target, *args, **kw)

    def svd_wrapper(self, combination_type, adapters, weights, new_rank, target, *args, **kw):
        expect(adapters, target, ["delta"])
        return svd_wise(self, combination_type, adapters, weights, new_rank, target, *args, **kw)

    original = merge_utils.random_pruning

    def seeded(tensor, density, rescale):
        label, index, module = plan.pop(0)
        torch.manual_seed(fnv_seed(seed, module, label, index))
        return original(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", factor_wrapper)
    monkeypatch.setattr(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", svd_wrapper)


def deltas(state: dict) -> dict[str, torch.Tensor]:
    """B @ A per module of an adapter state dict (scaling 1, as every combined adapter has)."""
    out = {}
    for k, a in state.items():
        if k.endswith(".lora_A.weight"):
            out[k[: -len(".lora_A.weight")]] = state[k.replace("lora_A", "lora_B")].float() @ a.float()
        elif k.endswith(".lora_embedding_A"):
            out[k[: -len(".lora_embedding_A")]] = state[k.replace("_A", "_B")].float() @ a.float()
    return out


def rel_err(x, y) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def peft_loads(adapter: Path, base: Path):
    """PeftModel.from_pretrained must load the adapter with every tensor used (no missing LoRA keys)."""
    model = CausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(model, adapter)
    state = load_file(adapter / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(pm)
    assert set(state) == set(loaded), set(state) ^ set(loaded)
    for k, v in state.items():
        assert torch.equal(loaded[k].to(v.dtype), v), k
    return pm


FACTOR_WISE = [("cat", {}), ("linear", {}), ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3})]
SVD_WISE = [
    ("svd", {}),
    ("svd", {"svd_rank": 4}),
    ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.4, "svd_rank": 6}),
]
DARE = [
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.7}),
    ("dare_ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
]


def ours_combine(adapters, out: Path, weights, method, seed=0, **kw) -> tuple[dict, lorafast.ArithReport]:
    r = lorafast.combine(
        adapters,
        out,
        weights=weights,
        method=method,
        density=kw.get("density"),
        rank=kw.get("svd_rank"),
        majority_sign=kw.get("majority_sign_method", "total"),
        seed=seed,
        progress=False,
    )
    return load_file(out / "adapter_model.safetensors"), r


@pytest.mark.parametrize("method,kw", FACTOR_WISE, ids=[m for m, _ in FACTOR_WISE])
def test_factor_wise_methods_equal_peft_bit_for_bit(tmp_path, base, adapters, method, kw):
    pair = adapters[:2]
    theirs = peft_combine(base, pair, [0.7, -0.4], method, **kw)
    ours, report = ours_combine(pair, tmp_path / "out", [0.7, -0.4], method, **kw)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    assert all(m.energy is None for m in report.modules)
    peft_loads(tmp_path / "out", base)


def test_cat_of_different_ranks_and_rslora_is_exact_with_scaling_one(tmp_path, base, adapters):
    weights = [1.0, 0.5, -2.0]
    ours, _ = ours_combine(adapters, tmp_path / "out", weights, "cat")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (20, 20, False)
    # The true weighted sum of the scaled deltas, computed from the inputs in f64.
    want: dict = {}
    for a, w in zip(adapters, weights):
        c = json.loads((a / "adapter_config.json").read_text())
        s = c["lora_alpha"] / (c["r"] ** 0.5 if c.get("use_rslora") else c["r"])
        for m, d in deltas(load_file(a / "adapter_model.safetensors")).items():
            want[m] = want.get(m, 0) + w * s * d.double()
    got = deltas(ours)
    assert set(got) == set(want)
    for m in want:
        assert rel_err(got[m].double(), want[m]) < 1e-6, m
    pm = peft_loads(tmp_path / "out", base)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 1.0


@pytest.mark.parametrize("method,kw", SVD_WISE, ids=[f"{m}-{kw.get('svd_rank', '')}" for m, kw in SVD_WISE])
def test_svd_methods_match_peft_deltas(tmp_path, base, adapters, method, kw):
    pair = adapters[:2]
    theirs = peft_combine(base, pair, [0.7, -0.4], method, **kw)
    ours, report = ours_combine(pair, tmp_path / "out", [0.7, -0.4], method, **kw)
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    mine, peft_d = deltas(ours), deltas(theirs)
    tol = 1e-5 if method == "svd" else 1e-3
    for m in peft_d:
        assert rel_err(mine[m], peft_d[m]) < tol, (m, rel_err(mine[m], peft_d[m]))
    energies = [m.energy for m in report.modules]
    assert all(0 < e <= 1 + 1e-9 for e in energies)
    if method == "svd" and "svd_rank" not in kw:
        # Rank 8 holds a module with one rank-8 adapter exactly; q/v/up hold two (rank up to 16).
        full = [m.energy for m in report.modules if not m.module.endswith(("q_proj", "v_proj", "up_proj"))]
        assert min(full) > 1 - 1e-6 and min(energies) < 0.99
    peft_loads(tmp_path / "out", base)


@pytest.mark.parametrize("method,kw", DARE, ids=[m for m, _ in DARE])
def test_dare_matches_peft_with_the_same_masks(tmp_path, base, adapters, method, kw, monkeypatch):
    pair = adapters[:2]
    theirs = peft_combine(base, pair, [0.7, 0.4], method, monkeypatch=monkeypatch, seed=11, **kw)
    ours, _ = ours_combine(pair, tmp_path / "out", [0.7, 0.4], method, seed=11, **kw)
    if method.endswith("svd"):
        mine, peft_d = deltas(ours), deltas(theirs)
        for m in peft_d:
            assert rel_err(mine[m], peft_d[m]) < 1e-3, m
    else:
        for k in theirs:
            assert torch.equal(ours[k], theirs[k]), k
    # Another seed draws other masks; the same seed the same ones.
    other, _ = ours_combine(pair, tmp_path / "other", [0.7, 0.4], method, seed=12, **kw)
    again, _ = ours_combine(pair, tmp_path / "again", [0.7, 0.4], method, seed=11, **kw)
    k = next(iter(ours))
    assert not torch.equal(ours[k], other[k]) and all(torch.equal(ours[x], again[x]) for x in ours)


def test_dare_keeps_the_density_share_rescaled(tmp_path, base, adapters):
    one = adapters[0]
    ours, _ = ours_combine([one, one], tmp_path / "out", [1.0, 0.0], "dare_linear", density=0.25)
    a_in = load_file(one / "adapter_model.safetensors")
    k = next(k for k in a_in if k.endswith("q_proj.lora_A.weight"))
    w = (16 / 8) ** 0.5  # sqrt(weight * scaling) on each factor
    kept = ours[k] != 0
    assert 0.2 < kept.float().mean().item() < 0.3
    torch.testing.assert_close(ours[k][kept], (a_in[k] * w / 0.25)[kept], rtol=1e-6, atol=0)


def test_one_adapter_with_a_weight_is_scaled_and_negative_subtracts(tmp_path, base, adapters):
    a = adapters[0]
    state = load_file(a / "adapter_model.safetensors")
    for w in (0.5, -1.0):
        ours, _ = ours_combine([a], tmp_path / f"w{w}", [w], "svd")  # one adapter: always linear (PEFT)
        got, want = deltas(ours), deltas(state)
        for m in want:
            assert rel_err(got[m], w * 2.0 * want[m]) < 1e-6
    # a + (-1) a = 0 through cat.
    zero, _ = ours_combine([a, a], tmp_path / "zero", [1.0, -1.0], "cat")
    assert all(float(d.abs().max()) < 1e-6 for d in deltas(zero).values())


def test_all_methods_are_accepted_by_the_cli(tmp_path, adapters):
    for method in METHODS:
        extra = ["--density", "0.5"] if any(x in method for x in ("ties", "dare", "prune")) else []
        out = tmp_path / method
        rc = cli(["combine", str(adapters[0]), str(adapters[1]), "-o", str(out), "--method", method, "-q", *extra])
        assert rc == 0 and (out / "adapter_model.safetensors").exists(), method


def test_svd_clamp_clamps_the_factors_at_their_quantile(tmp_path, adapters):
    """PEFT's svd_clamp: quantile of the concatenated factors, both clamped to +-it. (Which sign each
    singular pair gets is the SVD's choice, so the clamped result is compared with our own factors.)"""
    pair = adapters[:2]
    kw = dict(weights=[1.0, 1.0], method="svd", progress=False)
    plain = load_file(lorafast.combine(pair, tmp_path / "plain", **kw).output / "adapter_model.safetensors")
    clamped = load_file(
        lorafast.combine(pair, tmp_path / "c", svd_clamp=0.9, **kw).output / "adapter_model.safetensors"
    )
    for k_a in (k for k in plain if k.endswith("lora_A.weight")):
        k_b = k_a.replace("lora_A", "lora_B")
        hi = torch.quantile(torch.cat([plain[k_b].flatten(), plain[k_a].flatten()]), 0.9)
        torch.testing.assert_close(clamped[k_a], plain[k_a].clamp(-hi, hi))
        torch.testing.assert_close(clamped[k_b], plain[k_b].clamp(-hi, hi))
