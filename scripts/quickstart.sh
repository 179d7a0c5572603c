#!/usr/bin/env bash
# Install, then train and evaluate pop, SASRec and RETR on the embedded synthetic dataset and
# print one results table (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
retr compare --data synthetic --models pop,gru4rec,sasrec,retr --config configs/synthetic.toml --out "$out"
