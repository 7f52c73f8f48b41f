"""lorafast's exceptions. Every message names the file, tensor or module and says what is wrong.

All derive from :class:`LorafastError`; IO failures also derive from the matching built-in
(``FileNotFoundError``, ``PermissionError``, ``OSError``) and argument problems from ``ValueError``.
"""

from __future__ import annotations


class LorafastError(Exception):
    """Base class of every error lorafast raises on bad input."""


class CheckpointError(LorafastError):
    """A safetensors file or JSON file that is truncated, corrupt or inconsistent."""


class AdapterError(LorafastError):
    """An adapter folder or adapter_config.json that cannot be used."""


class UnsupportedError(LorafastError):
    """Something lorafast deliberately does not handle (a PEFT type, a LoRA variant, pickle files)."""


class ShapeMismatchError(LorafastError, ValueError):
    """Adapter tensors whose shapes do not fit the base weights they target."""


class NonFiniteError(LorafastError, ValueError):
    """The merge produced NaN or Inf (raised with safe_merge)."""


class OutputError(LorafastError):
    """The output path is unusable: it exists, or overlaps an input."""


class InvalidArgumentError(LorafastError, ValueError):
    """A bad argument: weights count, dtype name, thread count..."""


class MissingDependencyError(LorafastError, ImportError):
    """An optional package a command needs (torch, transformers, peft, bitsandbytes, matplotlib) is missing."""


class FileMissingError(LorafastError, FileNotFoundError):
    """An input file or folder does not exist."""


class FilePermissionError(LorafastError, PermissionError):
    """An input or output cannot be accessed."""


class LorafastIOError(LorafastError, OSError):
    """Any other operating-system error while reading or writing."""


__all__ = [
    "LorafastError",
    "CheckpointError",
    "AdapterError",
    "UnsupportedError",
    "ShapeMismatchError",
    "NonFiniteError",
    "OutputError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "FileMissingError",
    "FilePermissionError",
    "LorafastIOError",
]
