"""Builds the aqlm_lora._C extension: CPU kernels always, CUDA kernels when the toolchain has them.

CUDA is decided from the toolchain (a CUDA build of torch and an nvcc), never from a visible GPU.
AQLM_LORA_USE_CUDA=auto (default) builds CUDA when possible and says why not otherwise; 0 never
builds it; 1 fails when it cannot. MAX_JOBS caps parallel compile jobs (torch's BuildExtension).
AQLM_LORA_SANITIZE=1 builds the C++ (CPU) code with AddressSanitizer and UndefinedBehaviorSanitizer
(for scripts/sanitize.sh; the library then needs libasan preloaded into Python).
"""

from __future__ import annotations

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_unavailable_reasons() -> list[str]:
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        reasons.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return reasons


def _wheel_cuda_includes() -> list[str]:
    """cuBLAS/cuSPARSE headers from torch's nvidia-* wheels, when CUDA_HOME lacks them.

    ATen/cuda/CUDAContext.h includes them; a minimal toolkit (nvcc + cudart only) does not ship them.
    """
    home = CUDA_HOME or ""
    if all(os.path.exists(os.path.join(home, "include", h)) for h in ("cublas_v2.h", "cusparse.h")):
        return []
    root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    found = {
        os.path.dirname(path)
        for header in ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
        for path in glob.glob(os.path.join(root, "**", "include", header), recursive=True)
    }
    if found:
        print("aqlm_lora: using CUDA headers from torch's nvidia wheels: " + ", ".join(sorted(found)))
    return sorted(found)


def _use_cuda() -> bool:
    mode = os.environ.get("AQLM_LORA_USE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"aqlm_lora: AQLM_LORA_USE_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        print("aqlm_lora: CUDA kernels skipped: AQLM_LORA_USE_CUDA=0")
        return False
    reasons = _cuda_unavailable_reasons()
    if reasons:
        if mode == "1":
            raise SystemExit("aqlm_lora: AQLM_LORA_USE_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        print("aqlm_lora: CUDA kernels skipped: " + "; ".join(reasons))
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU torch cannot guess the architectures; build for Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print("aqlm_lora: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0")
    return True


# ASan + UBSan for the C++ code; -ftrivial-auto-var-init=pattern fills uninitialized locals with a
# pattern, so reading one gives garbage the tests notice instead of a lucky zero.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-ftrivial-auto-var-init=pattern", "-g"]


def _sanitize() -> bool:
    mode = os.environ.get("AQLM_LORA_SANITIZE", "0").strip()
    if mode not in ("0", "1"):
        raise SystemExit(f"aqlm_lora: AQLM_LORA_SANITIZE must be 0 or 1, got {mode!r}")
    if mode == "1":
        print("aqlm_lora: sanitizer build (" + " ".join(SANITIZE_FLAGS) + ")")
    return mode == "1"


def _extension():
    use_cuda = _use_cuda()
    sources = ["csrc/aqlm_lora.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp makes at::parallel_for's inline OpenMP regions real; the runtime itself comes from
    # the libgomp that torch already loads, so nothing extra is linked.
    cxx_flags = ["-O3", "-fopenmp"]  # py_limited_api=True makes torch define Py_LIMITED_API
    extra = {"cxx": cxx_flags}
    kwargs = dict(
        name="aqlm_lora._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        py_limited_api=True,
    )
    if _sanitize():
        cxx_flags += SANITIZE_FLAGS
        kwargs["extra_link_args"] = ["-fsanitize=address,undefined"]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += _wheel_cuda_includes()
        return CUDAExtension(sources=sources, extra_compile_args=extra, **kwargs)
    return CppExtension(sources=sources, extra_compile_args=extra, **kwargs)


setup(
    packages=find_packages(include=["aqlm_lora", "aqlm_lora.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
