"""Long histories side by side: SASRec, RETR and RETR with a pathway budget, vs RecTools.

Usage:
    python -m benchmarks.long_history [--lengths 1024 2048 200 512] [--minutes 4] [--threads 1]
        [--loss bce] [--peers rectools] [--rows 1,2,3,4,5]
        [--out benchmarks/results/long_history.json]

ml-1m (5-core, leave-one-out: every model trains on each user's items but the last two),
d=64, 2 blocks, 2 heads, batch 128, Adam 1e-3, dropout 0.2, SASRec's loss (binary
cross-entropy with one uniform negative per position; ``--loss ce`` for the full softmax,
whose [positions x items] work then outweighs attention's), at windows N of 200 to 2,048 (a quarter of ml-1m's users have more than 200 items; the longest
2,314). Rows:

1. retr's SASRec;
2. retr's RETR at the paper's defaults (the learned router keeps almost every token);
3. RETR with a pathway budget ρ = 0.5 (ours: keep-rate penalty, ω floor, threshold rule);
4. the same at ρ = 0.25 — below ``sparse_below`` the off-route queries' work is skipped in
   training (straight-through slope from a linear-attention sum) and at inference;
5. RecTools 0.19's SASRec, same settings, in its own virtualenv;
6. row 4 with ``model.router_recompute`` (the router's activations recomputed in the backward
   pass: memory for time).

Each row is one fresh worker process (`benchmarks.speed_worker`, the same one as
`benchmarks.bench_speed`) with a fixed training budget of ``--minutes`` (whole epochs: the
budget is checked between epochs, so one long epoch can overrun it). Reported: training
tokens/s (real positions, each user's last N training items), the worker's peak RSS
(``wait4``), full-ranking top-10 users/s, single-history latency, validation NDCG@10 over all
items (history excluded) at the end of the budget, and for RETR the keep rate of its inference
route per layer. Rows are written as they finish: a rerun replaces the rows of the same label
and N and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench_speed import HERE, matmul_gflops, peer_python, prepare, run_worker
from .common import code_version

BUDGET = ["inference_rule=threshold", "keep_weight=1.0", "omega_floor=0.1"]
ROWS: list[tuple[str, str, str, list[str]]] = [  # (label, implementation, model, model keys)
    ("retr SASRec", "retr", "sasrec", []),
    ("retr RETR (paper)", "retr", "retr", []),
    ("retr RETR, budget ρ = 0.5 (ours)", "retr", "retr", ["keep_target=0.5", *BUDGET]),
    ("retr RETR, budget ρ = 0.25 (ours)", "retr", "retr", ["keep_target=0.25", *BUDGET]),
    ("RecTools 0.19 SASRec", "rectools", "sasrec", []),
    ("retr RETR, budget ρ = 0.25, router recomputed (ours)", "retr", "retr",
     ["keep_target=0.25", *BUDGET, "router_recompute=true"]),
]


def merge(out: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Write ``rows`` into ``out``, replacing the rows of the same label and N."""
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    new = {(r["label"], r["max_len"]) for r in rows}
    kept = [r for r in old if (r["label"], r["max_len"]) not in new]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "rows": kept + rows}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 200, 512])
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loss", choices=["bce", "ce"], default="bce")
    p.add_argument("--peers", default="rectools", help="'' for retr only")
    p.add_argument("--rows", default="", help="comma list of row numbers (1-based)")
    p.add_argument("--venv-dir", type=Path, default=HERE / ".peers")
    p.add_argument("--work", type=Path, default=HERE / ".peers" / "work-long")
    p.add_argument("--out", type=Path, default=HERE / "results" / "long_history.json")
    args = p.parse_args()
    hidden, batch = 64, 128
    venv_dir = args.venv_dir.absolute()  # not resolved: a venv's python is a symlink
    peers = {name: peer_python(name, venv_dir) for name in filter(None, args.peers.split(","))}
    only = {int(x) for x in args.rows.split(",") if x}
    command = "python -m benchmarks.long_history " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    fp32 = matmul_gflops(args.threads, torch.float32)
    header = {"command": command, "code": code_version(),
              "machine": f"{platform.machine()}, {args.threads} thread(s) per run; torch "
                         f"{torch.__version__}; matmul 2048² {fp32:.0f} GFLOP/s fp32",
              "minutes": args.minutes, "hidden": hidden, "batch": batch, "loss": args.loss}
    for n in args.lengths:
        work = (args.work / str(n)).resolve()  # the workers run from the repository root
        stats = prepare(work, n)
        print(f"[long] N={n}: {stats}", flush=True)
        for number, (label, impl, model, keys) in enumerate(ROWS, 1):
            if (only and number not in only) or (impl != "retr" and impl not in peers):
                continue
            python = Path(sys.executable) if impl == "retr" else peers[impl]
            argv = ["--impl", impl, "--model", model, "--loss", args.loss, "--work", str(work),
                    "--minutes", str(args.minutes), "--threads", str(args.threads),
                    "--target", "2", "--no-stop", "--final-eval-only", "--max-len", str(n),
                    "--hidden", str(hidden), "--batch-size", str(batch)]
            for key in keys:
                argv += ["--set", key]
            print(f"[long] N={n} {label}", flush=True)
            try:
                res, rss = run_worker(python, argv)
            except RuntimeError as err:  # e.g. a peer out of memory: say so in the table
                merge(args.out, [{"label": label, "max_len": n, "failed": str(err)}], header)
                print(f"[long] {err}", flush=True)
                continue
            sec = float(np.median([e["seconds"] for e in res["epochs"]]))
            row = {"label": label, "max_len": n, "model_keys": keys,
                   "seconds_per_epoch": round(sec, 1),
                   "tokens_per_second": round(stats["tokens_per_epoch"] / sec),
                   "epochs_in_budget": len(res["epochs"]), "train_seconds": res["train_seconds"],
                   "valid_full_ndcg10": res["valid_full_ndcg10"],
                   "valid_sampled_ndcg10": res["epochs"][-1]["valid_sampled_ndcg10"],
                   "loss": args.loss, "code": code_version(), "command": command,
                   "full_ranking_users_per_second": round(res["users"]
                                                          / res["full_ranking_seconds"]),
                   "latency_p50_ms": res["latency"]["p50_ms"],
                   "latency_p99_ms": res["latency"]["p99_ms"],
                   "peak_rss_mb": round(rss), "route_keep": res.get("route_keep", []),
                   "tokens_per_epoch": stats["tokens_per_epoch"], "raw": res}
            merge(args.out, [row], header)
            print(f"[long] {json.dumps({k: v for k, v in row.items() if k != 'raw'})}",
                  flush=True)
    print(f"[long] wrote {args.out}")


if __name__ == "__main__":
    main()
