"""The one engine against the old multi-step composition as oracle: a 4-bit base merged to float equals
`dequantize` then `merge`; `--requantize` equals the old route (dequantize, merge in fp32, quantize) on
the weights it changes and copies the others byte for byte; `--quantize` equals `merge` then `quantize`,
file for file. On Llama, tied Qwen2 and GPT-2 (Conv1D), NF4 and FP4, double quantization on and off, two
blocksizes. And the per-weight report, against a float64 computation from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_adapter, save_model, tiny_gpt2_config, tiny_llama_config, tiny_qwen2_config
from helpers import cli_error, digest

import lorafast
from lorafast.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = pytest.importorskip("bitsandbytes.functional")
from safetensors.torch import load_file  # noqa: E402

CausalLM = transformers.AutoModelForCausalLM
ARCHS = {
    "llama": (
        transformers.LlamaForCausalLM,
        lambda: tiny_llama_config(intermediate_size=192),
        ["q_proj", "v_proj", "down_proj"],
    ),
    "qwen2-tied": (
        transformers.Qwen2ForCausalLM,
        lambda: tiny_qwen2_config(intermediate_size=192),
        ["k_proj", "up_proj", "lm_head"],
    ),
    "gpt2": (transformers.GPT2LMHeadModel, tiny_gpt2_config, ["c_attn", "c_fc"]),
}
# (quant type, double quantization, blocksize)
QUANT = [("nf4", True, 64), ("fp4", False, 128), ("nf4", False, 128), ("fp4", True, 64)]


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_files(a: Path, b: Path, skip=()) -> None:
    da, db = digest(a), digest(b)
    assert set(da) == set(db), set(da) ^ set(db)
    for name in da:
        if name not in skip:
            assert da[name] == db[name], name


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a bf16 base and an adapter on some of its linear layers (random B, so merges
    change the weights)."""
    out = {}
    for arch, (cls, config, targets) in ARCHS.items():
        root = tmp_path_factory.mktemp(arch)
        base = save_model(cls, config(), root / "base", torch.bfloat16)
        adapter = save_adapter(CausalLM, base, root / "adapter", r=8, lora_alpha=16, target_modules=targets)
        out[arch] = (base, adapter)
    return out


def qbase(tmp_path: Path, base: Path, qt: str, dq: bool, bs: int) -> Path:
    return lorafast.quantize(base, tmp_path / "q", quant_type=qt, double_quant=dq, blocksize=bs, progress=False).output


@pytest.mark.parametrize("qt,dq,bs", QUANT, ids=[f"{q}-{'dq' if d else 'plain'}-{b}" for q, d, b in QUANT])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_into_a_4bit_base_equals_dequantize_then_merge(tmp_path, models, arch, qt, dq, bs):
    base, adapter = models[arch]
    q = qbase(tmp_path, base, qt, dq, bs)
    new = lorafast.merge(q, adapter, tmp_path / "new", progress=False)
    deq = lorafast.dequantize(q, tmp_path / "deq", progress=False).output
    old = lorafast.merge(deq, adapter, tmp_path / "old", progress=False).output
    same_files(new.output, old)
    assert new.tensors_dequantized == len([k for k in tensors(q) if k.endswith(f"bitsandbytes__{qt}")])
    assert "quantization_config" not in json.loads((new.output / "config.json").read_text())


