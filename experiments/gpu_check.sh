#!/usr/bin/env bash
# The accelerator check (experiments/gpu_check.py): usage  experiments/gpu_check.sh [OUT_DIR] [FLAGS]
# Installs every carried .whl/*.whl (ml-collections: the GPU image lacks it) into a
# temporary folder, then writes OUT_DIR/gpu_check.json, OUT_DIR/accuracy/ and OUT_DIR/log.txt.
set -euo pipefail
out=$(realpath -m "${1:-gpu_check_out}")  # before the cd: relative to the caller's folder
cd "$(dirname "$0")/.."
shift || true
if compgen -G '.whl/*.whl' >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 experiments/gpu_check.py --out-dir "$out" "$@" 2>&1 | tee "$out/log.txt"
