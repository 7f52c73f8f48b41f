"""Combine two adapters, shrink the result, and pull a LoRA out of a fully fine-tuned model.

python examples/adapter_arithmetic.py BASE TUNED ADAPTER_A ADAPTER_B OUT_DIR
"""

import sys
from pathlib import Path

import lorafast

base, tuned, a, b, out = sys.argv[1:6]
out = Path(out)

# 70% of A plus 30% of B, exactly (cat stacks the scaled factors: rank r_a + r_b).
mixed = lorafast.combine([a, b], out / "mixed", weights=[0.7, 0.3], method="cat")
# Back to at most rank 16, keeping per module the fewest components that hold 99% of its delta.
small = lorafast.resize(mixed.output, out / "mixed-r16", rank=16, energy=0.99)
print("resize kept", small.energy_summary())

# A rank-32 LoRA that approximates TUNED - BASE on every linear layer; changed norms/heads carried whole.
extracted = lorafast.extract(base, tuned, out / "extracted", rank=32, modules_to_save=True)
worst = min(extracted.modules, key=lambda m: m.energy)
print(f"extract captured {extracted.energy_summary()}; lowest {worst.energy:.3f} in {worst.module}")
