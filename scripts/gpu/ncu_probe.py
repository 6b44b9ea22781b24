#!/usr/bin/env python3
"""A few decode-kernel launches for Nsight Compute to profile (what bounds them at N = 1):

    ncu --clock-control none -k regex:'gemv|lora_shrink|dequant' --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python scripts/gpu/ncu_probe.py

One ``aqlm_gemm`` (the GEMV kernel), one ``lora_forward`` (lora_shrink, then the GEMV with the LoRA
epilogue) at N = 1 and one ``dequantize`` (the tiled path's kernel), in fp16, per case: 4096x4096
1x16 (codebooks gathered from global memory/L2), 4096x4096 2x8 (codebooks staged in shared memory)
and 8192x28672 2x8. Without a GPU it exits 0.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("ncu_probe: no CUDA device; nothing to do")
        return 0
    from aqlm_lora import ops
    from aqlm_lora.scheme import random_weight

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for scheme, out_features, in_features in (("1x16", 4096, 4096), ("2x8", 4096, 4096), ("2x8", 8192, 28672)):
        w = random_weight(scheme, out_features, in_features, torch.float16, device, generator=g)
        a = (torch.randn(16, in_features, generator=g) / in_features**0.5).to(device, torch.float16)
        b = (torch.randn(out_features, 16, generator=g) * 0.05).to(device, torch.float16)
        x = torch.randn(1, in_features, generator=g).to(device, torch.float16)
        with torch.no_grad():
            ops.aqlm_gemm(x, *w.args(), None)
            ops.lora_forward(x, *w.args(), None, a, b, None, 2.0, 0.0, 0, 0)
            ops.dequantize(*w.args())  # the kernel behind every N above the decode threshold
        torch.cuda.synchronize()
        print(f"ncu_probe: {out_features}x{in_features} {scheme} N=1 done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
