#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a machine with one NVIDIA GPU. Written for an H200 box with
# torch (2.11+cu130) preinstalled, Python 3.12, 16 cores and no internet: it installs nothing.
#
# Steps, each under a timeout taken from what is left of DEADLINE_S (default 460 s, < 8 min):
#   1. build the extension in place with its CUDA kernels (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16,
#      `setup.py build_ext --inplace`: needs no write access to site-packages);
#   2. check that all six ops have CUDA kernels;
#   3. smoke test: every CUDA op against aqlm_lora/reference.py on small shapes (decode and tiled
#      paths, every kernel variant, fp32/fp16/bf16/fp64, N = 0, strided input, dropout masks);
#      needs only torch, so it runs even where peft/aqlm are missing;
#   4. the test suite's CUDA cases: pytest tests -k cuda;
#   5. benchmarks/bench_cuda.py (first without aqlm, then with aqlm's JIT-compiled kernels when
#      `import aqlm` works and time is left; the second table replaces the first only if it completes).
# Everything lands in $OUT (default ./gpu_check_out): gpu_check.log (this output), build.log,
# smoke.log, pytest.log, bench_cuda.md, bench.log.
# Exit status: 0 when build, registration, smoke test and tests pass; the benchmark never fails it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-460}
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }
# cap N: N seconds, or what is left before the deadline if less (at least 1).
cap() {
  local left=$(( DEADLINE_S - ($(date +%s) - T0) )) want=$1
  (( left < want )) && want=$left
  (( want < 1 )) && want=1
  echo "$want"
}
status=0

PY=${PYTHON:-$(command -v python3 || command -v python)}
say "python: $PY ($("$PY" --version 2>&1))"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null || say "nvidia-smi not available"
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
EOF

# ---- toolchain: nvcc, and the cuSPARSE/cuBLAS headers ATen/cuda/CUDAContext.h includes
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
say "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1 || echo 'NOT FOUND')"
if [ ! -f "$CUDA_HOME/include/cusparse.h" ] || [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
  extra_inc=$("$PY" - <<'EOF'
import glob, os, site, sysconfig
roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
dirs = sorted({os.path.dirname(p) for r in roots for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
               for p in glob.glob(os.path.join(r, "nvidia", "**", "include", h), recursive=True)})
print(":".join(dirs))
EOF
)
  if [ -n "$extra_inc" ]; then
    say "CUDA_HOME lacks cuSPARSE/cuBLAS headers; adding torch's wheel headers to CPATH: $extra_inc"
    export CPATH="${extra_inc}${CPATH:+:$CPATH}"
  fi
fi
"$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null 2>&1 || say "WARNING: no ninja; the build will be serial and slow"

# ---- 1. build
say "1. build: AQLM_LORA_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 setup.py build_ext --inplace"
if AQLM_LORA_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout -k 10 "$(cap 270)" \
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  say "build ok"
  grep -E "csrc/cuda/.*warning" "$OUT/build.log" | sort -u | head -n 20 || true
else
  tail -n 40 "$OUT/build.log"
  say "FAILED: build (see build.log)"
  exit 1
fi

# ---- 2. registration
say "2. registration"
if ! "$PY" - <<'EOF'
import glob, sys
import torch
libs = sorted(glob.glob("aqlm_lora/_C*.so"))
assert libs, "no aqlm_lora/_C*.so after the build"
torch.ops.load_library(libs[0])
ops = ["dequantize", "aqlm_gemm", "aqlm_gemm_t", "dropout_mask", "lora_forward", "lora_backward"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aqlm_lora::{o}", "CUDA")]
print("CUDA kernels:", ", ".join(o for o in ops if o not in missing) or "none")
if missing:
    sys.exit(f"missing CUDA kernels: {missing}")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False")
EOF
then
  say "FAILED: registration / device"
  exit 1
fi

# ---- 3. smoke test against reference.py
say "3. smoke test (log: smoke.log)"
if timeout -k 10 "$(cap 120)" "$PY" - >"$OUT/smoke.log" 2>&1 <<'EOF'
import glob, importlib.util, math, sys, time
import torch

torch.ops.load_library(sorted(glob.glob("aqlm_lora/_C*.so"))[0])
spec = importlib.util.spec_from_file_location("aqlm_lora_reference", "aqlm_lora/reference.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
op = torch.ops.aqlm_lora
dev = torch.device("cuda")
torch.manual_seed(0)
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}
fails = []


def check(name, got, want, tol):
    if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
        fails.append(name)
        print(f"FAIL {name}: got {tuple(got.shape)} {got.dtype} {got.device}, want {tuple(want.shape)} {want.dtype} {want.device}")
        return
    g, w = got.double(), want.double()
    err = 0.0 if w.numel() == 0 else float((g - w).abs().max() / w.abs().max().clamp_min(1e-12))
    ok = err <= tol and bool(torch.isfinite(g).all())
    if not ok:
        fails.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})")


