"""Shared benchmark plumbing: the cached ~1.1B checkpoint, timed child processes, Markdown tables."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("LORAFAST_BENCH_CACHE", Path.home() / ".cache/lorafast/bench"))

# A child prints its wall time and its peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec and
# would report the parent's peak.
CHILD_FOOTER = r"""
wall = time.perf_counter() - t0
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"wall": wall, "peak_rss": hwm}))
"""


def ensure_model(cache: Path = CACHE) -> tuple[Path, Path]:
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


def run_python(code: str, *args: str) -> dict:
    """Run `code` (which sets t0 and does the work) in a fresh interpreter; its wall time and peak RSS."""
    src = "import json, sys, time\n" + code + CHILD_FOOTER
    r = subprocess.run([sys.executable, "-c", src, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_copy(src: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(out)], check=True)
    return {"wall": time.perf_counter() - t0, "peak_rss": None}


def measure(run, runs: int, out: Path, cold: bool = False) -> dict:
    """Median and min wall time, max peak RSS over `runs` calls of run(out); `out` removed around each."""
    walls, rss = [], []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # untimed: the previous run's dirty pages must not be written back during this one
        if cold:
            drop_caches()
        res = run(out)
        walls.append(res["wall"])
        if res["peak_rss"] is not None:
            rss.append(res["peak_rss"])
        shutil.rmtree(out, ignore_errors=True)
    return {"median": statistics.median(walls), "min": min(walls), "runs": runs, "peak_rss": max(rss) if rss else None}


def table(results: dict, labels: dict, title: str, ours: str, slow: str, copy: str = "copy") -> str:
    lf, cp, sl = results.get(ours), results.get(copy), results.get(slow)
    lines = [title, "", f"| method | median wall | min | peak RSS | vs {slow} | vs copy |", "|---|---|---|---|---|---|"]
    for m, r in results.items():
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if r["peak_rss"] else "-"
        vs_slow = f"{sl['median'] / r['median']:.1f}x faster" if sl and m != slow else "-"
        vs_copy = f"{r['median'] / cp['median']:.2f}x the time" if cp and m != copy else "-"
        lines.append(f"| {labels[m]} | {r['median']:.2f} s | {r['min']:.2f} s | {rss} | {vs_slow} | {vs_copy} |")
    if lf and sl and cp:
        lines += [
            "",
            f"lorafast is {sl['median'] / lf['median']:.1f}x faster than {labels[slow]} and takes "
            f"{lf['median'] / cp['median']:.2f}x the time of a plain copy; peak RSS {lf['peak_rss'] / 2**20:.0f} MiB.",
        ]
    return "\n".join(lines)
