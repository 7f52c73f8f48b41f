"""The training loop."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from lorafast import _core
from lorafast._deps import TRAINING, require
from lorafast.errors import InvalidArgumentError
from lorafast.train import data as D
from lorafast.train.models import TASKS, check_task, load_for_task_with_new_modules, task_class
from lorafast.train.targets import resolve_targets


@dataclass
class TrainConfig:
    """Everything `lorafast train` takes. Learning-rate default 2e-4 is the usual LoRA choice."""

    model: str
    data: str
    out: str
    task: str = "seq-cls"  # or "causal-lm"
    eval_data: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    max_length: int = 256
    r: int = 8
    alpha: Optional[float] = None  # default 2 * r
    dropout: float = 0.05
    targets: str = "attn"
    rslora: bool = False
    init: str = "default"  # default | gaussian | olora | pissa
    rank_pattern: dict[str, int] = field(default_factory=dict)
    qlora: bool = False
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 42
    merge: bool = False
    device: Optional[str] = None
    progress: bool = True


@dataclass
class TrainResult:
    out: Path
    adapter: Path
    summary: dict[str, Any]
    merged: Optional[Path] = None


def _set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quantized_base(model: str, cfg: TrainConfig, compute_dtype: str) -> str:
    """A full-precision base is quantized once with the Rust quantizer and cached. Output layers and task
    heads stay in full precision (and are listed as such), so the 4-bit checkpoint loads under the task
    class even where the head is new, and PEFT can train that head in full (modules_to_save)."""
    from lorafast.merge import is_4bit_checkpoint
    from lorafast.quant import quantize

    if is_4bit_checkpoint(model) or not Path(model).is_dir():
        return model
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(Path(model).glob("*")))
    key = hashlib.sha256(f"{Path(model).resolve()}|{stamp}|nf4|dq|heads|{compute_dtype}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LORAFAST_CACHE", Path.home() / ".cache/lorafast")) / "quantized" / key
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        quantize(
            model,
            cache,
            quant_type="nf4",
            double_quant=True,
            compute_dtype=compute_dtype,
            keep_heads=True,
            progress=cfg.progress,
            overwrite=True,  # another process may have cached it meanwhile: same bytes
        )
    return str(cache)


def check_train_outputs(cfg: TrainConfig) -> None:
    """Before training: OUT may not lie in the model folder, and what it will hold (the adapter, the
    merged model) may not overlap the model. The merge itself is guarded again by the engine."""
    model = Path(cfg.model)
    if not model.exists():
        return  # a hub id: nothing local to protect
    out = Path(cfg.out)
    if out.resolve() == model.resolve() or model.resolve() in out.resolve().parents:
        raise InvalidArgumentError(
            f"{cfg.out}: lies inside the model folder {cfg.model}; lorafast never writes into its inputs"
        )
    for sub in ["adapter", *(["merged"] if cfg.merge else [])]:
        _core.check_output(os.fspath(out / sub), [os.fspath(model)], overwrite=True)


def warn_misread_4bit_rows(model) -> None:
    """bitsandbytes' AVX-512 CPU dequantizer (blocksizes under 2048) reads the absmax of a row that is not
    a whole number of blocks from the wrong place: such layers train against other weights than the
    checkpoint holds, and the merged model will not match. Real models' widths are multiples of 64; say
    so when these are not."""
    import warnings

    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return
    bad, blocksize = [], 0
    for name, m in model.named_modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and qs.blocksize < 2048 and qs.shape[-1] % qs.blocksize and qs.shape[-1] % 2 == 0:
            bad.append(name)
            blocksize = qs.blocksize
    if bad:
        warnings.warn(
            f"bitsandbytes on this CPU (AVX-512) dequantizes {len(bad)} layers wrongly, whose rows are not a whole "
            f"number of {blocksize}-element blocks (e.g. {bad[0]}): QLoRA would train against other weights "
            "than the checkpoint holds (a bitsandbytes bug); train with LoRA, or on a GPU",
            stacklevel=3,
        )


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def train(config: Optional[TrainConfig] = None, **kwargs) -> TrainResult:
    """Fine-tune a LoRA (or QLoRA) adapter and save it as a PEFT adapter folder.

    Example:
        >>> from lorafast.train import train
        >>> r = train(model="gpt2", data="train.jsonl", eval_data="dev.jsonl", out="runs/sst2",
        ...           task="seq-cls", r=8, targets="attn", epochs=3)  # doctest: +SKIP
        >>> r.summary["eval"]["accuracy"]  # doctest: +SKIP
    """
    cfg = config or TrainConfig(**kwargs)
    if cfg.task not in TASKS:
        raise InvalidArgumentError(f"task {cfg.task!r}: use seq-cls or causal-lm")
    require("lorafast train", *TRAINING, *(["bitsandbytes"] if cfg.qlora else []))
    check_train_outputs(cfg)
    check_task(cfg.model, cfg.task)
    import torch
    import transformers
    from accelerate import Accelerator
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    transformers.logging.set_verbosity_error()
    if not cfg.progress:
        transformers.logging.disable_progress_bar()
    # One process, or one of several under `accelerate launch` (DDP / FSDP / DeepSpeed as accelerate is
    # configured); mixed precision stays ours (autocast below).
    want_cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=want_cpu, mixed_precision="no")
    device = torch.device(cfg.device) if cfg.device and cfg.device != "cpu" else accelerator.device
    main = accelerator.is_main_process

    # Data first: bad input fails before any model is loaded.
    rows = D.read_records(cfg.data)
    eval_rows = D.optional_records(cfg.eval_data)
    fields = [cfg.text_field, cfg.label_field] if cfg.task == "seq-cls" else [cfg.instruction_field, cfg.output_field]
    D.check_fields(rows, fields, cfg.data)
    if eval_rows is not None:
        D.check_fields(eval_rows, fields, cfg.eval_data)
    labels = D.label_vocabulary(rows, cfg.label_field) if cfg.task == "seq-cls" else []

    _set_seed(cfg.seed)
    use_cuda = device.type == "cuda"
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # The 4-bit layers compute in what the rest of the step computes in: fp32 on the CPU.
    compute_dtype = precision if precision in ("bf16", "fp16") else "fp32"
    model_path = _quantized_base(cfg.model, cfg, compute_dtype) if cfg.qlora else cfg.model
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        # GPT-2 and others have none: pad with end-of-text (saved with the adapter's tokenizer, and so in
        # the merged model's config, for prediction on padded batches).
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    load_kw: dict[str, Any] = {"device_map": {"": str(device)}} if use_cuda else {}
    extra = {"num_labels": len(labels)} if cfg.task == "seq-cls" else {}
    model, new_modules = load_for_task_with_new_modules(
        model_path, task_class(cfg.task), pad_token_id=tokenizer.pad_token_id, device=str(device), **load_kw, **extra
    )
    # Every part of a new head is trained and saved in full, not only what PEFT's task type names
    # (classifier / score): ModernBERT's head.dense and head.norm, DistilBERT's pre_classifier are new too,
    # and would otherwise be random again wherever the adapter is loaded.
    new_head = new_modules if cfg.task == "seq-cls" else []
    task_type = TaskType.SEQ_CLS if cfg.task == "seq-cls" else TaskType.CAUSAL_LM
    if cfg.qlora and not use_cuda:
        warn_misread_4bit_rows(model)
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.grad_checkpointing)
    elif cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.to(device)

    init: Any = {"default": True, "gaussian": "gaussian", "olora": "olora", "pissa": "pissa"}.get(cfg.init)
    if init is None:
        raise InvalidArgumentError(f"init {cfg.init!r}: use default, gaussian, olora or pissa")
    modules, params = resolve_targets(cfg.targets, model)
    if params and cfg.dropout:
        # PEFT's ParamWrapper (peft/tuners/lora/layer.py) raises on lora_dropout != 0 for target_parameters
        raise InvalidArgumentError(
            f"--dropout {cfg.dropout}: LoRA on expert parameters ({', '.join(params)}) needs --dropout 0 (PEFT)"
        )
    lora = LoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.r,
        lora_dropout=cfg.dropout,
        target_modules=modules or None,
        target_parameters=params or None,
        use_rslora=cfg.rslora,
        init_lora_weights=init,
        rank_pattern=dict(cfg.rank_pattern),
        modules_to_save=new_head or None,
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    # PiSSA / OLoRA change the base weights at init: keep the initial adapter so the result can be saved
    # converted to plain LoRA (rank 2r) that merges into the original base.
    # (its folder name becomes a PEFT adapter name: no dots)
    initial_dir = Path(cfg.out) / "initial_adapter" if cfg.init in ("pissa", "olora") else None
    if initial_dir is not None and accelerator.is_main_process:
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial_dir)

    if cfg.task == "seq-cls":
        enc = D.encode_classification(rows, tokenizer, cfg.text_field, cfg.label_field, labels, cfg.max_length)
        eval_enc = (
            D.encode_classification(eval_rows, tokenizer, cfg.text_field, cfg.label_field, labels, cfg.max_length)
            if eval_rows
            else None
        )
    else:
        enc = D.encode_instructions(
            rows, tokenizer, cfg.max_length, cfg.instruction_field, cfg.input_field, cfg.output_field
        )
        eval_enc = (
            D.encode_instructions(
                eval_rows, tokenizer, cfg.max_length, cfg.instruction_field, cfg.input_field, cfg.output_field
            )
            if eval_rows
            else None
        )
        if not enc:
            raise InvalidArgumentError(f"{cfg.data}: every prompt is longer than max_length {cfg.max_length}")

    from torch.utils.data import DataLoader

    def loader(items, shuffle):
        g = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(
            items,
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            generator=g,
            collate_fn=lambda b: D.collate(b, tokenizer.pad_token_id, cfg.task),
        )

    train_loader = loader(enc, True)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.qlora and use_cuda:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scheduler is not handed to accelerate: it steps once per optimizer step of this process.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if main:
        metrics_path.write_text("")

    def log(entry: dict) -> None:
        if main:  # one log, from the main process
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save_adapter(m) -> None:
        if initial_dir is None:
            m.save_pretrained(out / "adapter")
            return
        m.save_pretrained(out / "adapter", path_initial_model_for_weight_conversion=str(initial_dir))
        # PEFT's conversion keeps only the LoRA tensors and drops modules_to_save (a classification head):
        # put them back, or the adapter cannot be loaded at all.
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        f = out / "adapter" / "adapter_model.safetensors"
        converted = load_file(str(f))
        full = get_peft_model_state_dict(m)
        missing = {
            k: v.detach().cpu().contiguous() for k, v in full.items() if ".lora_" not in k and k not in converted
        }
        if missing:
            save_file({**converted, **missing}, str(f), metadata={"format": "pt"})

    from tqdm.auto import tqdm

    step, best, best_metrics, last_eval = 0, None, None, None
    started = time.perf_counter()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    epochs = math.ceil(cfg.epochs)
    bar = tqdm(total=total_steps, desc="train", disable=not (cfg.progress and main))
    model.train()
    for epoch in range(epochs):
        running, count = 0.0, 0
        for i, batch in enumerate(train_loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(**batch).loss / cfg.grad_accum
            accelerator.backward(scaler.scale(loss) if scaler else loss)
            running += loss.item() * cfg.grad_accum
            count += 1
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(train_loader):
                if scaler:
                    scaler.unscale_(optimizer)
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                log(
                    {
                        "step": step,
                        "epoch": epoch + (i + 1) / len(train_loader),
                        "loss": running / count,
                        "lr": scheduler.get_last_lr()[0],
                    }
                )
                running, count = 0.0, 0
                if step >= total_steps:
                    break
        if eval_enc and main:  # the main process evaluates the whole set and keeps the best adapter
            unwrapped = accelerator.unwrap_model(model)
            last_eval, logits = evaluate(unwrapped, loader(eval_enc, False), device, cfg.task, amp_dtype)
            log({"step": step, "epoch": epoch + 1, "eval": last_eval})
            key = "accuracy" if cfg.task == "seq-cls" else "loss"
            better = best is None or (last_eval[key] > best if key == "accuracy" else last_eval[key] < best)
            if better:
                best, best_metrics = last_eval[key], last_eval
                save_adapter(unwrapped)
                if logits:  # what the kept adapter predicts on the evaluation set, for later comparison
                    (out / "eval_predictions.jsonl").write_text(
                        "".join(
                            json.dumps({"label": int(max(range(len(x)), key=x.__getitem__)), "logits": x}) + "\n"
                            for x in logits
                        )
                    )
        accelerator.wait_for_everyone()
        if step >= total_steps:
            break
    bar.close()
    train_seconds = time.perf_counter() - started
    if main:
        if not eval_enc:
            save_adapter(accelerator.unwrap_model(model))
        # A fresh copy: encoding with max_length leaves truncation set on the backend, which would be
        # saved into tokenizer.json (and cut every later use of the tokenizer, GGUF's hash included).
        saved = transformers.AutoTokenizer.from_pretrained(cfg.model)
        saved.pad_token = tokenizer.pad_token
        saved.save_pretrained(out / "adapter")
        if initial_dir is not None:
            import shutil

            shutil.rmtree(initial_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    adapter_file = out / "adapter" / "adapter_model.safetensors"
    summary = {
        "task": cfg.task,
        "model": cfg.model,
        "device": str(device),
        "precision": precision,
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "adapter_bytes": adapter_file.stat().st_size,
        "train_seconds": train_seconds,
        "steps": step,
        "processes": accelerator.num_processes,
        "peak_memory_bytes": _peak_memory(device),
        "peak_memory_kind": "cuda_max_allocated" if use_cuda else "process_rss",
        "eval": best_metrics,
        "last_eval": last_eval,
        "labels": [str(x) for x in labels],
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "base": str(model_path),
        "config": asdict(cfg),
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    merged = None
    if cfg.merge and main:
        from lorafast.merge import merge

        # A QLoRA adapter merges into the 4-bit base it was trained on (dequantized exactly).
        merged = merge(model_path, out / "adapter", out / "merged", overwrite=True, progress=cfg.progress).output
    return TrainResult(out=out, adapter=out / "adapter", summary=summary, merged=merged)


def evaluate(model, loader, device, task: str, amp_dtype) -> tuple[dict[str, float], list[list[float]]]:
    """Accuracy and macro F1 for classification (and each example's logits); loss and perplexity for
    causal LM."""
    import torch

    model.eval()
    total_loss, n, preds, golds, logits = 0.0, 0, [], [], []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(**batch)
            if task == "seq-cls":
                preds += out.logits.argmax(-1).tolist()
                golds += batch["labels"].tolist()
                logits += out.logits.float().tolist()
            else:
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                total_loss += out.loss.item() * tokens
                n += tokens
    model.train()
    if task == "seq-cls":
        acc = sum(p == g for p, g in zip(preds, golds)) / max(1, len(golds))
        f1s = []
        for c in set(golds) | set(preds):
            tp = sum(p == c and g == c for p, g in zip(preds, golds))
            fp = sum(p == c and g != c for p, g in zip(preds, golds))
            fn = sum(p != c and g == c for p, g in zip(preds, golds))
            f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
        return {"accuracy": acc, "f1": sum(f1s) / max(1, len(f1s))}, logits
    loss = total_loss / max(1, n)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}, []
