"""Several task adapters on one base, predictions with a chosen one, and checking a merge."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from lorafast._deps import INFERENCE, require
from lorafast.errors import InvalidArgumentError, LorafastError
from lorafast.train.models import load_for_task, read_config, saved_pad_token_id

PathLike = Union[str, "os.PathLike[str]"]


def _adapter_task(adapter: PathLike) -> Optional[str]:
    cfg = Path(os.fspath(adapter)) / "adapter_config.json"
    if not cfg.is_file():
        raise InvalidArgumentError(f"{adapter}: no adapter_config.json")
    return json.loads(cfg.read_text()).get("task_type")


def _model_class(task: Optional[str], base: PathLike):
    from lorafast.reference import _model_class as cls

    return cls(task, Path(os.fspath(base)))


def _num_labels(adapter: PathLike) -> Optional[int]:
    """The head size an adapter's saved classifier has (modules_to_save), if any."""
    from lorafast import _core

    return _core.inspect_adapter(os.fspath(adapter))["num_labels"]


def load(base: PathLike, adapters: dict[str, PathLike], *, active: Optional[str] = None, device: Optional[str] = None):
    """The base model with every adapter attached under its name (PEFT ``PeftModel``).

    Switch with ``model.set_adapter(name)``, run the base with ``with model.disable_adapter():``, drop
    one with ``model.delete_adapter(name)``, and fold the active one in with ``merge_and_unload()``.

    Example:
        >>> adapters = {"sentiment": "runs/sst2/adapter", "topic": "runs/ag/adapter"}
        >>> model = lorafast.load("gpt2", adapters)  # doctest: +SKIP
        >>> model.set_adapter("topic")  # doctest: +SKIP
    """
    require("lorafast.load", *INFERENCE)
    from peft import PeftModel

    if not adapters:
        raise InvalidArgumentError("load needs at least one adapter")
    tasks = {name: _adapter_task(path) for name, path in adapters.items()}
    if len(set(tasks.values())) > 1:
        raise InvalidArgumentError(f"adapters for different tasks cannot share one base: {tasks}")
    task = next(iter(tasks.values()))
    kw: dict[str, Any] = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        sizes = {n: _num_labels(p) for n, p in adapters.items()}
        if len({s for s in sizes.values() if s}) > 1:
            raise InvalidArgumentError(f"classification adapters with different label counts: {sizes}")
        n = next((s for s in sizes.values() if s), None)
        if n:
            kw["num_labels"] = n
    chosen = adapters[active] if active in adapters else next(iter(adapters.values()))
    model = load_for_task(base, _model_class(task, base), pad_token_id=saved_pad_token_id(chosen), **kw)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, os.fspath(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.fspath(adapters[name]), adapter_name=name)
    model.set_adapter(active or names[0])
    if device:
        model.to(device)
    return model.eval()


def predict(
    model,
    tokenizer,
    rows: list[dict],
    *,
    task: str,
    text_field: str = "text",
    labels: Optional[list[str]] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[dict]:
    """Predictions for `rows`: a label and its probability (classification), or generated text."""
    import torch

    from lorafast.train.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    out = []
    device = next(model.parameters()).device
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # batches are padded
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        if task == "seq-cls":
            enc = tokenizer([str(r[text_field]) for r in chunk], padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                probs = model(**enc.to(device)).logits.float().softmax(-1)
            for p in probs:
                k = int(p.argmax())
                out.append({"label": labels[k] if labels and k < len(labels) else k, "probability": float(p[k])})
        else:
            for r in chunk:
                ctx = str(r.get("input") or "")
                prompt = (ALPACA_WITH_INPUT if ctx else ALPACA_NO_INPUT).format(instruction=r["instruction"], input=ctx)
                enc = tokenizer(prompt, return_tensors="pt").to(device)
                enc.pop("token_type_ids", None)  # BERT-style tokenizers add them; decoders take none
                with torch.no_grad():
                    ids = model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                    )
                out.append(
                    {"response": tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)}
                )
    return out


def verify(
    base: PathLike,
    adapter: PathLike,
    merged: PathLike,
    *,
    tolerance: Optional[float] = None,
    samples: int = 4,
    seq_len: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Run base + adapter (PEFT, unmerged) and the merged model on the same inputs; report the largest
    logit difference. Raises when it exceeds `tolerance` (default: 1e-3 for fp32 models, 5e-2 for
    16-bit ones, relative to the logits' scale)."""
    require("lorafast verify", *INFERENCE)
    import torch
    from peft import PeftModel

    task = _adapter_task(adapter)
    cls = _model_class(task, base)
    kw: dict[str, Any] = {}
    n = _num_labels(adapter) if task in ("SEQ_CLS", "TOKEN_CLS") else None
    if n:
        kw["num_labels"] = n
    pad = saved_pad_token_id(adapter)
    ref = PeftModel.from_pretrained(load_for_task(base, cls, pad_token_id=pad, **kw), os.fspath(adapter)).eval()
    mrg = load_for_task(merged, cls, pad_token_id=pad, **kw).eval()
    vocab = int(getattr(mrg.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 30000), (samples, seq_len), generator=g)
    with torch.no_grad():
        a = ref(input_ids=ids).logits.float()
        b = mrg(input_ids=ids).logits.float()
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) or 1.0
    dtype = next(mrg.parameters()).dtype
    # A 4-bit base computes in its compute dtype: the reference is no more precise than that.
    compute = read_config(base).get("quantization_config") or {}
    exact = dtype == torch.float32 and compute.get("bnb_4bit_compute_dtype", "float32") == "float32"
    tol = tolerance if tolerance is not None else (1e-3 if exact else 5e-2)
    result = {
        "max_abs_diff": diff,
        "relative_diff": diff / scale,
        "tolerance": tol,
        "dtype": str(dtype),
        "ok": diff / scale <= tol,
    }
    if not result["ok"]:
        raise LorafastError(
            f"{merged}: merged model differs from base + adapter by {diff:.3g} "
            f"({diff / scale:.3g} of the logits' scale, tolerance {tol})"
        )
    return result
