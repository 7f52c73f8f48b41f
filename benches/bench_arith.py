"""Adapter arithmetic benchmark on the ~1.1B checkpoint: lorafast against pure-Python torch and PEFT,
measured in the same run, each in its own process (wall time, peak RSS).

1. extract, rank 16, from a base / fine-tuned pair (the fine-tune: a decaying rank-64 change on every
   linear weight, stored in bf16 as a real fine-tune is, so the difference is full rank): lorafast
   against torch.svd_lowrank and (with --full) torch.linalg.svd, with the energy each captures.
2. combine two r=16 all-linear adapters (cat, linear, svd, ties) against PEFT's add_weighted_adapter (cat).
3. resize an r=16 adapter to rank 8 and by energy; with --full against a dense torch.linalg.svd resize.

    python benches/bench_arith.py [--runs 3] [--full]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import CACHE, ensure_model, lorafast_cli, measure_alternating, python_script

RANK = 16

# What extraction scripts do in torch: per weight, the fp32 difference and a truncated SVD.
TORCH_SVD = {
    "lowrank": "SVD = lambda d: torch.svd_lowrank(d, q=16, niter=2)\n",
    "full": "SVD = lambda d: torch.linalg.svd(d, full_matrices=False)\n",
}
TORCH_EXTRACT = r"""
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
base, tuned, out, energies_path = sys.argv[1:5]
index = json.load(open(f"{base}/model.safetensors.index.json"))["weight_map"]
tensors, energies = {}, {}
for shard in sorted(set(index.values())):
    with safe_open(f"{base}/{shard}", "pt") as fb, safe_open(f"{tuned}/{shard}", "pt") as ft:
        for name in fb.keys():
            if not name.endswith("proj.weight"):
                continue
            d = ft.get_tensor(name).float() - fb.get_tensor(name).float()
            U, S, V = SVD(d)
            if V.shape[0] != d.shape[1]:  # linalg.svd gives Vh
                V = V.T
            module = name[: -len(".weight")]
            energies[module] = float((S[:16] ** 2).sum() / (d * d).sum())
            tensors[f"base_model.model.{module}.lora_B.weight"] = (U[:, :16] * S[:16]).contiguous()
            tensors[f"base_model.model.{module}.lora_A.weight"] = V[:, :16].T.contiguous()
import os
os.makedirs(out, exist_ok=True)
save_file(tensors, f"{out}/adapter_model.safetensors", metadata={"format": "pt"})
json.dump(energies, open(energies_path, "w"))
"""

PEFT_COMBINE = r"""
import sys, torch, transformers, peft
transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[5], torch_dtype=torch.float32)
pm = peft.PeftModel.from_pretrained(model, sys.argv[1], adapter_name="a")
pm.load_adapter(sys.argv[2], adapter_name="b")
pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type=sys.argv[4])
pm.save_pretrained(sys.argv[3], selected_adapters=["mix"])
"""
TORCH_RESIZE = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(f"{sys.argv[1]}/adapter_model.safetensors")
cfg = json.load(open(f"{sys.argv[1]}/adapter_config.json"))
s = cfg["lora_alpha"] / cfg["r"]
out = {}
for k in [k for k in sd if k.endswith("lora_A.weight")]:
    kb = k.replace("lora_A", "lora_B")
    U, S, Vh = torch.linalg.svd(sd[kb] @ sd[k] * s, full_matrices=False)  # dense delta, as sd-scripts does
    out[kb] = (U[:, :8] * S[:8]).contiguous()
    out[k] = Vh[:8].contiguous()
import os
os.makedirs(sys.argv[2], exist_ok=True)
save_file(out, f"{sys.argv[2]}/adapter_model.safetensors")
"""


