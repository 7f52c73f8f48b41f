"""Quantization benchmark: lorafast vs bitsandbytes (CPU) and transformers + bitsandbytes, same run.

1. Kernels: NF4 + double quantization of a bf16 tensor and its dequantization, lorafast's Python API
   (output allocation included) against bitsandbytes.functional on the CPU; plus the Rust kernels with
   preallocated buffers (`cargo bench --bench kernels`) when cargo is available.
2. Checkpoints: `lorafast quantize` of the ~1.1B benchmark checkpoint against transformers
   `from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True, nf4, double quant), device_map="cpu")`
   + `save_pretrained`, and a plain copy; each in its own process (wall time, peak RSS).

    python benches/bench_quant.py [--runs 3] [--slow-runs 2] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import CACHE, ensure_model, lorafast_cli, measure_alternating, python_script, table

TRANSFORMERS = (
    "import sys, torch, transformers\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
    "transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()\n"
    "cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,"
    " bnb_4bit_compute_dtype=torch.bfloat16)\n"
    "AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, device_map='cpu')"
    ".save_pretrained(sys.argv[2])"
)
LABELS = {
    "lorafast": "`lorafast quantize` (Rust, 2 threads)",
    "transformers": "transformers + bitsandbytes load_in_4bit + save_pretrained",
    "copy": "`cp -r` of the checkpoint folder",
}


def kernel_table(n_ours: int = 5632 * 2048 * 8, n_bnb: int = 5632 * 2048 * 2) -> str:
    import bitsandbytes.functional as F
    import numpy as np
    import torch

    from lorafast.quant import dequantize_4bit, quantize_4bit

    def best(f, reps=3):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    g = torch.Generator().manual_seed(0)
    rows = [
        f"| kernel (bf16 input, NF4, blocksize 64, double quant, {torch.get_num_threads()} threads) | "
        "quantize | dequantize |",
        "|---|---|---|",
    ]
    x = (torch.randn(n_ours, generator=g) * 0.02).to(torch.bfloat16)
    p, s = quantize_4bit(x, "nf4", 64, True)
    q = best(lambda: quantize_4bit(x, "nf4", 64, True))
    d = best(lambda: dequantize_4bit(p, s))
    api = "lorafast Python API (allocates its outputs)"
    rows.append(f"| {api} | {n_ours / q / 1e9:.2f} G el/s | {n_ours / d / 1e9:.2f} G el/s |")
    xb = x[:n_bnb]
    pb, sb = F.quantize_4bit(xb, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = best(lambda: F.quantize_4bit(xb, blocksize=64, quant_type="nf4", compress_statistics=True), reps=2)
    d = best(lambda: F.dequantize_4bit(pb, sb), reps=2)
    rows.append(f"| bitsandbytes.functional on the CPU | {n_bnb / q / 1e9:.3f} G el/s | {n_bnb / d / 1e9:.2f} G el/s |")
    if shutil.which("cargo"):
        r = subprocess.run(
            ["cargo", "bench", "-q", "--bench", "kernels"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        vals = {
            line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in r.stdout.splitlines()
            if line.startswith("| quantize") or line.startswith("| dequantize")
        }
        if vals:
            rows.append(
                f"| lorafast Rust kernels, preallocated buffers | {vals.get('quantize + double quant')} G el/s | "
                f"{vals.get('dequantize')} G el/s |"
            )
    del np
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--slow-runs", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args()
    if not args.skip_kernels:
        print(kernel_table())
        print()
    base, _ = ensure_model(CACHE)
    scratch = Path(tempfile.mkdtemp(prefix="lorafast-bench-", dir=CACHE))
    b = str(base)
    routes = {
        "lorafast": (lambda out: lorafast_cli("quantize", b, "-o", str(out), "-q"), args.runs),
        "copy": (lambda out: ["cp", "-r", b, str(out)], args.runs),
    }
    if not args.skip_transformers:
        routes["transformers"] = (lambda out: python_script(TRANSFORMERS, b, str(out)), args.slow_runs)
    try:
        measure_alternating({"copy": routes["copy"]}, scratch)  # warm the page cache
        res = measure_alternating(routes, scratch)
        size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
        title = (
            f"NF4 + double quantization of the ~1.1B Llama-shaped bf16 checkpoint ({size:.2f} GB, 3 shards), "
            f"{os.cpu_count()} cores, page cache warm:"
        )
        print(table(res, LABELS, title, "lorafast", "transformers" if "transformers" in res else None))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