@pytest.mark.parametrize("qt,dq,bs", QUANT, ids=[f"{q}-{'dq' if d else 'plain'}-{b}" for q, d, b in QUANT])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_requantize_equals_the_old_route_on_changed_weights_and_copies_the_rest(tmp_path, models, arch, qt, dq, bs):
    base, adapter = models[arch]
    q = qbase(tmp_path, base, qt, dq, bs)
    new = lorafast.merge(q, adapter, tmp_path / "new", requantize=True, progress=False).output
    # The old route: dequantize, merge with fp32 outputs (the merged values unrounded), quantize.
    deq = lorafast.dequantize(q, tmp_path / "deq", progress=False).output
    merged = lorafast.merge(deq, adapter, tmp_path / "m32", dtype="fp32", progress=False).output
    old = lorafast.quantize(merged, tmp_path / "old", quant_type=qt, double_quant=dq, blocksize=bs, progress=False)
    old = tensors(old.output)
    qs, ns = tensors(q), tensors(new)
    assert set(qs) == set(ns), "the same 4-bit layout"
    deqs, m32 = tensors(deq), tensors(merged)
    floats = tensors(lorafast.merge(deq, adapter, tmp_path / "m16", progress=False).output)
    changed = {k for k in deqs if not torch.equal(m32[k], deqs[k].float())}
    assert changed, "the adapter changes something"
    for name in qs:
        weight = next((w for w in deqs if name == w or name.startswith(f"{w}.")), name)
        four_bit = f"{weight}.quant_state.bitsandbytes__{qt}" in qs
        if weight in changed and not four_bit:
            assert torch.equal(ns[name], floats[name]), name  # a float tensor merged (a tied embedding)
        elif weight in changed:
            assert torch.equal(ns[name], old[name]), name  # re-quantized from the f32 merged values
        else:
            assert torch.equal(ns[name], qs[name]), name  # untouched: byte for byte
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(new) == qc(q)


@pytest.mark.parametrize("qt,dq,bs", QUANT, ids=[f"{q}-{'dq' if d else 'plain'}-{b}" for q, d, b in QUANT])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_and_quantize_in_one_pass_equals_merge_then_quantize(tmp_path, models, arch, qt, dq, bs):
    base, adapter = models[arch]
    new = lorafast.merge(
        base, adapter, tmp_path / "new", quantize=qt, double_quant=dq, blocksize=bs, progress=False
    ).output
    merged = lorafast.merge(base, adapter, tmp_path / "merged", progress=False).output
    old = lorafast.quantize(merged, tmp_path / "old", quant_type=qt, double_quant=dq, blocksize=bs, progress=False)
    same_files(new, old.output)


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def variant_adapters(root: Path, base: Path, qwen: Path) -> list[tuple[Path, list[Path], dict]]:
    """(base, adapters, merge options) for what the float merge supports beyond a plain adapter."""
    a = lambda name, b=base, **kw: save_adapter(CausalLM, b, root / name, **kw)  # noqa: E731
    return [
        (
            base,
            [
                a(
                    "rslora",
                    r=8,
                    lora_alpha=16,
                    use_rslora=True,
                    target_modules=ALL,
                    rank_pattern={"q_proj": 4},
                    alpha_pattern={"down_proj": 32},
                )
            ],
            {},
        ),  # fmt: skip
        (
            base,
            [a("w1", r=4, target_modules=["q_proj"]), a("w2", seed=2, r=8, target_modules=["q_proj", "up_proj"])],
            {"weights": [0.7, -0.3]},
        ),  # fmt: skip
        (base, [a("dora", r=4, use_dora=True, target_modules=["q_proj", "o_proj"], randomize=("magnitude",))], {}),
        (
            base,
            [a("head", r=4, target_modules=["v_proj"], modules_to_save=["lm_head"], randomize=("modules_to_save",))],
            {},
        ),  # fmt: skip
        (qwen, [a("tied", b=qwen, r=4, target_modules=["lm_head", "q_proj"])], {}),
        (
            qwen,
            [a("bias", b=qwen, r=4, target_modules=["q_proj", "v_proj"], lora_bias=True, randomize=("lora_B.bias",))],
            {},
        ),  # fmt: skip
    ]


