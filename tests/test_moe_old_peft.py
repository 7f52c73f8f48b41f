"""Expert LoRAs written by PEFT 0.18, checked against PEFT 0.18 itself.

PEFT before 0.19 reads every 3-D parameter `[E, d1, d2]` as `(E, in, out)`: on transformers 5's
`[E, out, in]` experts (Qwen3-MoE, Mixtral) its factors are A `[E*r, out]`, B `[in, E*r]` and expert e's
delta `(B_e A_e)^T`; PEFT 0.19 swapped in and out (`_did_swap_in_out_features`), and nothing converts the
old files: PEFT 0.21 refuses them, or - where the weight is square (2I == H) - applies them wrongly without a
word. lorafast reads the layout from `peft_version`. PEFT 0.18.1 (from PyPI, no dependencies, into a cache
folder) runs in a subprocess on this venv's torch and transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import peft
from helpers import assert_matches_peft, cli_error
from safetensors.torch import load_file
from test_moe import assert_correctly_rounded, save_moe

import lorafast
from lorafast.errors import UnsupportedError
from lorafast.reference import load_state_dict

OLD_PEFT = "0.18.1"

# Builds the adapter with PEFT 0.18 on BASE, saves it, and merges it in fp32 and in float64 (the truth).
SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers, peft
    assert peft.__version__ == sys.argv[1], peft.__file__
    base, out, targets = sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj"], target_parameters=targets)
    peft.get_peft_model(model, cfg).save_pretrained(out + "/adapter")
    for dtype, name in ((None, "peft"), (torch.float64, "truth")):
        m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype) if dtype else \\
            transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.PeftModel.from_pretrained(m, out + "/adapter", autocast_adapter_dtype=False)
        if dtype:
            pm = pm.to(dtype)  # the factors too: PEFT 0.18 makes its LoRA layers in fp32
        pm.merge_and_unload().save_pretrained(out + "/" + name)
    """
)


