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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    import numpy as np

from lorafast import _core
from lorafast._core import MergeReport
from lorafast.errors import InvalidArgumentError
from lorafast.hub import PathLike, resolve_model_path
from lorafast.progress import run_with_bar


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
    import numpy as np

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
    import numpy as np

    flat, dtype, shape, is_torch = _flat_input(A)
    raw = _core.quantize_4bit(
        flat, dtype, quant_type, blocksize, compress_statistics, torch_threads or default_torch_threads(), list(shape)
    )
    state: dict[str, Any] = {"absmax": raw["absmax"], "quant_map": raw["quant_map"]}
    if compress_statistics:
        state["nested_absmax"] = raw["nested_absmax"]
        state["nested_quant_map"] = raw["nested_quant_map"]
    # The core writes the quant state's JSON; bitsandbytes stores it as uint8 (pack_dict_to_tensor).
    state[f"quant_state.bitsandbytes__{quant_type}"] = np.frombuffer(raw["quant_state"].encode(), dtype=np.uint8).copy()
    packed = raw["packed"].reshape(-1, 1)
    if is_torch:
        import torch

        packed = torch.from_numpy(packed)
        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return packed, state


def _to_numpy(x: Any) -> np.ndarray:
    import numpy as np

    if type(x).__module__.startswith("torch"):
        return x.detach().to("cpu").contiguous().numpy()
    return np.asarray(x)


def _read_state(state: Any) -> dict[str, Any]:
    """A QuantState, or its as_dict(packed=True) form, as plain values."""
    import numpy as np

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
    meta = _core.parse_quant_state(bytes(_to_numpy(state[key]).astype(np.uint8))) if key else {}
    out = {**meta, **{k.split(".")[-1]: v for k, v in state.items() if k != key}}
    out["absmax"] = _to_numpy(out["absmax"])
    return out


def dequantize_4bit(packed: Any, state: Any) -> Any:
    """Dequantize exactly as ``bitsandbytes.functional.dequantize_4bit`` (CPU): ``table[code] * absmax``
    in f32, rounded to the state's dtype. Takes a state dict or a bitsandbytes ``QuantState``."""
    import numpy as np

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
        dtype,
    )
    if type(packed).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    return raw.view(np_dtype).reshape(shape)


# --- whole checkpoints ------------------------------------------------------------------------


# Quantization and dequantization run through the merge engine and report as a merge does.
QuantizeReport = MergeReport


def plan_targets(base: PathLike, skip_modules: Optional[Sequence[str]] = None) -> Optional[list[tuple[str, bool]]]:
    """The weights transformers would quantize (``(name, is_conv1d)``), decided by transformers itself
    on a meta-device model (no memory, no weights): exactly ``nn.Linear`` and ``Conv1D`` modules minus
    ``get_modules_to_not_convert`` (output embeddings, tied weights, the last module, ``_keep_in_fp32_modules``,
    ``llm_int8_skip_modules``). None when transformers is not installed (a name-based rule is used then)."""
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return None
    config = transformers.AutoConfig.from_pretrained(os.fspath(base))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        return None
    with torch.device("meta"):
        model = cls(config)
    skips = list(skip_modules) if skip_modules else None
    not_convert = HfQuantizer.get_modules_to_not_convert(model, skips, model._keep_in_fp32_modules)
    targets = []
    for name, module in model.named_modules():
        if not should_convert_module(name, not_convert):
            continue
        if isinstance(module, Conv1D) or type(module) is torch.nn.Linear:
            targets.append((f"{name}.weight", isinstance(module, Conv1D)))
    return targets


# Architectures whose linear layers the name rule (in Rust) finds exactly as transformers does; the
# tests check it against transformers' own plan for the ones they build.
NAME_PLAN_MODEL_TYPES = frozenset(
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 phi phi3 gpt2 gpt_neox gptj falcon bert "
    "roberta opt bloom stablelm starcoder2 olmo olmo2 granite cohere".split()
)


