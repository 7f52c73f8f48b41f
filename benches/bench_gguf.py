"""GGUF benchmark: `lorafast gguf` against the routes users run today with llama.cpp's own tools, measured
in one run on the ~1.1B Llama-shaped bf16 checkpoint and its r=16 adapter (generated once, cached; a
sentencepiece tokenizer is trained for it once, since GGUF carries the vocabulary).

Routes, each the process(es) a user starts, timed from spawn to exit with start-up included:
- lorafast: `lorafast gguf BASE ADAPTER --type T` (merge + GGUF in one pass).
- today's route: PEFT merge (from_pretrained, merge_and_unload, save_pretrained), then
  `convert_hf_to_gguf.py --outtype bf16`, then llama-quantize (`llama_model_quantize`, the function the
  llama-quantize tool runs, called through the llama-cpp-python binding with 2 threads), one after the other.
- convert + quantize of an already merged model.
- `cp -r` of the base folder.
llama.cpp is the one scripts/llama_cpp.sh builds (llama-cpp-python 0.3.36's vendored copy).

    python benches/bench_gguf.py [--runs 3] [--slow-runs 1] [--skip-peft]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CACHE, ensure_model, lorafast_cli, measure_alternating, table

ROOT = Path(__file__).resolve().parents[1]

PEFT_MERGE = (
    "from lorafast.reference import peft_merge; import sys, transformers\n"
    "transformers.logging.set_verbosity_error(); transformers.logging.disable_progress_bar()\n"
    "peft_merge(sys.argv[1], [sys.argv[2]], sys.argv[3])\n"
    "import shutil; shutil.copy(sys.argv[1] + '/tokenizer.model', sys.argv[3])  # the tokenizer travels too"
)
QUANTIZE = (
    "import os, sys\nsys.path.insert(0, sys.argv[1])\nimport llama_cpp\n"
    "p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[4]); p.nthread = 2\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), p))"
)
FTYPES = {"q4_k_m": 15, "q8_0": 7}
LABELS = {
    "lorafast_q4": "`lorafast gguf BASE ADAPTER --type q4_k_m`",
    "route_q4": "PEFT merge + convert_hf_to_gguf.py (bf16) + llama-quantize q4_k_m",
    "convert_q4": "convert_hf_to_gguf.py (bf16) + llama-quantize q4_k_m, on the merged model",
    "lorafast_bf16": "`lorafast gguf BASE ADAPTER --type bf16`",
    "lorafast_q8": "`lorafast gguf BASE ADAPTER --type q8_0`",
    "convert_bf16": "convert_hf_to_gguf.py --outtype bf16, on the merged model",
    "copy": "`cp -r` of the base folder",
}


def ensure_tokenizer(base: Path) -> None:
    """A sentencepiece tokenizer.model beside the benchmark checkpoint (trained once on generated text)."""
    if (base / "tokenizer.model").exists():
        return
    import numpy as np
    import sentencepiece as spm

    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lines = [" ".join("".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(12)) for _ in range(2000)]
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=f"{tmp}/tokenizer",
            vocab_size=32000,
            model_type="bpe",
            hard_vocab_limit=False,
            minloglevel=2,
        )
        shutil.copy(f"{tmp}/tokenizer.model", base / "tokenizer.model")


def llama_cpp_dir() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "llama_cpp.sh"), sys.executable], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def shell(*steps: list[str]) -> list[str]:
    """One process running the steps one after the other (stopping at the first failure)."""
    import shlex

    return ["bash", "-c", " && ".join(shlex.join(s) for s in steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of every lorafast route and the copy")
    ap.add_argument("--slow-runs", type=int, default=1, help="runs of the llama.cpp routes")
    ap.add_argument("--skip-peft", action="store_true", help="leave out today's route (its PEFT merge)")
    args = ap.parse_args()

    base, adapter = ensure_model(CACHE)
    ensure_tokenizer(base)
    llama = llama_cpp_dir()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama / "build" / "bin")
    convert_py = str(llama / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py")
    scratch = Path(tempfile.mkdtemp(prefix="lorafast-bench-", dir=CACHE))
    b, a, py = str(base), str(adapter), sys.executable
    merged = scratch / "merged"
    subprocess.run(lorafast_cli("merge", b, a, "-o", str(merged), "-q"), check=True)

    def lorafast(t: str):
        return lambda out: shell(
            ["mkdir", "-p", str(out)], lorafast_cli("gguf", b, a, "-o", f"{out}/m.gguf", "--type", t, "-q")
        )

    def convert_quantize(model: str, out: Path) -> list[list[str]]:
        return [
            ["mkdir", "-p", str(out)],
            [py, convert_py, model, "--outtype", "bf16", "--outfile", f"{out}/bf16.gguf"],
            [py, "-c", QUANTIZE, str(llama), f"{out}/bf16.gguf", f"{out}/m.gguf", str(FTYPES["q4_k_m"])],
        ]

    routes = {
        "lorafast_q4": (lorafast("q4_k_m"), args.runs),
        "convert_q4": (lambda out: shell(*convert_quantize(str(merged), out)), args.slow_runs),
        "lorafast_bf16": (lorafast("bf16"), args.runs),
        "lorafast_q8": (lorafast("q8_0"), args.runs),
        "convert_bf16": (
            lambda out: shell(
                ["mkdir", "-p", str(out)],
                [py, convert_py, str(merged), "--outtype", "bf16", "--outfile", f"{out}/m.gguf"],
            ),
            args.slow_runs,
        ),
        "copy": (lambda out: ["cp", "-r", b, str(out)], args.runs),
    }
    if not args.skip_peft:
        routes["route_q4"] = (
            lambda out: shell([py, "-c", PEFT_MERGE, b, a, f"{out}/merged"], *convert_quantize(f"{out}/merged", out)),
            args.slow_runs,
        )
    try:
        measure_alternating({"copy": routes["copy"]}, scratch)  # warm the page cache
        res = measure_alternating(routes, scratch)
        size = sum(f.stat().st_size for f in base.iterdir()) / 1e9
        title = (
            f"GGUF of the ~1.1B Llama-shaped bf16 checkpoint ({size:.2f} GB) with its r=16 adapter merged, "
            f"{os.cpu_count()} cores, page cache warm:"
        )
        print(table(res, LABELS, title, "lorafast_q4", "route_q4" if "route_q4" in res else "convert_q4"))
        q4 = res["lorafast_q4"]["median"]
        print(
            f"\nq4_k_m: {res['convert_q4']['median'] / q4:.1f}x faster than convert + llama-quantize on the merged"
            " model"
            + (f", {res['route_q4']['median'] / q4:.1f}x faster than today's route" if "route_q4" in res else "")
            + f"; bf16 {res['lorafast_bf16']['median'] / res['copy']['median']:.2f}x and q8_0 "
            f"{res['lorafast_q8']['median'] / res['copy']['median']:.2f}x the time of `cp -r`."
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
