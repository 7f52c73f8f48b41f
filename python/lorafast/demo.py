"""`lorafast demo`: the main job on an embedded default, end to end, in a temporary folder."""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Optional

from lorafast.merge import merge
from lorafast.synthetic import LlamaShape, make_llama_checkpoint, make_lora_adapter


def _have_peft() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def run_demo(keep: Optional[Path] = None, verify: bool = True, echo=print) -> dict:
    """Make a small Llama-shaped bf16 checkpoint (2 shards) and an r=16 LoRA adapter on all linear
    projections, merge them, and - when PEFT is installed - check the result against PEFT's
    ``merge_and_unload`` tensor by tensor and on logits."""
    with tempfile.TemporaryDirectory(prefix="lorafast-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        shape = LlamaShape()
        t0 = time.perf_counter()
        base = make_llama_checkpoint(root / "base", shape, dtype="bf16", shards=2)
        adapter = make_lora_adapter(root / "adapter", shape, r=16, alpha=32)
        echo(
            f"made a Llama-shaped bf16 checkpoint ({shape.layers} layers, hidden {shape.hidden}, 2 shards) "
            f"and an r=16 LoRA adapter in {root} ({time.perf_counter() - t0:.2f} s)"
        )
        report = merge(base, [adapter], root / "merged", progress=False, overwrite=True)
        echo(
            f"lorafast merge: {report.tensors_merged} tensors merged, {report.tensors_copied} copied, "
            f"{report.bytes_written / 1e6:.1f} MB written in {report.seconds:.3f} s -> {report.output}"
        )
        result = {"report": report}
        if verify and _have_peft():
            result.update(_verify(base, adapter, root / "merged", root / "peft", echo))
        elif verify:
            echo("PEFT is not installed: skipped the comparison (pip install 'lorafast[torch]' to run it)")
        return result


def _verify(base: Path, adapter: Path, merged: Path, peft_out: Path, echo) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from lorafast.reference import compare_checkpoints, peft_merge

    t0 = time.perf_counter()
    peft_merge(base, [adapter], peft_out)
    peft_s = time.perf_counter() - t0
    cmp = compare_checkpoints(merged, peft_out)
    stats = cmp["tensors"].values()
    worst = min(s["equal_fraction"] for s in stats)
    max_ulp = max(s["max_ulp"] for s in stats)
    echo(
        f"PEFT merge_and_unload + save_pretrained: {peft_s:.2f} s; lorafast vs PEFT on {len(cmp['tensors'])} tensors: "
        f"worst tensor {worst * 100:.4f}% bit-identical, max {max_ulp} ULP"
    )
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(peft_out)).eval()(ids).logits
    diff = (a.float() - b.float()).abs().max().item()
    echo(f"logits of the two merged models: max |difference| = {diff:.3g}")
    return {"equal_fraction": worst, "max_ulp": max_ulp, "logit_diff": diff, "peft_seconds": peft_s}
