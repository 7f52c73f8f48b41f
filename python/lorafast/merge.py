"""Merging LoRA adapters into a base checkpoint, float or 4-bit, to a float or 4-bit output: one call
into the Rust engine, one pass, one write."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from lorafast import _core
from lorafast._core import MergeReport, TensorReport
from lorafast.hub import PathLike, resolve_model_path
from lorafast.progress import run_with_bar
from lorafast.quant import default_torch_threads, quantize_plan

__all__ = ["merge", "MergeReport", "TensorReport", "is_4bit_checkpoint"]


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
    quantize: Optional[str] = None,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[str] = None,
    report: bool = True,
) -> MergeReport:
    """Merge PEFT LoRA adapters into a Hugging Face safetensors checkpoint, exactly as PEFT would.

    The result equals ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` followed by
    ``save_pretrained`` (deltas computed in fp32, rounded once), streamed tensor by tensor so memory
    stays bounded whatever the model size. Several adapters merge as
    ``W + sum_i weights[i] * scaling_i * B_i @ A_i`` (PEFT's exact ``cat`` combination).

    A 4-bit bitsandbytes base (QLoRA) is dequantized exactly as bitsandbytes does and merged into:
    ``round(dequantize_4bit(W) + delta)``, the weights the adapter was trained on; with ``requantize`` the
    output is 4-bit again, with ``quantize`` a float base is merged and quantized in the same pass.

    Args:
        base: model folder (``model.safetensors`` or shards with ``model.safetensors.index.json``),
            or a Hugging Face Hub id; may be a bitsandbytes 4-bit checkpoint.
        adapters: one PEFT LoRA folder (or Hub id), or several.
        out: output folder; written beside it in a staging folder and renamed when complete.
        weights: one weight per adapter (default 1.0 each); negative subtracts an adapter.
        dtype: output float dtype, ``"bf16"``, ``"fp16"`` or ``"fp32"`` (default: as stored).
        threads: worker threads (default: ``LORAFAST_NUM_THREADS`` or every core).
        progress: show a tqdm progress bar.
        safe_merge: refuse to write merged tensors that contain NaN or Inf.
        overwrite: replace ``out`` if it exists.
        requantize: with a 4-bit base, write 4-bit again with the base's settings: the weights the
            adapters change are re-quantized from their fp32 merged values (no intermediate rounding),
            every other 4-bit weight is copied byte for byte.
        quantize: with a float base, ``"nf4"`` or ``"fp4"``: merge and quantize in one pass - byte for
            byte what ``quantize`` writes from the merged checkpoint.
        blocksize, double_quant, compute_dtype: the quantization settings with ``quantize``.
        report: compute the per-weight report (``MergeReport.tensors``: how much of each weight's change
            the output kept).

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
    # The double-quantization offset is a mean in torch's summation order, which follows its threads.
    torch_threads = default_torch_threads() if quantize or requantize else 1
    # What `lorafast quantize` would quantize: for architectures the name rule does not cover, transformers'
    # own plan on a meta-device model.
    targets = quantize_plan(base) if quantize else None
    return run_with_bar(
        "merge",
        progress,
        lambda bar: _core.merge(
            base,
            [resolve_model_path(a) for a in adapters],
            os.fspath(out),
            weights=None if weights is None else [float(w) for w in weights],
            dtype=dtype,
            threads=threads,
            safe_merge=safe_merge,
            overwrite=overwrite,
            progress=bar,
            requantize=requantize,
            quantize=quantize,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            targets=targets,
            torch_threads=torch_threads,
            stats=report,
        ),
    )


def is_4bit_checkpoint(path: PathLike) -> bool:
    """A folder holding bitsandbytes 4-bit weights (with quant states), as the Rust core reads it."""
    if not os.path.isdir(os.fspath(path)):
        return False
    try:
        return _core.inspect_checkpoint(os.fspath(path))["quantized_weights"] > 0
    except Exception:  # noqa: BLE001 - not a checkpoint at all: not a 4-bit one
        return False
