"""Merging LoRA adapters into a base checkpoint (the Rust core does the work)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from lorafast import _core

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class MergeReport:
    """What a merge did."""

    output: Path
    tensors_total: int
    tensors_merged: int
    tensors_replaced: int
    tensors_added: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    nonfinite_values: int
    warnings: list[str] = field(default_factory=list)


class _ProgressBar:
    """A tqdm byte counter created on the first report, so a call that fails while planning prints
    nothing; hidden when stderr is not a terminal."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None

    def __call__(self, name: str, nbytes: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=0,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.desc,
                leave=False,
                disable=None,
            )
        if name == "":  # the start call carries the total
            self.bar.total = nbytes
            self.bar.refresh()
        else:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


def merge(
    base: PathLike,
    adapters: Union[PathLike, Sequence[PathLike]],
    out: PathLike,
    *,
    weights: Optional[Sequence[float]] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    safe_merge: bool = False,
    overwrite: bool = False,
    requantize: bool = False,
    f32_outputs: Sequence[str] = (),
) -> MergeReport:
    """Merge PEFT LoRA adapters into a Hugging Face safetensors checkpoint, exactly as PEFT would.

    The result equals ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` followed by
    ``save_pretrained`` (deltas computed in fp32, rounded once), streamed tensor by tensor so memory
    stays bounded whatever the model size. Several adapters merge as
    ``W + sum_i weights[i] * scaling_i * B_i @ A_i`` (PEFT's exact ``cat`` combination).

    A 4-bit bitsandbytes base (QLoRA) is dequantized exactly as bitsandbytes does and merged into, giving
    a normal checkpoint: ``round(dequantize_4bit(W) + delta)``, the weights the adapter was trained on.

    Args:
        base: model folder (``model.safetensors`` or shards with ``model.safetensors.index.json``),
            or a Hugging Face Hub id; may be a 4-bit checkpoint.
        adapters: one PEFT LoRA folder (or Hub id), or several.
        out: output folder; written beside it in a temporary folder and renamed when complete.
        weights: one weight per adapter (default 1.0 each); negative subtracts an adapter.
        dtype: output float dtype, ``"bf16"``, ``"fp16"`` or ``"fp32"`` (default: as stored).
        threads: worker threads (default: ``LORAFAST_NUM_THREADS`` or every core).
        progress: show a tqdm progress bar.
        safe_merge: refuse to write merged tensors that contain NaN or Inf.
        overwrite: replace ``out`` if it exists.
        requantize: with a 4-bit base, write a 4-bit checkpoint again: the weights the adapter changes are
            re-quantized from their fp32 merged values (no intermediate rounding), every other 4-bit
            weight is copied byte for byte - what PEFT's merge into ``Linear4bit`` does, less its rounding.

    Returns:
        A :class:`MergeReport`.

    Raises:
        lorafast.errors.LorafastError: on bad input, naming the file, tensor or module.

    Example:
        >>> from lorafast import merge
        >>> r = merge("llama-1b", "adapter", "llama-1b-merged", dtype="bf16")  # doctest: +SKIP
        >>> print(f"{r.tensors_merged} tensors merged in {r.seconds:.1f} s")  # doctest: +SKIP
    """
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    base = resolve_model_path(base)
    adapters = [resolve_model_path(a) for a in adapters]
    if is_4bit_checkpoint(base):
        return _merge_into_4bit(
            base,
            adapters,
            out,
            requantize,
            weights=weights,
            dtype=dtype,
            threads=threads,
            progress=progress,
            safe_merge=safe_merge,
            overwrite=overwrite,
        )
    if requantize:
        from lorafast.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{base}: requantize needs a 4-bit (bitsandbytes) base checkpoint")
    return _merge_files(
        base,
        adapters,
        out,
        weights=weights,
        dtype=dtype,
        threads=threads,
        progress=progress,
        safe_merge=safe_merge,
        overwrite=overwrite,
        f32_outputs=f32_outputs,
    )


