#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a machine with one NVIDIA GPU, written for a box that has
# never run it: an H200 with torch (2.11+cu130) preinstalled in /opt/torch/.venv, Python 3.12,
# nvcc 13, ninja, pytest, 16 cores, no network. It installs nothing from the network.
#
# Usage, from anywhere (it works in the repository root):
#   OUT=/some/dir bash scripts/gpu_check.sh        # everything lands in $OUT (default ./gpu_check_out)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh # the dry run on a machine without a GPU (see Knobs)
#
# Steps, each under `timeout` with a cap taken from what is left of DEADLINE_S (default 460 s,
# under 8 minutes with the kill grace), so the summary line is always written:
#   0. preflight: python (PYTHON, else the first of /opt/torch/.venv/bin/python3, ./.venv/bin/python
#      and python3 that exists; its bin/ and $CUDA_HOME/bin go first on PATH), torch and the GPU
#      (scripts/gpu/probe_device.py), nvcc, ninja (required: a serial build of the ~10 sources can
#      pass the cap; scripts/gpu/build_paths.py finds the pip package's binary and torch's cuBLAS
#      headers); aqlm from the wheel in .whl/ when `import aqlm` fails (see below);
#   1. build the extension in place with its CUDA kernels (AQLM_LORA_USE_CUDA=1,
#      TORCH_CUDA_ARCH_LIST from the GPU, MAX_JOBS = cores; `setup.py build_ext --inplace` needs no
#      write access to site-packages) -> build.log;
#   2. scripts/gpu/check_registration.py: `import aqlm_lora` works and every op the library
#      registers (its schemas, read back from the dispatcher) has a CUDA kernel;
#   3. scripts/gpu_smoke.py: every op against aqlm_lora/reference.py (every GEMV variant, the
#      shared-memory thresholds, a non-default stream, dropout indices past 2**31) -> smoke.log;
#   4. the test suite's CUDA cases: the device-parametrized test files with -k "cuda or device_mix"
#      -> pytest.log, pytest_junit.xml (--durations=25 in the log; scripts/gpu/junit_counts.py sums it);
#   5. benchmarks/bench_cuda.py with aqlm's JIT-compiled kernels when `import aqlm` works, else (or
#      if that fails) without -> bench_cuda.md (.csv, .png beside it), bench.log; then, as time
#      allows, scripts/gpu/gemv_grid_sweep.py -> sweep.md and Nsight Compute on the N = 1 decode
#      kernels (scripts/gpu/ncu_probe.py) -> ncu.txt. None of these fails the check.
# Also in $OUT: gpu_check.log (this output), summary.txt (the last line). The last line is
#   gpu_check: PASSED|FAILED (<failed steps>)|INCOMPLETE (pytest) in <s>s: build ...; smoke <n> checks,
#   <n> failures, ...; pytest <n> passed, <n> failed, <n> errors, <n> skipped; bench ...
# Exit status: 0 when preflight, build, registration, smoke test and tests pass; 1 when one fails;
# 3 when pytest reached its time cap before any failure (what ran passed, not everything ran).
#
# aqlm (pure Python; the tests' oracle and the benchmark's aqlm column) is not installed on that
# machine and it has no network. Bring its wheel along in .whl/ (git-ignored):
#   pip download aqlm==1.1.7 --no-deps -d .whl      # or: pip wheel aqlm==1.1.7 --no-deps -w .whl
# and name the folder in the device tool's carry list (carry: [".whl"]). The script then runs
#   pip install --no-index --no-deps --target <tmp dir> .whl/*.whl
# and puts <tmp dir> on PYTHONPATH. Without it the tests that need aqlm are skipped, not failed.
#
# Knobs (defaults are for the GPU box): PYTHON, CUDA_HOME, MAX_JOBS, TORCH_CUDA_ARCH_LIST,
# DEADLINE_S, GPU_CHECK_SKIP_BUILD, GPU_CHECK_PYTEST_FILES, GPU_CHECK_PYTEST_K, GPU_CHECK_PYTEST_CAP_S,
# GPU_CHECK_BENCH_BUDGET (seconds per benchmark cell, default 0.05), GPU_CHECK_BENCH_ARGS (more
# arguments for bench_cuda.py, e.g. "--tokens 1,8,4096"), GPU_CHECK_BENCH_AQLM=0 (no aqlm column),
# GPU_CHECK_PYTEST_WORKERS (pytest-xdist processes when it is installed; default 6 on cuda, 0 on cpu),
# GPU_CHECK_SMOKE_ARGS. Exit 0 PASSED, 1 FAILED, 3 INCOMPLETE (pytest stopped at its time cap with no
# failure before it: rerun with a larger DEADLINE_S, or fewer GPU_CHECK_PYTEST_FILES).
# GPU_CHECK_DEVICE=cpu is a dry run of the whole flow on the CPU kernels of the existing in-place
# build (tests/test_gpu_smoke.py runs it): it never rebuilds (GPU_CHECK_SKIP_BUILD defaults to 1, as
# other work may be using that library), and the smoke test and pytest run a CPU-sized subset
# (GPU_CHECK_SMOKE_ARGS="" asks for the whole smoke test).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_check.log") 2>&1

