#!/usr/bin/env bash
# Create .venv and install retr with the CPU build of torch 2.13.0 (never a CUDA download).
# Usage: bash scripts/setup.sh [extra ...]   e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin torch first: the project's range (<=2.13.0) is then already satisfied.
python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
    python -m pip install -q -e ".[$extras]"
else
    python -m pip install -q -e .
fi
