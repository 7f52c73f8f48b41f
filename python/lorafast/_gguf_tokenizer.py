"""The byte-level BPE tokenizer `AutoTokenizer.from_pretrained` would load, read with the `tokenizers`
library alone, for the GGUF vocabulary: transformers imports torch (seconds and hundreds of MB) where
tokenizer.json takes a fraction of a second.

It is used only where transformers 5 is known to end up with tokenizer.json's own tokenizer: a class that
loads the file as it is (`PreTrainedTokenizerFast` / `TokenizersBackend`), or one that rebuilds the
pipeline (`GPT2Tokenizer`, `Qwen2Tokenizer`) where the file's pipeline is the one the class builds; every
special token the config names (or the class defaults to) already an added special token of the file; no
setting that changes the post-processor, the special-token splitting or the decoding. Anything else goes
to transformers (`load` returns None). tests/test_gguf.py checks the two agree on tokenizers of each kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

# tokenizer_config.json keys that do not change what the vocabulary export reads (the tokens, their added /
# special / normalized flags, the ids of a text with special tokens, the decoding of an added token).
_INERT_KEYS = frozenset(
    {
        "add_prefix_space",
        "backend",
        "errors",
        "model_max_length",
        "tokenizer_class",
        "chat_template",
        "padding_side",
        "truncation_side",
        "model_input_names",
        "is_local",
        "local_files_only",
        "name_or_path",
        "clean_up_tokenization_spaces",
        "split_special_tokens",
        "added_tokens_decoder",
        "extra_special_tokens",
        "additional_special_tokens",
        *("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"),
    }
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_FILE_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# transformers 5's Qwen2Tokenizer pre-tokenizer (models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX).
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Model types whose tokenizers transformers patches (`_patch_mistral_regex`) when their vocabulary is large.
_MISTRAL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


class _Tokenizer:
    """The part of a transformers tokenizer the GGUF vocabulary reads, over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
        self.added_tokens_decoder: dict[int, Any] = tok.get_added_tokens_decoder()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}


def _class_pipeline(tokenizer_class: str, add_prefix_space: bool) -> Optional[tuple[dict[str, Any], dict]]:
    """The pipeline (normalizer, pre-tokenizer, decoder, model settings) a transformers class builds, as
    tokenizers serializes it, and the special tokens it defaults to; None for a class not known here."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    name = tokenizer_class.removesuffix("Fast")
    if name == "GPT2Tokenizer":
        tok = Tokenizer(BPE(vocab={}, merges=[], dropout=None, continuing_subword_prefix="", end_of_word_suffix=""))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()
        end = "<|endoftext|>"
        return _pipeline(json.loads(tok.to_str())), {"unk_token": end, "bos_token": end, "eos_token": end}
    if name == "Qwen2Tokenizer":
        tok = Tokenizer(
            BPE(vocab={}, merges=[], dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        )
        tok.decoder = decoders.ByteLevel()
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
        end = "<|endoftext|>"
        return _pipeline(json.loads(tok.to_str())), {"unk_token": end, "eos_token": end, "pad_token": end}
    return None


def _pipeline(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    model = {k: v for k, v in tokenizer_json["model"].items() if k not in ("vocab", "merges")}
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        model[key] = model.get(key) or ""  # None and "" are the same affix
    return {
        "normalizer": tokenizer_json.get("normalizer"),
        "pre_tokenizer": tokenizer_json.get("pre_tokenizer"),
        "decoder": tokenizer_json.get("decoder"),
        "model": model,
    }


def _content(token: Any) -> Optional[str]:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return str(token["content"])
    raise ValueError("not a token")


def load(model_dir: Path) -> Optional[_Tokenizer]:
    """tokenizer.json as AutoTokenizer would load it, or None where that is not known to hold."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    file, config_file = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    if not file.is_file() or not config_file.is_file():
        return None
    if any((model_dir / f).exists() for f in ("tokenizer.model", "added_tokens.json", "tekken.json")):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(file))
        model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except Exception:  # unreadable or not JSON: transformers gives the error
        return None
    if not isinstance(config, dict) or not isinstance(model_config, dict) or not set(config) <= _INERT_KEYS:
        return None
    if config.get("clean_up_tokenization_spaces") or config.get("split_special_tokens"):
        return None
    serialized = json.loads(tok.to_str())
    if serialized["model"].get("type") != "BPE" or serialized.get("decoder", {}).get("type") != "ByteLevel":
        return None
    if tok.get_vocab_size() > 100000 and model_config.get("model_type") in _MISTRAL_TYPES:
        return None
    tokenizer_class = config.get("tokenizer_class")
    add_prefix_space = config.get("add_prefix_space")
    defaults: dict = {}
    if tokenizer_class not in _FILE_CLASSES:
        if not isinstance(tokenizer_class, str) or not isinstance(add_prefix_space, (bool, type(None))):
            return None
        built = _class_pipeline(tokenizer_class, bool(add_prefix_space))
        if built is None or built[0] != _pipeline(serialized):
            return None
        defaults = built[1]
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    try:
        named = [_content(config.get(k, defaults.get(k))) for k in _SPECIAL_KEYS]
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        if not isinstance(extra, list):
            return None
        named += [_content(t) for t in extra]
    except ValueError:
        return None
    # A special token that is not yet an added special token of the file: transformers would add it.
    if any(t is not None and (t not in added or not added[t].special) for t in named):
        return None
    saved = config.get("added_tokens_decoder") or {}
    for key, entry in saved.items():
        ours = tok.get_added_tokens_decoder().get(int(key))
        fields = ("content", "special", "normalized", "lstrip", "rstrip", "single_word")
        if ours is None or any(entry.get(f) != getattr(ours, f) for f in fields):
            return None
    return _Tokenizer(tok)
