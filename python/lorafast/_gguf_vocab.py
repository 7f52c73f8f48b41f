"""`gguf.SpecialVocab` as llama.cpp's own gguf-py has it (the copy vendored in llama-cpp-python 0.3.36,
`gguf-py/gguf/vocab.py`, MIT licence, (c) the ggml authors). PyPI's `gguf` 0.19.0 carries the same
version number but older code: it does not write the tokenizer's normalizer flags and reads
post-processors differently, so `convert_hf_to_gguf.py`'s output differs from what it gives. These three
methods are llama.cpp's, unchanged but for formatting; the rest is PyPI's class."""

# ruff: noqa: E501
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

logger = logging.getLogger("lorafast.gguf")

NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"


class SpecialVocab(gguf.SpecialVocab):
    normalizer_lowercase: bool | None
    normalizer_strip_accents: bool | None

    def __init__(self, *args, **kwargs):
        self.normalizer_lowercase = None
        self.normalizer_strip_accents = None
        super().__init__(*args, **kwargs)

    def add_to_gguf(self, gw: gguf.GGUFWriter, quiet: bool = False) -> None:
        if self.merges:
            if not quiet:
                logger.info(f"Adding {len(self.merges)} merge(s).")
            gw.add_token_merges(self.merges)
        elif self.load_merges:
            logger.warning("Adding merges requested but no merges found, output may be non-functional.")
        for typ, tokid in self.special_token_ids.items():
            id_handler: Any = getattr(gw, f"add_{typ}_token_id", None)
            if id_handler is None:
                logger.warning(f"No handler for special token type {typ} with id {tokid} - skipping")
                continue
            if not quiet:
                logger.info(f"Setting special token type {typ} to {tokid}")
            id_handler(tokid)
        for typ, value in self.add_special_token.items():
            add_handler: Any = getattr(gw, f"add_add_{typ}_token", None)
            if add_handler is None:
                logger.warning(f"No handler for add_{typ}_token with value {value} - skipping")
                continue
            if not quiet:
                logger.info(f"Setting add_{typ}_token to {value}")
            add_handler(value)
        if self.chat_template is not None:
            if not quiet:
                logger.info(f"Setting chat_template to {self.chat_template}")
            gw.add_chat_template(self.chat_template)
        if self.normalizer_lowercase is not None:
            if not quiet:
                logger.info(f"Setting normalizer_lowercase to {self.normalizer_lowercase}")
            gw.add_bool(NORMALIZER_LOWERCASE, self.normalizer_lowercase)
        if self.normalizer_strip_accents is not None:
            if not quiet:
                logger.info(f"Setting normalizer_strip_accents to {self.normalizer_strip_accents}")
            gw.add_bool(NORMALIZER_STRIP_ACCENTS, self.normalizer_strip_accents)

    def _parse_normalizer(self, normalizer: dict) -> None:
        # ref: https://huggingface.co/docs/tokenizers/api/normalizers
        #
        # Extracts normalizer flags from three possible formats:
        # 1. Standalone:           {"type": "Lowercase"}
        # 2. BertNormalizer attrs: {"type": "BertNormalizer", ...}
        # 3. Nested in Sequence:   {"type": "Sequence", "normalizers": [...]}

        normalizer_type = normalizer.get("type")
        if normalizer_type == "Lowercase":
            self.normalizer_lowercase = True
        elif normalizer_type == "StripAccents":
            self.normalizer_strip_accents = True
        elif normalizer_type == "BertNormalizer":
            if "lowercase" in normalizer:
                self.normalizer_lowercase = normalizer["lowercase"]
            if "strip_accents" in normalizer:
                self.normalizer_strip_accents = normalizer["strip_accents"]
        elif normalizer_type == "Sequence":
            for norm in normalizer.get("normalizers", []):
                self._parse_normalizer(norm)

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        tokenizer = None
        tokenizer_file = path / "tokenizer.json"
        if tokenizer_file.is_file():
            with open(tokenizer_file, encoding="utf-8") as f:
                tokenizer = json.load(f)
            if self.load_merges:
                merges = tokenizer.get("model", {}).get("merges")
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = merges
                    elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
                        # New format since transformers 4.45 to support spaces in merges
                        # ref: https://github.com/ggml-org/llama.cpp/issues/9692
                        # TODO: internally store as the new format instead of converting to old
                        if any(" " in s for pair in merges for s in pair):
                            logger.warning(f"Spaces in merges detected, encoding as {chr(ord(' ') + 256)!r}")
                        self.merges = [
                            " ".join(
                                [
                                    # ensure the spaces are properly encoded
                                    "".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                    for part in pair
                                ]
                            )
                            for pair in merges
                        ]
                    else:
                        raise ValueError("Unknown tokenizer merges format")
            # Parse normalizer configuration (e.g. Lowercase) into metadata
            if normalizer := tokenizer.get("normalizer"):
                self._parse_normalizer(normalizer)
            added_tokens = tokenizer.get("added_tokens", {})
        else:
            added_tokens = {}
        tokenizer_config = None
        tokenizer_config_file = path / "tokenizer_config.json"
        if tokenizer_config_file.is_file():
            with open(tokenizer_config_file, encoding="utf-8") as f:
                tokenizer_config = json.load(f)
        if tokenizer:
            special_bos = (tokenizer_config or {}).get("bos_token")
            special_cls = (tokenizer_config or {}).get("cls_token")
            special_eos = (tokenizer_config or {}).get("eos_token")
            special_sep = (tokenizer_config or {}).get("sep_token")
            if not special_bos and special_cls and tokenizer_config:
                tokenizer_config["bos_token"] = special_bos = special_cls
            if not special_eos and special_sep and tokenizer_config:
                tokenizer_config["eos_token"] = special_eos = special_sep
            if post_processor := tokenizer.get("post_processor"):
                for processor in post_processor.get("processors", [post_processor]):
                    processor_type = processor.get("type")
                    if processor_type == "ByteLevel":
                        self.add_special_token.setdefault("bos", False)
                        self.add_special_token.setdefault("eos", False)
                    elif processor_type == "RobertaProcessing":
                        self.add_special_token["bos"] = True
                        self.add_special_token["eos"] = True
                        self.add_special_token["sep"] = True
                        if not special_cls and tokenizer_config:
                            special_cls = processor.get("cls", [special_bos])[0]
                            tokenizer_config["cls_token"] = special_cls
                        if not special_sep and tokenizer_config:
                            special_sep = processor.get("sep", [special_eos])[0]
                            tokenizer_config["sep_token"] = special_sep
                        continue
                    # Crude parsing of TemplateProcessing to determine if BOS/SEP/EOS should be added
                    # Only works with simple templates, **will** get it wrong on unusual sequences
                    elif processor_type == "TemplateProcessing":
                        tmpl_single = processor.get("single", [])
                        tmpl_pair = processor.get("pair", [])
                        special_first = None
                        special_last = None
                        if len(tmpl_single) > 1:
                            if special_first := tmpl_single[0].get("SpecialToken", {}).get("id"):
                                if not tokenizer_config:
                                    special_bos = special_first
                                elif special_first not in (special_bos, special_cls):
                                    if not special_bos:
                                        tokenizer_config["bos_token"] = special_bos = special_first
                                    if not special_cls:
                                        tokenizer_config["cls_token"] = special_cls = special_first
                                self.add_special_token["bos"] = (
                                    True if special_first in (special_bos, special_cls) else False
                                )
                                if special_first not in (special_bos, special_cls):
                                    logger.warning(
                                        f"Unknown leading special token {special_first!r} in TemplateProcessing<single>"
                                    )
                            if special_last := tmpl_single[-1].get("SpecialToken", {}).get("id"):
                                if not tokenizer_config:
                                    special_eos = special_last
                                elif special_last != special_eos:
                                    if "eot" not in self.special_token_types:
                                        self.special_token_types = tuple(self.special_token_types) + ("eot",)
                                        tokenizer_config["eot_token"] = special_eos
                                    elif "eom" not in self.special_token_types:
                                        self.special_token_types = tuple(self.special_token_types) + ("eom",)
                                        tokenizer_config["eom_token"] = special_eos
                                    else:
                                        logger.warning(
                                            f"Overriding EOS token {special_eos!r} with {special_last!r} without EOT/EOM fallback!"
                                        )
                                    tokenizer_config["eos_token"] = special_eos = special_last
                                self.add_special_token["eos"] = True if special_last == special_eos else False
                                if special_last != special_eos:
                                    logger.warning(
                                        f"Unknown trailing special token {special_last!r} in TemplateProcessing<single>"
                                    )
                        if tmpl_pair:
                            seq_start = (
                                1
                                if special_first and tmpl_pair[0].get("SpecialToken", {}).get("id") == special_first
                                else 0
                            )
                            seq_stop = (
                                -1
                                if special_last and tmpl_pair[-1].get("SpecialToken", {}).get("id") == special_last
                                else None
                            )
                            if (special_first and seq_start == 0) or (special_last and seq_stop is None):
                                logger.warning(
                                    "TemplateProcessing<single> leading/trailing special tokens do not match TemplateProcessing<pair>"
                                )
                            if tmpl_pair := tmpl_pair[slice(seq_start, seq_stop)]:
                                tmpl_a = tmpl_pair[0].get("Sequence", {}).get("id")
                                tmpl_b = tmpl_pair[-1].get("Sequence", {}).get("id")
                                if tmpl_a != "A" or tmpl_b != "B":
                                    logger.warning(f"Unknown sequence {tmpl_a}...{tmpl_b} in TemplateProcessing<pair>")
                                # A [sep] [eos] B
                                if tmpl_a == "A" and tmpl_b == "B" and (tmpl_pair := tmpl_pair[1:-1]):
                                    add_sep = False
                                    if special_entry := tmpl_pair[0].get("SpecialToken", {}).get("id"):
                                        if special_entry in (special_sep, special_eos) and not special_last:
                                            add_sep = True
                                        if special_entry not in (special_sep, special_eos):
                                            logger.warning(
                                                f"Unknown separator token {special_entry!r} in TemplateProcessing<pair>"
                                            )
                                    else:
                                        logger.warning(
                                            f"Unknown middle sequence {tmpl_pair[0]!r} in TemplateProcessing<pair>"
                                        )
                                    if len(tmpl_pair) == 2:
                                        if special_entry := tmpl_pair[1].get("SpecialToken", {}).get("id"):
                                            if special_entry in (special_sep, special_eos):
                                                add_sep = True
                                            if special_entry not in (special_sep, special_eos):
                                                logger.warning(
                                                    f"Unknown second separator token {special_entry!r} in TemplateProcessing<pair>"
                                                )
                                        else:
                                            logger.warning(
                                                f"Unknown second middle sequence {tmpl_pair[1]!r} in TemplateProcessing<pair>"
                                            )
                                    self.add_special_token["sep"] = add_sep
                                    if add_sep and not special_sep and tokenizer_config:
                                        tokenizer_config["sep_token"] = special_eos
                        continue
        if not tokenizer_config:
            return True
        chat_template_alt = None
        chat_template_json = path / "chat_template.json"
        chat_template_jinja = path / "chat_template.jinja"
        if chat_template_jinja.is_file():
            with open(chat_template_jinja, encoding="utf-8") as f:
                chat_template_alt = f.read()
            if additional_templates := list((path / "additional_chat_templates").glob("*.jinja")):
                chat_template_alt = [{"name": "default", "template": chat_template_alt}]
                for template_path in additional_templates:
                    with open(template_path, encoding="utf-8") as fp:
                        chat_template_alt.append({"name": template_path.stem, "template": fp.read()})
        elif chat_template_json.is_file():
            with open(chat_template_json, encoding="utf-8") as f:
                chat_template_alt = json.load(f).get("chat_template")
        chat_template = tokenizer_config.get("chat_template", chat_template_alt)
        if chat_template is None or isinstance(chat_template, (str, list)):
            self.chat_template = chat_template
        else:
            logger.warning(f"Bad type for chat_template field in {tokenizer_config_file!r} - ignoring")
        for typ in self.special_token_types:
            add_entry = tokenizer_config.get(f"add_{typ}_token")
            if isinstance(add_entry, bool):
                if typ not in self.add_special_token:
                    self.add_special_token[typ] = add_entry
                elif self.add_special_token[typ] != add_entry:
                    logger.warning(
                        f"Mismatch between tokenizer_config add_{typ}_token({add_entry}) and tokenizer post_processor<{typ}>({self.add_special_token[typ]}) - opting for the latter"
                    )
            entry = tokenizer_config.get(f"{typ}_token")
            if isinstance(entry, str):
                tc_content = entry
            elif isinstance(entry, dict):
                entry_content = entry.get("content")
                if not isinstance(entry_content, str):
                    continue
                tc_content = entry_content
            else:
                continue
            # We only need the first match here.
            maybe_token_id = next(
                (atok.get("id") for atok in added_tokens if atok.get("content") == tc_content),
                None,
            )
            self._set_special_token(typ, maybe_token_id)
        return True
