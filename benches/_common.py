"""Shared benchmark plumbing: the cached ~1.1B checkpoint, timed processes, Markdown tables.

Every route is timed as the process a user would start (the `lorafast` CLI, a Python script, `cp -r`),
from spawn to exit, start-up included. Routes run in alternating rounds (A B C, A B C, ...) so that a
slow minute on a shared machine hits all of them alike; the tables report medians. Peak memory is the
process's own maximum resident set (GNU time's %M where it is installed, else wait4's ru_maxrss)."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

CACHE = Path(os.environ.get("LORAFAST_BENCH_CACHE", Path.home() / ".cache/lorafast/bench"))
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


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


def lorafast_cli(*args: str) -> list[str]:
    """The installed `lorafast` command (the console script next to this interpreter)."""
    exe = Path(sys.executable).with_name("lorafast")
    return [str(exe) if exe.exists() else "lorafast", *args]


def python_script(code: str, *args: str) -> list[str]:
    """A Python process running `code` with `args` in sys.argv[1:] (imports and start-up timed too)."""
    return [sys.executable, "-c", code, *args]


def run_timed(argv: list[str]) -> dict:
    """Run one process; its wall time (spawn to exit), peak RSS and the kernel (sys) time it used."""
    import tempfile

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if GNU_TIME:
        argv = [GNU_TIME, "-f", "LORAFAST_BENCH %M %S", *argv]
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if p.returncode != 0:
        raise RuntimeError(f"benchmark process failed: {' '.join(argv)}\n{text[-3000:]}")
    # Without GNU time, wait4's own figures (ru_maxrss is then the larger of this child and what it forked from).
    peak, sys_s = usage.ru_maxrss * 1024, usage.ru_stime
    notes = []
    for line in text.splitlines():
        if line.startswith("LORAFAST_BENCH "):
            kb, s = line.split()[1:]
            peak, sys_s = int(kb) * 1024, float(s)
        elif "FAILED" in line:
            notes.append(line.strip())
    return {"wall": wall, "peak_rss": peak, "sys": sys_s, "notes": notes}


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


Route = Callable[[Path], list[str]]


def settle() -> None:
    """Untimed, before each run: flush what earlier runs wrote and deleted (ext4 mounted with `discard`
    trims freed blocks at the next journal commit), so that no run pays for another's."""
    os.sync()
    time.sleep(0.3)
    os.sync()


def measure_alternating(routes: dict[str, tuple[Route, int]], scratch: Path, cold: bool = False) -> dict:
    """Run each route (argv for an output path, number of runs) in alternating rounds, in an order that
    rotates from round to round; per route the median and min wall time, the max peak RSS and the median
    kernel time. Outputs are removed and flushed (untimed) around every run, so no run pays for another's
    write-back."""
    samples: dict[str, list[dict]] = {m: [] for m in routes}
    rounds = max(n for _, n in routes.values())
    names = list(routes)
    for r in range(rounds):
        # The order rotates: no route is always the one that follows the slowest.
        for m in names[r % len(names) :] + names[: r % len(names)]:
            argv_for, n = routes[m]
            if r >= n:
                continue
            out = scratch / m
            shutil.rmtree(out, ignore_errors=True)
            settle()
            if cold:
                drop_caches()
            samples[m].append(run_timed(argv_for(out)))
            shutil.rmtree(out, ignore_errors=True)
    results = {}
    for m, runs in samples.items():
        walls = [s["wall"] for s in runs]
        rss = [s["peak_rss"] for s in runs if s["peak_rss"] is not None]
        sys_s = [s["sys"] for s in runs if s["sys"] is not None]
        results[m] = {
            "median": statistics.median(walls),
            "min": min(walls),
            "runs": len(walls),
            "peak_rss": max(rss) if rss else None,
            "sys": statistics.median(sys_s) if sys_s else None,
            "stderr": "; ".join(runs[-1]["notes"]),
        }
    return results


def table(results: dict, labels: dict, title: str, ours: str, slow: Optional[str], copy: Optional[str] = "copy") -> str:
    """A Markdown table: each route's median and min wall time, peak RSS, and how it compares with the
    slow alternative and with a plain copy."""
    lf, cp, sl = results.get(ours), results.get(copy) if copy else None, results.get(slow) if slow else None
    head = ["method", "median wall", "min", "peak RSS"]
    if sl:
        head.append(f"vs {labels[slow].split(' ')[0]}")
    if cp:
        head.append("vs copy")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in results.items():
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if r["peak_rss"] else "-"
        row = [labels[m], f"{r['median']:.2f} s", f"{r['min']:.2f} s", rss]
        if sl:
            row.append(f"{sl['median'] / r['median']:.1f}x faster" if m != slow else "-")
        if cp:
            row.append(f"{r['median'] / cp['median']:.2f}x the time" if m != copy else "-")
        lines.append("| " + " | ".join(row) + " |")
    runs = sorted({r["runs"] for r in results.values()})
    lines += ["", f"Each route a separate process, start-up included; medians of {'/'.join(map(str, runs))} runs."]
    if lf and sl and cp:
        lines.append(
            f"lorafast is {sl['median'] / lf['median']:.1f}x faster than {labels[slow]} and takes "
            f"{lf['median'] / cp['median']:.2f}x the time of a plain copy; peak RSS {lf['peak_rss'] / 2**20:.0f} MiB."
        )
    return "\n".join(lines)
