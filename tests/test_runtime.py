"""The GIL is released during a merge, Ctrl-C stops one cleanly, and the CLI's main jobs run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lorafast
from lorafast.cli import main
from lorafast.synthetic import LlamaShape, make_llama_checkpoint, make_lora_adapter

MEDIUM = LlamaShape(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vocab=4096)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    return make_llama_checkpoint(root / "base", MEDIUM, shards=2), make_lora_adapter(root / "adapter", MEDIUM, r=16)


def test_gil_is_released_during_merge(tmp_path, medium):
    base, adapter = medium
    window = {}

    def run():
        window["start"] = time.perf_counter()
        # The adapter 48 times over: rank-768 deltas make the merge long enough to observe.
        lorafast.merge(base, [adapter] * 48, tmp_path / "out", threads=1, progress=False)
        window["end"] = time.perf_counter()

    t = threading.Thread(target=run)
    ticks = []
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())  # pure-Python work: only runs while the merge does not hold the GIL
    t.join()
    assert window["end"] - window["start"] > 0.1, "merge too short to measure"
    inside = [x for x in ticks if window["start"] + 0.02 < x < window["end"] - 0.02]
    assert len(inside) > 1000, f"the main thread ran {len(inside)} times during the merge"


def test_cli_merge_and_inspect(tmp_path, medium, capsys):
    base, adapter = medium
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(adapter), "-o", str(out), "--dtype", "bf16", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "tensors merged" in text and str(out) in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{MEDIUM.layers * 9 + 3} tensors" in text and "BF16" in text
    assert main(["inspect", str(adapter), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "trainable parameters" in text and text.count("model.layers.") == 3


def test_inspect_adapter_norms_match_numpy(medium):
    from safetensors.numpy import load_file

    _, adapter = medium
    info = lorafast.inspect_adapter(adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert info["trainable_parameters"] == sum(t.size for t in tensors.values())
    assert info["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    norms = [m["delta_norm"] for m in info["modules"]]
    assert norms == sorted(norms, reverse=True)
    for m in info["modules"][:5]:
        key = f"base_model.model.{m['module']}"
        delta = tensors[f"{key}.lora_B.weight"].astype(np.float64) @ tensors[f"{key}.lora_A.weight"].astype(np.float64)
        assert m["delta_norm"] == pytest.approx(m["scaling"] * np.linalg.norm(delta), rel=1e-5)


def test_inspect_checkpoint(medium):
    base, _ = medium
    info = lorafast.inspect_checkpoint(base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert {t["name"] for t in info["tensors"]} == set(index["weight_map"])
    assert info["total_bytes"] == index["metadata"]["total_size"]
    assert info["parameters"] == info["total_bytes"] // 2


def test_progress_callback_counts_every_byte(tmp_path, medium):
    base, adapter = medium
    seen = []
    raw = lorafast._core.merge(
        str(base), [str(adapter)], str(tmp_path / "o"), progress=lambda n, b: seen.append((n, b))
    )
    total = seen[0]
    assert total[0] == "" and sum(b for n, b in seen[1:]) == total[1]
    assert len(seen) - 1 == raw.tensors_total


def test_env_thread_count(tmp_path, medium, monkeypatch):
    base, adapter = medium
    monkeypatch.setenv("LORAFAST_NUM_THREADS", "nope")
    with pytest.raises(lorafast.errors.InvalidArgumentError, match="LORAFAST_NUM_THREADS"):
        lorafast.merge(base, adapter, tmp_path / "o", progress=False)
    monkeypatch.setenv("LORAFAST_NUM_THREADS", "1")
    assert lorafast.merge(base, adapter, tmp_path / "o", progress=False).tensors_merged == MEDIUM.layers * 7


@pytest.mark.slow
def test_entry_point_demo_runs_and_verifies(tmp_path):
    """The README's first command: the installed `lorafast` script, end to end, against PEFT."""
    exe = Path(sys.executable).with_name("lorafast")
    r = subprocess.run(
        [str(exe), "demo", "--keep", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "lorafast merge:" in r.stdout and "100.0000% bit-identical" in r.stdout, r.stdout
    assert "max |difference| = 0" in r.stdout, r.stdout


def test_hub_ids_resolve_through_the_local_hub_cache(tmp_path, monkeypatch):
    """The hub code path, offline: a model and an adapter laid out in an HF cache as snapshot_download leaves them."""
    from lorafast.hub import resolve_model_path

    shape = LlamaShape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=64)
    hub = tmp_path / "hf" / "hub"
    rev = "0" * 40
    for repo, make in (
        ("acme/tiny", lambda d: make_llama_checkpoint(d, shape)),
        ("acme/tiny-lora", lambda d: make_lora_adapter(d, shape, r=4)),
    ):
        root = hub / f"models--{repo.replace('/', '--')}"
        make(root / "snapshots" / rev)
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("acme/tiny").endswith(rev)
    report = lorafast.merge("acme/tiny", "acme/tiny-lora", tmp_path / "out", progress=False)
    assert report.tensors_merged == 7
    with pytest.raises(lorafast.errors.FileMissingError, match="acme/missing"):
        lorafast.merge("acme/missing", "acme/tiny-lora", tmp_path / "out2", progress=False)