def test_everything_the_float_merge_supports_works_from_a_4bit_base(tmp_path, models):
    """rsLoRA with patterns, weighted adapters, DoRA (norms from the dequantized weight), a saved head,
    tied embeddings, lora_bias: the same bytes as merging into the dequantized base."""
    base, qwen = models["llama"][0], models["qwen2-tied"][0]
    for i, (b, adapters, kw) in enumerate(variant_adapters(tmp_path / "ad", base, qwen)):
        q = qbase(tmp_path / f"v{i}", b, "nf4", True, 64)
        deq = lorafast.dequantize(q, tmp_path / f"v{i}" / "deq", progress=False).output
        new = lorafast.merge(q, adapters, tmp_path / f"v{i}" / "new", progress=False, **kw)
        old = lorafast.merge(deq, adapters, tmp_path / f"v{i}" / "old", progress=False, **kw)
        same_files(new.output, old.output)
        assert new.tensors_merged == old.tensors_merged > 0, adapters[0].name
        # And back to 4-bit.
        lorafast.merge(q, adapters, tmp_path / f"v{i}" / "rq", requantize=True, progress=False, **kw)


# --- the report -----------------------------------------------------------------------------------


def f64(t):
    return t.double()


def reference_stats(base_loaded: dict, merged_loaded: dict, delta: dict) -> dict:
    out = {}
    for name, d in delta.items():
        r = f64(merged_loaded[name]) - f64(base_loaded[name])
        dd = float((d * d).sum())
        out[name] = {
            "delta_norm": dd**0.5,
            "weight_norm": float(f64(base_loaded[name]).norm()),
            "retention": float((r * d).sum()) / dd,
            "relative_error": float((r - d).norm()) / dd**0.5,
        }
    return out


def dequantized(folder: Path) -> dict:
    """Every 4-bit weight as bitsandbytes dequantizes it (in its state dtype), other tensors as stored."""
    st = tensors(folder)
    out = {}
    for k in st:
        if ".quant_state." in k:
            w = k.split(".quant_state.")[0]
            group = {n.split(f"{w}.")[1]: st[n] for n in st if n.startswith(f"{w}.")}
            state = F.QuantState.from_dict(group, device="cpu")
            out[w] = F.dequantize_4bit(st[w], state).reshape(state.shape)
    return {**{k: v for k, v in st.items() if k not in out and not any(k.startswith(f"{w}.") for w in out)}, **out}


