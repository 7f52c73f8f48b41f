"""Mixture-of-experts: LoRA on fused expert parameters (PEFT's target_parameters) merged into checkpoints in
their own on-disk layout - per expert (Qwen2/3-MoE, Mixtral) or fused (GPT-OSS) - against PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import peft
from helpers import assert_matches_peft, cli_error, digest, no_leftovers
from safetensors.torch import load_file, save_file

import lorafast
from lorafast.reference import load_state_dict, peft_merge, reference_merge

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# PEFT warns that parameter rank/alpha patterns (its own, too, when it converts a per-expert adapter) "were
# ignored", and applies them: the comparisons below show it.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")


def moe_config(arch: str):
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen3_moe":
        # The first layer dense (mlp_only_layers), as Qwen3-MoE-style checkpoints with dense first layers.
        return transformers.Qwen3MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            head_dim=16, mlp_only_layers=[0],
        )  # fmt: skip
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(
            **common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    raise ValueError(arch)


ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_moe(folder: Path, arch: str, dtype: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(arch)).to(DTYPES[dtype])
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


def save_moe_adapter(base: Path, folder: Path, seed: int = 1, **lora) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    lora.setdefault("target_parameters", EXPERTS)
    cfg = peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    peft.get_peft_model(model, cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[(a, d) for a in ARCHS for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def moe_pair(request, tmp_path_factory):
    arch, dtype = request.param
    root = tmp_path_factory.mktemp(f"{arch}_{dtype}")
    base = save_moe(root / "base", arch, dtype)
    adapter = save_moe_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return arch, dtype, base, adapter


def float64_truth(base: Path, adapters: list[Path], out: Path, weights=None) -> Path:
    """The merge in float64 by PEFT itself: the model and the factors in float64, each adapter's B scaled by its
    weight, merged with merge_and_unload and saved by transformers (so in the checkpoint's own layout)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    pm = peft.PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0", autocast_adapter_dtype=False)
    for i, a in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(a), adapter_name=f"a{i}", autocast_adapter_dtype=False)
    names = [f"a{i}" for i in range(len(adapters))]
    with torch.no_grad():
        for n, p in pm.named_parameters():
            for i, w in enumerate(weights or []):
                if f"lora_B.a{i}." in n:
                    p.mul_(w)
    pm.merge_and_unload(adapter_names=names).save_pretrained(str(out))
    return out


def assert_correctly_rounded(ours: Path, truth64: Path, theirs: Path | None = None, min_exact: float = 0.99):
    """Every changed tensor: ours is the float64 truth rounded once in >= 99% of elements, never more than one
    rounding step away, and nowhere farther from the truth than PEFT's own merge."""
    o, t = load_state_dict(ours), load_state_dict(truth64)
    p = load_state_dict(theirs) if theirs else None
    assert set(o) == set(t), set(o) ^ set(t)
    for name, x in o.items():
        exact = t[name].to(x.dtype)
        err = (x.double() - t[name]).abs()
        step = (exact.double() - t[name]).abs()  # the error of rounding once
        assert (x == exact).double().mean() >= min_exact, name
        ulp = torch.finfo(x.dtype).eps * torch.maximum(x.double().abs(), exact.double().abs())
        assert bool((err <= step + ulp).all()), name
        if p is not None:
            assert bool((err <= (p[name].double() - t[name]).abs() + ulp / 2).all()), name


