"""Pathway attention with and without the off-route queries' work, side by side.

Usage: python -m benchmarks.pathway_speed [--lengths 200 512 1024] [--json-out FILE]

RETR (d=64, 2 heads, 2 blocks) with the random router at keep rates 1, 0.5 and 0.25 (the
random router needs no gradient through its route, so the sparse path applies in training too;
layer 2 keeps p² of the tokens, the hierarchy), batch 32, full histories, one thread: the
median time of a training step (forward + backward of the hidden states) and of an
evaluation forward, once with the off-route queries skipped and once with the dense path
forced (``model.sparse_below`` 1 and 0). The ratio says where its default should sit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

import retr


def _median_seconds(step: Any, reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(n: int, keep: float, sparse: bool, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = retr.build_model("retr", 3000, {"hidden_size": 64, "num_heads": 2, "ffn_size": 64,
                                            "max_len": n, "router": "random",
                                            "random_keep_prob": keep,
                                            "sparse_below": 1.0 if sparse else 0.0})
    seqs = torch.randint(1, 3001, (32, n))

    def train_step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(seqs).hidden.pow(2).mean().backward()

    def eval_step() -> None:
        model.eval()
        with torch.no_grad():
            model(seqs)

    return {"N": n, "keep": keep, "path": "sparse" if sparse else "dense",
            "train_step_seconds": round(_median_seconds(train_step, reps), 4),
            "eval_forward_seconds": round(_median_seconds(eval_step, reps), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[200, 512, 1024])
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json-out")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.lengths:
        for keep in args.keeps:
            dense, sparse = (measure(n, keep, s, args.reps) for s in (False, True))
            rows += [dense, sparse]
            print(f"N={n:5d} keep={keep:4.2f}  train {dense['train_step_seconds']:.3f} s dense, "
                  f"{sparse['train_step_seconds']:.3f} s sparse "
                  f"({dense['train_step_seconds'] / sparse['train_step_seconds']:.2f}x)  eval "
                  f"{dense['eval_forward_seconds']:.3f} / {sparse['eval_forward_seconds']:.3f} s "
                  f"({dense['eval_forward_seconds'] / sparse['eval_forward_seconds']:.2f}x)",
                  flush=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"command": " ".join(["python -m benchmarks.pathway_speed", *sys.argv[1:]]),
                       "threads": 1, "batch": 32, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
