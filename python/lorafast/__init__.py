"""lorafast: fast, exact LoRA tools for safetensors checkpoints, with a Rust core.

>>> import lorafast
>>> report = lorafast.merge("base-model", ["my-adapter"], "merged")  # doctest: +SKIP
>>> report.tensors_merged  # doctest: +SKIP
154
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafast._core import __version__
from lorafast.arith import ArithReport, ModuleReport, combine, extract, resize
from lorafast.errors import LorafastError
from lorafast.inspect import inspect_adapter, inspect_checkpoint
from lorafast.merge import MergeReport, TensorReport, merge
from lorafast.quant import QuantizeReport, dequantize, quantize

if TYPE_CHECKING:
    from lorafast.train.multi import load

__all__ = [
    "load",
    "__version__",
    "merge",
    "MergeReport",
    "TensorReport",
    "combine",
    "extract",
    "resize",
    "ArithReport",
    "ModuleReport",
    "quantize",
    "dequantize",
    "QuantizeReport",
    "inspect_checkpoint",
    "inspect_adapter",
    "LorafastError",
]


def __getattr__(name: str) -> object:
    # The training layer is imported on first use, not by every `lorafast` command (tens of ms).
    if name == "load":
        from lorafast.train.multi import load

        return load
    raise AttributeError(f"module 'lorafast' has no attribute {name!r}")
