"""Run a grid of model x dataset x seed from recipe files; one JSON per finished run.

Usage:
    python benchmarks/grid.py benchmarks/grids/cpu.toml --out benchmarks/results [--dry-run]
    python benchmarks/grid.py benchmarks/grids/paper.toml --jobs 8 --set train.max_minutes=20

A grid file lists ``[[run]]`` tables (recipe config, optional label and ``--set`` overrides),
the seeds, optional top-level ``set`` overrides applied to every run before its own (the
budget, for example) and the ``table`` of RESULTS.md its rows belong to. Each run trains
into ``<out>/runs/<label>-seed<k>`` and writes ``<out>/<label>-seed<k>.json`` holding the
run's results.json, its per-epoch budget, the exact command that made it, the hardware it
ran on and the commit of the code. Finished runs are skipped, so a
killed grid resumes where it stopped. ``--jobs`` runs several at once (one GPU shared by
several small runs, or a many-core machine); ``--stop-after-minutes`` starts no new run after
that time, for a machine that is only lent for a while. `benchmarks/make_results.py` turns
the JSON files into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def load_grid(path: Path) -> tuple[list[dict[str, Any]], list[int], str]:
    grid = tomllib.loads(path.read_text(encoding="utf-8"))
    runs = grid.get("run", [])
    if not runs:
        raise SystemExit(f"{path}: no [[run]] tables")
    shared = list(grid.get("set", []))
    for r in runs:
        if "config" not in r:
            raise SystemExit(f"{path}: every [[run]] needs a 'config' recipe path")
        r.setdefault("label", Path(r["config"]).stem)
        r["set"] = shared + list(r.get("set", []))
    return runs, [int(s) for s in grid.get("seeds", [0, 1, 2])], str(grid.get("table", "intra-domain"))


def command(run: dict[str, Any], seed: int, run_dir: Path) -> list[str]:
    argv = ["train", "--config", run["config"], "--out", str(run_dir),
            "--seed", str(seed), "--set", "train.progress=false", "--json"]
    for s in run["set"]:
        argv += ["--set", s]
    return argv


def hardware(argv: list[str]) -> str:
    """Where a run ran, for its record: the GPU's name for a CUDA run, else the CPU count."""
    text = f"{platform.machine()}, {os.cpu_count()} CPUs"
    devices = [a.split("=", 1)[1] for a in argv if a.startswith("train.device=")]
    if devices and devices[-1].startswith("cuda"):  # the last override is the one in force
        try:
            proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True)
            names = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
        except OSError:
            names = []
        text += f", {names[0].strip() if names else 'CUDA device'}"
    return text


def code_version() -> str:
    """The commit the run's code came from ("-dirty" when src/ had local changes), else the
    package version: rows made by different code can be told apart."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"],
                               capture_output=True, text=True)
    except OSError:
        head = dirty = None
    if head is not None and dirty is not None and head.returncode == 0:
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    import retr

    return f"retr {retr.__version__}"


def median_epoch_seconds(epochs: list[dict[str, Any]]) -> float | None:
    """The typical epoch: robust to one epoch slowed by a paused or busy machine."""
    return round(statistics.median(e["train_seconds"] for e in epochs), 2) if epochs else None


def stop_reason(run_dir: Path, epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the run's training ended: its config.json against ``epochs`` (its metrics.jsonl).

    ``stopped_by`` is "patience", "time cap" (``train.max_minutes``), "epoch cap" or
    "interrupted"; ``best_epoch`` is the epoch of the best validation value. A row cut by a
    cap while still improving must never pass for a converged one. Empty without training.
    """
    config = run_dir / "config.json"
    if not config.exists() or not epochs:
        return {}
    tc = json.loads(config.read_text())["train"]
    scored = [(e["valid"][tc["valid_metric"]], e["epoch"]) for e in epochs
              if e.get("valid", {}).get("protocol", tc["valid_protocol"]) == tc["valid_protocol"]
              and tc["valid_metric"] in e.get("valid", {})]
    best_epoch = min((-v, ep) for v, ep in scored)[1] if scored else 0
    last = epochs[-1]
    if last["epoch"] >= tc["epochs"]:
        stopped = "epoch cap"
    elif tc["patience"] and last["epoch"] - best_epoch >= tc["patience"] \
            and last["epoch"] >= tc.get("min_epochs", 0):
        stopped = "patience"
    elif tc.get("max_minutes") and last.get("elapsed_seconds", 0) >= tc["max_minutes"] * 60:
        stopped = "time cap"
    else:
        stopped = "interrupted"
    return {"best_epoch": best_epoch, "stopped_by": stopped}


