"""pytest-benchmark comparison on a mid-sized model (run: pytest benches --benchmark-only).

The README's table comes from bench_merge.py on the ~1.1B checkpoint; this is the quick version that
fits in a development loop: lorafast against the pure-Python merge on the same ~110M-parameter model.
"""

from __future__ import annotations

import shutil

import pytest

import lorafast
from lorafast.synthetic import LlamaShape, make_llama_checkpoint, make_lora_adapter

SHAPE = LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, vocab=16000)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = make_llama_checkpoint(root / "base", SHAPE, shards=2)
    adapter = make_lora_adapter(root / "adapter", SHAPE, r=16)
    return base, adapter, root


def _fresh(out):
    shutil.rmtree(out, ignore_errors=True)


def test_lorafast_merge(benchmark, model):
    base, adapter, root = model
    out = root / "lf"
    benchmark.pedantic(
        lambda: lorafast.merge(base, adapter, out, progress=False),
        setup=lambda: _fresh(out),
        rounds=5,
    )


def test_pure_python_merge(benchmark, model):
    pytest.importorskip("torch")
    from lorafast.reference import reference_merge

    base, adapter, root = model
    out = root / "py"
    benchmark.pedantic(lambda: reference_merge(base, [adapter], out), setup=lambda: _fresh(out), rounds=3)
