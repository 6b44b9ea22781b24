#!/usr/bin/env python3
"""Build tools a bare CUDA machine may lack but Python packages ship; prints where they are.

    python scripts/gpu/build_paths.py ninja-dir       # the ninja package's bin folder, or nothing
    python scripts/gpu/build_paths.py cuda-includes   # include dirs of torch's nvidia-* wheels, ':'-joined

ATen/cuda/CUDAContext.h includes the cuSPARSE/cuBLAS headers, which a minimal CUDA toolkit does
not have; torch's nvidia-* wheels do. An empty line means not found.
"""

from __future__ import annotations

import glob
import os
import site
import sys
import sysconfig
from typing import Optional

CUDA_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")


def ninja_dir() -> str:
    try:
        import ninja
    except ImportError:
        return ""
    # Older ninja packages have no BIN_DIR; their binary sits in data/bin.
    found = getattr(ninja, "BIN_DIR", os.path.join(os.path.dirname(ninja.__file__), "data", "bin"))
    return found if os.path.isfile(os.path.join(found, "ninja")) else ""


def cuda_include_dirs() -> list[str]:
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return sorted(
        {
            os.path.dirname(p)
            for root in roots
            for header in CUDA_HEADERS
            for p in glob.glob(os.path.join(root, "nvidia", "**", "include", header), recursive=True)
        }
    )


def main(argv: Optional[list[str]] = None) -> int:
    what = (argv if argv is not None else sys.argv[1:]) or [""]
    if what[0] == "ninja-dir":
        print(ninja_dir())
    elif what[0] == "cuda-includes":
        print(":".join(cuda_include_dirs()))
    else:
        print(f"usage: {sys.argv[0]} ninja-dir | cuda-includes", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
