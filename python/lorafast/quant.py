"""NF4 / FP4 4-bit quantization, byte-identical to bitsandbytes (its CPU path), in Rust.

>>> import torch
>>> from lorafast.quant import quantize_4bit, dequantize_4bit
>>> w = torch.randn(256, 256, dtype=torch.bfloat16)
>>> packed, state = quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
>>> packed.shape, packed.dtype
(torch.Size([32768, 1]), torch.uint8)
>>> dequantize_4bit(packed, state).dtype
torch.bfloat16

``state`` is the dict ``QuantState.as_dict(packed=True)`` produces, so
``bitsandbytes.functional.QuantState.from_dict(state, device="cpu")`` accepts it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import numpy as np

from lorafast import _core

_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def default_torch_threads() -> int:
    """The intra-op thread count torch would use: the double-quant offset's summation order depends
    on it for tensors of 2M+ elements. torch's own value when torch is already imported."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _flat_input(A: Any) -> tuple[np.ndarray, str, tuple[int, ...], bool]:
    """(flat array for the kernel, dtype name, shape, is_torch)."""
    if type(A).__module__.startswith("torch"):
        import torch

        t = A.detach().to("cpu").contiguous().reshape(-1)
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(t.dtype)
        if name is None:
            raise TypeError(f"quantize_4bit takes float32, float16 or bfloat16 tensors, got {t.dtype}")
        arr = t.numpy() if name == "float32" else t.view(torch.int16).numpy().view(np.uint16)
        return arr, name, tuple(A.shape), True
    a = np.ascontiguousarray(A)
    if a.dtype == np.float32:
        return a.reshape(-1), "float32", a.shape, False
    if a.dtype == np.float16:
        return a.reshape(-1).view(np.uint16), "float16", a.shape, False
    raise TypeError(f"quantize_4bit takes float32 or float16 numpy arrays (or torch tensors), got {a.dtype}")


def quantize_4bit(
    A: Any,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    *,
    torch_threads: Optional[int] = None,
) -> tuple[Any, dict[str, Any]]:
    """Quantize a tensor or array blockwise to NF4/FP4 exactly as
    ``bitsandbytes.functional.quantize_4bit`` does on the CPU.

    Args:
        A: torch tensor (float32, float16, bfloat16) or numpy array (float32, float16).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        compress_statistics: double quantization of the absmax (8-bit, blocks of 256).
        torch_threads: the thread count whose summation order the double-quant offset follows
            (default: torch's, see :func:`default_torch_threads`).

    Returns:
        ``(packed, state)``: packed uint8 codes of shape ``[(n + 1) // 2, 1]`` and the
        ``QuantState.as_dict(packed=True)`` dict (torch tensors for torch input, numpy otherwise).
    """
    flat, dtype, shape, is_torch = _flat_input(A)
    raw = _core.quantize_4bit(
        flat, _DTYPE_NAMES[dtype], quant_type, blocksize, compress_statistics, torch_threads or default_torch_threads()
    )
    qstate: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    state: dict[str, Any] = {"absmax": raw["absmax"], "quant_map": raw["quant_map"]}
    if compress_statistics:
        state["nested_absmax"] = raw["nested_absmax"]
        state["nested_quant_map"] = raw["nested_quant_map"]
        qstate.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(raw["nested_offset"]))
    # bitsandbytes.utils.pack_dict_to_tensor: json.dumps with default separators, as uint8.
    state[f"quant_state.bitsandbytes__{quant_type}"] = np.frombuffer(json.dumps(qstate).encode(), dtype=np.uint8).copy()
    packed = raw["packed"].reshape(-1, 1)
    if is_torch:
        import torch

        packed = torch.from_numpy(packed)
        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return packed, state


def _to_numpy(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().to("cpu").contiguous().numpy()
    return np.asarray(x)


def _read_state(state: Any) -> dict[str, Any]:
    """A QuantState, or its as_dict(packed=True) form, as plain values."""
    if not isinstance(state, dict):  # a bitsandbytes QuantState
        out = {
            "quant_type": state.quant_type,
            "blocksize": state.blocksize,
            "dtype": str(state.dtype).replace("torch.", ""),
            "shape": list(state.shape),
            "absmax": _to_numpy(state.absmax),
        }
        if state.nested:
            out.update(
                nested_absmax=_to_numpy(state.state2.absmax),
                nested_quant_map=_to_numpy(state.state2.code),
                nested_offset=float(state.offset),
            )
        return out
    key = next((k for k in state if "quant_state" in k), None)
    meta = json.loads(bytes(_to_numpy(state[key]).astype(np.uint8)).decode()) if key else {}
    out = {**meta, **{k.split(".")[-1]: v for k, v in state.items() if k != key}}
    out["absmax"] = _to_numpy(out["absmax"])
    return out


def dequantize_4bit(packed: Any, state: Any) -> Any:
    """Dequantize exactly as ``bitsandbytes.functional.dequantize_4bit`` (CPU): ``table[code] * absmax``
    in f32, rounded to the state's dtype. Takes a state dict or a bitsandbytes ``QuantState``."""
    s = _read_state(state)
    absmax = s["absmax"]
    if "nested_absmax" in s:
        absmax = _core.dequantize_nested(
            absmax.astype(np.uint8),
            _to_numpy(s["nested_absmax"]).astype(np.float32),
            float(s["nested_offset"]),
            _to_numpy(s["nested_quant_map"]).astype(np.float32),
        )
    shape = tuple(s["shape"])
    n = int(np.prod(shape))
    dtype = s["dtype"]
    raw = _core.dequantize_4bit(
        _to_numpy(packed).reshape(-1).astype(np.uint8),
        np.ascontiguousarray(absmax, dtype=np.float32),
        s["quant_type"],
        int(s["blocksize"]),
        n,
        _DTYPE_NAMES[dtype],
    )
    if type(packed).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    return raw.view(np_dtype).reshape(shape)


Tensorish = Union[np.ndarray, Any]
