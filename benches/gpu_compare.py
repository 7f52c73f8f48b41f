"""Compare lorafast's 4-bit kernel (bitsandbytes' CPU semantics) with bitsandbytes' CUDA kernels.

Run on a machine with a GPU: prints, per case, how many packed bytes, absmax values and dequantized
values differ between lorafast and bitsandbytes on CUDA, and the CUDA kernels' speed.
"""

from __future__ import annotations

import time

import bitsandbytes.functional as F
import torch

from lorafast.quant import dequantize_4bit, quantize_4bit


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    code = F.get_4bit_type("nf4", device="cpu").float()
    mids = (code[:-1] + code[1:]) / 2
    fp4 = F.get_4bit_type("fp4", device="cpu").float().sort().values
    cases = {
        "random": torch.randn(512, 1030, generator=g) * 0.05,
        "zero blocks": torch.cat([torch.randn(64, generator=g), torch.zeros(128), torch.randn(64, generator=g)]),
        "thresholds": torch.cat([torch.ones(1), mids, -mids, (fp4[:-1] + fp4[1:]) / 2, -(fp4[:-1] + fp4[1:]) / 2]),
        "outlier": torch.cat([torch.randn(255, generator=g) * 1e-3, torch.tensor([3e4])]),
    }
    return {k: v.to(dtype) for k, v in cases.items()}


def main() -> None:
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| dtype | type | blocksize | dq | case | packed bytes differing | absmax differing | dequantized differing |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for qt in ("nf4", "fp4"):
            for bs in (64, 128):
                for dq in (False, True):
                    for name, x in inputs(dtype).items():
                        pc, sc = F.quantize_4bit(x.cuda(), blocksize=bs, quant_type=qt, compress_statistics=dq)
                        po, so = quantize_4bit(x, qt, bs, dq)
                        dc = sc.as_dict(packed=True)
                        bytes_diff = int((pc.cpu() != po).sum())
                        a_c, a_o = dc["absmax"].cpu(), so["absmax"]
                        absmax_diff = int((a_c.view(torch.uint8) != a_o.view(torch.uint8)).sum())
                        # Dequantize lorafast's output with bitsandbytes' CUDA kernel and with lorafast.
                        qs = F.QuantState.from_dict({k: v.cuda() for k, v in so.items()}, device="cuda")
                        dq_c = F.dequantize_4bit(po.cuda(), qs).cpu().reshape(x.shape)
                        dq_o = dequantize_4bit(po, so)
                        bits = torch.int32 if dtype == torch.float32 else torch.int16
                        nan = torch.isnan(dq_o)
                        deq_diff = int((dq_c.view(bits) != dq_o.view(bits))[~nan].sum())
                        deq_num = int((dq_c != dq_o)[~nan].sum())
                        print(
                            f"| {str(dtype)[6:]} | {qt} | {bs} | {dq} | {name} | {bytes_diff}/{po.numel()} | "
                            f"{absmax_diff}/{a_o.numel()} | {deq_diff} bits, {deq_num} values |"
                        )
    n = 5632 * 2048 * 8
    x = (torch.randn(n, device="cuda") * 0.02).to(torch.bfloat16)
    for _ in range(3):
        p, s = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        p, s = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    torch.cuda.synchronize()
    q = (time.perf_counter() - t) / 10
    t = time.perf_counter()
    for _ in range(10):
        F.dequantize_4bit(p, s)
    torch.cuda.synchronize()
    d = (time.perf_counter() - t) / 10
    print(
        f"\nbitsandbytes CUDA on {torch.cuda.get_device_name()}: quantize (nf4, dq, bf16) {n / q / 1e9:.1f} G el/s, "
        f"dequantize {n / d / 1e9:.1f} G el/s"
    )


if __name__ == "__main__":
    main()
