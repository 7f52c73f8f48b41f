from os import PathLike
from typing import Any, Callable, Optional, Sequence, Union

_Path = Union[str, PathLike[str]]

__version__: str
__all__ = ["__version__", "merge", "inspect_checkpoint", "inspect_adapter"]

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
) -> dict[str, Any]: ...
def inspect_checkpoint(path: _Path) -> dict[str, Any]: ...
def inspect_adapter(path: _Path) -> dict[str, Any]: ...