@pytest.fixture(scope="session")
def old_peft() -> Path:
    """PEFT 0.18.1's package folder, installed once into the cache (no dependencies: it runs on ours)."""
    target = Path(os.environ.get("LORAFAST_CACHE", Path.home() / ".cache" / "lorafast")) / f"peft-{OLD_PEFT}"
    if not (target / "peft" / "__init__.py").is_file():
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), f"peft=={OLD_PEFT}"]
        subprocess.run(pip, check=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def old_peft_run(old_peft: Path, base: Path, out: Path, targets: list[str]) -> Path:
    env = {**os.environ, "PYTHONPATH": str(old_peft)}
    cmd = [sys.executable, "-c", SCRIPT, OLD_PEFT, str(base), str(out), ",".join(targets)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return out


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def old_models(old_peft, tmp_path_factory):
    """(arch, dtype) -> (base, folder with PEFT 0.18's adapter and merges), built once each. gate_up
    [E, 64, 64] is square for Qwen3-MoE and Mixtral."""
    made = {}

    def get(arch: str, dtype: str = "fp32") -> tuple[Path, Path]:
        if (arch, dtype) not in made:
            root = tmp_path_factory.mktemp(f"{arch}_{dtype}")
            base = save_moe(root / "base", arch, dtype)
            made[arch, dtype] = base, old_peft_run(old_peft, base, root, EXPERTS)
        return made[arch, dtype]

    return get


CASES = [("qwen3_moe", "fp32"), ("mixtral", "fp32"), ("gpt_oss", "fp32"), ("qwen3_moe", "bf16"), ("gpt_oss", "bf16")]


@pytest.fixture(params=CASES, ids=lambda c: "-".join(c))
def old_pair(request, old_models):
    arch, dtype = request.param
    return (arch, dtype, *old_models(arch, dtype))


def test_old_peft_adapter_has_the_unswapped_layout(old_pair):
    arch, _, _, root = old_pair
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_version"] == OLD_PEFT
    a = load_file(root / "adapter" / "adapter_model.safetensors")
    down_a = next(v for k, v in a.items() if k.endswith("layers.1.mlp.experts.lora_A.weight"))
    # down_proj is [E, H=64, I=32] (Qwen3-MoE, Mixtral) or [E, I=32, H=64] (GPT-OSS, is_transposed): PEFT 0.18
    # takes d1 as "in" for both, so A reads H for the first and I for the second - for GPT-OSS as 0.19+ does.
    assert down_a.shape[1] == (32 if arch == "gpt_oss" else 64)


def test_old_peft_expert_lora_merges_as_old_peft(tmp_path, old_pair):
    """Per expert on disk (Qwen3-MoE, Mixtral's w1/w3/w2) and fused (GPT-OSS), as for PEFT 0.21's adapters:
    fp32 bit for bit PEFT 0.18's merge; bf16 correctly rounded against PEFT 0.18's float64 merge, never
    farther from it than PEFT 0.18's own bf16 merge."""
    _, dtype, base, root = old_pair
    ours = lorafast.merge(base, [root / "adapter"], tmp_path / "ours", progress=False).output
    if dtype == "fp32":
        assert_matches_peft(ours, root / "peft")
    else:
        assert_correctly_rounded(ours, root / "truth", root / "peft")
    changed = [k for k, v in load_state_dict(ours).items() if not torch.equal(v, load_state_dict(base)[k])]
    assert sum("experts" in k for k in changed) >= 4, changed


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_the_same_adapter_read_as_new_peft_is_refused(tmp_path, old_models, capsys, arch):
    """Without the version the square gate_up weight is refused (it reads either way); claimed as PEFT
    0.19's, the non-square down_proj does not fit. (GPT-OSS sets is_transposed: read alike by both.)"""
    base, root = old_models(arch)
    for version in (None, "0.19.0"):
        adapter = tmp_path / f"a-{version}"
        shutil.copytree(root / "adapter", adapter)
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg.pop("peft_version")
        if version:
            cfg["peft_version"] = version
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(Exception) as err:
            lorafast.merge(base, [adapter], tmp_path / f"out-{version}", progress=False)
        msg = str(err.value)
        if version is None:
            assert err.type is UnsupportedError and "peft_version" in msg, msg
        else:
            assert "down_proj" in msg and "shape" in msg, msg
        assert not (tmp_path / f"out-{version}").exists()
    # On the CLI: one line naming the parameter.
    line = cli_error(capsys, "merge", str(base), str(tmp_path / "a-None"), "-o", str(tmp_path / "cli"))
    assert "peft_version" in line and "gate_up_proj" in line


def test_down_proj_alone_without_a_version_is_read_by_its_shapes(tmp_path, old_peft):
    """down_proj [E, 64, 32] is not square: with no peft_version its factors fit only one layout."""
    base = save_moe(tmp_path / "base", "qwen3_moe", "fp32")
    old_peft_run(old_peft, base, tmp_path, ["mlp.experts.down_proj"])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del cfg["peft_version"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    ours = lorafast.merge(base, [tmp_path / "adapter"], tmp_path / "ours", progress=False).output
    assert_matches_peft(ours, tmp_path / "peft")


def test_old_and_new_layouts_combine_only_through_the_base(tmp_path, old_models):
    """Factor arithmetic across layouts is refused; merging both into the base reads each as written; resize
    keeps the old layout (and its peft_version), so the resized adapter merges as the original."""
    import transformers

    base, root = old_models("qwen3_moe")
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_parameters=EXPERTS)
    new = tmp_path / "new"
    peft.get_peft_model(model, cfg).save_pretrained(new)
    with pytest.raises(UnsupportedError, match="laid out differently"):
        lorafast.combine([root / "adapter", new], tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    one = load_state_dict(lorafast.merge(base, [root / "adapter"], tmp_path / "one", progress=False).output)
    new_only = load_state_dict(lorafast.merge(base, [new], tmp_path / "new_only", progress=False).output)
    both = load_state_dict(lorafast.merge(base, [root / "adapter", new], tmp_path / "both", progress=False).output)
    b = load_state_dict(base)
    for k, v in both.items():
        # Each adapter's delta as its own merge has it: the sum within two fp32 roundings of the weight.
        want = one[k].double() + new_only[k].double() - b[k].double()
        tol = 4 * torch.finfo(torch.float32).eps * float(want.abs().max().clamp(min=1e-30))
        assert float((v.double() - want).abs().max()) <= tol, k
    resized = lorafast.resize(root / "adapter", tmp_path / "resized", rank=4, progress=False).output
    assert json.loads((resized / "adapter_config.json").read_text())["peft_version"] == OLD_PEFT
    again = load_state_dict(lorafast.merge(base, [resized], tmp_path / "again", progress=False).output)
    for k, v in one.items():
        # A rank-4 SVD of each rank-4 expert delta, refactored in fp32: error ~ eps * the delta's scale.
        delta = float((v.double() - b[k].double()).abs().max())
        tol = 64 * torch.finfo(torch.float32).eps * delta + torch.finfo(torch.float32).eps * float(v.abs().max())
        assert float((again[k].double() - v.double()).abs().max()) <= tol, k
