"""Merge two task adapters into one model with weights (a negative weight subtracts an adapter).

python examples/combine_two_adapters.py BASE_DIR ADAPTER_A ADAPTER_B OUT_DIR
"""

import sys

import lorafast

base, a, b, out = sys.argv[1:5]
report = lorafast.merge(base, [a, b], out, weights=[1.0, 0.5], overwrite=True)
print(f"W + 1.0 * dA + 0.5 * dB: {report.tensors_merged} tensors merged in {report.seconds:.2f} s")
