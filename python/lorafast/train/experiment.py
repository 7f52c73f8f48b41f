"""Rank and target-module experiments: one adapter per setting, same data and seed, and a table and a
plot of metric and cost against the setting."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from lorafast._deps import TRAINING, require
from lorafast.errors import InvalidArgumentError, LorafastError

COLUMNS = ["setting", "trainable_parameters", "adapter_bytes", "train_seconds", "peak_memory_bytes", "metric", "value"]


def run(kind: str, settings: Sequence[str], train_argv: list[str], out: Path) -> list[dict]:
    """Train once per setting (`kind` "ranks": settings are ranks; "modules": --targets values), each in
    its own process so that its peak memory is its own, and write results.csv / .md / .png in `out`."""
    if kind not in ("ranks", "modules"):
        raise InvalidArgumentError(f"experiment {kind!r}: use ranks or modules")
    require("lorafast experiment", *TRAINING, "matplotlib")
    if not settings:
        raise InvalidArgumentError(f"no {kind} to compare")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in settings:
        run_dir = out / (f"r{setting}" if kind == "ranks" else setting.replace(",", "+").replace("/", "_"))
        flag = ["--r", str(int(setting))] if kind == "ranks" else ["--targets", setting]
        cmd = [sys.executable, "-m", "lorafast.cli", "train", *train_argv, *flag, "--out", str(run_dir), "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise LorafastError(f"setting {setting}: {(r.stderr.strip().splitlines() or ['training failed'])[-1]}")
        s = json.loads((run_dir / "summary.json").read_text())
        ev = s.get("eval") or {}
        metric = "accuracy" if "accuracy" in ev else ("perplexity" if "perplexity" in ev else "")
        rows.append(
            {
                "setting": setting,
                "trainable_parameters": s["trainable_parameters"],
                "adapter_bytes": s["adapter_bytes"],
                "train_seconds": round(s["train_seconds"], 3),
                "peak_memory_bytes": s["peak_memory_bytes"],
                "metric": metric,
                "value": ev.get(metric),
            }
        )
    write_results(rows, kind, out)
    return rows


def write_results(rows: list[dict], kind: str, out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    metric = rows[0]["metric"] or "eval metric"
    lines = [
        f"| {kind[:-1]} | trainable params | adapter size | train time | peak memory | {metric} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = f"{r['value']:.4f}" if isinstance(r["value"], float) else "-"
        lines.append(
            f"| {r['setting']} | {r['trainable_parameters']:,} | {r['adapter_bytes'] / 1e6:.2f} MB | "
            f"{r['train_seconds']:.1f} s | {r['peak_memory_bytes'] / 2**20:.0f} MiB | {value} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["setting"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(labels, [r["value"] if r["value"] is not None else float("nan") for r in rows], marker="o")
    ax1.set_xlabel(kind[:-1])
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} by {kind[:-1]}")
    ax2.bar(labels, [r["trainable_parameters"] for r in rows], color="tab:orange")
    ax2.set_ylabel("trainable parameters", color="tab:orange")
    ax2.set_xlabel(kind[:-1])
    twin = ax2.twinx()
    twin.plot(labels, [r["train_seconds"] for r in rows], marker="s", color="tab:blue")
    twin.set_ylabel("train seconds", color="tab:blue")
    ax2.set_title("cost")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)
