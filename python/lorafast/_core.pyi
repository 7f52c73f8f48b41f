from os import PathLike
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union, final

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]

__version__: str
TOKENIZER_FILES: list[str]
__all__ = [
    "__version__",
    "TOKENIZER_FILES",
    "MergeReport",
    "TensorReport",
    "ArithReport",
    "ModuleReport",
    "merge",
    "combine",
    "extract",
    "resize",
    "check_output",
    "inspect_checkpoint",
    "inspect_adapter",
    "quantize_4bit",
    "dequantize_4bit",
    "float8_e4m3_encode",
    "float8_e4m3_decode",
    "fp8_quantize_blocks",
    "fp8_dequantize_blocks",
    "mxfp4_dequantize",
    "dequantize_nested",
    "parse_quant_state",
    "quantize_checkpoint",
    "dequantize_checkpoint",
    "GgufReport",
    "gguf_architectures",
    "gguf_not_runnable",
    "gguf_plan",
    "gguf_write",
    "gguf_encode_rows",
    "gguf_lora_plan",
    "gguf_lora_write",
]

@final
class TensorReport:
    """What the merge kept of one merged weight."""

    @property
    def name(self) -> str: ...
    @property
    def delta_norm(self) -> float: ...
    @property
    def weight_norm(self) -> float: ...
    @property
    def ratio(self) -> float: ...
    @property
    def retention(self) -> float: ...
    @property
    def relative_error(self) -> float: ...

@final
class MergeReport:
    """What a merge (or a quantization / dequantization) did."""

    @property
    def output(self) -> Path: ...
    @property
    def tensors_total(self) -> int: ...
    @property
    def tensors_merged(self) -> int: ...
    @property
    def tensors_replaced(self) -> int: ...
    @property
    def tensors_added(self) -> int: ...
    @property
    def tensors_copied(self) -> int: ...
    @property
    def tensors_quantized(self) -> int: ...
    @property
    def tensors_dequantized(self) -> int: ...
    @property
    def elements_quantized(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def nonfinite_values(self) -> int: ...
    @property
    def warnings(self) -> list[str]: ...
    @property
    def tensors(self) -> list[TensorReport]: ...

@final
class ModuleReport:
    """What one module of a combined, extracted or resized adapter became."""

    @property
    def module(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def energy(self) -> Optional[float]: ...

@final
class ArithReport:
    """What combine, extract or resize wrote."""

    @property
    def output(self) -> Path: ...
    @property
    def modules(self) -> list[ModuleReport]: ...
    @property
    def saved_tensors(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def warnings(self) -> list[str]: ...
    def energy_summary(self) -> Optional[dict[str, float]]: ...

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
    requantize: bool = False,
    quantize: Optional[str] = None,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[str] = None,
    targets: Optional[Sequence[tuple[str, bool]]] = None,
    skip_modules: Sequence[str] = ...,
    torch_threads: int = 1,
    stats: bool = True,
) -> MergeReport: ...
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
) -> ArithReport: ...
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
) -> ArithReport: ...
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
) -> ArithReport: ...
def check_output(out: _Path, inputs: Sequence[_Path], *, overwrite: bool = False) -> Path: ...
def inspect_checkpoint(path: _Path) -> dict[str, Any]: ...
def inspect_adapter(path: _Path) -> dict[str, Any]: ...
def quantize_4bit(
    data: npt.NDArray[Any],
    dtype: str,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    torch_threads: int,
    shape: Sequence[int],
) -> dict[str, Any]: ...
def parse_quant_state(data: bytes) -> dict[str, Any]: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8], absmax: npt.NDArray[np.float32], quant_type: str, blocksize: int, n: int, dtype: str
) -> npt.NDArray[np.uint8]: ...
def float8_e4m3_encode(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]: ...
def float8_e4m3_decode(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]: ...
def fp8_quantize_blocks(
    values: npt.NDArray[np.float32], rows: int, cols: int, block: tuple[int, int], scale_fmt: str = "float"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def mxfp4_dequantize(
    blocks: npt.NDArray[np.uint8], scales: npt.NDArray[np.uint8], bytes: int
) -> npt.NDArray[np.float32]: ...
def fp8_dequantize_blocks(
    codes: npt.NDArray[np.uint8], rows: int, cols: int, block: tuple[int, int], inv_scales: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]: ...
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
    compute_dtype: Optional[str] = None,
    targets: Optional[Sequence[tuple[str, bool]]] = None,
    skip_modules: Sequence[str] = ...,
    keep_heads: bool = False,
    torch_threads: int = 1,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> MergeReport: ...
def dequantize_checkpoint(
    qdir: _Path,
    out: _Path,
    *,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> MergeReport: ...

@final
class GgufReport:
    """What a GGUF write did."""

    @property
    def output(self) -> Path: ...
    @property
    def tensors(self) -> int: ...
    @property
    def types(self) -> list[tuple[str, int]]: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def nonfinite_values(self) -> int: ...
    @property
    def warnings(self) -> list[str]: ...

def gguf_architectures() -> list[str]: ...
def gguf_not_runnable() -> list[tuple[str, str]]: ...
def gguf_plan(
    base: _Path,
    adapters: Sequence[_Path],
    *,
    file_type: str,
    weights: Optional[Sequence[float]] = None,
    extra: Sequence[tuple[str, Sequence[float]]] = ...,
) -> tuple[str, str, str, list[tuple[str, list[int], str]], Optional[str]]: ...
def gguf_write(
    base: _Path,
    adapters: Sequence[_Path],
    out: _Path,
    kv: bytes,
    n_kv: int,
    *,
    file_type: str,
    weights: Optional[Sequence[float]] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    safe_merge: bool = False,
    extra: Sequence[tuple[str, Sequence[float]]] = ...,
    progress: Optional[Callable[[str, int], Any]] = None,
) -> GgufReport: ...
def gguf_encode_rows(values: npt.NDArray[np.float32], row_len: int, ggml_type: str) -> bytes: ...
def gguf_lora_plan(
    adapter: _Path, base: _Path, *, file_type: str
) -> tuple[str, float, list[tuple[str, list[int], str]]]: ...
def gguf_lora_write(
    adapter: _Path,
    base: _Path,
    out: _Path,
    kv: bytes,
    n_kv: int,
    *,
    file_type: str,
    overwrite: bool = False,
) -> GgufReport: ...
