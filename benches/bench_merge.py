"""Merge benchmark: lorafast vs PEFT vs a pure-Python merge vs a plain copy, measured in one run.

Generates (once, cached) a ~1.1B-parameter Llama-shaped bf16 checkpoint (hidden 2048, intermediate
5632, 22 layers, vocab 32000, 3 shards) and an r=16 adapter on q,k,v,o,gate,up,down, then times each
method in its own process (median wall time over several runs, peak RSS of that process) and prints
a Markdown table.

    python benches/bench_merge.py [--runs 5] [--slow-runs 3] [--skip-peft] [--cache DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time, os
method, base, adapter, out = sys.argv[1:5]
t0 = time.perf_counter()
if method == "lorafast":
    import lorafast
    lorafast.merge(base, [adapter], out, progress=False)
elif method == "peft":
    from lorafast.reference import peft_merge
    import transformers
    transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()
    peft_merge(base, [adapter], out)
elif method == "python":
    from lorafast.reference import reference_merge
    reference_merge(base, [adapter], out)
wall = time.perf_counter() - t0
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"wall": wall, "peak_rss": hwm}))
"""


def ensure_model(cache: Path) -> tuple[Path, Path]:
    from lorafast.synthetic import BENCH_SHAPE, make_llama_checkpoint, make_lora_adapter

    base, adapter, done = cache / "llama-1.1b", cache / "adapter-r16", cache / "READY"
    if not done.exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        t0 = time.perf_counter()
        print(f"generating the benchmark checkpoint in {cache} ...", file=sys.stderr)
        make_llama_checkpoint(base, BENCH_SHAPE, dtype="bf16", shards=3)
        make_lora_adapter(adapter, BENCH_SHAPE, r=16, alpha=32)
        done.write_text("ok")
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return base, adapter


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(method: str, base: Path, adapter: Path, out: Path) -> dict:
    if method == "copy":
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(base), str(out)], check=True)
        return {"wall": time.perf_counter() - t0, "peak_rss": None}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(base), str(adapter), str(out)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(method: str, runs: int, base: Path, adapter: Path, scratch: Path, cold: bool) -> dict:
    walls, rss = [], []
    for _ in range(runs):
        out = scratch / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # untimed: the previous run's dirty pages must not be written back during this one
        if cold:
            drop_caches()
        res = run_child(method, base, adapter, out)
        walls.append(res["wall"])
        if res["peak_rss"] is not None:
            rss.append(res["peak_rss"])
        shutil.rmtree(out, ignore_errors=True)
    return {
        "median": statistics.median(walls),
        "min": min(walls),
        "runs": runs,
        "peak_rss": max(rss) if rss else None,
    }


LABELS = {
    "lorafast": "lorafast merge (Rust, 2 threads)",
    "peft": "PEFT from_pretrained + merge_and_unload + save_pretrained",
    "python": "pure-Python merge (torch + safetensors, shard by shard)",
    "copy": "`cp -r` of the checkpoint folder",
}


def table(results: dict, title: str) -> str:
    lf, cp, pf = results.get("lorafast"), results.get("copy"), results.get("peft")
    lines = [
        f"{title}",
        "",
        "| method | median wall | min | peak RSS | vs PEFT | vs copy |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if r["peak_rss"] else "-"
        vs_peft = f"{pf['median'] / r['median']:.1f}x faster" if pf and m != "peft" else "-"
        vs_copy = f"{r['median'] / cp['median']:.2f}x the time" if cp and m != "copy" else "-"
        lines.append(f"| {LABELS[m]} | {r['median']:.2f} s | {r['min']:.2f} s | {rss} | {vs_peft} | {vs_copy} |")
    if lf and pf:
        lines.append("")
        lines.append(
            f"lorafast is {pf['median'] / lf['median']:.1f}x faster than PEFT and takes "
            f"{lf['median'] / cp['median']:.2f}x the time of a plain copy; peak RSS {lf['peak_rss'] / 2**20:.0f} MiB."
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs of lorafast and copy")
    ap.add_argument("--slow-runs", type=int, default=3, help="runs of PEFT and the pure-Python merge")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-python", action="store_true")
    ap.add_argument("--cold", action="store_true", help="also measure with the page cache dropped (needs root)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("LORAFAST_BENCH_CACHE", Path.home() / ".cache/lorafast/bench")),
    )
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()

    base, adapter = ensure_model(args.cache)
    scratch = Path(tempfile.mkdtemp(prefix="lorafast-bench-", dir=args.cache))
    methods = ["lorafast", "copy"] + ([] if args.skip_python else ["python"]) + ([] if args.skip_peft else ["peft"])
    try:
        run_child("copy", base, adapter, scratch / "warm")  # warm the page cache
        shutil.rmtree(scratch / "warm")
        warm = {}
        for m in methods:
            runs = args.runs if m in ("lorafast", "copy") else args.slow_runs
            warm[m] = measure(m, runs, base, adapter, scratch, cold=False)
            print(f"{m}: {warm[m]}", file=sys.stderr)
        size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
        print(
            table(
                warm,
                f"Merge of an r=16 adapter into a ~1.1B Llama-shaped bf16 checkpoint ({size:.2f} GB, "
                f"3 shards), {os.cpu_count()} cores, page cache warm:",
            )
        )
        out = {"warm": warm}
        if args.cold:
            if drop_caches():
                cold = {
                    m: measure(m, max(1, args.slow_runs), base, adapter, scratch, cold=True)
                    for m in ("lorafast", "copy")
                }
                print()
                print(table(cold, "Same, page cache dropped before each run:"))
                out["cold"] = cold
            else:
                print("\n(cold-cache runs skipped: cannot drop the page cache here)")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