def ensure_tuned(base: Path, cache: Path = CACHE) -> Path:
    """The base plus, on every linear weight, a change with singular values c/k (k = 1..64) sized like a
    fine-tune's (RMS 1e-3 against weights of 0.02), stored in bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    tuned, done = cache / "llama-1.1b-tuned", cache / "TUNED_READY"
    if done.exists():
        return tuned
    print(f"generating the fine-tuned checkpoint in {tuned} ...", file=sys.stderr)
    tuned.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    sigma = 1.0 / torch.arange(1, 65, dtype=torch.float32)
    for f in sorted(base.iterdir()):
        if f.suffix != ".safetensors":
            (tuned / f.name).write_bytes(f.read_bytes())
            continue
        shard = load_file(f)
        for name, w in shard.items():
            if name.endswith("proj.weight"):
                m, n = w.shape
                c = 1e-3 * (m * n / float((sigma**2).sum())) ** 0.5
                u = torch.randn(m, 64, generator=g) / m**0.5
                v = torch.randn(64, n, generator=g) / n**0.5
                shard[name] = (w.float() + (u * (c * sigma)) @ v).to(torch.bfloat16)
        save_file(shard, tuned / f.name, metadata={"format": "pt"})
    done.write_text("ok")
    return tuned


def ensure_second_adapter(cache: Path = CACHE) -> Path:
    from lorafast.synthetic import BENCH_SHAPE, make_lora_adapter

    path = cache / "adapter-r16-b"
    if not (path / "adapter_config.json").exists():
        make_lora_adapter(path, BENCH_SHAPE, r=RANK, alpha=16, seed=2)
    return path


def fmt_rss(r: dict) -> str:
    return f"{r['peak_rss'] / 2**20:.0f} MiB" if r.get("peak_rss") else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also the exact torch.linalg.svd baselines (minutes)")
    args = ap.parse_args()
    base, adapter = ensure_model()
    tuned = ensure_tuned(base)
    adapter_b = ensure_second_adapter()
    work = Path(tempfile.mkdtemp(prefix="lorafast-bench-arith-"))
    lines: list[str] = []

    # 1. extract
    b, t = str(base), str(tuned)
    report = {m: work / f"energy-{m}.json" for m in ("lorafast", "lorafast4", "lowrank", "full")}
    routes = {
        "lorafast": (
            lambda o: lorafast_cli(
                "extract", b, t, "--rank", "16", "-o", str(o), "-q", "--report", str(report["lorafast"])
            ),
            args.runs,
        ),
        "lorafast4": (
            lambda o: lorafast_cli(
                "extract",
                b,
                t,
                "--rank",
                "16",
                "--power-iters",
                "6",
                "--tol",
                "1e-6",
                "-o",
                str(o),
                "-q",
                "--report",
                str(report["lorafast4"]),
            ),
            args.runs,
        ),
        "lowrank": (
            lambda o: python_script(
                TORCH_SVD["lowrank"].join(["import torch\n", TORCH_EXTRACT]), b, t, str(o), str(report["lowrank"])
            ),
            args.runs,
        ),
    }
    if args.full:
        routes["full"] = (
            lambda o: python_script(
                TORCH_SVD["full"].join(["import torch\n", TORCH_EXTRACT]), b, t, str(o), str(report["full"])
            ),
            1,
        )
    results = measure_alternating(routes, work)
    energies: dict[str, dict[str, float]] = {}
    for m in routes:
        data = json.loads(report[m].read_text())
        energies[m] = {x["module"]: x["energy"] for x in data["modules"]} if "modules" in data else data
    methods = list(routes)
    labels = {
        "lorafast": "`lorafast extract` (Rust, randomized SVD, default: 2 power iterations)",
        "lorafast4": "`lorafast extract --power-iters 6`",
        "lowrank": "pure-Python torch: `torch.svd_lowrank(q=16, niter=2)` per weight",
        "full": "pure-Python torch: `torch.linalg.svd` per weight (exact)",
    }
    lines += [
        f"Extract a rank-{RANK} LoRA from the ~1.1B base / fine-tuned pair (154 linear weights, 2 cores):",
        "",
        "| method | median wall | min | peak RSS | mean energy captured | min energy | vs lorafast |",
        "|---|---|---|---|---|---|---|",
    ]
    ours = results["lorafast"]["median"]
    for m in methods:
        e = list(energies[m].values())
        lines.append(
            f"| {labels[m]} | {results[m]['median']:.2f} s | {results[m]['min']:.2f} s | {fmt_rss(results[m])} | "
            f"{statistics.fmean(e):.5f} | {min(e):.5f} | "
            + ("-" if m == "lorafast" else f"{results[m]['median'] / ours:.1f}x the time")
            + " |"
        )
    below = sum(energies["lorafast"][k] < energies["lowrank"][k] for k in energies["lowrank"])
    n = len(energies["lowrank"])
    lines += ["", f"Modules where lorafast's default captures less than torch.svd_lowrank: {below} of {n}."]
    if args.full:
        for m in ("lorafast", "lorafast4"):
            gap = max(energies["full"][k] - energies[m][k] for k in energies["full"])
            lines.append(f"Largest per-module shortfall of {labels[m]} against the exact SVD: {gap:.2e}.")
    lines.append("")

    # 2. combine
    a1, a2 = str(adapter), str(adapter_b)
    routes = {
        method: (
            lambda o, m=method: lorafast_cli(
                "combine",
                a1,
                a2,
                "--weights",
                "0.6,0.4",
                "--method",
                m,
                *(["--density", "0.5"] if m == "ties" else []),
                "-o",
                str(o),
                "-q",
            ),
            args.runs,
        )
        for method in ("cat", "linear", "svd", "ties")
    }
    routes["peft"] = (lambda o: python_script(PEFT_COMBINE, a1, a2, str(o), "cat", b), 1)
    results = measure_alternating(routes, work)
    lines += [
        f"Combine two r={RANK} all-linear adapters (154 modules each) with weights 0.6 / 0.4:",
        "",
        "| method | median wall | min | peak RSS |",
        "|---|---|---|---|",
    ]
    for m, r in results.items():
        label = (
            "PEFT: load fp32 model + 2 adapters, add_weighted_adapter(cat), save"
            if m == "peft"
            else f"`lorafast combine --method {m}`"
        )
        lines.append(f"| {label} | {r['median']:.2f} s | {r['min']:.2f} s | {fmt_rss(r)} |")
    lines.append("")

    # 3. resize
    routes = {
        "rank": (lambda o: lorafast_cli("resize", a1, "--rank", "8", "-o", str(o), "-q"), args.runs),
        "energy": (lambda o: lorafast_cli("resize", a1, "--energy", "0.9", "-o", str(o), "-q"), args.runs),
    }
    if args.full:
        routes["torch"] = (lambda o: python_script(TORCH_RESIZE, a1, str(o)), 1)
    results = measure_alternating(routes, work)
    labels = {
        "rank": "`lorafast resize --rank 8`",
        "energy": "`lorafast resize --energy 0.9`",
        "torch": "pure-Python torch: dense delta + `torch.linalg.svd`, rank 8",
    }
    lines += [f"Resize the r={RANK} adapter:", "", "| method | median wall | min | peak RSS |", "|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {labels[m]} | {r['median']:.2f} s | {r['min']:.2f} s | {fmt_rss(r)} |")
    lines += ["", "Each route a separate process, start-up included; routes alternate; medians."]
    text = "\n".join(lines)
    print(text)
    dest = Path(__file__).parent / "results" / "arith_cpu.md"
    dest.write_text(
        f"Measured {time.strftime('%Y-%m-%d')} with benches/bench_arith.py"
        f"{' --full' if args.full else ''} (2-core machine).\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
