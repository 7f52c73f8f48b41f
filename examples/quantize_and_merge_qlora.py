"""Quantize a base model to NF4 for QLoRA training, then merge the trained adapter back.

    python examples/quantize_and_merge_qlora.py BASE_DIR ADAPTER_DIR WORK_DIR

1. BASE -> WORK/base-nf4: a 4-bit checkpoint, byte-identical to what transformers + bitsandbytes
   write; `AutoModelForCausalLM.from_pretrained(WORK/base-nf4)` loads it in 4-bit for QLoRA training.
2. After training, merge the adapter into the 4-bit base: the base is dequantized exactly as
   bitsandbytes does (the weights the adapter was trained against) and merged with one rounding.
3. Or keep it 4-bit: --requantize re-quantizes only the weights the adapter changed.
4. Or merge a float base and quantize in the same pass (--quantize nf4).
Each merge reports how much of the adapter's change each weight kept.
"""

import sys
from pathlib import Path

import lorafast

base, adapter, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])

q = lorafast.quantize(base, work / "base-nf4", quant_type="nf4", double_quant=True, overwrite=True)
print(f"quantized {q.tensors_quantized} weights in {q.seconds:.2f} s -> {q.output}")

merged = lorafast.merge(q.output, adapter, work / "merged-bf16", overwrite=True)
print(f"merged into the dequantized base: {merged.tensors_merged} tensors -> {merged.output}")

merged4 = lorafast.merge(q.output, adapter, work / "merged-nf4", requantize=True, overwrite=True)
print(f"merged and re-quantized: {merged4.tensors_merged} tensors -> {merged4.output}")

one_pass = lorafast.merge(base, adapter, work / "merged-quantized", quantize="nf4", overwrite=True)
for name, r in (("bf16", merged), ("re-quantized", merged4), ("quantized in one pass", one_pass)):
    kept = sorted(t.retention for t in r.tensors)
    print(f"{name}: median retention of the adapter's change {kept[len(kept) // 2]:.3f}, lowest {kept[0]:.3f}")