def weight(C, nbits, og, ig, O, I, dtype, code_dtype=None):
    code_dtype = code_dtype or (torch.int8 if nbits <= 8 else torch.int16)
    info = torch.iinfo(code_dtype)
    codes = torch.randint(info.min, info.max + 1, (O, I, C)).to(code_dtype)
    codebooks = (torch.randn(C, 2**nbits, og, ig) / math.sqrt(ig * C)).to(dtype)
    scales = (torch.rand(O, 1, 1, 1) + 0.5).to(dtype)
    return codes.to(dev), codebooks.to(dev), scales.to(dev)


def run_case(tag, w, x, dtype, lora_dtype=None, r=4, p=0.25, seed=1234, offset=7):
    codes, codebooks, scales = w
    tol = max(TOL[dtype], TOL[codebooks.dtype])
    out_f, in_f = codes.shape[0] * codebooks.shape[2], codes.shape[1] * codebooks.shape[3]
    lora_dtype = lora_dtype or dtype
    bias = torch.randn(out_f, device=dev).to(dtype)
    check(f"aqlm_gemm {tag}", op.aqlm_gemm(x, codes, codebooks, scales, bias), ref.aqlm_gemm(x, codes, codebooks, scales, bias), tol)
    g = torch.randn(*x.shape[:-1], out_f, device=dev).to(dtype)
    check(f"aqlm_gemm_t {tag}", op.aqlm_gemm_t(g, codes, codebooks, scales), ref.aqlm_gemm_t(g, codes, codebooks, scales), tol)
    A = (torch.randn(r, in_f, device=dev) / math.sqrt(in_f)).to(lora_dtype)
    B = torch.randn(out_f, r, device=dev).to(lora_dtype)
    lb = torch.randn(out_f, device=dev).to(lora_dtype)
    args = (codes, codebooks, scales, bias, A, B, lb, 0.5, p, seed, offset)
    y, xa = op.lora_forward(x, *args)
    y_ref, xa_ref = ref.lora_forward(x, *args)
    check(f"lora_forward.out {tag}", y, y_ref, tol)
    check(f"lora_forward.xa {tag}", xa, xa_ref, max(tol, TOL[lora_dtype]))
    bargs = (codes, codebooks, scales, A, B, 0.5, p, seed, offset)
    for input_grad in (True, False):
        got = op.lora_backward(g, x, xa, *bargs, input_grad)
        want = ref.lora_backward(g, x, xa, *bargs, input_grad)
        for name, a, b in zip(("grad_input", "grad_A", "grad_B"), got, want):
            check(f"lora_backward.{name} {tag} input_grad={input_grad}", a, b, max(tol, TOL[lora_dtype]))


t0 = time.time()
schemes = [  # (C, nbits, og, ig, code dtype): every decode kernel variant and the generic ones
    (1, 16, 1, 8, None),   # ig8 global (L2) kernel, one codebook
    (2, 8, 1, 8, None),    # ig8 shared-memory kernel
    (1, 8, 2, 8, None),    # shared memory, out_group 2
    (4, 8, 1, 8, None),
    (2, 16, 1, 8, None),   # ig8 global kernel, several codebooks
    (2, 8, 1, 8, torch.int16),
    (1, 16, 1, 16, None),  # generic kernel
    (3, 5, 2, 4, None),    # generic, odd sizes
    (1, 1, 1, 1, torch.int16),
]
for C, nbits, og, ig, cd in schemes:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = weight(C, nbits, og, ig, 24, 10, dtype, cd)
        check(f"dequantize {C}x{nbits} og{og} ig{ig} {dtype}", op.dequantize(*w), ref.dequantize(*w), TOL[dtype])
        for n in (1, 5, 8, 9, 40):
            x = torch.randn(n, 10 * ig, device=dev).to(dtype)
            run_case(f"{C}x{nbits} og{og} ig{ig} {cd or ''} {dtype} N={n}", w, x, dtype)
# float64, mixed dtypes, N = 0, leading dims + strided input, a large decode shape
w64 = weight(2, 8, 1, 8, 24, 10, torch.float64)
for n in (1, 3, 40):
    run_case(f"fp64 N={n}", w64, torch.randn(n, 80, device=dev, dtype=torch.float64), torch.float64)