def quantize(
    base: PathLike,
    out: PathLike,
    *,
    plan: str = "auto",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[str] = None,
    skip_modules: Optional[Sequence[str]] = None,
    torch_threads: Optional[int] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
    targets: Optional[Sequence[tuple[str, bool]]] = None,
    keep_heads: bool = False,
) -> QuantizeReport:
    """Write a pre-quantized 4-bit checkpoint, byte-identical to what
    ``AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    ...), device_map="cpu").save_pretrained(out)`` writes, without loading the model.

    Args:
        base: model folder (safetensors), or a Hub id.
        out: output folder (written beside it in a temporary folder, renamed when complete).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: 32 ... 4096 (bitsandbytes' choices); 64 is QLoRA's.
        double_quant: quantize the absmax too (``bnb_4bit_use_double_quant``).
        compute_dtype: ``bnb_4bit_compute_dtype`` in the config (default: the base's dtype).
        skip_modules: modules left unquantized (``llm_int8_skip_modules``), on top of transformers'
            defaults (output head, tied weights).
        plan: how the weights to quantize are found: ``"names"`` (a name rule, no torch import),
            ``"transformers"`` (transformers' own rules on a meta-device model: exact for any
            architecture, but imports torch), ``"auto"`` (names for known architectures).
        torch_threads: the torch thread count whose summation order the double-quant offset follows.
        threads: worker threads.
        keep_heads: also keep the output layer and every task head (``classifier``, ``score``, ...) in full
            precision and list them in ``llm_int8_skip_modules``, so that the checkpoint loads under a task
            class whose head is new (what ``lorafast train --qlora`` quantizes for). The file then differs
            from transformers' default quantization of the same model.

    Example:
        >>> import lorafast
        >>> lorafast.quantize("llama-1b", "llama-1b-nf4")  # doctest: +SKIP
        >>> # AutoModelForCausalLM.from_pretrained("llama-1b-nf4") loads it in 4-bit.
    """
    base = resolve_model_path(base)
    skips = list(skip_modules or [])
    if plan not in ("auto", "names", "transformers"):
        raise InvalidArgumentError(f"plan {plan!r}: use auto, names or transformers")
    if targets is None:
        targets = quantize_plan(base, plan, skips)
    return run_with_bar(
        "quantize",
        progress,
        lambda bar: _core.quantize_checkpoint(
            base,
            os.fspath(out),
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            targets=None if targets is None else list(targets),
            # With skips, transformers adds no default ones; keep the output head unquantized explicitly.
            skip_modules=(["lm_head"] + [s for s in skips if s != "lm_head"]) if skips else [],
            keep_heads=keep_heads,
            torch_threads=torch_threads or default_torch_threads(),
            threads=threads,
            overwrite=overwrite,
            progress=bar,
        ),
    )


def quantize_plan(base: str, plan: str = "auto", skips: Sequence[str] = ()) -> Optional[list[tuple[str, bool]]]:
    """The weights to quantize when the core's name rule is not the answer: transformers' plan for
    ``plan="transformers"``, or for ``"auto"`` with an architecture the name rule is not checked on.
    None: the core decides by name."""
    if plan == "transformers" or (plan == "auto" and _model_type(base) not in NAME_PLAN_MODEL_TYPES):
        return plan_targets(base, list(skips) + ["lm_head"] if skips else None)
    return None


def _model_type(base: str) -> Optional[str]:
    """config.json's model_type, to choose the plan (a missing config is the core's to report)."""
    try:
        return json.loads((Path(base) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def dequantize(
    qdir: PathLike,
    out: PathLike,
    *,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> QuantizeReport:
    """Turn a pre-quantized 4-bit checkpoint back into a normal one: each weight equals
    ``bitsandbytes.functional.dequantize_4bit`` of it (in the quant state's dtype, or ``dtype``)."""
    return run_with_bar(
        "dequantize",
        progress,
        lambda bar: _core.dequantize_checkpoint(
            os.fspath(qdir), os.fspath(out), dtype=dtype, threads=threads, overwrite=overwrite, progress=bar
        ),
    )
