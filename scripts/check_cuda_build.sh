#!/usr/bin/env bash
# Compiles the CUDA kernels and checks that every aqlm_lora op has a CUDA kernel. No GPU needed.
#
# - Its own venv (AQLM_LORA_CUDA_VENV, default .venv-cuda; git-ignored), with a CUDA build of torch
#   (AQLM_LORA_CUDA_TORCH, default torch==2.14.1, a CUDA 13.0 build) plus numpy, ninja, setuptools,
#   wheel. The CPU venv (.venv) and its in-place build are never touched. The GPU machine has torch
#   2.11: `AQLM_LORA_CUDA_VENV=.venv-cuda211 AQLM_LORA_CUDA_TORCH=torch==2.11.0` checks that the
#   kernels compile against its headers too.
# - Builds from a temporary copy of the repository (tracked and untracked, not ignored files) with
#   AQLM_LORA_USE_CUDA=1 (fail rather than skip CUDA), TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
#   and MAX_JOBS (default 2), installing the package into that venv with --no-deps.
# - Checks registration with scripts/gpu/check_registration.py run from a directory outside the
#   repository, so `import aqlm_lora` (torch only) loads the installed build, not the source tree's
#   CPU one: every op the library's schemas declare must have a CUDA kernel.
# - When CUDA_HOME lacks the cuSPARSE/cuBLAS headers that ATen/cuda/CUDAContext.h includes, the
#   ones shipped in torch's nvidia-* wheels are put on CPATH (scripts/gpu/build_paths.py).
# Exits non-zero when the venv, the build, or the registration of any op fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/${AQLM_LORA_CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${AQLM_LORA_CUDA_TORCH:-torch==2.14.1}
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
JOBS=${MAX_JOBS:-2}

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
"$VENV/bin/python" scripts/gpu/probe_device.py --device cpu --cuda-build

# ---- headers torch's CUDA headers need but a minimal toolkit may lack
if [ ! -f "$CUDA_HOME/include/cusparse.h" ] || [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  extra_inc=$("$VENV/bin/python" scripts/gpu/build_paths.py cuda-includes)
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
"$VENV/bin/python" "$ROOT/scripts/gpu/check_registration.py" --device cuda
say "ok: the CUDA build registers a CUDA kernel for every op"
