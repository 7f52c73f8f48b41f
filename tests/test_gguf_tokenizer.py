"""The GGUF vocabulary read without transformers (`lorafast._gguf_tokenizer`) is what AutoTokenizer
loads, token for token and flag for flag, for every tokenizer it takes; the rest go to transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import transformers
from conftest import with_minilm_tokenizer
from tokenizers import AddedToken, Tokenizer, processors

from lorafast import _gguf_tokenizer
from lorafast._gguf_pretokenizers import CHKTXT

END = "<|endoftext|>"


def summary(tok: Any) -> dict[str, Any]:
    """Everything `gguf._vocab_base` reads of a tokenizer."""
    decoder = tok.added_tokens_decoder
    return dict(
        vocab=tok.vocab,
        ids=tok.encode(CHKTXT),
        specials=tok.encode(f"<|im_start|>hello_world  spaced{END} normword"),
        added=tok.get_added_vocab(),
        flags={i: (t.content, t.special, t.normalized) for i, t in decoder.items()},
        decoded={i: tok.decode(tok.encode(t.content, add_special_tokens=False)) for i, t in decoder.items()},
    )


def variant(
    gpt2: Path,
    folder: Path,
    config: Optional[dict[str, Any]] = None,
    edit: Optional[Callable[[Tokenizer], None]] = None,
) -> Path:
    """GPT-2's tokenizer folder with tokenizer_config.json keys set (None: removed) and tokenizer.json edited."""
    shutil.copytree(gpt2, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if edit is not None:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        edit(tok)
        tok.save(str(folder / "tokenizer.json"))
    return folder


def bos_template(tok: Tokenizer) -> None:
    """A Llama-3-style post-processor that puts a BOS before every text."""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{END} $A", pair=f"{END} $A $B", special_tokens=[(END, tok.token_to_id(END))]
    )


def added_tokens(tok: Tokenizer) -> None:
    tok.add_tokens([AddedToken("normword", normalized=True), AddedToken("<|think|>", normalized=False)])
    tok.add_special_tokens(["<|im_start|>"])


def saved_by_transformers(gpt2: Path, folder: Path) -> Path:
    """Added, special and extra special tokens through transformers' own API, then save_pretrained."""
    tok = transformers.AutoTokenizer.from_pretrained(gpt2)
    tok.add_tokens(["hello_world", AddedToken("  spaced", normalized=False)])
    tok.add_special_tokens({"pad_token": "<|pad|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return folder


def qwen2_class(gpt2: Path, folder: Path) -> Path:
    """A Qwen2Tokenizer (its own pre-tokenizer, NFC, special-token defaults) over GPT-2's vocabulary."""
    model = json.loads((gpt2 / "tokenizer.json").read_text())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return folder


LIGHT: dict[str, Callable[[Path, Path], Path]] = {
    "gpt2": lambda g, f: variant(g, f),
    "fast-class": lambda g, f: variant(g, f, {"tokenizer_class": "PreTrainedTokenizerFast"}),
    "llama3-style-bos": lambda g, f: variant(g, f, {"tokenizer_class": "PreTrainedTokenizerFast"}, bos_template),
    "gpt2-class-bos-template": lambda g, f: variant(g, f, None, bos_template),
    "added-tokens-in-file": lambda g, f: variant(g, f, {"tokenizer_class": "TokenizersBackend"}, added_tokens),
    "added-tokens-rebuilt-class": lambda g, f: variant(g, f, None, added_tokens),
    "saved-by-transformers": saved_by_transformers,
    "qwen2-class": qwen2_class,
}

TO_TRANSFORMERS: dict[str, Callable[[Path, Path], Path]] = {
    "add-bos-token": lambda g, f: variant(g, f, {"add_bos_token": True}),
    "unknown-key": lambda g, f: variant(g, f, {"legacy": False}),
    "no-class": lambda g, f: variant(g, f, {"tokenizer_class": None}),
    "pad-not-an-added-token": lambda g, f: variant(g, f, {"pad_token": "<pad>"}),
    "prefix-space-not-the-files": lambda g, f: variant(g, f, {"add_prefix_space": True}),
    "qwen2-class-gpt2-pipeline": lambda g, f: variant(g, f, {"tokenizer_class": "Qwen2Tokenizer"}),
    "split-special-tokens": lambda g, f: variant(g, f, {"split_special_tokens": True}),
    "wordpiece": lambda g, f: with_minilm_tokenizer(variant(g, f)),
}


@pytest.mark.parametrize("case", LIGHT)
def test_light_tokenizer_is_what_transformers_loads(gpt2_tokenizer_dir, tmp_path, case):
    folder = LIGHT[case](gpt2_tokenizer_dir, tmp_path / case)
    ours = _gguf_tokenizer.load(folder)
    assert ours is not None, case
    theirs = summary(transformers.AutoTokenizer.from_pretrained(folder))
    mine = summary(ours)
    for key in mine:
        assert mine[key] == theirs[key], key


@pytest.mark.parametrize("case", TO_TRANSFORMERS)
def test_tokenizers_not_known_to_load_the_same_go_to_transformers(gpt2_tokenizer_dir, tmp_path, case):
    folder = TO_TRANSFORMERS[case](gpt2_tokenizer_dir, tmp_path / case)
    assert _gguf_tokenizer.load(folder) is None
    if case == "pad-not-an-added-token":
        # (the reason: transformers adds the pad token, so the vocabulary grows)
        assert "<pad>" in transformers.AutoTokenizer.from_pretrained(folder).get_added_vocab()
