#!/usr/bin/env python3
"""Checks that every registered aqlm_lora op has a kernel for one device; exits 1 when one lacks it.

    python scripts/gpu/check_registration.py --device cuda

Imports ``aqlm_lora`` (torch only), so run it where the library to check is the one imported: the
source tree for an in-place build, or a directory outside the repository for an installed one.
Prints one line per op with its CPU and CUDA kernels, then the library's path.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from op_registry import NAMESPACE, has_kernel, missing_kernels, registered_ops

import aqlm_lora


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="whose kernels must exist")
    key = parser.parse_args(argv).device.upper()
    print(f"library: {aqlm_lora.ops._C.__file__}")
    for op in registered_ops():
        kernels = [k for k in ("CPU", "CUDA") if has_kernel(op, k)]
        print(f"  {NAMESPACE}::{op:16s} kernels: {', '.join(kernels) or 'none'}")
    try:
        missing = missing_kernels(key)
    except RuntimeError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    if missing:
        print(f"FAILED: no {key} kernel for {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"ok: every one of the {len(registered_ops())} {NAMESPACE} ops has a {key} kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
