"""The 4-bit kernel against bitsandbytes (its CPU path, the oracle here), bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from lorafast.quant import dequantize_4bit, quantize_4bit  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN (bitsandbytes' NaN payloads vary with torch's kernels)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def reference_dequantize(packed, state, shape, dtype):
    """bitsandbytes' own reference dequantization (the default backend's)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax if not state.nested else F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, shape, dtype).reshape(shape)


def assert_same(x: torch.Tensor, quant_type: str, blocksize: int, dq: bool):
    p1, s1 = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    p2, s2 = quantize_4bit(x, quant_type, blocksize, dq, torch_threads=torch.get_num_threads())
    assert torch.equal(p1, p2), f"packed codes differ at {torch.nonzero(p1 != p2)[:5].tolist()}"
    d1 = s1.as_dict(packed=True)
    assert set(d1) == set(s2)
    for k in d1:
        if d1[k].is_floating_point():
            assert same_floats(d1[k], s2[k]), k
        else:
            assert torch.equal(d1[k], s2[k]), (k, bytes(d1[k].numpy())[:200], bytes(s2[k].numpy())[:200])
    # bitsandbytes accepts the state as it is.
    qs = F.QuantState.from_dict(s2, device="cpu")
    ours = dequantize_4bit(p2, s2)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    # Bit for bit what bitsandbytes' reference dequantization computes.
    assert same_floats(ours, reference_dequantize(p1, s1, x.shape, x.dtype))
    # And what F.dequantize_4bit returns (its native CPU kernel returns [1, n] for 1-D, may write FP4's
    # zero as -0.0, and mis-indexes absmax when rows are not a whole number of blocks - a bitsandbytes bug).
    native = F.dequantize_4bit(p1, s1).reshape(x.shape)
    nan = torch.isnan(ours)
    if not torch.equal(native[~nan], ours[~nan]):
        assert x.dim() == 2 and x.shape[-1] % blocksize != 0, "bitsandbytes and lorafast disagree on an aligned tensor"
    assert torch.equal(F.dequantize_4bit(p2, qs).reshape(x.shape)[~nan], native[~nan])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double-quant"])
def test_random_data(dtype, quant_type, blocksize, dq):
    g = torch.Generator().manual_seed(blocksize)
    x = (torch.randn(7, 1031, generator=g) * 0.05).to(dtype)  # odd count, partial last block
    assert_same(x, quant_type, blocksize, dq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_generated_shapes(quant_type, dtype):
    rng = np.random.default_rng(7)
    for _ in range(12):
        shape = tuple(int(s) for s in rng.integers(1, 300, size=rng.integers(1, 3)))
        scale = float(10 ** rng.uniform(-6, 3))
        x = (torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * scale).to(dtype)
        assert_same(x, quant_type, int(rng.choice(BLOCKSIZES[:4])), bool(rng.integers(0, 2)))


def _edge_cases(dtype) -> dict[str, torch.Tensor]:
    finfo = torch.finfo(dtype)
    code = F.get_4bit_type("nf4", device="cpu").float()
    mids = (code[:-1] + code[1:]) / 2
    fp4 = F.get_4bit_type("fp4", device="cpu").float().sort().values
    fp4_mids = (fp4[:-1] + fp4[1:]) / 2
    on_thresholds = torch.cat(
        [
            torch.ones(1),
            mids,
            -mids,
            fp4_mids,
            -fp4_mids,
            torch.nextafter(mids, torch.ones(1)),
            torch.nextafter(mids, -torch.ones(1)),
        ]
    )
    cases = {
        "zeros": torch.zeros(64 * 3 + 10),
        "zero block among others": torch.cat([torch.randn(64), torch.zeros(64), torch.randn(70)]),
        "one huge outlier": torch.cat([torch.randn(100) * 1e-3, torch.tensor([3e4]), torch.randn(155) * 1e-3]),
        "on thresholds": on_thresholds,
        "subnormals": torch.full((130,), finfo.tiny) * torch.linspace(-0.9, 0.9, 130),
        "tiny and huge": torch.tensor([finfo.tiny, finfo.max / 2, -finfo.max / 2, finfo.eps] * 40),
        "negative zeros": torch.cat([torch.zeros(64).neg(), torch.randn(64)]),
        "nan": torch.cat([torch.randn(70), torch.tensor([float("nan")]), torch.randn(60)]),
        "inf": torch.cat(
            [torch.randn(70), torch.tensor([float("inf")]), torch.randn(60), torch.tensor([-float("inf")])]
        ),
        "single element": torch.tensor([0.37]),
    }
    return {k: v.to(dtype) for k, v in cases.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", list(_edge_cases(torch.float32)))
def test_edge_cases(dtype, quant_type, case):
    x = _edge_cases(dtype)[case]
    for blocksize in (32, 64):
        for dq in (False, True):
            if dq and case in ("nan", "inf"):
                continue  # a NaN/Inf absmax poisons the mean; tested without double quant
            assert_same(x, quant_type, blocksize, dq)


def test_nan_and_inf_follow_bitsandbytes():
    """Documented behaviour: a NaN makes its block's absmax NaN and every code 15 (NF4); an Inf makes
    absmax Inf, the Inf itself NaN-scaled (code 15) and the rest of the block 0 (code 7)."""
    x = torch.cat([torch.tensor([float("nan")]), torch.ones(63), torch.tensor([float("inf")]), torch.ones(63)])
    packed, state = quantize_4bit(x, "nf4", 64, False)
    assert torch.isnan(state["absmax"][0]) and torch.isinf(state["absmax"][1])
    assert (packed[:32] == 0xFF).all()
    assert packed[32].item() == 0xF7 and (packed[33:] == 0x77).all()


def test_mean_over_two_million_elements_uses_torch_thread_chunks():
    """Double quant of a tensor with more than 32768 blocks: the offset follows torch's threaded sum."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2048, 1100, generator=g) * 0.02).to(torch.bfloat16)
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert_same(x, "nf4", 64, True)
        finally:
            torch.set_num_threads(old)


def test_numpy_input_round_trip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    packed, state = quantize_4bit(x, "nf4", 64, True)
    assert isinstance(packed, np.ndarray) and packed.shape == (500, 1) and packed.dtype == np.uint8
    y = dequantize_4bit(packed, state)
    ref = F.dequantize_4bit(
        *F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    ).numpy()
    assert np.array_equal(y, ref.reshape(y.shape))  # bitsandbytes returns [1, n] for 1-D input


def test_spec_test_vectors():
    """The vectors in shared/bnb-4bit-testvectors.json (bitsandbytes 0.50.1, CPU)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "bnb-4bit-testvectors.json"
    if not path.exists():
        pytest.skip("shared/ is not beside this checkout")
    vectors = json.loads(path.read_text())
    for case in vectors["cases"]:
        n = case["n"]
        i = np.arange(n)
        v = (((i * 37) % 101) - 50) * (1 + ((i // 64) % 7))
        x = torch.from_numpy(v.astype(np.float32) / np.float32(512)).to(getattr(torch, case["dtype"]))
        packed, state = quantize_4bit(x, case["quant_type"], case["blocksize"], case["double_quant"], torch_threads=2)
        assert bytes(packed.numpy().reshape(-1)).hex() == case["packed_hex"], case
        qs = json.loads(bytes(state[f"quant_state.bitsandbytes__{case['quant_type']}"].numpy()).decode())
        assert qs == json.loads(case["state_json"]) if "state_json" in case else True
