"""Training on a GPU: LoRA in bf16 and QLoRA (NF4 base quantized by lorafast, paged 8-bit AdamW) on a
generated ~0.2B-parameter Llama-shaped model; prints step time and peak CUDA memory.

    python benches/train_cuda.py TOKENIZER_DIR WORK_DIR
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch

from lorafast.synthetic import LlamaShape, make_llama_checkpoint
from lorafast.train import train


def main() -> None:
    tok_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
    shape = LlamaShape(hidden=1024, intermediate=2816, layers=12, heads=16, kv_heads=4, vocab=30522)
    base = make_llama_checkpoint(work / "base", shape, dtype="bf16")
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, base / f.name)
    rnd = random.Random(0)
    rows = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": f"The sum is {a + b}."}
        for a, b in ((rnd.randint(0, 999), rnd.randint(0, 999)) for _ in range(1024))
    ]
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    print(
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; Llama-shaped model, "
        f"hidden 1024, 12 layers (~0.2B params), r=16 on q,k,v,o,gate,up,down, batch 16, up to 128 tokens"
    )
    print("| run | precision | steps | step time | peak CUDA memory | final train loss |")
    print("|---|---|---|---|---|---|")
    for name, extra in (
        ("LoRA", {}),
        ("QLoRA (NF4 + double quant, paged AdamW 8-bit)", {"qlora": True}),
        ("LoRA + gradient checkpointing", {"grad_checkpointing": True}),
    ):
        out = work / name.split()[0].lower()
        r = train(
            model=str(base),
            data=str(data),
            out=str(out),
            task="causal-lm",
            r=16,
            targets="attn-mlp",
            epochs=1,
            batch_size=16,
            max_length=128,
            lr=2e-4,
            progress=False,
            **extra,
        )
        s = r.summary
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        print(
            f"| {name} | {s['precision']} | {s['steps']} | {1000 * s['train_seconds'] / s['steps']:.0f} ms | "
            f"{s['peak_memory_bytes'] / 2**30:.2f} GiB | {losses[-1]:.3f} |"
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
