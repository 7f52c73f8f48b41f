from os import PathLike
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]

__version__: str
__all__ = [
    "__version__",
    "merge",
    "combine",
    "extract",
    "resize",
    "check_output",
    "inspect_checkpoint",
    "inspect_adapter",
    "quantize_4bit",
    "dequantize_4bit",
    "dequantize_nested",
    "quantize_checkpoint",
    "dequantize_checkpoint",
]

def merge(
    base: _Path,
    adapters: Sequence[_Path],
    out: _Path,
    *,
    weights: Optional[Sequence[float]] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    safe_merge: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
    f32_outputs: Sequence[str] = ...,
) -> dict[str, Any]: ...
def combine(
    adapters: Sequence[_Path],
    out: _Path,
    *,
    weights: Sequence[float],
    method: str,
    density: Optional[float] = None,
    rank: Optional[int] = None,
    majority_sign: str = "total",
    seed: int = 0,
    svd_clamp: Optional[float] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    allow_different_bases: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> dict[str, Any]: ...
def extract(
    base: _Path,
    tuned: _Path,
    out: _Path,
    *,
    rank: int,
    energy: Optional[float] = None,
    targets: Optional[Sequence[str]] = None,
    modules_to_save: bool = False,
    dtype: Optional[str] = None,
    oversample: Optional[int] = None,
    tol: Optional[float] = None,
    max_iters: Optional[int] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> dict[str, Any]: ...
def resize(
    adapter: _Path,
    out: _Path,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> dict[str, Any]: ...
def check_output(out: _Path, inputs: Sequence[_Path], *, overwrite: bool = False) -> Path: ...
def inspect_checkpoint(path: _Path) -> dict[str, Any]: ...
def inspect_adapter(path: _Path) -> dict[str, Any]: ...
def quantize_4bit(
    data: npt.NDArray[Any], dtype: str, quant_type: str, blocksize: int, double_quant: bool, torch_threads: int
) -> dict[str, Any]: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8], absmax: npt.NDArray[np.float32], quant_type: str, blocksize: int, n: int, dtype: str
) -> npt.NDArray[np.uint8]: ...
def dequantize_nested(
    codes: npt.NDArray[np.uint8], nested_absmax: npt.NDArray[np.float32], offset: float, code: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]: ...
def quantize_checkpoint(
    base: _Path,
    out: _Path,
    *,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: str,
    targets: Optional[Sequence[tuple[str, bool]]] = None,
    skip_modules: Sequence[str] = ...,
    keep_heads: bool = False,
    torch_threads: int = 1,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> dict[str, Any]: ...
def dequantize_checkpoint(
    qdir: _Path,
    out: _Path,
    *,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
    only: Optional[Sequence[str]] = None,
) -> dict[str, Any]: ...
