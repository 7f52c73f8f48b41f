"""Model and adapter names: a local folder as it is, or a Hugging Face Hub id fetched into the hub cache."""

from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

# Files worth fetching from the hub: weights as safetensors only (never pickles), configs, tokenizers.
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.py"]


def resolve_model_path(path: PathLike) -> str:
    """A local folder as it is; otherwise a Hugging Face Hub id (``org/name``) fetched into the hub
    cache with ``huggingface_hub.snapshot_download`` (safetensors and small files only; honours
    ``HF_HUB_OFFLINE`` and ``HF_HOME``)."""
    text = os.fspath(path)
    if os.path.exists(text) or text.count("/") != 1 or text.startswith((".", "/")):
        return text
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return text  # the Rust side will say the folder does not exist
    try:
        return snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        from lorafast.errors import FileMissingError

        raise FileMissingError(f"{text}: not a local folder, and not found on the Hugging Face Hub ({e})") from None
