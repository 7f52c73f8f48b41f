"""Optional dependencies: checked before any work starts, so a missing one is one clear line naming the
package and how to install it, not an import error halfway through."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Iterator

from lorafast.errors import MissingDependencyError

# Import name -> the pip name and the lorafast extra that brings it.
_PACKAGES = {
    "torch": ("torch", "torch"),
    "transformers": ("transformers", "torch"),
    "peft": ("peft", "torch"),
    "accelerate": ("accelerate", "torch"),
    "bitsandbytes": ("bitsandbytes", "torch"),
    "matplotlib": ("matplotlib", "torch"),
    "gguf": ("gguf", "gguf"),
    "sentencepiece": ("sentencepiece", "gguf"),
    "google.protobuf": ("protobuf", "gguf"),
}

TRAINING = ("torch", "transformers", "peft", "accelerate")
INFERENCE = ("torch", "transformers", "peft")


def _installed(module: str) -> bool:
    """Whether `module` can be found, without importing it (torch takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked with None in sys.modules
        return False


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what imports print to stderr (bitsandbytes announces the kernels it could not fetch): the
    check's own outcome is the one line the user sees."""
    # The file descriptor, not the sys.stderr object: a logging handler made during the import keeps the
    # object, which stays valid.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_error(module: str) -> str | None:
    """Why `module`, which is installed, fails to import (a broken install), or None if it imports."""
    try:
        with _quiet_stderr():
            importlib.import_module(module)
    except Exception as e:  # a broken install can raise anything, not only ImportError
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def require(what: str, *modules: str, find_only: tuple[str, ...] = ()) -> None:
    """Raise MissingDependencyError naming every package of `modules` that is missing or fails to import.

    Each module is imported here, before any work starts (the work imports it anyway), so a broken install
    ends in one line now rather than after a training; `find_only` modules, which the work may not need,
    are only looked up (transformers takes seconds to import).

    Example:
        >>> require("lorafast experiment", "matplotlib")  # doctest: +SKIP
    """
    missing = [m for m in modules if not _installed(m)]
    if not missing:
        for m in modules:
            why = None if m in find_only else _import_error(m)
            if why is not None:
                pip = _PACKAGES.get(m, (m, None))[0]
                raise MissingDependencyError(
                    f"{what} needs {pip}, which is installed but fails to import ({why}): "
                    f"reinstall it with pip install --force-reinstall {pip}"
                )
        return
    pips = [_PACKAGES.get(m, (m, None))[0] for m in missing]
    extras = sorted({e for m in missing if (e := _PACKAGES.get(m, (m, None))[1])})
    how = f"pip install 'lorafast[{','.join(extras)}]'" if extras else f"pip install {' '.join(pips)}"
    names = ", ".join(pips)
    verb = "is" if len(pips) == 1 else "are"
    raise MissingDependencyError(
        f"{what} needs {names}, which {verb} not installed: {how} (or pip install {' '.join(pips)})"
    )
