"""What is in a checkpoint or adapter folder."""

from __future__ import annotations

import json
import os
from typing import Any, Union

from lorafast import _core


def inspect_checkpoint(path: Union[str, os.PathLike[str]]) -> dict[str, Any]:
    """Tensors, dtypes, shapes and sizes of a safetensors model folder.

    Example:
        >>> info = inspect_checkpoint("llama-1b")  # doctest: +SKIP
        >>> info["parameters"], info["total_bytes"]  # doctest: +SKIP
    """
    return _core.inspect_checkpoint(os.fspath(path))


def inspect_adapter(path: Union[str, os.PathLike[str]]) -> dict[str, Any]:
    """An adapter's config, trainable parameter count, file size, and per-module ``||scaling * B A||_F``
    (sorted, largest first: the modules the adapter changes most).
    """
    info = _core.inspect_adapter(os.fspath(path))
    info["config"] = json.loads(info["config"])
    info["modules"].sort(key=lambda m: -m["delta_norm"])
    return info


def is_adapter(path: Union[str, os.PathLike[str]]) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "adapter_config.json"))
