"""Run a grid of model x dataset x seed from recipe files; one JSON per finished run.

Usage (from the repository root):
    python -m benchmarks.grid benchmarks/grids/cpu.toml --out benchmarks/results [--dry-run]
    python -m benchmarks.grid benchmarks/grids/paper.toml --jobs 8 --set train.max_minutes=20

A grid file lists ``[[run]]`` tables (recipe config, optional label and ``--set`` overrides),
the seeds, optional top-level ``set`` overrides applied to every run before its own (the
budget, for example) and the ``table`` of RESULTS.md its rows belong to. Each run trains
into ``<out>/runs/<label>-seed<k>`` and writes ``<out>/<label>-seed<k>.json`` holding the
run's results.json, its per-epoch budget, the exact command that made it, the hardware it
ran on and the commit of the code. Finished runs are skipped, so a
killed grid resumes where it stopped. ``--jobs`` runs several at once (one GPU shared by
several small runs, or a many-core machine); ``--stop-after-minutes`` starts no new run after
that time, for a machine that is only lent for a while. `python -m benchmarks.make_results`
turns the JSON files into RESULTS.md.
"""

from __future__ import annotations

import argparse
import shlex
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .common import run_and_record


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
