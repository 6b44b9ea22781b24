#!/usr/bin/env python3
"""Reports torch and the device it will run on; exits 1 when that device is not usable.

    python scripts/gpu/probe_device.py --device cuda            # prints the GPU's arch, e.g. 9.0
    python scripts/gpu/probe_device.py --device cpu --cuda-build

The report goes to stderr; stdout holds only the arch (``major.minor``) of the GPU with
``--device cuda``, for TORCH_CUDA_ARCH_LIST. ``--cuda-build`` also requires a CUDA build of torch
(a compile needs its CUDA headers even where no GPU is present).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--cuda-build", action="store_true", help="fail unless torch is a CUDA build")
    args = parser.parse_args(argv)
    available = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {available}", file=sys.stderr)
    if args.cuda_build and not torch.version.cuda:
        print(f"FAILED: torch {torch.__version__} is not a CUDA build", file=sys.stderr)
        return 1
    if args.device == "cuda":
        if not available:
            print("FAILED: torch.cuda.is_available() is False: no usable GPU for this torch", file=sys.stderr)
            return 1
        p = torch.cuda.get_device_properties(0)
        gib = p.total_memory / 2**30
        print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {gib:.0f} GiB", file=sys.stderr)
        print(f"{p.major}.{p.minor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
