"""GGUF tensor encodings against llama.cpp itself: lorafast's block quantizers must give the bytes that
ggml's reference quantizers (`ggml_quantize_chunk`, what llama-quantize and the converter use without an
importance matrix) give, bit for bit. The oracle is libggml-base from llama.cpp as vendored in the
llama-cpp-python sdist, built by scripts/llama_cpp.sh (the test command runs it)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from lorafast import _core

GGML_TYPES = {"F16": 1, "Q4_0": 2, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}


@pytest.fixture(scope="module")
def ggml(llama_cpp_dir):
    lib = ctypes.CDLL(str(llama_cpp_dir / "build" / "bin" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = (
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    )
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_encode(lib, x: np.ndarray, type_name: str) -> bytes:
    rows, cols = x.shape
    tid = GGML_TYPES[type_name]
    dst = np.zeros(lib.ggml_row_size(tid, cols) * rows, dtype=np.uint8)
    n = lib.ggml_quantize_chunk(tid, x.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    assert n == dst.size
    return dst.tobytes()


def cases(rng: np.random.Generator):
    """Weights of every scale, and the blocks the quantizers treat specially."""
    rows, cols = 48, 512
    for scale in (1e-4, 0.02, 3.0, 300.0):
        yield f"normal*{scale}", (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    bf16 = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    bf16 = (bf16.view(np.uint32) & 0xFFFF0000).view(np.float32)  # values a bf16 checkpoint holds
    yield "bf16 values", bf16
    x = (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)
    x[:, :256] = 0
    yield "zero blocks", x
    yield "positive", np.abs(x) + np.float32(0.25)
    yield "negative", -np.abs(rng.standard_normal((rows, cols)).astype(np.float32))
    yield "constant", np.full((rows, cols), 0.75, np.float32)
    tiny = (rng.standard_normal((rows, cols)) * 1e-20).astype(np.float32)
    tiny[::2] *= np.float32(1e18)
    yield "tiny blocks", tiny
    heavy = rng.standard_t(2, (rows, cols)).astype(np.float32)
    yield "heavy tails", heavy
    ties = (np.round(rng.standard_normal((rows, cols)) * 8) / 8).astype(np.float32)
    yield "grid values", ties
    # Three blocks a row: the K-quants search two blocks side by side, then one alone.
    odd = (rng.standard_normal((15, 768)) * 0.1).astype(np.float32)
    odd[::3, 256:512] = 0
    odd[1::3, 512:] = np.float32(-0.5)
    yield "three blocks a row", odd


@pytest.mark.parametrize("type_name", list(GGML_TYPES))
def test_encodings_are_llama_cpps_bytes(ggml, type_name):
    rng = np.random.default_rng(GGML_TYPES[type_name])
    for label, x in cases(rng):
        x = np.ascontiguousarray(x)
        ours = _core.gguf_encode_rows(x.ravel(), x.shape[1], type_name)
        theirs = ggml_encode(ggml, x, type_name)
        assert len(ours) == len(theirs), label
        if ours != theirs:
            a, b = np.frombuffer(ours, np.uint8), np.frombuffer(theirs, np.uint8)
            bad = np.flatnonzero(a != b)
            pytest.fail(f"{type_name} {label}: {bad.size} bytes differ, first at {bad[:8].tolist()}")


def test_encoder_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="whole 256-element blocks"):
        _core.gguf_encode_rows(np.zeros(300, np.float32), 300, "Q4_K")
