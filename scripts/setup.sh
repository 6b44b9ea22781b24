#!/usr/bin/env bash
# Sets everything up on a fresh machine with Python 3.9+ and a C++ compiler: a venv in .venv,
# the CPU build of torch, the package (C++ extension built in place) and its test/bench extras.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${AQLM_LORA_TORCH:-torch==2.13.0}  # the CPU build this project is tested with

if [ ! -x .venv/bin/python ]; then
  echo "aqlm_lora setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel ninja
echo "aqlm_lora setup: installing $TORCH_SPEC"
$PIP install -q "$TORCH_SPEC"
echo "aqlm_lora setup: building the extension and installing dependencies"
# --no-build-isolation: build against the torch installed above, not a freshly downloaded one.
MAX_JOBS=${MAX_JOBS:-2} $PIP install -q --no-build-isolation -e ".[test,bench]"
.venv/bin/python -c "import aqlm_lora, torch; print('aqlm_lora setup: ok, torch', torch.__version__)"
