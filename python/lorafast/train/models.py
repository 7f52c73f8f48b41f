"""Loading a base model for a task the same way in training, prediction and verification: the task
class (checked before anything loads), a 4-bit base as bitsandbytes computes it exactly, and the pad
token a trainer chose, carried by the tokenizer files saved with the adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from lorafast.errors import InvalidArgumentError

PathLike = Union[str, "os.PathLike[str]"]

# lorafast's task names, PEFT's task types and transformers' auto classes.
TASKS = {
    "seq-cls": ("SEQ_CLS", "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "causal-lm": ("CAUSAL_LM", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
}
PEFT_TASKS = {peft: task for task, (peft, _, _) in TASKS.items()}


def read_config(model: PathLike) -> dict[str, Any]:
    """config.json of a local folder, or of a hub id (fetched alone)."""
    path = Path(os.fspath(model)) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(os.fspath(model)).to_dict()
    except Exception as e:  # noqa: BLE001 - any failure is one line naming the model
        raise InvalidArgumentError(f"{model}: no config.json ({e})") from None


def check_task(model: PathLike, task: str) -> str:
    """The model's architecture must have a transformers class for `task`; returns its model_type.
    Raises before any weight is read or quantized."""
    from transformers.models.auto import modeling_auto

    if task not in TASKS:
        raise InvalidArgumentError(f"task {task!r}: use {' or '.join(TASKS)}")
    config = read_config(model)
    model_type = config.get("model_type")
    arch = (config.get("architectures") or [model_type])[0]
    mapping = getattr(modeling_auto, TASKS[task][2])
    if model_type not in mapping:
        raise InvalidArgumentError(
            f"{model}: architecture {arch} (model_type {model_type!r}) has no {task} model in transformers; "
            f"lorafast train cannot train it for this task"
        )
    return str(model_type)


def task_class(task: str):
    import transformers

    return getattr(transformers, TASKS[task][1])


def exact_4bit_on_cpu(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference and rounds its absmax
    to bf16 (so evaluation would see other weights than training). Keep the exact dequantization."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def saved_pad_token_id(folder: PathLike) -> Optional[int]:
    """The pad token id of the tokenizer saved in `folder` (a trained adapter carries the trainer's
    choice), or None."""
    if not (Path(os.fspath(folder)) / "tokenizer_config.json").is_file():
        return None
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(os.fspath(folder))
    return tok.pad_token_id


def load_for_task(base: PathLike, cls, *, pad_token_id: Optional[int] = None, device: Optional[str] = None, **kw):
    """`cls.from_pretrained(base)`; a 4-bit base placed by bitsandbytes and computed exactly; the model's
    pad_token_id set from `pad_token_id` where its config has none."""
    return load_for_task_with_new_modules(base, cls, pad_token_id=pad_token_id, device=device, **kw)[0]


def load_for_task_with_new_modules(
    base: PathLike, cls, *, pad_token_id: Optional[int] = None, device: Optional[str] = None, **kw
) -> tuple[Any, list[str]]:
    """`load_for_task`, and the modules the checkpoint had no weights for (a task head transformers
    initialized at random)."""
    from lorafast.merge import is_4bit_checkpoint

    if is_4bit_checkpoint(base):
        kw.setdefault("device_map", {"": device or "cpu"})
    model, info = cls.from_pretrained(os.fspath(base), output_loading_info=True, **kw)
    exact_4bit_on_cpu(model)
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model, sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", ()) if "." in k})
