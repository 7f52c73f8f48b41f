"""Merge benchmark: every mode of `lorafast merge` against PEFT, a pure-Python merge, `lorafast quantize`
and a plain copy, measured in one run.

Generates (once, cached) a ~1.1B-parameter Llama-shaped bf16 checkpoint (hidden 2048, intermediate
5632, 22 layers, vocab 32000, 3 shards), an r=16 adapter on q,k,v,o,gate,up,down, and the NF4 +
double-quantization checkpoint of the base. Each route is the process a user starts (the `lorafast`
CLI; a Python script for PEFT and the pure-Python merge; `cp -r`), timed from spawn to exit; routes
alternate round by round; the tables show medians.

    python benches/bench_merge.py [--runs 5] [--slow-runs 3] [--skip-peft] [--skip-python] [--skip-4bit]
                                  [--cold] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from _common import CACHE, drop_caches, ensure_model, lorafast_cli, measure_alternating, python_script, table

PEFT = (
    "import sys, transformers\nfrom lorafast.reference import peft_merge\n"
    "transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()\n"
    "peft_merge(sys.argv[1], [sys.argv[2]], sys.argv[3])"
)
PYTHON = (
    "import sys\nfrom lorafast.reference import reference_merge\n"
    "reference_merge(sys.argv[1], [sys.argv[2]], sys.argv[3])"
)
# What users run for a 4-bit base: transformers loads it (bitsandbytes on the CPU), PEFT merges the adapter
# into the Linear4bit layers (dequantize, add, re-quantize) and saves. A failure is reported, not hidden.
PEFT_4BIT = r"""
import sys, os, transformers, peft
transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
merged = peft.PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
try:
    merged.save_pretrained(sys.argv[3])
except Exception as e:
    os.makedirs(sys.argv[3], exist_ok=True)
    import traceback
    where = traceback.extract_tb(e.__traceback__)[-1]
    module = where.filename.split("site-packages/")[-1]
    print(f"SAVE FAILED: {type(e).__name__} in {where.name} ({module})", file=sys.stderr)
"""
LABELS = {
    "lorafast": "`lorafast merge BASE ADAPTER` (Rust, 2 threads)",
    "report": "`lorafast merge BASE ADAPTER --report r.json` (with the per-weight report)",
    "copy": "`cp -r` of the base folder",
    "python": "pure-Python merge (torch + safetensors, shard by shard)",
    "peft": "PEFT from_pretrained + merge_and_unload + save_pretrained",
    "quantize": "`lorafast quantize BASE` (NF4 + double quant)",
    "q_float": "`lorafast merge QBASE ADAPTER` (bf16 output)",
    "q_requant": "`lorafast merge QBASE ADAPTER --requantize`",
    "q_quantize": "`lorafast merge BASE ADAPTER --quantize nf4`",
    "peft_4bit": "transformers + bitsandbytes + PEFT: load QBASE, merge_and_unload, save_pretrained",
}


def ensure_qbase(base: Path, cache: Path = CACHE) -> Path:
    qbase = cache / "llama-1.1b-nf4"
    if not (qbase / "config.json").exists():
        subprocess.run(lorafast_cli("quantize", str(base), "-o", str(qbase), "-q", "--overwrite"), check=True)
    return qbase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9, help="runs of every lorafast route and the copy")
    ap.add_argument("--slow-runs", type=int, default=3, help="runs of PEFT and the pure-Python merge")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-python", action="store_true")
    ap.add_argument("--skip-4bit", action="store_true", help="only the float merge")
    ap.add_argument("--cold", action="store_true", help="also measure with the page cache dropped (needs root)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()

    base, adapter = ensure_model(CACHE)
    scratch = Path(tempfile.mkdtemp(prefix="lorafast-bench-", dir=CACHE))
    b, a = str(base), str(adapter)
    report = str(scratch / "report.json")
    routes = {
        "lorafast": (lambda out: lorafast_cli("merge", b, a, "-o", str(out), "-q"), args.runs),
        "report": (lambda out: lorafast_cli("merge", b, a, "-o", str(out), "-q", "--report", report), args.runs),
        "copy": (lambda out: ["cp", "-r", b, str(out)], args.runs),
    }
    if not args.skip_python:
        routes["python"] = (lambda out: python_script(PYTHON, b, a, str(out)), args.slow_runs)
    if not args.skip_peft:
        routes["peft"] = (lambda out: python_script(PEFT, b, a, str(out)), args.slow_runs)
    results = {}
    try:
        measure_alternating({"copy": routes["copy"]}, scratch)  # warm the page cache
        warm = measure_alternating(routes, scratch)
        size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
        title = (
            f"Merge of an r=16 adapter into a ~1.1B Llama-shaped bf16 checkpoint ({size:.2f} GB, 3 shards), "
            f"{os.cpu_count()} cores, page cache warm:"
        )
        print(table(warm, LABELS, title, "lorafast", "peft" if "peft" in warm else None))
        results["warm"] = warm
        if not args.skip_4bit:
            qbase = ensure_qbase(base)
            q = str(qbase)
            routes4 = {
                "quantize": (lambda out: lorafast_cli("quantize", b, "-o", str(out), "-q"), args.runs),
                "lorafast": routes["lorafast"],
                "q_float": (lambda out: lorafast_cli("merge", q, a, "-o", str(out), "-q"), args.runs),
                "q_requant": (lambda out: lorafast_cli("merge", q, a, "-o", str(out), "-q", "--requantize"), args.runs),
                "q_quantize": (
                    lambda out: lorafast_cli("merge", b, a, "-o", str(out), "-q", "--quantize", "nf4"),
                    args.runs,
                ),
                "copy": routes["copy"],
            }
            if not args.skip_peft:
                routes4["peft_4bit"] = (lambda out: python_script(PEFT_4BIT, q, a, str(out)), 1)
            four = measure_alternating(routes4, scratch)
            qsize = sum(f.stat().st_size for f in qbase.iterdir()) / 1e9
            print()
            print(
                table(
                    four,
                    LABELS,
                    f"The 4-bit modes on the same model (QBASE: its NF4 + double-quant checkpoint, {qsize:.2f} GB):",
                    "lorafast",
                    None,
                )
            )
            qz, mg = four["quantize"]["median"], four["lorafast"]["median"]
            print(
                f"\n--requantize takes {four['q_requant']['median'] / qz:.2f}x and --quantize "
                f"{four['q_quantize']['median'] / qz:.2f}x the time of `lorafast quantize`; a 4-bit base merged to "
                f"bf16 {four['q_float']['median'] / mg:.2f}x the time of the float merge; the report costs "
                f"{100 * (warm['report']['median'] / warm['lorafast']['median'] - 1):+.0f}% on the float merge."
            )
            if "peft_4bit" in four and four["peft_4bit"].get("stderr"):
                print(f"PEFT route: {four['peft_4bit']['stderr']}")
            results["four_bit"] = four
        if args.cold:
            if drop_caches():
                cold_routes = {m: (routes[m][0], max(1, args.slow_runs)) for m in ("lorafast", "copy")}
                cold = measure_alternating(cold_routes, scratch, cold=True)
                print()
                print(table(cold, LABELS, "Same, page cache dropped before each run:", "lorafast", None))
                results["cold"] = cold
            else:
                print("\n(cold-cache runs skipped: cannot drop the page cache here)")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
