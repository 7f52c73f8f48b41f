"""FP8 E4M3 (torch's float8_e4m3fn, the weight dtype of transformers' fine-grained FP8 and compressed-tensors'
FP8 formats): lorafast's codec against torch's own cast, bit for bit - every code's value, and the cast of
f32 values at every scale, on every rounding boundary and tie, and past the largest finite value."""

from __future__ import annotations

import numpy as np
import torch

from lorafast import _core


def torch_encode(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def test_every_code_decodes_as_torch_reads_it():
    codes = np.arange(256, dtype=np.uint8)
    ours = _core.float8_e4m3_decode(codes)
    theirs = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    finite = ~np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), ~finite)
    assert np.array_equal(ours[finite].view(np.uint32), theirs[finite].view(np.uint32))  # -0.0 included
    assert np.isnan(ours).sum() == 2 and ours[0x7E] == 448.0


def test_the_cast_from_f32_is_torchs_bit_for_bit():
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal(200_000).astype(np.float32) * np.float32(s)
        for s in (1e-4, 1e-2, 0.1, 1.0, 10.0, 100.0, 300.0)
    ]
    # Every code's value, the midpoints between neighbours (ties), and one f32 step either side of them.
    grid = _core.float8_e4m3_decode(np.arange(256, dtype=np.uint8))
    finite = np.unique(grid[np.isfinite(grid)])
    mids = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)
    edges = np.concatenate([finite, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, -np.inf)])
    values.append(edges.astype(np.float32))
    # Past 448 (saturated by this torch; the quantizers clamp first), the specials.
    values.append(np.array([448.0, 463.9, 464.0, 464.1, 479.9, 480.0, 1e9, np.inf, -np.inf, -0.0, 0.0], np.float32))
    x = np.concatenate(values)
    ours, theirs = _core.float8_e4m3_encode(x), torch_encode(x)
    assert np.array_equal(ours, theirs), x[ours != theirs][:10]
    nan = np.array([np.nan, -np.nan], np.float32)
    assert (_core.float8_e4m3_encode(nan) & 0x7F == 0x7F).all() and (torch_encode(nan) & 0x7F == 0x7F).all()


def fp8_quantizer(block, scale_fmt):
    """transformers' Fp8Quantize with the config it reads (weight_block_size, scale_fmt)."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = SimpleNamespace(weight_block_size=list(block), scale_fmt=scale_fmt)
    return Fp8Quantize(SimpleNamespace(quantization_config=config))


def weight(rows: int, cols: int, block: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Blocks of very different magnitudes, the first all zero, values bf16-representable."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 1, cols).repeat(rows, 1)
    w[: block[0], : block[1]] = 0.0
    return w.bfloat16().float()


import pytest  # noqa: E402


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((256, 96), (128, 32)), ((64, 64), (1, 32))])
def test_block_quantization_is_transformers_fp8_quantize(shape, block, scale_fmt):
    w = weight(*shape, block)
    theirs = fp8_quantizer(block, scale_fmt)._quantize_one("m.weight", w)
    codes, inv = _core.fp8_quantize_blocks(w.numpy().ravel(), *shape, block, scale_fmt)
    assert np.array_equal(codes, theirs["m.weight"].view(torch.uint8).numpy().ravel())
    assert np.array_equal(inv, theirs["m.weight_scale_inv"].float().numpy().ravel())
    if scale_fmt == "float":
        # 1 / (448 / amax), not amax / 448: they differ in some blocks, so the rule is tested.
        amax = w.reshape(shape[0] // block[0], block[0], -1, block[1]).abs().amax(dim=(1, 3)).numpy().ravel()
        nonzero = amax > 0
        assert (inv[nonzero] != (amax[nonzero] / np.float32(448))).any()


@pytest.mark.parametrize("shape", [(256, 384), (192, 200), (130, 129)])
def test_block_dequantization_is_transformers_with_partial_edge_blocks(shape):
    """Divisible grids against Fp8Dequantize (f32 product, then one cast); DeepSeek-V3-style partial edge
    blocks (a ceil grid) against `_dequantize_fp8_weight` in f32, which takes them."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    grid = (-(-shape[0] // 128), -(-shape[1] // 128))
    inv = torch.rand(grid, generator=g) * 1e-2 + 1e-5
    ours = _core.fp8_dequantize_blocks(codes.numpy().ravel(), *shape, (128, 128), inv.numpy().ravel())
    fp8 = codes.view(torch.float8_e4m3fn)
    ref = _dequantize_fp8_weight(fp8.clone(), inv, [128, 128], torch.float32)
    assert np.array_equal(ours, ref.numpy().ravel())
    if shape[0] % 128 == 0 and shape[1] % 128 == 0:
        direct = Fp8Dequantize(SimpleNamespace())._dequantize_one(fp8, inv, torch.float32)
        assert np.array_equal(ours, direct.numpy().ravel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantization_is_transformers_convert_moe_packed_tensors(dtype):
    """GPT-OSS's MXFP4 experts ([E, out, G, 16] blocks, [E, out, G] E8M0 scales): every nibble and a spread of
    scales, extremes included (2^-127 subnormal, 2^128 infinite), against transformers' dequantizer."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    e, out, groups = 2, 6, 4
    blocks = torch.randint(0, 256, (e, out, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (e, out, groups), generator=g, dtype=torch.uint8)
    scales[0, 0, :] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, G*32, out]
    ours = _core.mxfp4_dequantize(blocks.numpy().ravel(), scales.numpy().ravel(), 16)
    ours_t = torch.from_numpy(ours).reshape(e, out, groups * 32).transpose(1, 2).to(dtype)
    assert ours_t.shape == theirs.shape
    same = (ours_t == theirs) | (ours_t.isnan() & theirs.isnan())
    assert bool(same.all()), (ours_t[~same][:5], theirs[~same][:5])
    assert torch.equal(ours_t.float().signbit(), theirs.float().signbit())