def routers(model) -> list:
    """The top-k routers (transformers 5's *TopKRouter modules: they return logits, scores, indices)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def logits_close(folder_a, model_b, dtype: str, vocab=256):
    """The merged model's logits against the PeftModel's (fp32 forward): within 8 rounding steps of the merged
    checkpoint's dtype of the logits' scale (its weights are rounded to it), plus fp32 summation noise.

    Routing is discrete: a rounding of the merged weights can flip a near-tied top-k choice, which changes
    the logits by far more than the rounding (seen on a 16-bit Mixtral). So the merged model is run with the
    PeftModel's routing - each router's output as the PeftModel's run gave it (the adapters do not touch
    routers; their weights are compared bit for bit above) - and the comparison is of the experts and
    attention the merged weights compute."""
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    a = transformers.AutoModelForCausalLM.from_pretrained(str(folder_a), dtype=torch.float32).eval()
    recorded: list = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: recorded.append(out)) for r in routers(model_b)]
    with torch.no_grad():
        lb = model_b(ids).logits.float()
    for h in hooks:
        h.remove()
    replay = iter(recorded)
    hooks = [r.register_forward_hook(lambda _m, _i, _out: next(replay)) for r in routers(a)]
    assert len(hooks) == len(recorded) > 0  # one call per router
    with torch.no_grad():
        la = a(ids).logits
    for h in hooks:
        h.remove()
    tol = 8 * torch.finfo(DTYPES[dtype]).eps * float(lb.abs().max()) + 1e-5
    assert float((la - lb).abs().max()) <= tol, ((la - lb).abs().max(), tol)


def test_expert_lora_merges_as_peft_in_the_checkpoints_own_layout(tmp_path, moe_pair):
    arch, dtype, base, adapter = moe_pair
    ours = lorafast.merge(base, [adapter], tmp_path / "ours", progress=False).output
    theirs = peft_merge(base, [adapter], tmp_path / "peft")
    # The same tensor names, shapes and dtypes as transformers' save_pretrained of PEFT's merged model.
    assert set(load_state_dict(ours)) == set(load_state_dict(theirs))
    names = set(load_state_dict(ours))
    if arch == "gpt_oss":
        assert "model.layers.0.mlp.experts.gate_up_proj" in names
    elif arch == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in names
    else:
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in names
    changed = [k for k, v in load_state_dict(ours).items() if not torch.equal(v, load_state_dict(base)[k])]
    assert any("experts" in k for k in changed) and any("q_proj" in k for k in changed), changed
    # Same shards and index as the base.
    assert (
        json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"]
        == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    )
    if dtype == "fp32":
        assert_matches_peft(ours, theirs)
    else:
        # PEFT rounds the delta to bf16 before adding it (ParamWrapper.get_delta_weight): two roundings.
        truth = float64_truth(base, [adapter], tmp_path / "truth")
        assert_correctly_rounded(ours, truth, theirs)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    logits_close(ours, peft.PeftModel.from_pretrained(model, str(adapter)).eval(), dtype)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_one_parameter_with_rank_and_alpha_patterns_and_rslora(tmp_path, arch):
    base = save_moe(tmp_path / "base", arch, "fp32")
    patterns = dict(rank_pattern={"1.mlp.experts.gate_up_proj": 2}, alpha_pattern={"experts.gate_up_proj": 3})
    cases = [
        (["mlp.experts.down_proj"], dict(use_rslora=True)),
        (["gate_up_proj"], patterns),
        (EXPERTS, dict(rank_pattern={"down_proj": 6}, alpha_pattern={".*gate_up_proj": 20}, use_rslora=True)),
    ]
    for i, (targets, extra) in enumerate(cases):
        ad = save_moe_adapter(base, tmp_path / f"ad{i}", r=4, lora_alpha=8, target_parameters=targets, **extra)
        ours = lorafast.merge(base, [ad], tmp_path / f"ours{i}", progress=False).output
        assert_matches_peft(ours, peft_merge(base, [ad], tmp_path / f"peft{i}"))
        ranks = {k: v.shape for k, v in load_file(str(ad / "adapter_model.safetensors")).items()}
        assert ranks, "adapter saved nothing"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_several_expert_adapters_with_weights(tmp_path, dtype):
    base = save_moe(tmp_path / "base", "qwen3_moe", dtype)
    a = save_moe_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    # PEFT holds several parameter adapters on one model only if they target the same parameters.
    b = save_moe_adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=4, target_modules=["k_proj"])
    ours = lorafast.merge(base, [a, b], tmp_path / "ours", weights=[0.7, -1.3], progress=False).output
    truth = float64_truth(base, [a, b], tmp_path / "truth", weights=[0.7, -1.3])
    if dtype == "bf16":
        assert_correctly_rounded(ours, truth)
        return
    # PEFT cannot combine parameter adapters (add_weighted_adapter refuses them). In fp32 the delta's own
    # rounding errors count: each element is within (rank + 3) eps of |W| + sum |w s B A|, the same merge of
    # the absolute values, computed by PEFT in float64.
    abs_adapters = [abs_copy(x, tmp_path / f"abs_{x.name}") for x in (a, b)]
    bound = float64_truth(abs_copy(base, tmp_path / "abs_base"), abs_adapters, tmp_path / "bound", weights=[0.7, 1.3])
    o, t, m = load_state_dict(ours), load_state_dict(truth), load_state_dict(bound)
    eps = torch.finfo(torch.float32).eps
    for name, x in o.items():
        assert bool(((x.double() - t[name]).abs() <= (6 + 3) * eps * m[name]).all()), name


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_a_router_in_modules_to_save_lands_on_its_on_disk_name(tmp_path, arch):
    """PEFT saves a modules_to_save router under its name in memory (Mixtral: `mlp.gate`), which transformers
    stores as `block_sparse_moe.gate`: the merge replaces the stored router, as PEFT's save_pretrained does,
    instead of adding a second one."""
    base = save_moe(tmp_path / "base", arch, "fp32")
    router = "router" if arch == "gpt_oss" else "gate"
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    cfg = peft.LoraConfig(
        init_lora_weights=False, task_type="CAUSAL_LM", target_modules=["q_proj"],
        target_parameters=["mlp.experts.down_proj"], modules_to_save=[router],
    )  # fmt: skip
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)  # a trained router
    pm.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(f".mlp.{router}." in k for k in saved), list(saved)
    ours = lorafast.merge(base, [tmp_path / "adapter"], tmp_path / "ours", progress=False).output
    theirs = peft_merge(base, [tmp_path / "adapter"], tmp_path / "peft")
    assert_matches_peft(ours, theirs)
    stored = "block_sparse_moe" if arch == "mixtral" else "mlp"
    o = load_state_dict(ours)
    for i in (1,) if arch == "qwen3_moe" else (0, 1):  # the test's Qwen3-MoE has a dense first layer
        trained = saved[f"base_model.model.model.layers.{i}.mlp.{router}.weight"]
        assert torch.equal(o[f"model.layers.{i}.{stored}.{router}.weight"], trained)


def abs_copy(folder: Path, out: Path) -> Path:
    """A model or adapter folder with every float tensor replaced by its absolute value."""
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.abs() for k, v in load_file(str(f)).items()}, str(out / f.name), metadata={"format": "pt"})
        elif f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def per_expert_adapter(base: Path, folder: Path, arch: str, *, rslora: bool) -> Path:
    """An adapter in the transformers-4 layout: LoRA on each expert's Linear (experts.{e}.gate_proj ...), as PEFT
    wrote them before transformers fused the experts - keys and config written as it wrote them."""
    names = {
        "qwen3_moe": ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        "mixtral": ("block_sparse_moe", ["w1", "w3", "w2"]),
    }
    block, projs = names[arch]
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for k, v in load_state_dict(base).items():
        if ".experts." in k and any(k.endswith(f".{p}.weight") for p in projs):
            out_f, in_f = v.shape
            m = k[: -len(".weight")]
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.1
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    assert tensors and all(f".{block}.experts." in k for k in tensors)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_rslora": rslora,
           "target_modules": projs, "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_per_expert_adapters_of_the_transformers_4_layout(tmp_path, arch):
    base = save_moe(tmp_path / "base", arch, "fp32")
    ad = per_expert_adapter(base, tmp_path / "ad", arch, rslora=False)
    ours = lorafast.merge(base, [ad], tmp_path / "ours", progress=False).output
    # PEFT converts such adapters to target_parameters on load (peft/utils/transformers_weight_conversion.py).
    assert_matches_peft(ours, peft_merge(base, [ad], tmp_path / "peft"))
    # With rsLoRA that conversion doubles r and alpha of gate/up, which scales them by sqrt(2): lorafast applies
    # the adapter's own scaling, expert by expert, as the per-Linear reference merge does.
    rs = per_expert_adapter(base, tmp_path / "rs", arch, rslora=True)
    ours = lorafast.merge(base, [rs], tmp_path / "ours_rs", progress=False).output
    assert_matches_peft(ours, reference_merge(base, [rs], tmp_path / "ref_rs"))


def test_bad_expert_adapters_are_one_line_naming_the_parameter(tmp_path, capsys):
    base = save_moe(tmp_path / "base", "qwen3_moe", "fp32")
    ad = save_moe_adapter(base, tmp_path / "ad", r=4, lora_alpha=8)
    # An adapter trained on a model with more experts than this base.
    other = tmp_path / "other"
    cfg = moe_config("qwen3_moe")
    cfg.num_experts = 4
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    before = digest(tmp_path)
    line = cli_error(capsys, "merge", str(other), str(ad), "-o", str(tmp_path / "out"))
    assert "mlp.experts" in line and "8 experts" in line, line
    no_leftovers(tmp_path)
    # A target parameter the base does not have.
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    save_file(
        {k.replace("layers.1.", "layers.0."): v for k, v in tensors.items()}, str(bad / "adapter_model.safetensors")
    )
    (bad / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    line = cli_error(capsys, "merge", str(base), str(bad), "-o", str(tmp_path / "out"))
    assert "model.layers.0.mlp.experts" in line and "_proj" in line, line
    # Options PEFT refuses on parameters (ParamWrapper): DoRA, lora_bias, dropout.
    for key, value in [("use_dora", True), ("lora_bias", True), ("lora_dropout", 0.1)]:
        d = tmp_path / f"cfg_{key}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes((ad / "adapter_model.safetensors").read_bytes())
        c = json.loads((ad / "adapter_config.json").read_text())
        c[key] = value
        (d / "adapter_config.json").write_text(json.dumps(c))
        line = cli_error(capsys, "merge", str(base), str(d), "-o", str(tmp_path / "out"))
        assert "target_parameters" in line and key.split("_")[-1] in line, line
    # Factors whose shapes are not PEFT's [E*r, in] / [out, E*r].
    d = tmp_path / "shapes"
    d.mkdir()
    t = dict(tensors)
    key = next(k for k in t if k.endswith("experts.lora_A.weight"))
    t[key] = t[key][:-1]
    save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    line = cli_error(capsys, "merge", str(base), str(d), "-o", str(tmp_path / "out"))
    assert "down_proj" in line and "experts * r" in line, line
    assert {k: v for k, v in digest(tmp_path).items() if k in before} == before, "inputs were modified"
    no_leftovers(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_keeps_experts_and_routers_float_as_transformers_does(tmp_path, arch):
    """transformers + bitsandbytes quantize only nn.Linear layers: fused experts and routers stay float. The
    name rule and transformers' own plan (GPT-OSS) give the bytes transformers' save_pretrained writes."""
    import bitsandbytes  # noqa: F401 - the oracle

    from lorafast import _core
    from lorafast.quant import NAME_PLAN_MODEL_TYPES, plan_targets

    base = save_moe(tmp_path / "base", arch, "bf16")
    if arch in NAME_PLAN_MODEL_TYPES:
        opts = dict(quant_type="nf4", blocksize=64, double_quant=True, compute_dtype="bf16", targets=None)
        r = _core.quantize_checkpoint(base, tmp_path / "names", **opts)
        found = sorted(k[: -len(".quant_state.bitsandbytes__nf4")] for k in load_state_dict(r.output) if "__nf4" in k)
        assert found == sorted(name for name, _ in plan_targets(base))
    ours = lorafast.quantize(base, tmp_path / "ours", progress=False).output
    nf4 = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, **nf4)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=bnb_config, device_map="cpu"
    )
    model.save_pretrained(tmp_path / "theirs")
    a, b = load_state_dict(ours), load_state_dict(tmp_path / "theirs")
    assert set(a) == set(b), set(a) ^ set(b)
    assert all(torch.equal(a[k].view(torch.uint8).flatten(), b[k].view(torch.uint8).flatten()) for k in a)
    assert any(k.endswith("q_proj.weight.absmax") for k in a) and not any(".experts." in k and "absmax" in k for k in a)


def test_merge_into_a_4bit_moe_base(tmp_path):
    base = save_moe(tmp_path / "base", "qwen3_moe", "bf16")
    ad = save_moe_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    q = lorafast.quantize(base, tmp_path / "q", progress=False).output
    dq = lorafast.dequantize(q, tmp_path / "dq", progress=False).output
    # To float: the 4-bit weights dequantized exactly, the float experts as they are, one rounding each.
    r = lorafast.merge(q, [ad], tmp_path / "float", progress=False)
    want = load_state_dict(lorafast.merge(dq, [ad], tmp_path / "ref", progress=False).output)
    got = load_state_dict(r.output)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert any(".experts." in t.name for t in r.tensors), "the report covers every expert"
    # Back into 4 bits: q_proj re-quantized, the experts (float in a 4-bit base) merged in float.
    rq = load_state_dict(lorafast.merge(q, [ad], tmp_path / "rq", requantize=True, progress=False).output)
    assert set(rq) == set(load_state_dict(q))
    for k, v in rq.items():
        if ".experts." in k:
            assert torch.equal(v, want[k]), k
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "rq"), device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # Merged and quantized in one pass (--quantize): what `lorafast quantize` writes from the merged model.
    mq = load_state_dict(lorafast.merge(base, [ad], tmp_path / "mq", quantize="nf4", progress=False).output)
    merged = lorafast.merge(base, [ad], tmp_path / "merged", progress=False).output
    qm = load_state_dict(lorafast.quantize(merged, tmp_path / "qm", progress=False).output)
    assert set(mq) == set(qm) and all(torch.equal(mq[k], qm[k]) for k in mq)
    assert not any(".experts." in k and k.endswith("absmax") for k in mq)