def _merge_files(
    base: str, adapters, out: PathLike, *, weights, dtype, threads, progress, safe_merge, overwrite, f32_outputs=()
) -> MergeReport:
    """The Rust merge on float checkpoints, with a progress bar."""
    bar = _ProgressBar("merge") if progress else None
    try:
        raw = _core.merge(
            base,
            [os.fspath(a) for a in adapters],
            os.fspath(out),
            weights=None if weights is None else [float(w) for w in weights],
            dtype=dtype,
            threads=threads,
            safe_merge=safe_merge,
            overwrite=overwrite,
            progress=bar,
            f32_outputs=list(f32_outputs),
        )
    finally:
        if bar is not None:
            bar.close()
    raw["output"] = Path(raw["output"])
    return MergeReport(**raw)


def is_4bit_checkpoint(path: PathLike) -> bool:
    """A bitsandbytes 4-bit checkpoint (``quantization_config.load_in_4bit`` in config.json)."""
    cfg = Path(os.fspath(path)) / "config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return bool(qc.get("load_in_4bit")) and qc.get("quant_method") == "bitsandbytes"


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            names.extend(st.keys())
    return names


def _targeted_4bit_weights(base: Path, adapters) -> list[str]:
    """The 4-bit weights of `base` that the adapters' LoRA modules land in (prefix differences allowed)."""
    tag = ".quant_state.bitsandbytes__"
    four_bit = {n.split(tag)[0] for n in _tensor_names(base) if tag in n}
    found = set()
    for a in adapters:
        for key in _tensor_names(Path(os.fspath(a))):
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix):
                    module = key[len("base_model.model.") : -len(suffix)]
                    for cand in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"):
                        if cand in four_bit:
                            found.add(cand)
                    found.update(w for w in four_bit if w.endswith(f".{module}.weight"))
    return sorted(found)


def _merge_into_4bit(base: str, adapters, out: PathLike, requantize: bool, **kw) -> MergeReport:
    """QLoRA: the 4-bit base dequantized exactly as bitsandbytes does (to its quant state's dtype), then
    the adapter merged with its delta in fp32 and one rounding - the weights QLoRA trained against, plus
    the delta, as a normal checkpoint. With `requantize`, only the changed weights are dequantized, merged
    unrounded (fp32) and quantized again with the base's settings; other 4-bit weights are copied."""
    import json
    import shutil
    import tempfile

    from lorafast.quant import dequantize, quantize

    out = Path(os.fspath(out))
    # The engine's guard, on the real inputs: the steps below only see temporary copies.
    _core.check_output(os.fspath(out), [base, *map(os.fspath, adapters)], overwrite=bool(kw.get("overwrite")))
    parent = out.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lorafast-dequant-", dir=parent))
    threads, progress = kw.get("threads"), kw.get("progress", True)
    try:
        if not requantize:
            deq = dequantize(base, tmp / "base", threads=threads, progress=progress)
            return _merge_files(str(deq.output), adapters, out, **kw)
        targets = _targeted_4bit_weights(Path(base), adapters)
        deq = dequantize(base, tmp / "base", threads=threads, progress=progress, only=targets)
        merged_kw = {**kw, "overwrite": False, "f32_outputs": targets}
        report = _merge_files(str(deq.output), adapters, tmp / "merged", **merged_kw)
        qc = json.loads((Path(base) / "config.json").read_text())["quantization_config"]
        state_key = next(n for n in _tensor_names(Path(base)) if ".quant_state.bitsandbytes__" in n)
        from safetensors import safe_open

        shard = next(f for f in sorted(Path(base).glob("*.safetensors")) if state_key in safe_open(str(f), "np").keys())
        with safe_open(str(shard), "np") as st:
            blocksize = json.loads(bytes(st.get_tensor(state_key)).decode())["blocksize"]
        names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
        model_type = json.loads((Path(base) / "config.json").read_text()).get("model_type")
        conv1d = model_type in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
        requantized = quantize(
            tmp / "merged",
            out,
            quant_type=qc.get("bnb_4bit_quant_type", "nf4"),
            blocksize=blocksize,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant")),
            compute_dtype=names.get(qc.get("bnb_4bit_compute_dtype") or "", "fp32"),
            skip_modules=[m for m in qc.get("llm_int8_skip_modules") or [] if m != "lm_head"],
            targets=[(t, conv1d and t.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc", "q_attn")) for t in targets],
            threads=threads,
            progress=progress,
            overwrite=kw.get("overwrite", False),
        )
        return MergeReport(**{**report.__dict__, "output": requantized.output})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
