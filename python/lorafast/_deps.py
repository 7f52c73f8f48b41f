"""Optional dependencies: checked before any work starts, so a missing one is one clear line naming the
package and how to install it, not an import error halfway through."""

from __future__ import annotations

import importlib.util

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
}

TRAINING = ("torch", "transformers", "peft", "accelerate")
INFERENCE = ("torch", "transformers", "peft")


def _installed(module: str) -> bool:
    """Whether `module` can be found, without importing it (torch takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked with None in sys.modules
        return False


def require(what: str, *modules: str) -> None:
    """Raise MissingDependencyError naming every package of `modules` that cannot be imported.

    Example:
        >>> require("lorafast experiment", "matplotlib")  # doctest: +SKIP
    """
    missing = [m for m in modules if not _installed(m)]
    if not missing:
        return
    pips = [_PACKAGES.get(m, (m, None))[0] for m in missing]
    extras = sorted({e for m in missing if (e := _PACKAGES.get(m, (m, None))[1])})
    how = f"pip install 'lorafast[{','.join(extras)}]'" if extras else f"pip install {' '.join(pips)}"
    names = ", ".join(pips)
    verb = "is" if len(pips) == 1 else "are"
    raise MissingDependencyError(
        f"{what} needs {names}, which {verb} not installed: {how} (or pip install {' '.join(pips)})"
    )
