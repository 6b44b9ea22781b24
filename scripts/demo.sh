#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: `aqlm-lora demo`.
# Extra arguments go to the demo (e.g. --out DIR --overwrite, or --size medium for the ~23M-parameter
# run with a BPE tokenizer, AQLM 2x8 and 1x16, and step time and memory against PEFT's layers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/aqlm-lora demo "$@"
