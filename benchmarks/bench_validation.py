"""How much of each training epoch full-ranking validation takes, side by side with another
implementation of ``full_rank_counts`` in the same process.

Usage (from the repository root; RETR_DATA_DIR names the data folder):
    python -m benchmarks.bench_validation configs/retr-ml-1m.toml configs/retr-beauty.toml \
        --set train.device=cuda
    git show 613316f^:src/retr/evaluation/ranking.py > /tmp/ranking_before.py
    python -m benchmarks.bench_validation configs/retr-ml-1m.toml --peer /tmp/ranking_before.py

Each recipe trains ``--epochs`` epochs with validation after every epoch through the real
trainer (``retr.train``), once with the library's ranking and once with the peer's (the same
recipe and seed). An epoch's validation time is its wall time minus its training time (what
remains is validation and the checkpoint writes). The first epoch is left out of the medians
(it pays for warm-up). Both implementations then rank the validation examples of the first
run's trained model: ``same_counts`` says whether every rank count agrees. Prints one JSON
object per recipe.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import retr
import retr.evaluation.protocol as protocol
from retr.evaluation.ranking import full_rank_counts
from retr.runs import make_run_split

from .common import epoch_validation_seconds


def load_peer(path: Path) -> Callable[..., Any]:
    """``full_rank_counts`` of the module file at ``path``."""
    spec = importlib.util.spec_from_file_location("peer_ranking", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "full_rank_counts"):
        raise SystemExit(f"{path}: defines no full_rank_counts")
    return module.full_rank_counts


def measure(cfg: retr.RunConfig, dataset: retr.SequenceDataset, ranker: Callable[..., Any],
            model: Any) -> dict[str, Any]:
    """Train ``model`` with ``ranker`` as the full-ranking implementation; median seconds."""
    protocol.full_rank_counts = ranker
    try:
        with tempfile.TemporaryDirectory() as tmp:
            retr.train(cfg, dataset, Path(tmp) / "run", log=lambda _msg: None, model=model)
            rows = [json.loads(line) for line in
                    (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        protocol.full_rank_counts = full_rank_counts
    train_s = [r["train_seconds"] for r in rows][1:]
    valid_s = epoch_validation_seconds(rows)[1:]
    return {"train_seconds": round(statistics.median(train_s), 3),
            "validation_seconds": round(statistics.median(valid_s), 3),
            "validation_share": round(statistics.median(
                v / (v + t) for v, t in zip(valid_s, train_s, strict=True)), 3)}


def same_counts(model: Any, dataset: retr.SequenceDataset, cfg: retr.RunConfig,
                peer: Callable[..., Any]) -> bool:
    """Whether both implementations give every validation example the same rank counts."""
    examples = make_run_split(cfg, dataset).valid  # the split the runs validated on
    args = (cfg.eval.exclude_history, cfg.eval.batch_size, cfg.eval.item_chunk)
    ours, theirs = full_rank_counts(model, dataset, examples, *args), peer(model, dataset, examples, *args)
    return all(np.array_equal(getattr(ours, f), getattr(theirs, f))
               for f in ("greater", "ties", "valid"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", type=Path, help="recipe TOML files")
    p.add_argument("--peer", type=Path, help="a module file with another full_rank_counts")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch is warm-up)")
    peer = load_peer(args.peer) if args.peer else None
    for path in args.configs:
        cfg = retr.resolve_config(path, [*args.set, f"train.epochs={args.epochs}",
                                         "train.eval_every=1", "train.patience=0",
                                         "train.valid_protocol=full", "train.progress=false"])
        dataset = retr.load_dataset(cfg.data)
        model = retr.build_run_model(cfg, dataset.n_items, dataset)
        row: dict[str, Any] = {"config": str(path), "device": cfg.train.device,
                               "users": dataset.n_users, "items": dataset.n_items,
                               "item_chunk": cfg.eval.item_chunk,
                               "retr": measure(cfg, dataset, full_rank_counts, model)}
        if peer is not None:
            fresh = retr.build_run_model(cfg, dataset.n_items, dataset)
            row["peer"] = {"module": str(args.peer), **measure(cfg, dataset, peer, fresh)}
            row["same_counts"] = same_counts(model, dataset, cfg, peer)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
