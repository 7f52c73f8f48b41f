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
