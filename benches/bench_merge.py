"""Merge benchmark: lorafast vs PEFT vs a pure-Python merge vs a plain copy, measured in one run.

Generates (once, cached) a ~1.1B-parameter Llama-shaped bf16 checkpoint (hidden 2048, intermediate
5632, 22 layers, vocab 32000, 3 shards) and an r=16 adapter on q,k,v,o,gate,up,down, then times each
method in its own process (median wall time over several runs, peak RSS of that process) and prints
a Markdown table.

    python benches/bench_merge.py [--runs 5] [--slow-runs 3] [--skip-peft] [--cold] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from _common import CACHE, drop_caches, ensure_model, measure, run_copy, run_python, table

CODE = {
    "lorafast": (
        "import lorafast\nt0 = time.perf_counter()\n"
        "lorafast.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], progress=False)"
    ),
    "peft": (
        "import transformers\nfrom lorafast.reference import peft_merge\n"
        "transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()\n"
        "t0 = time.perf_counter()\npeft_merge(sys.argv[1], [sys.argv[2]], sys.argv[3])"
    ),
    "python": "from lorafast.reference import reference_merge\nt0 = time.perf_counter()\n"
    "reference_merge(sys.argv[1], [sys.argv[2]], sys.argv[3])",
}
LABELS = {
    "lorafast": "lorafast merge (Rust, 2 threads)",
    "peft": "PEFT from_pretrained + merge_and_unload + save_pretrained",
    "python": "pure-Python merge (torch + safetensors, shard by shard)",
    "copy": "`cp -r` of the checkpoint folder",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs of lorafast and copy")
    ap.add_argument("--slow-runs", type=int, default=3, help="runs of PEFT and the pure-Python merge")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-python", action="store_true")
    ap.add_argument("--cold", action="store_true", help="also measure with the page cache dropped (needs root)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()

    base, adapter = ensure_model(CACHE)
    scratch = Path(tempfile.mkdtemp(prefix="lorafast-bench-", dir=CACHE))
    methods = ["lorafast", "copy"] + ([] if args.skip_python else ["python"]) + ([] if args.skip_peft else ["peft"])

    def runner(m):
        if m == "copy":
            return lambda out: run_copy(base, out)
        return lambda out: run_python(CODE[m], str(base), str(adapter), str(out))

    try:
        run_copy(base, scratch / "warm")  # warm the page cache
        shutil.rmtree(scratch / "warm")
        warm = {
            m: measure(runner(m), args.runs if m in ("lorafast", "copy") else args.slow_runs, scratch / m)
            for m in methods
        }
        size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
        title = (
            f"Merge of an r=16 adapter into a ~1.1B Llama-shaped bf16 checkpoint ({size:.2f} GB, 3 shards), "
            f"{os.cpu_count()} cores, page cache warm:"
        )
        print(table(warm, LABELS, title, "lorafast", "peft"))
        out = {"warm": warm}
        if args.cold:
            if drop_caches():
                cold = {
                    m: measure(runner(m), max(1, args.slow_runs), scratch / m, cold=True) for m in ("lorafast", "copy")
                }
                print()
                print(table(cold, LABELS, "Same, page cache dropped before each run:", "lorafast", "peft"))
                out["cold"] = cold
            else:
                print("\n(cold-cache runs skipped: cannot drop the page cache here)")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