T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-460}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  SKIP_BUILD=${GPU_CHECK_SKIP_BUILD:-1}
  cpu_smoke_args="--quick --tokens 1"  # CPU-sized: no 4096x4096 shapes, one token count
  SMOKE_ARGS=${GPU_CHECK_SMOKE_ARGS-$cpu_smoke_args}
else
  SKIP_BUILD=${GPU_CHECK_SKIP_BUILD:-0}
  SMOKE_ARGS=${GPU_CHECK_SMOKE_ARGS-}
fi
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
# cap WANT [RESERVE]: WANT seconds, or what is left before the deadline minus RESERVE (kept for
# later steps) if less; at least 5.
cap() {
  local want=$1 avail=$(( $(left) - ${2:-0} ))
  (( avail < want )) && want=$avail
  (( want < 5 )) && want=5
  echo "$want"
}

FAILED_STEPS=()
INCOMPLETE_STEPS=()  # stopped at their time cap with no failure so far: not a kernel verdict
S_BUILD="not run"
S_SMOKE="not run"
S_PYTEST="not run"
S_BENCH="not run"
fail() { FAILED_STEPS+=("$1"); say "FAILED: $1${2:+: $2}"; }
incomplete() { INCOMPLETE_STEPS+=("$1"); say "INCOMPLETE: $1${2:+: $2}"; }
finish() {
  local verdict=PASSED
  (( ${#INCOMPLETE_STEPS[@]} )) && verdict="INCOMPLETE (${INCOMPLETE_STEPS[*]})"
  (( ${#FAILED_STEPS[@]} )) && verdict="FAILED (${FAILED_STEPS[*]})"
  local line="gpu_check: $verdict in $(( $(date +%s) - T0 ))s: build $S_BUILD; smoke $S_SMOKE; pytest $S_PYTEST; bench $S_BENCH"
  echo "$line"
  echo "$line" >"$OUT/summary.txt"
  sleep 1  # let tee flush gpu_check.log
  (( ${#FAILED_STEPS[@]} )) && exit 1
  (( ${#INCOMPLETE_STEPS[@]} )) && exit 3
  exit 0
}
trap finish EXIT

# ---- 0. preflight -------------------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x /opt/torch/.venv/bin/python3 ]; then
  PY=/opt/torch/.venv/bin/python3
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=$(command -v python3 || command -v python || echo python3)
fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
export CUDA_HOME PATH="$(dirname "$PY"):$CUDA_HOME/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1  # logs of a step killed by its timeout keep every line
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
say "device: $DEVICE, deadline ${DEADLINE_S}s, out: $OUT"
say "python: $PY ($("$PY" --version 2>&1))"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null ||
  say "nvidia-smi not available"
if ! ARCH_FOUND=$(timeout -k 5 "$(cap 90)" "$PY" scripts/gpu/probe_device.py --device "$DEVICE"); then
  fail preflight "torch cannot use the $DEVICE device (see above)"
  exit 1
fi
ARCH=${TORCH_CUDA_ARCH_LIST:-${ARCH_FOUND:-9.0}}

if [ "$SKIP_BUILD" != 1 ]; then
  say "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1 || echo 'NOT FOUND')"
  if ! command -v ninja >/dev/null 2>&1; then
    # pip's ninja package puts the binary in its own folder; use it when the module is there.
    NINJA_DIR=$("$PY" scripts/gpu/build_paths.py ninja-dir 2>/dev/null)
    [ -n "$NINJA_DIR" ] && [ -x "$NINJA_DIR/ninja" ] && export PATH="$NINJA_DIR:$PATH"
  fi
  if ! command -v ninja >/dev/null 2>&1; then
    fail preflight "ninja not found on PATH (nor as the python package): without it the build is serial and can pass the time cap"
    exit 1
  fi
  say "ninja: $(command -v ninja) ($(ninja --version)), MAX_JOBS=$JOBS, TORCH_CUDA_ARCH_LIST=$ARCH"
  # ATen/cuda/CUDAContext.h includes the cuSPARSE/cuBLAS headers; a minimal toolkit lacks them.
  if [ ! -f "$CUDA_HOME/include/cusparse.h" ] || [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
    extra_inc=$("$PY" scripts/gpu/build_paths.py cuda-includes)
    if [ -n "$extra_inc" ]; then
      say "CUDA_HOME lacks cuSPARSE/cuBLAS headers; adding torch's wheel headers to CPATH: $extra_inc"
      export CPATH="${extra_inc}${CPATH:+:$CPATH}"
    fi
  fi
fi

# aqlm from the wheel brought along in .whl/, when it is not importable already.
if "$PY" -c "import aqlm" 2>/dev/null; then
  say "aqlm: importable"
else
  wheels=(.whl/*.whl)
  if [ -f "${wheels[0]}" ]; then
    DEPS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_pydeps.XXXXXX")
    say "aqlm: installing ${wheels[*]} into $DEPS (no index, no deps)"
    if ! timeout -k 5 "$(cap 60)" "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" "${wheels[@]}" \
        >"$OUT/pip.log" 2>&1; then
      say "pip failed (see pip.log); unpacking the wheel instead (aqlm is pure Python)"
      "$PY" scripts/gpu/unpack_wheels.py "$DEPS" "${wheels[@]}" >>"$OUT/pip.log" 2>&1
    fi
    export PYTHONPATH="$PYTHONPATH:$DEPS"
    if "$PY" -c "import aqlm" >>"$OUT/pip.log" 2>&1; then
      say "aqlm: importable from $DEPS"
    else
      say "aqlm: still not importable (see pip.log); tests that need it will be skipped"
    fi
  else
    say "aqlm: not installed and no .whl/*.whl brought along; tests that need it will be skipped"
  fi
fi

# ---- 1. build -----------------------------------------------------------------------------------
if [ "$SKIP_BUILD" = 1 ]; then
  S_BUILD="skipped (GPU_CHECK_SKIP_BUILD=1)"
  say "1. build skipped; using the existing aqlm_lora/_C*.so"
else
  say "1. build: AQLM_LORA_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS setup.py build_ext --inplace (log: build.log)"
  rm -f aqlm_lora/_C*.so  # never test a stale library
  tb=$(date +%s)
  AQLM_LORA_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS timeout -k 10 "$(cap 270 150)" \
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  if (( rc == 0 )) && ls aqlm_lora/_C*.so >/dev/null 2>&1; then
    S_BUILD="ok ($(( $(date +%s) - tb ))s)"
    say "build ok"
    grep -E "csrc/.*warning" "$OUT/build.log" | sort -u | head -n 20
  else
    tail -n 40 "$OUT/build.log"
    S_BUILD="FAILED (exit $rc$( (( rc == 124 || rc == 137 )) && echo ', timed out'))"
    fail build "exit $rc, see build.log"
    exit 1
  fi
fi

# ---- 2. registration ----------------------------------------------------------------------------
say "2. registration"
# Every op the library's schemas declare, read back from the dispatcher (no list to keep in sync).
if ! timeout -k 5 "$(cap 60)" "$PY" scripts/gpu/check_registration.py --device "$DEVICE"; then
  fail registration
  exit 1
fi

# ---- 3. smoke test ------------------------------------------------------------------------------
say "3. smoke test: scripts/gpu_smoke.py --device $DEVICE $SMOKE_ARGS (log: smoke.log)"
# shellcheck disable=SC2086  # SMOKE_ARGS is a list of words
timeout -k 10 "$(cap 150 120)" "$PY" scripts/gpu_smoke.py --device "$DEVICE" $SMOKE_ARGS \
  >"$OUT/smoke.log" 2>&1
rc=$?
last=$(grep -E "^gpu_smoke: [0-9]+ checks" "$OUT/smoke.log" | tail -n 1)
grep -E "^(FAIL|WARN)" "$OUT/smoke.log" | head -n 30
S_SMOKE=${last#gpu_smoke: }
case $rc in
  0) say "smoke test ok: ${S_SMOKE}" ;;
  124|137)
    S_SMOKE="timed out after $(grep -c '^ok' "$OUT/smoke.log") ok and $(grep -c '^FAIL' "$OUT/smoke.log") failed checks"
    fail smoke "timed out (see smoke.log)" ;;
  *) [ -n "$last" ] || { tail -n 15 "$OUT/smoke.log"; S_SMOKE="exit $rc"; }; fail smoke "exit $rc (see smoke.log)" ;;
esac

# ---- 4. the test suite's CUDA cases -------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  # Device-parametrized files (tests/support/weights.py: devices() adds "cuda" ids) and the mixed-device check.
  # Values first; opcheck (slowest per case) last, so a time cap cuts the least telling cases.
  PYTEST_FILES=${GPU_CHECK_PYTEST_FILES:-tests/ops/test_ops.py tests/ops/test_multi_lora.py tests/ops/test_nonfinite.py tests/ops/test_dropout.py tests/ops/test_autograd.py tests/ops/test_checks.py tests/ops/test_opcheck.py}
  PYTEST_K=${GPU_CHECK_PYTEST_K:-cuda or device_mix}
else
  PYTEST_FILES=${GPU_CHECK_PYTEST_FILES:-tests/ops/test_dropout.py}
  PYTEST_K=${GPU_CHECK_PYTEST_K:-cpu}
fi
# pytest-xdist (on the GPU box's image) spreads the cases over a few processes sharing the GPU.
WORKERS=${GPU_CHECK_PYTEST_WORKERS:-$([ "$DEVICE" = cuda ] && echo 6 || echo 0)}
XDIST=()
if (( WORKERS > 0 )) && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); fi
if "$PY" -c "import pytest" 2>/dev/null; then
  say "4. pytest $PYTEST_FILES -k '$PYTEST_K' ${XDIST[*]} (log: pytest.log, pytest_junit.xml)"
  # SIGINT first: pytest stops, prints its summary and writes the junit xml of what ran.
  # shellcheck disable=SC2086  # PYTEST_FILES is a list of paths
  timeout -s INT -k 20 "${GPU_CHECK_PYTEST_CAP_S:-$(cap 240 40)}" "$PY" -m pytest $PYTEST_FILES "${XDIST[@]}" -q -k "$PYTEST_K" -p no:cacheprovider \
    --maxfail=100 --durations=25 --junitxml="$OUT/pytest_junit.xml" -o junit_family=xunit1 >"$OUT/pytest.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/pytest.log"
  counts=$("$PY" scripts/gpu/junit_counts.py "$OUT/pytest_junit.xml" 2>/dev/null)
  S_PYTEST=${counts:-"no junit xml"}
  case $rc in
    0) say "pytest ok: $S_PYTEST" ;;
    5) S_PYTEST="no test collected"; fail pytest "collected no test (GPU not visible to the tests, or kernels not registered?)" ;;
    124|137)
      # The time cap, not a test, stopped it: a failure only if a test failed before that.
      if [[ $S_PYTEST == *" 0 failed, 0 errors"* ]]; then
        S_PYTEST="stopped at the time cap after: $S_PYTEST"; incomplete pytest "time cap (no failure before it)"
      else
        S_PYTEST="timed out after: $S_PYTEST"; fail pytest "timed out"
      fi ;;
    *) fail pytest "exit $rc" ;;
  esac
else
  S_PYTEST="pytest not installed"
  fail pytest "pytest is not installed for $PY"
fi

# ---- 5. benchmarks and profiles (never fail the check) -----------------------------------------
if [ "$DEVICE" = cuda ]; then
  # With aqlm importable, one run with its JIT-compiled CUDA kernels as a column; without it (or if
  # that run fails before its table is complete), one without.
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_torch_ext.XXXXXX")}
  # shellcheck disable=SC2206  # GPU_CHECK_BENCH_ARGS is a list of words
  BENCH_ARGS=(--budget "${GPU_CHECK_BENCH_BUDGET:-0.05}" --out "$OUT/bench_cuda.md" ${GPU_CHECK_BENCH_ARGS:-})
  bench_ok=0
  if [ "${GPU_CHECK_BENCH_AQLM:-1}" = 0 ]; then
    S_BENCH="aqlm column not asked for (GPU_CHECK_BENCH_AQLM=0)"
    rc=0
  elif "$PY" -c "import aqlm" 2>/dev/null; then
    say "5. benchmarks/bench_cuda.py with aqlm's CUDA kernels (log: bench.log; $(left) s left)"
    MAX_JOBS=$JOBS TORCH_CUDA_ARCH_LIST=$ARCH timeout -k 10 "$(cap 300 90)" \
      "$PY" benchmarks/bench_cuda.py "${BENCH_ARGS[@]}" >"$OUT/bench.log" 2>&1
    rc=$?
    (( rc == 0 )) && bench_ok=1
    S_BENCH="with aqlm: $( ((rc == 0)) && echo ok || echo "exit $rc")"
  else
    S_BENCH="aqlm not importable"
    rc=0
  fi
  # A run stopped by its time cap keeps the rows it wrote (the table and CSV are rewritten after
  # every row); a second run would overwrite them and run out of time too.
  if (( ! bench_ok )) && [[ "${rc:-0}" != 124 && "${rc:-0}" != 137 ]]; then
    say "5. benchmarks/bench_cuda.py --no-aqlm (log: bench.log; $(left) s left)"
    timeout -k 10 "$(cap 240 60)" "$PY" benchmarks/bench_cuda.py --no-aqlm "${BENCH_ARGS[@]}" >>"$OUT/bench.log" 2>&1
    rc=$?
    S_BENCH="$S_BENCH; without aqlm: $( ((rc == 0)) && echo ok || echo "exit $rc")"
  fi
  rows=$(grep -cE "^\| [0-9]+x[0-9]+ " "$OUT/bench_cuda.md" 2>/dev/null)
  S_BENCH="$S_BENCH, ${rows:-0} rows"
  say "bench_cuda.py: $S_BENCH"
  if (( $(left) > 90 )); then
    say "5b. scripts/gpu/gemv_grid_sweep.py (log: sweep.md)"
    timeout -k 10 "$(cap 120 40)" "$PY" scripts/gpu/gemv_grid_sweep.py --out "$OUT/sweep.md" >>"$OUT/bench.log" 2>&1 ||
      say "grid sweep did not complete"
  fi
  if command -v ncu >/dev/null 2>&1 && (( $(left) > 45 )); then
    say "5c. ncu on the N=1 decode kernels and dequantize (log: ncu.txt)"
    timeout -k 10 "$(cap 120 5)" ncu --clock-control none -k regex:'gemv|lora_shrink|dequant' --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      "$PY" scripts/gpu/ncu_probe.py >"$OUT/ncu.txt" 2>&1 || say "ncu did not complete (see ncu.txt)"
  fi
  cat "$OUT/bench_cuda.md" 2>/dev/null || say "no bench_cuda.md"
else
  S_BENCH="skipped (device $DEVICE)"
fi
exit 0  # the EXIT trap prints the summary and sets the status
