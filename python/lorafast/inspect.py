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

    A LoRA on a fused experts parameter (PEFT's ``target_parameters``) has ``param`` set (``"gate_up_proj"``)
    and ``expert_norms``: ``||scaling * B_e A_e||_F`` for each expert e, which experts the adapter moved; its
    ``delta_norm`` is the norm of all experts' deltas together. Module LoRAs have ``param=None`` and no
    ``expert_norms``.

    Example:
        >>> m = next(m for m in inspect_adapter("moe-adapter")["modules"] if m["param"])  # doctest: +SKIP
        >>> m["module"], m["param"], len(m["expert_norms"])  # doctest: +SKIP
        ('model.layers.1.mlp.experts', 'gate_up_proj', 8)
    """
    info = _core.inspect_adapter(os.fspath(path))
    info["config"] = json.loads(info["config"])
    info["modules"].sort(key=lambda m: -m["delta_norm"])
    return info


def is_adapter(path: Union[str, os.PathLike[str]]) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "adapter_config.json"))
