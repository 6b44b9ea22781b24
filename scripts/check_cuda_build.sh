#!/usr/bin/env bash
# Compiles the CUDA kernels and checks that every aqlm_lora op has a CUDA kernel. No GPU needed.
#
# - Its own venv, .venv-cuda (git-ignored), with a CUDA build of torch (AQLM_LORA_CUDA_TORCH,
#   default torch==2.14.1, a CUDA 13.0 build) plus numpy, ninja, setuptools, wheel. The CPU venv
#   (.venv) and its in-place build are never touched.
# - Builds from a temporary copy of the repository (tracked and untracked, not ignored files) with
#   AQLM_LORA_USE_CUDA=1 (fail rather than skip CUDA), TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
#   and MAX_JOBS (default 2), installing the package into .venv-cuda with --no-deps.
# - Checks registration from a directory outside the repository by loading the built _C library
#   with torch.ops.load_library: importing the aqlm_lora package would also import its PEFT layer
#   (peft, aqlm and their dependencies), which this compile-only check does not install.
# - When CUDA_HOME lacks the cuSPARSE/cuBLAS headers that ATen/cuda/CUDAContext.h includes, the
#   ones shipped in torch's nvidia-* wheels are put on CPATH.
# Exits non-zero when the venv, the build, or the registration of any op fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv-cuda
TORCH_SPEC=${AQLM_LORA_CUDA_TORCH:-torch==2.14.1}
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
JOBS=${MAX_JOBS:-2}
OPS="dequantize aqlm_gemm aqlm_gemm_t dropout_mask lora_forward lora_backward"

say() { echo "check_cuda_build: $*"; }

# ---- toolchain
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  else
    say "FAILED: nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    exit 1
  fi
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
say "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"

# ---- venv
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
say "installing $TORCH_SPEC numpy ninja setuptools wheel into $VENV (large the first time)"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy ninja setuptools wheel
"$VENV/bin/python" - <<'EOF'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"check_cuda_build: torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# ---- headers torch's CUDA headers need but a minimal toolkit may lack
if [ ! -f "$CUDA_HOME/include/cusparse.h" ] || [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  extra_inc=$("$VENV/bin/python" - <<'EOF'
import glob, os, sysconfig
root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia")
dirs = sorted({os.path.dirname(p) for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
               for p in glob.glob(os.path.join(root, "**", "include", h), recursive=True)})
print(":".join(dirs))
EOF
)
  if [ -n "$extra_inc" ]; then
    say "CUDA_HOME lacks cuSPARSE/cuBLAS headers; using torch's wheels: $extra_inc"
    export CPATH="${extra_inc}${CPATH:+:$CPATH}"
  fi
fi

# ---- build from a temporary copy
WORK=$(mktemp -d "${TMPDIR:-/tmp}/aqlm_lora_cuda.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
else
  tar --exclude='./.venv*' --exclude=./build --exclude=./build-cmake --exclude=./.git --exclude='*.so' -cf - . |
    tar -xf - -C "$WORK/src"
fi
ls "$WORK/src/csrc/cuda/"*.cu >/dev/null 2>&1 || { say "FAILED: no csrc/cuda/*.cu in the copy"; exit 1; }
say "building in $WORK/src (TORCH_CUDA_ARCH_LIST=$ARCHS, MAX_JOBS=$JOBS); log: $WORK/build.log"
t0=$(date +%s)
if ! (cd "$WORK/src" && AQLM_LORA_USE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="$JOBS" \
      "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps . >"$WORK/build.log" 2>&1); then
  tail -n 60 "$WORK/build.log"
  say "FAILED: the build failed after $(( $(date +%s) - t0 ))s (log tail above)"
  exit 1
fi
say "build ok in $(( $(date +%s) - t0 ))s"
warnings=$(grep -E "csrc/cuda/.*(warning|Warning)" "$WORK/build.log" | sort -u || true)
if [ -n "$warnings" ]; then
  say "compiler warnings in csrc/cuda:"
  echo "$warnings"
else
  say "no compiler warnings in csrc/cuda"
fi

# ---- registration check, outside the repository
cd "$WORK"
OPS="$OPS" "$VENV/bin/python" - <<'EOF'
import glob, importlib.util, os, sys
import torch

spec = importlib.util.find_spec("aqlm_lora")  # locates the installed package without importing it
assert spec is not None and spec.submodule_search_locations, "aqlm_lora is not installed in .venv-cuda"
pkg_dir = list(spec.submodule_search_locations)[0]
libs = sorted(glob.glob(os.path.join(pkg_dir, "_C*.so")))
assert libs, f"no _C library in {pkg_dir}"
print(f"check_cuda_build: loading {libs[0]}")
torch.ops.load_library(libs[0])
missing = []
for op in os.environ["OPS"].split():
    name = f"aqlm_lora::{op}"
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    print(f"check_cuda_build:   {name:26s} CUDA kernel: {'yes' if cuda else 'NO'}   CPU kernel: {'yes' if cpu else 'no'}")
    if not cuda:
        missing.append(name)
if missing:
    sys.exit(f"check_cuda_build: FAILED: no CUDA kernel for {', '.join(missing)}")
print("check_cuda_build: ok, every op has a CUDA kernel")
EOF
