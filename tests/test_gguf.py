"""`lorafast gguf` against llama.cpp's own tools, as vendored in the llama-cpp-python sdist: for f32 /
f16 / bf16 / q8_0 the file must be byte-identical to `convert_hf_to_gguf.py --outtype T`; for the 4-bit
mixes, to llama-quantize (`llama_model_quantize`, the function the tool calls) applied to the converter's
output in the model's own dtype. Every metadata key and value, tensor name, type, shape and byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import minilm_path

from lorafast import gguf as lgguf

CONVERTER_TYPES = ["f32", "f16", "bf16", "q8_0"]
MIXES = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

QUANTIZE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[4])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), p))
"""


def convert(llama_cpp_dir: Path, model: Path, outtype: str, out: Path) -> Path:
    """convert_hf_to_gguf.py as users run it (its vendored gguf-py first on the path)."""
    script = llama_cpp_dir / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    run = subprocess.run(
        [sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def llama_quantize(llama_cpp_dir: Path, src: Path, out: Path, ftype: int) -> Path:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_cpp_dir / "build" / "bin")}
    run = subprocess.run(
        [sys.executable, "-c", QUANTIZE, str(llama_cpp_dir), str(src), str(out), str(ftype)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def assert_same_file(ours: Path, theirs: Path) -> None:
    a, b = ours.read_bytes(), theirs.read_bytes()
    if a == b:
        return
    import gguf

    ra, rb = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ka, kb = list(ra.fields), list(rb.fields)
    assert ka == kb, f"key order differs: {ka} vs {kb}"
    for k in ka:
        fa, fb = ra.fields[k], rb.fields[k]
        assert [bytes(p) for p in fa.parts] == [bytes(p) for p in fb.parts], f"key {k} differs"
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert (ta.name, ta.tensor_type, list(ta.shape)) == (tb.name, tb.tensor_type, list(tb.shape))
        assert bytes(ta.data) == bytes(tb.data), f"tensor {ta.name} ({ta.tensor_type.name}) differs"
    pytest.fail(f"{ours.name}: files differ outside keys and tensors ({len(a)} vs {len(b)} bytes)")


@pytest.fixture(scope="module")
def minilm_converted(llama_cpp_dir, tmp_path_factory):
    """The converter's outputs for the real MiniLM (a BertModel, f32 weights), once per type."""
    out = tmp_path_factory.mktemp("converter")
    model = minilm_path()
    return {t: convert(llama_cpp_dir, model, t, out / f"{t}.gguf") for t in CONVERTER_TYPES}


@pytest.mark.slow
@pytest.mark.parametrize("file_type", CONVERTER_TYPES + list(MIXES))
def test_minilm_is_byte_identical_to_llama_cpp(llama_cpp_dir, minilm_converted, tmp_path, file_type):
    if file_type in MIXES:
        # llama-quantize starts from the converter's output in the model's own dtype (f32 here).
        theirs = llama_quantize(llama_cpp_dir, minilm_converted["f32"], tmp_path / "theirs.gguf", MIXES[file_type])
    else:
        theirs = minilm_converted[file_type]
    report = lgguf.to_gguf(minilm_path(), [], tmp_path / "ours.gguf", type=file_type, progress=False)
    assert report.tensors == 101
    assert_same_file(tmp_path / "ours.gguf", theirs)


def test_unsupported_architecture_is_one_line(tmp_path):
    import json

    from lorafast.errors import UnsupportedError
    from lorafast.synthetic import make_llama_checkpoint

    model = make_llama_checkpoint(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="architecture FalconForCausalLM"):
        lgguf.to_gguf(model, [], tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()