def intended(base_loaded: dict, adapter: Path, names, transposed=()) -> dict:
    """The adapter's change in float64 from its factors: scaling * B @ A (transposed for Conv1D)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for name in names:
        key = f"base_model.model.{name.removesuffix('.weight')}"
        d = f64(ad[f"{key}.lora_B.weight"]) @ f64(ad[f"{key}.lora_A.weight"]) * cfg["lora_alpha"] / cfg["r"]
        out[name] = d.T if name in transposed else d
    return out


def assert_report_matches(report, want: dict, rel: float):
    got = {t.name: t for t in report.tensors}
    assert set(got) == set(want)
    for name, w in want.items():
        t = got[name]
        assert t.ratio == pytest.approx(t.delta_norm / t.weight_norm)
        for field, value in w.items():
            assert getattr(t, field) == pytest.approx(value, rel=rel, abs=rel), (name, field, getattr(t, field), value)


def test_report_of_a_float_merge(tmp_path, models):
    base, adapter = models["llama"]
    r = lorafast.merge(base, adapter, tmp_path / "out", progress=False)
    b, m = tensors(base), tensors(r.output)
    names = [t.name for t in r.tensors]
    assert len(names) == 3 * 3 and names == sorted(names, key=list(b).index), "in the model's order"
    # Delta is the change in f32 before rounding: the float64 product of the factors, to f32 rounding of
    # the sum w + delta (relative u per element); the sums in f32 chunks of 1024 (relative 1024 u).
    assert_report_matches(r, reference_stats(b, m, intended(b, adapter, names)), rel=1e-4)
    # bf16 keeps most of an r=8 change of this size.
    assert all(0.9 < t.retention < 1.1 for t in r.tensors)


@pytest.mark.parametrize("dq", [True, False], ids=["dq", "plain"])
def test_report_of_a_requantized_merge(tmp_path, models, dq):
    base, adapter = models["gpt2"]
    q = qbase(tmp_path, base, "nf4", dq, 64)
    r = lorafast.merge(q, adapter, tmp_path / "rq", requantize=True, progress=False)
    qb, out = dequantized(q), dequantized(r.output)
    names = [t.name for t in r.tensors]
    # GPT-2 Conv1D weights are stored quantized as (out, in): the delta B @ A as it is.
    want = reference_stats(qb, out, intended(qb, adapter, names))
    assert_report_matches(r, want, rel=1e-4)


def test_report_of_merge_and_quantize_from_an_fp32_base(tmp_path):
    """--quantize: the base as loaded is the base quantized alone. In fp32 the quant state's dtype is
    fp32, so the loaded 4-bit values are the f32 products and the report is exact."""
    base = save_model(
        transformers.LlamaForCausalLM, tiny_llama_config(intermediate_size=192), tmp_path / "b", torch.float32
    )
    adapter = save_adapter(CausalLM, base, tmp_path / "a", r=8, lora_alpha=64, target_modules=["q_proj", "o_proj"])
    for dq in (True, False):
        r = lorafast.merge(base, adapter, tmp_path / f"o{dq}", quantize="nf4", double_quant=dq, progress=False)
        alone = dequantized(lorafast.quantize(base, tmp_path / f"alone{dq}", double_quant=dq, progress=False).output)
        names = [t.name for t in r.tensors]
        want = reference_stats(alone, dequantized(r.output), intended(tensors(base), adapter, names))
        assert_report_matches(r, want, rel=1e-4)


def test_summary_line_report_file_and_the_warning_when_rounding_erases_the_change(tmp_path, models, capsys):
    base, _ = models["llama"]
    # A change far below a 4-bit step: re-quantizing erases it.
    tiny = save_adapter(CausalLM, base, tmp_path / "tiny", r=4, lora_alpha=4, target_modules=["q_proj"])
    ad = load_file(str(tiny / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v * (1e-3 if "lora_B" in k else 1) for k, v in ad.items()}, str(tiny / "adapter_model.safetensors"))
    q = qbase(tmp_path, base, "nf4", True, 64)
    report = tmp_path / "r.json"
    assert main(["merge", str(q), str(tiny), "-o", str(tmp_path / "o"), "--requantize", "--report", str(report)]) == 0
    cap = capsys.readouterr()
    assert "kept " in cap.out and "of the adapters' change" in cap.out
    warn = [x for x in cap.err.splitlines() if "keeps less than half" in x]
    assert len(warn) == 1 and "bf16" in warn[0], cap.err
    rep = json.loads(report.read_text())
    assert len(rep["tensors"]) == 3 and all(t["retention"] < 0.5 for t in rep["tensors"])
    # The same adapter merged to fp32 keeps it all: no warning.
    assert main(["merge", str(q), str(tiny), "-o", str(tmp_path / "f"), "--dtype", "fp32"]) == 0
    cap = capsys.readouterr()
    assert "keeps less than half" not in cap.err
    # --quiet: no summary, and no statistics computed without --report.
    r = lorafast.merge(q, tiny, tmp_path / "qq", requantize=True, report=False, progress=False)
    assert r.tensors == []


def test_bad_mode_combinations_are_one_line(tmp_path, capsys, models):
    base, adapter = models["llama"]
    q = qbase(tmp_path, base, "nf4", True, 64)
    line = cli_error(capsys, "merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--requantize")
    assert "requantize needs a 4-bit" in line
    line = cli_error(capsys, "merge", str(q), str(adapter), "-o", str(tmp_path / "o"), "--quantize", "nf4")
    assert "already 4-bit" in line
    line = cli_error(
        capsys, "merge", str(q), str(adapter), "-o", str(tmp_path / "o"), "--quantize", "nf4", "--requantize"
    )
    assert "give one" in line
    assert not (tmp_path / "o").exists()