def run_and_record(out: Path, name: str, argv: list[str], run_dir: Path,
                   extra: dict[str, Any]) -> bool:
    """Run one ``retr`` command (``argv`` after ``retr``) unless its record exists.

    Writes ``<out>/<name>.json``: ``extra`` plus the exact command, wall time, epochs, training
    seconds and the command's JSON results. A run directory left by a killed run resumes
    from its last epoch; one killed before any epoch ended (no trainer state) starts over.
    Returns whether the record exists afterwards.
    """
    record_path = out / f"{name}.json"
    if record_path.exists():
        return True
    shown = " ".join(shlex.quote(a) for a in ["retr", *argv])
    full = [sys.executable, "-m", "retr", *argv]
    if (run_dir / "trainer_state.pt").exists():
        full = [sys.executable, "-m", "retr", "train", "--resume", str(run_dir), "--json"]
    elif run_dir.exists():  # killed before its first epoch ended: nothing to resume
        shutil.rmtree(run_dir)
    print(f"[grid] {name}: {shown}", flush=True)
    code = code_version()
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"[grid] {name} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return False
    results = json.loads(proc.stdout)
    metrics = run_dir / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    record = {**extra, "command": shown, "hardware": hardware(argv), "code": code,
              "wall_seconds": round(wall, 1), "epochs": len(epochs),
              "train_seconds": round(sum(e["train_seconds"] for e in epochs), 1),
              "median_epoch_seconds": median_epoch_seconds(epochs), **stop_reason(run_dir, epochs),
              "results": results}
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"[grid] {name} done in {wall:.0f}s", flush=True)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--seeds", help="comma list overriding the grid's seeds (e.g. 0 first)")
    p.add_argument("--only", help="comma list of run labels to run (in the grid's order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, after the grid's own (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--stop-after-minutes", type=float, default=0.0,
                   help="start no run after this many minutes (runs in flight finish)")
    args = p.parse_args()
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    runs, seeds, table = load_grid(args.grid)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r["label"] for r in runs}
        if unknown:
            raise SystemExit(f"{args.grid}: no run labelled {', '.join(sorted(unknown))}")
        runs = [r for r in runs if r["label"] in wanted]
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
    for r in runs:
        r["set"] = r["set"] + args.set
    args.out.mkdir(parents=True, exist_ok=True)
    todo = []
    for run in runs:
        for seed in seeds:
            name = f"{run['label']}-seed{seed}"
            run_dir = args.out / "runs" / name
            argv = command(run, seed, run_dir)
            if args.dry_run:
                if not (args.out / f"{name}.json").exists():
                    print(" ".join(shlex.quote(a) for a in ["retr", *argv]))
                continue
            todo.append((name, argv, run_dir, {"table": table, "label": run["label"],
                                               "config": run["config"], "seed": seed}))
    t0 = time.monotonic()

    def one(job: tuple[str, list[str], Path, dict[str, Any]]) -> bool:
        if args.stop_after_minutes and time.monotonic() - t0 > args.stop_after_minutes * 60:
            print(f"[grid] {job[0]}: not started (--stop-after-minutes)", flush=True)
            return False
        return run_and_record(args.out, *job)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))


if __name__ == "__main__":
    main()