w32 = weight(2, 8, 1, 8, 24, 10, torch.float32)
run_case("fp16 input, fp32 codebooks+lora N=3", w32, torch.randn(3, 80, device=dev).half(), torch.float16, torch.float32)
run_case("fp16 input, fp32 codebooks+lora N=40", w32, torch.randn(40, 80, device=dev).half(), torch.float16, torch.float32)
w16 = weight(1, 16, 1, 8, 24, 10, torch.float16)
mixed = (w16[0], w16[1], w16[2].double())  # float64 scales with float16 codebooks
run_case("fp16, fp64 scales N=2", mixed, torch.randn(2, 80, device=dev).half(), torch.float16)
run_case("fp16, fp64 scales N=20", mixed, torch.randn(20, 80, device=dev).half(), torch.float16)
run_case("N=0", w16, torch.randn(0, 80, device=dev).half(), torch.float16)
run_case("leading dims N=0", w16, torch.randn(2, 0, 80, device=dev).half(), torch.float16)
for n in (2, 30):
    x = torch.randn(n, 3, 160, device=dev).half()[..., ::2]  # [n, 3, 80], non-contiguous
    run_case(f"strided [n,3,80] n={n}", w16, x, torch.float16)
big = weight(1, 16, 1, 8, 4096, 512, torch.float16)
run_case("4096x4096 1x16 N=1", big, torch.randn(1, 4096, device=dev).half(), torch.float16, r=16)
big = weight(2, 8, 1, 8, 4096, 512, torch.float16)
run_case("4096x4096 2x8 N=4", big, torch.randn(4, 4096, device=dev).half(), torch.float16, r=16)
# dropout masks: bit-identical to the reference (and so to the CPU kernels)
for shape, seed, offset, p in [((7, 129), 0, 0, 0.5), ((3, 5, 11), 2**40 + 17, 3, 0.1), ((1000,), 2**62 - 1, 2**33 + 5, 0.9)]:
    x = torch.empty(shape, device=dev)
    got = op.dropout_mask(x, p, seed, offset)
    want = ref.dropout_mask(x, p, seed, offset)
    same = got.dtype == torch.bool and bool((got == want).all())
    if not same:
        fails.append(f"dropout_mask {shape}")
    print(f"{'ok  ' if same else 'FAIL'} dropout_mask {shape} seed={seed} p={p}")
torch.cuda.synchronize()
print(f"{len(fails)} failures in {time.time() - t0:.1f}s")
sys.exit(1 if fails else 0)
EOF
then
  say "smoke test ok ($(tail -n 1 "$OUT/smoke.log"))"
else
  grep -E "^FAIL|Error|error" "$OUT/smoke.log" | head -n 30
  tail -n 5 "$OUT/smoke.log"
  say "FAILED: smoke test (see smoke.log)"
  status=1
fi

# ---- 4. the test suite's CUDA cases
if "$PY" -c "import pytest" 2>/dev/null; then
  say "4. pytest tests -k cuda (log: pytest.log)"
  timeout -k 10 "$(cap 170)" "$PY" -m pytest tests -q -k cuda --continue-on-collection-errors --maxfail=30 \
    -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/pytest.log"
  case $rc in
    0) say "pytest ok" ;;
    5) say "FAILED: pytest collected no CUDA test (GPU not visible to the tests, or kernels not registered?)"; status=1 ;;
    124|137) say "FAILED: pytest timed out"; status=1 ;;
    *) say "FAILED: pytest exit code $rc"; status=1 ;;
  esac
else
  say "4. SKIPPED: pytest is not installed"
  status=1
fi

# ---- 5. benchmark (never fails the check)
say "5. benchmarks/bench_cuda.py --no-aqlm (log: bench.log)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$(cap 150)" \
  "$PY" benchmarks/bench_cuda.py --no-aqlm --budget 0.15 --out "$OUT/bench_cuda.md" >"$OUT/bench.log" 2>&1 ||
  say "bench_cuda.py --no-aqlm exited with $? (partial table, if any, in bench_cuda.md)"
left=$(( DEADLINE_S - ($(date +%s) - T0) ))
if "$PY" -c "import aqlm" 2>/dev/null && (( left > 100 )); then
  say "5b. bench_cuda.py with aqlm's CUDA kernels ($left s left)"
  if PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MAX_JOBS=16 timeout -k 10 "$(cap 600)" \
      "$PY" benchmarks/bench_cuda.py --budget 0.1 --out "$OUT/bench_cuda_aqlm.md.part" >>"$OUT/bench.log" 2>&1; then
    mv "$OUT/bench_cuda_aqlm.md.part" "$OUT/bench_cuda.md"
  else
    say "bench with aqlm did not complete; keeping the table without aqlm"
  fi
else
  say "5b. skipped the aqlm column (import aqlm failed or only $left s left)"
fi
cat "$OUT/bench_cuda.md" 2>/dev/null || say "no bench_cuda.md"

say "done, status $status"
sleep 1  # let tee flush gpu_check.log
exit $status
