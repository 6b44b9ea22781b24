#!/usr/bin/env bash
# Builds the extension's C++ (CPU) code with AddressSanitizer + UndefinedBehaviorSanitizer in a
# separate copy of the working tree and runs the op tests against that build:
#
#   bash scripts/sanitize.sh                      # build + tests/ops/test_{ops,autograd,checks,dropout,fuzz,
#                                                 #   scheme_grid,nonfinite,multi_lora,decode_kernels}.py
#   bash scripts/sanitize.sh -k lora_backward     # extra arguments go to pytest
#
# The in-place build (aqlm_lora/_C*.so of this checkout) is left alone: the copy lives in
# SANITIZE_DIR (default build/sanitize, git-ignored) and builds there with AQLM_LORA_SANITIZE=1
# AQLM_LORA_USE_CUDA=0 (see setup.py). Copies keep file times, so a second run recompiles only
# what changed. The tests run with libasan (and libstdc++) preloaded into the uninstrumented Python,
# ASAN_OPTIONS=detect_leaks=0 (Python and torch keep allocations alive at exit) and
# UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1; the first sanitizer report aborts the run.
#
# Environment: MAX_JOBS (compile jobs, default 2), AQLM_LORA_FUZZ_EXAMPLES (the fuzz test's
# examples, default 25 here), SANITIZE_DIR, SANITIZE_REF (a commit to test instead of the working
# tree, e.g. HEAD; git archive keeps no file times, so that build is a full one). Needs .venv from
# scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
DEST=${SANITIZE_DIR:-$ROOT/build/sanitize}
TESTS=(tests/ops/test_ops.py tests/ops/test_autograd.py tests/ops/test_checks.py tests/ops/test_dropout.py tests/ops/test_fuzz.py
       tests/ops/test_scheme_grid.py tests/ops/test_nonfinite.py tests/ops/test_multi_lora.py
       tests/ops/test_decode_kernels.py)

[ -x "$PY" ] || { echo "sanitize: $PY not found; run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
[ "$DEST" != "$ROOT" ] || { echo "sanitize: SANITIZE_DIR must not be the checkout itself" >&2; exit 1; }

start=$(date +%s)
echo "== sanitize: copying ${SANITIZE_REF:-the working tree} to $DEST"
# Everything but the previous build outputs goes, then the tracked and untracked (not ignored)
# files come back with their times, so removed sources do not linger and ninja rebuilds by time.
find "$DEST" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
if [ -n "${SANITIZE_REF:-}" ]; then
  git archive "$SANITIZE_REF" | tar -xf - -C "$DEST"
else
  git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
    | tar -xf - -C "$DEST"
fi

echo "== sanitize: building with AQLM_LORA_SANITIZE=1 (MAX_JOBS=${MAX_JOBS:-2})"
(cd "$DEST" && AQLM_LORA_SANITIZE=1 AQLM_LORA_USE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace)
built=$(date +%s)
echo "== sanitize: build took $((built - start)) s"

# libstdc++ is preloaded too: Python itself is C, so without it ASan finds no real __cxa_throw
# when it starts and aborts at the first C++ exception ("CHECK failed: ... real___cxa_throw").
LIBASAN=$(${CXX:-c++} -print-file-name=libasan.so)
LIBSTDCXX=$(${CXX:-c++} -print-file-name=libstdc++.so)
for lib in "$LIBASAN" "$LIBSTDCXX"; do
  [ -e "$lib" ] || { echo "sanitize: $lib not found (${CXX:-c++} -print-file-name)" >&2; exit 1; }
done
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export AQLM_LORA_FUZZ_EXAMPLES=${AQLM_LORA_FUZZ_EXAMPLES:-25}

cd "$DEST"
# The tests must import the sanitized copy, not the checkout's (editable-installed) package.
"$PY" - "$DEST" <<'EOF'
import sys

sys.path.insert(0, sys.argv[1])
import aqlm_lora._C as c

assert c.__file__.startswith(sys.argv[1] + "/"), f"imported {c.__file__}, not the sanitized copy"
with open("/proc/self/maps") as maps:
    assert "libasan" in maps.read(), "libasan is not loaded"
print(f"== sanitize: testing {c.__file__} with {sys.argv[1]} first on sys.path")
EOF
status=0
# --capture=sys: pytest captures Python's output only, so a sanitizer report (written to fd 2 just
# before the process aborts) reaches the terminal instead of a capture file that dies with it.
"$PY" -m pytest -p no:cacheprovider -q --capture=sys "${TESTS[@]}" "$@" || status=$?
echo "== sanitize: tests took $(($(date +%s) - built)) s (exit $status); build + tests $(($(date +%s) - start)) s"
exit $status
