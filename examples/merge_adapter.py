"""Merge a PEFT LoRA adapter into its base model, check it, and load the result.

python examples/merge_adapter.py BASE_DIR ADAPTER_DIR OUT_DIR
"""

import sys

import lorafast

base, adapter, out = sys.argv[1:4]

info = lorafast.inspect_adapter(adapter)
print(f"adapter: r={info['config']['r']}, {info['trainable_parameters']:,} parameters; changes most:")
for m in info["modules"][:3]:
    print(f"  {m['module']}: ||scaling * B A|| = {m['delta_norm']:.4g}")

report = lorafast.merge(base, adapter, out, dtype="bf16", overwrite=True)
print(f"{report.tensors_merged} tensors merged in {report.seconds:.2f} s -> {report.output}")

# The output is a normal model folder:
#   from transformers import AutoModelForCausalLM
#   model = AutoModelForCausalLM.from_pretrained(out)
