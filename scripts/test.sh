#!/usr/bin/env bash
# Install with the dev tools, then lint, type-check and run the fast test suite.
# Real-data tests read RETR_DATA_DIR (default: ../shared/data when present) and skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
if [ -z "${RETR_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export RETR_DATA_DIR="$(cd ../shared/data && pwd)"
fi
ruff check src tests benchmarks
mypy src
python -m pytest "$@"
