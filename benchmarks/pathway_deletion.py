"""The deletion test on real data (ours): does deleting what an explanation ranks highest hurt?

Usage:
    python -m benchmarks.pathway_deletion RUN_DIR [RUN_DIR ...] [--k 3] [--users 0]
        [--out benchmarks/results/routes-real]

For each trained next-item run (RETR here), :func:`retr.deletion_test` scores the test
histories' behaviours with each explanation (route: the last layer's keep probability α;
attention: the last query's attention at the last layer; gradient: gradient x input, and its
magnitude; recency: newest first, a control; random),
deletes the k it ranks highest and, separately, the k it ranks lowest, and ranks the true next
item among all items again. A faithful explanation makes the top-k deletion hurt much more than
the bottom-k one. ``--users N`` keeps a random N of the test users (drawn with the run's seed;
0 = all). Writes one JSON record per run (``<run name>.json``) and the table ``deletion.md``
over every record in ``--out``, grouped by the run's label (its name less ``-seed<k>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retr import DELETION_METHODS, deletion_test, load_run


def test_ndcg(run_dir: Path) -> float | None:
    results = run_dir / "results.json"
    if not results.exists():
        return None
    return next((r["metrics"]["NDCG@10"] for r in json.loads(results.read_text())["results"]
                 if r["split"] == "test" and r["protocol"] == "full"), None)


def measure(run_dir: Path, k: int, users: int) -> dict[str, Any]:
    run = load_run(run_dir)
    test = run.data.split.examples("test")
    seed = run.config.seed
    if users and users < len(test):
        rows = np.sort(np.random.default_rng(seed).choice(len(test), size=users, replace=False))
        test = dataclasses.replace(test, users=test.users[rows], lengths=test.lengths[rows],
                                   targets=test.targets[rows])
    t0 = time.perf_counter()
    result = deletion_test(run.model, run.data.dataset, test, k=k, seed=seed)
    name = run_dir.name
    return {"run": str(run_dir), "label": re.sub(r"-seed\d+$", "", name), "seed": seed,
            "dataset": run.config.data.source, "test_users": int(len(test)),
            "users_limit": users, "test_ndcg@10": test_ndcg(run_dir),
            "seconds": round(time.perf_counter() - t0, 1), "deletion": result}


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(records: list[dict[str, Any]], metric: str) -> list[str]:
    k = records[0]["deletion"]["k"]
    out = ["| run | seeds | examples | intact | " + " | ".join(
        f"{m}: top-{k} / bottom-{k} deleted" for m in DELETION_METHODS) + " |",
           "|---" * (4 + len(DELETION_METHODS)) + "|"]
    for label in sorted({r["label"] for r in records}):
        rs = sorted((r for r in records if r["label"] == label), key=lambda r: r["seed"])
        ds = [r["deletion"] for r in rs]
        cells = []
        for m in DELETION_METHODS:
            if all(m in d["methods"] for d in ds):
                top = [d["methods"][m]["top"][metric] for d in ds]
                bottom = [d["methods"][m]["bottom"][metric] for d in ds]
                cells.append(f"{_ms(top)} / {_ms(bottom)}")
            else:
                cells.append("-")
        out.append(f"| {label} | {','.join(str(r['seed']) for r in rs)} "
                   f"| {statistics.mean(d['examples'] for d in ds):.0f} "
                   f"| {_ms([d['intact'][metric] for d in ds])} | " + " | ".join(cells) + " |")
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    k = records[0]["deletion"]["k"]
    return "\n".join([
        "# Deletion test on real data (ours)", "",
        f"Each trained run's test histories (leave-one-out; histories with more than {2 * k} "
        f"behaviours in the window): delete the {k} behaviours an explanation ranks highest "
        f"(top) or lowest (bottom), rank the true next item among all items again "
        "(`retr.deletion_test`). route: the last layer's keep probability α; attention: the "
        "last query's attention at the last layer (heads averaged); gradient: gradient x input "
        "of the target's score (gradient_abs: its magnitude); recency: newest first (bottom: "
        "the oldest in the window), a control an explanation has to beat to say more than a "
        "timestamp; random: a random order. A faithful explanation makes the top "
        "number much worse than the bottom one (lower HR@10, higher mean log2 rank). Mean ± sd "
        "over seeds. Written by `python -m benchmarks.pathway_deletion`.", "",
        "## HR@10 (all items)", "", *table(records, "HR@10"), "",
        "## Mean log2 rank of the target (lower is better)", "",
        *table(records, "mean_log2_rank"), "",
        "## Commands (OMP_NUM_THREADS=1, RETR_DATA_DIR pointing at the datasets)", "",
        *[f"- `{c}`" for c in dict.fromkeys(r["command"] for r in records)], "",
        "Test users per run: " + ", ".join(
            f"{label}: {n}" for label, n in dict.fromkeys(
                (r["label"], r["test_users"]) for r in records)) + ".", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="trained run directories")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--users", type=int, default=0, help="random test users per run (0 = all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/routes-real"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.pathway_deletion", *sys.argv[1:]])
    for run_dir in args.runs:
        record = measure(run_dir, args.k, args.users)
        record["command"] = command
        (args.out / f"{run_dir.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        d = record["deletion"]
        print(f"[deletion] {run_dir.name}: {d['examples']} examples in {record['seconds']}s, "
              f"intact HR@10 {d['intact']['HR@10']:.3f}; " + "; ".join(
                  f"{m} {v['top']['HR@10']:.3f}/{v['bottom']['HR@10']:.3f}"
                  for m, v in d["methods"].items()), flush=True)
    records = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
    (args.out / "deletion.md").write_text(markdown(records) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
