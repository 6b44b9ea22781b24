#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: `aqlm-lora demo`.
# Extra arguments go to the demo (e.g. --out DIR --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/aqlm-lora demo "$@"
