"""Run a grid of model x dataset x seed from recipe files; one JSON per finished run.

Usage:
    python benchmarks/grid.py benchmarks/grids/fast.toml --out benchmarks/results [--dry-run]

A grid file lists ``[[run]]`` tables (recipe config, optional label and ``--set`` overrides)
and the seeds. Each run trains into ``<out>/runs/<label>-seed<k>`` and writes
``<out>/<label>-seed<k>.json`` holding the run's results.json, its per-epoch budget and the
exact command that made it. Finished runs are skipped, so a killed grid resumes where it
stopped. `benchmarks/make_results.py` turns the JSON files into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any


def load_grid(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    grid = tomllib.loads(path.read_text(encoding="utf-8"))
    runs = grid.get("run", [])
    if not runs:
        raise SystemExit(f"{path}: no [[run]] tables")
    for r in runs:
        if "config" not in r:
            raise SystemExit(f"{path}: every [[run]] needs a 'config' recipe path")
        r.setdefault("label", Path(r["config"]).stem)
        r.setdefault("set", [])
    return runs, [int(s) for s in grid.get("seeds", [0, 1, 2])]


def command(run: dict[str, Any], seed: int, run_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "retr", "train", "--config", run["config"], "--out", str(run_dir),
            "--seed", str(seed), "--set", "train.progress=false", "--json"]
    for s in run["set"]:
        argv += ["--set", s]
    return argv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args()
    runs, seeds = load_grid(args.grid)
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        for seed in seeds:
            name = f"{run['label']}-seed{seed}"
            record_path = args.out / f"{name}.json"
            if record_path.exists():
                continue
            run_dir = args.out / "runs" / name
            argv = command(run, seed, run_dir)
            shown = " ".join(shlex.quote(a) for a in ["retr", *argv[3:]])
            if args.dry_run:
                print(shown)
                continue
            if (run_dir / "trainer_state.pt").exists():
                argv = [sys.executable, "-m", "retr", "train", "--resume", str(run_dir), "--json"]
            print(f"[grid] {name}: {shown}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"[grid] {name} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            results = json.loads(proc.stdout)
            epochs = [json.loads(line) for line in
                      (run_dir / "metrics.jsonl").read_text().splitlines()] \
                if (run_dir / "metrics.jsonl").exists() else []
            record = {"label": run["label"], "config": run["config"], "seed": seed,
                      "command": shown, "wall_seconds": round(wall, 1), "epochs": len(epochs),
                      "train_seconds": round(sum(e["train_seconds"] for e in epochs), 1),
                      "results": results}
            record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            print(f"[grid] {name} done in {wall:.0f}s", flush=True)


if __name__ == "__main__":
    main()
