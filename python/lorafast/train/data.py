"""Training data: local .jsonl / .json / .csv / .parquet files (or a `datasets` name), turned into
token ids for sequence classification or causal-LM instruction tuning."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional

from lorafast.errors import InvalidArgumentError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_records(source: str) -> list[dict[str, Any]]:
    """Rows of a local data file, or of a `datasets` dataset name (its train split)."""
    path = Path(os.fspath(source))
    if path.is_dir() or (not path.exists() and not path.suffix):
        # A dataset folder or a `datasets` name (a hub id such as "imdb"): its train split.
        try:
            from datasets import load_dataset
        except ImportError:
            raise InvalidArgumentError(f"{source}: not a data file, and `datasets` is not installed") from None
        try:
            return [dict(r) for r in load_dataset(str(source), split="train")]
        except Exception as e:  # noqa: BLE001 - one clear line for any loading failure
            raise InvalidArgumentError(f"{source}: cannot load it with datasets ({e})") from None
    if not path.exists():
        raise InvalidArgumentError(f"{source}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise InvalidArgumentError(f"{path}:{i}: not valid JSON ({e})") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise InvalidArgumentError(f"{path}: expected a JSON list of records")
        return data
    if suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InvalidArgumentError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    raise InvalidArgumentError(f"{path}: unsupported data format {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def check_fields(rows: list[dict], fields: list[str], source: str) -> None:
    if not rows:
        raise InvalidArgumentError(f"{source}: no records")
    for i, r in enumerate(rows):
        missing = [f for f in fields if f not in r or r[f] is None]
        if missing:
            raise InvalidArgumentError(f"{source}: record {i} has no field {missing[0]!r} (fields: {sorted(r)})")


def label_vocabulary(rows: list[dict], field: str) -> list[Any]:
    """Labels in a stable order: integers as they are (0..n-1), strings sorted."""
    labels = {r[field] for r in rows}
    if all(isinstance(x, int) or (isinstance(x, str) and x.isdigit()) for x in labels):
        return sorted({int(x) for x in labels})
    return sorted(str(x) for x in labels)


def encode_classification(rows, tokenizer, text_field: str, label_field: str, labels: list, max_length: int):
    index = {str(lab): i for i, lab in enumerate(labels)}
    out = []
    for r in rows:
        key = str(int(r[label_field])) if isinstance(labels[0], int) else str(r[label_field])
        if key not in index:
            raise InvalidArgumentError(f"label {r[label_field]!r} is not among the training labels {labels}")
        enc = tokenizer(str(r[text_field]), truncation=True, max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "labels": index[key]})
    return out


def encode_instructions(
    rows, tokenizer, max_length: int, instruction="instruction", input_field="input", output="output"
):
    """Alpaca prompt + response; the loss covers the response (and EOS) only."""
    out = []
    eos = tokenizer.eos_token or ""
    for r in rows:
        ctx = str(r.get(input_field) or "")
        prompt = (ALPACA_WITH_INPUT if ctx else ALPACA_NO_INPUT).format(instruction=r[instruction], input=ctx)
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(str(r[output]) + eos, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_length]
        labels = ([-100] * len(p_ids) + r_ids)[:max_length]
        if all(x == -100 for x in labels):
            continue  # the prompt alone fills max_length: nothing to learn from this record
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict], pad_id: int, task: str):
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "seq-cls":
        out["labels"] = torch.tensor([b["labels"] for b in batch])
    else:
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        out["labels"] = labels
    return out


def optional_records(source: Optional[str]) -> Optional[list[dict]]:
    return read_records(source) if source else None
