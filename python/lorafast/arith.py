"""Adapter arithmetic on files (the Rust core does the work): combine adapters as PEFT's
``add_weighted_adapter`` does, extract a LoRA from a fine-tuned model, resize an adapter's rank."""

from __future__ import annotations

import os
from typing import Literal, Optional, Sequence

from lorafast import _core
from lorafast._core import ArithReport, ModuleReport
from lorafast.hub import PathLike, resolve_model_path
from lorafast.progress import run_with_bar

__all__ = ["combine", "extract", "resize", "ArithReport", "ModuleReport", "METHODS"]

Method = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


def combine(
    adapters: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Optional[Sequence[float]] = None,
    method: Method = "svd",
    density: Optional[float] = None,
    rank: Optional[int] = None,
    majority_sign: Literal["total", "frequency"] = "total",
    seed: int = 0,
    svd_clamp: Optional[float] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
    allow_different_bases: bool = False,
) -> ArithReport:
    """Combine LoRA adapters into one, as PEFT's ``LoraModel.add_weighted_adapter`` does, on files.

    The new adapter has PEFT's rank (``cat``: the sum of the ranks; ``linear``, ``ties``, ``dare_*``,
    ``magnitude_prune``: the common rank; ``*svd``: ``rank`` or the largest rank) and scaling 1.
    ``cat`` and ``linear`` equal PEFT's factors to float rounding; ``svd`` is an exact SVD of the
    combined factors; the pruned ``*_svd`` methods use a converged randomized SVD (delta within 1e-3
    relative of PEFT's). DARE's masks are drawn per tensor from ``seed`` with torch's generator.

    Args:
        adapters: PEFT LoRA adapter folders (or Hub ids), trained on the same base.
        out: output adapter folder (written to a temporary folder, renamed when complete).
        weights: one per adapter (default 1 each); negative subtracts, one adapter with weight w is scaled.
        method: PEFT's ``combination_type``.
        density: share of values kept by the ties, dare and magnitude_prune methods.
        rank: rank of the svd methods' result.
        majority_sign: TIES sign election, ``"total"`` or ``"frequency"``.
        seed: seed of DARE's random masks (the result is deterministic for a seed).
        svd_clamp: PEFT's ``svd_clamp`` quantile for the svd methods.
        dtype: output float type (default fp32, as PEFT saves).
        threads: worker threads (default: ``LORAFAST_NUM_THREADS`` or every core).

    Example:
        >>> from lorafast import combine
        >>> r = combine(["math", "code"], "mixed", weights=[0.7, 0.3], method="cat")  # doctest: +SKIP
    """
    paths = [resolve_model_path(a) for a in adapters]
    ws = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    return run_with_bar(
        "combine",
        progress,
        lambda bar: _core.combine(
            paths,
            os.fspath(out),
            weights=ws,
            method=method,
            density=density,
            rank=rank,
            majority_sign=majority_sign,
            seed=seed,
            svd_clamp=svd_clamp,
            dtype=dtype,
            threads=threads,
            overwrite=overwrite,
            allow_different_bases=allow_different_bases,
            progress=bar,
        ),
    )


def extract(
    base: PathLike,
    tuned: PathLike,
    out: PathLike,
    *,
    rank: int,
    energy: Optional[float] = None,
    targets: Optional[Sequence[str]] = None,
    modules_to_save: bool = False,
    dtype: Optional[str] = None,
    oversample: Optional[int] = None,
    tol: Optional[float] = None,
    max_iters: Optional[int] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ArithReport:
    """Extract a LoRA adapter from a fine-tuned model: per targeted weight, B A ~ TUNED - BASE by a
    truncated SVD (randomized subspace iteration; exact SVD for small matrices).

    Args:
        base, tuned: checkpoint folders (or Hub ids) with the same tensors.
        rank: rank of each module; with ``energy``, the largest rank.
        energy: per module, keep the fewest components holding this share of the difference's energy.
        targets: module names or suffixes (``["q_proj", "v_proj"]``); default every linear layer except
            embeddings and heads.
        modules_to_save: carry other tensors that changed (norms, heads) whole, as ``modules_to_save``.
        dtype: output float type (default fp32).
        oversample, tol, max_iters: randomized SVD settings: extra columns (8), and power iterations
            (at most ``max_iters``, default 2, stopping early once one adds less than ``tol`` = 1e-3 of
            the captured energy). Two are within 1% of the exact SVD's energy on
            fine-tune differences; raise ``max_iters`` for flat spectra.

    Returns:
        An :class:`ArithReport` whose ``modules`` give each module's captured energy share.
    """
    b, t = resolve_model_path(base), resolve_model_path(tuned)
    return run_with_bar(
        "extract",
        progress,
        lambda bar: _core.extract(
            b,
            t,
            os.fspath(out),
            rank=rank,
            energy=energy,
            targets=None if targets is None else list(targets),
            modules_to_save=modules_to_save,
            dtype=dtype,
            oversample=oversample,
            tol=tol,
            max_iters=max_iters,
            threads=threads,
            overwrite=overwrite,
            progress=bar,
        ),
    )


def resize(
    adapter: PathLike,
    out: PathLike,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ArithReport:
    """Re-factor each module's ``scaling * B @ A`` at a lower rank (exact SVD of the factors).

    Give ``rank`` (largest rank kept), ``energy`` (fewest components holding that share of each
    module's delta), or both. Modules whose rank differs from the largest go to ``rank_pattern``; the
    scaling of every module is 1, so PEFT loads the result as it is.
    """
    path = resolve_model_path(adapter)
    return run_with_bar(
        "resize",
        progress,
        lambda bar: _core.resize(
            path,
            os.fspath(out),
            rank=rank,
            energy=energy,
            dtype=dtype,
            threads=threads,
            overwrite=overwrite,
            progress=bar,
        ),
    )
