"""Training and serving speed side by side: retr's SASRec and RETR vs RecTools' and RecBole's.

Usage:
    python -m benchmarks.bench_speed [--minutes 4] [--threads 2] [--peers rectools,recbole]
        [--only 1,2] [--max-len 200] [--venv-dir benchmarks/.peers]
        [--out benchmarks/results/speed.json]

Same data and configuration for every implementation: ml-1m (5-core, leave-one-out; every
model trains on each user's items but the last two), sequence length 200, hidden 64, 2 layers,
2 heads, batch 128, Adam 1e-3, dropout 0.2, ID embeddings only. Each implementation runs in a
fresh process (`benchmarks.speed_worker`) of its own interpreter — RecTools 0.19 and RecBole 1.2.1 each
in a virtualenv this script creates (see ``PEERS``; never retr dependencies) — and gets a
training budget of ``--minutes``. RecBole trains on every prefix of every sequence (about a
million samples per ml-1m epoch), so its budget ends inside its first epoch: it is trained in
six segments of the budget, and its s/epoch is extrapolated from the share of the epoch done.
After every epoch (or segment) the worker scores
all items for all 6,040 users and reports validation NDCG@10 against the same 100 uniform
negatives per user (ties count half); the clock stops during validation. Then it times top-10
recommendation for every user (history excluded) and 100 single-history requests. Peak RSS is
the worker process's maximum resident set (``wait4``). The machine's own limit — matmul
GFLOP/s on ``--threads`` threads — and the model FLOP/s retr reaches while training are
measured here too. Leave the machine otherwise idle while it runs.

Rows are merged into ``--out``: a rerun replaces the rows of the same implementation, loss
and sequence length and keeps the others, each with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

import retr

from .common import code_version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the workers run as ``python -m benchmarks.speed_worker`` from here
PEERS = {  # pip installs per peer, in order: torch first, so pip keeps the local CPU build
    "rectools": [["torch==2.13.0"], ["rectools[torch]==0.19.0"]],
    # RecBole 1.2.1 runs only beside the numpy/pandas/scipy/scikit-learn of its time
    "recbole": [["torch==2.13.0"], ["numpy<1.24", "pandas<2", "scipy<1.12", "scikit-learn<1.4",
                                    "recbole==1.2.1"]],
}
RUNS = [  # (implementation, model, loss, label)
    ("retr", "sasrec", "bce", "retr SASRec"),
    ("retr", "sasrec", "ce", "retr SASRec"),
    ("retr", "retr", "ce", "retr RETR"),
    ("retr", "retr", "bce", "retr RETR"),
    ("rectools", "sasrec", "bce", "RecTools 0.19 SASRec"),
    ("rectools", "sasrec", "ce", "RecTools 0.19 SASRec"),
    ("recbole", "sasrec", "bce", "RecBole 1.2.1 SASRec"),  # its pairwise loss: BPR
    ("recbole", "sasrec", "ce", "RecBole 1.2.1 SASRec"),
]
LOSS_NAMES = {"bce": "BCE, 1 negative", "ce": "full softmax CE"}


def prepare(work: Path, max_len: int, seed: int = 0) -> dict[str, int]:
    """ml-1m's training part as a CSV, the validation targets and their negatives."""
    dataset = retr.load_dataset(retr.RunConfig.from_dict({"data": {"source": "ml-1m"}}).data)
    split = retr.make_split(dataset, "loo")
    train = split.examples("valid")  # valid prefix = each user's training items
    starts = np.repeat(dataset.offsets[train.users], train.lengths)
    order = np.arange(len(starts)) - np.repeat(np.cumsum(train.lengths) - train.lengths,
                                               train.lengths)  # position within the user
    ext_users = np.array(dataset.vocab.users, dtype=np.int64)
    ext_items = np.array(["0", *dataset.vocab.items]).astype(np.int64)
    work.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": np.repeat(ext_users[train.users], train.lengths),
                  "item_id": ext_items[dataset.items[starts + order]],
                  "datetime": order}).to_csv(work / "train.csv", index=False)
    neg = retr.sample_negatives(dataset, train, 100, seed=seed)
    np.savez(work / "valid.npz", users=ext_users[train.users], targets=ext_items[train.targets],
             negatives=ext_items[neg])
    rng = np.random.default_rng(seed)
    np.save(work / "latency_users.npy", rng.choice(ext_users[train.users], 105, replace=False))
    np.save(work / "windows.npy", np.minimum(train.lengths - 1, max_len))  # real inputs per user
    tokens = int(np.minimum(train.lengths, max_len).sum())
    return {"users": int(len(train.users)), "items": dataset.n_items,
            "training_interactions": int(train.lengths.sum()), "tokens_per_epoch": tokens}


def peer_python(name: str, venv_dir: Path) -> Path:
    """The peer's interpreter, creating its virtualenv on first use."""
    venv = venv_dir / name
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"[speed] creating {venv} with {PEERS[name]}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for specs in PEERS[name]:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *specs], check=True)
    return python


def run_worker(python: Path, argv: list[str]) -> tuple[dict[str, Any], float]:
    """Run one worker; its JSON and peak RSS in MB (wait4 of that process alone)."""
    proc = subprocess.Popen([str(python), "-m", "benchmarks.speed_worker", *argv],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(argv)} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def write_rows(out: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Merge ``rows`` into ``out``: same implementation, loss and N replace, others stay."""
    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["implementation"], r["loss"], int(r.get("max_len", 200))

    old = json.loads(out.read_text())["rows"] if out.exists() else []
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "rows": merged}, indent=2) + "\n")


def matmul_gflops(threads: int, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def epoch_gflop(model_name: str, loss: str, n_items: int, max_len: int, hidden: int,
                windows: np.ndarray) -> float:
    """FLOPs of one training epoch (forward, loss, backward) that the real tokens need.

    Each history counts at its own window length (``windows``: real input tokens per user),
    with a target at every position: work on padding is not counted, whether an
    implementation does it or not, so the FLOP/s compare like with like.
    """
    cfg: dict[str, Any] = {"hidden_size": hidden, "num_heads": 2, "num_layers": 2,
                           "max_len": max_len}
    if model_name == "retr":
        cfg["ffn_size"] = hidden
    model = retr.build_model(model_name, n_items, cfg)
    gen = torch.Generator().manual_seed(0)
    lengths, counts = np.unique(windows[windows > 0], return_counts=True)
    total = 0.0
    for length, count in zip(lengths.tolist(), counts.tolist(), strict=True):
        seqs = torch.randint(1, n_items + 1, (1, length))
        with FlopCounterMode(display=False) as counter:
            states = model(seqs).hidden.reshape(-1, model.item_representation(
                torch.tensor([1])).shape[-1])
            retr.compute_loss(loss, model, states, seqs.reshape(-1), gen, 1).backward()
        total += counter.get_total_flops() * count
    return total / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target", type=float, default=0.55)
    p.add_argument("--peers", default="rectools,recbole",
                   help="comma list, or '' for retr only")
    p.add_argument("--max-len", type=int, default=200, help="sequence length N")
    p.add_argument("--only", default="", help="comma list of run numbers (1-based) to run")
    p.add_argument("--venv-dir", type=Path, default=HERE / ".peers")
    p.add_argument("--work", type=Path, default=HERE / ".peers" / "work")
    p.add_argument("--out", type=Path, default=HERE / "results" / "speed.json")
    args = p.parse_args()
    max_len, hidden, batch = args.max_len, 64, 128
    work = args.work.resolve()  # the workers run from the repository root
    stats = prepare(work, max_len)
    windows = np.load(work / "windows.npy")
    print(f"[speed] data: {stats}", flush=True)
    venv_dir = args.venv_dir.absolute()  # not resolved: a venv's python is a symlink
    peers = {name: peer_python(name, venv_dir) for name in filter(None, args.peers.split(","))}
    only = {int(x) for x in args.only.split(",") if x}
    command = "python -m benchmarks.bench_speed " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    code = code_version()
    fp32 = matmul_gflops(args.threads, torch.float32)
    bf16 = matmul_gflops(args.threads, torch.bfloat16)
    rows = []
    for number, (impl, model, loss, label) in enumerate(RUNS, 1):
        if (only and number not in only) or (impl != "retr" and impl not in peers):
            continue
        python = Path(sys.executable) if impl == "retr" else peers[impl]
        argv = ["--impl", impl, "--model", model, "--loss", loss, "--work", str(work),
                "--minutes", str(args.minutes), "--threads", str(args.threads),
                "--target", str(args.target), "--max-len", str(max_len),
                "--hidden", str(hidden), "--batch-size", str(batch)]
        print(f"[speed] {label} {loss}", flush=True)
        res, rss = run_worker(python, argv)
        partial = "samples_per_epoch" in res  # RecBole: the budget ended inside an epoch
        sec = (res["epoch_seconds_estimate"] if partial
               else float(np.median([e["seconds"] for e in res["epochs"]])))
        loss_name = "BPR, 1 negative" if impl == "recbole" and loss == "bce" else LOSS_NAMES[loss]
        row = {"implementation": label, "loss": loss_name, "max_len": max_len,
               "budget_minutes": args.minutes, "command": command, "code": code,
               "seconds_per_epoch": round(sec, 1),
               "sequences_per_second": round(stats["users"] / sec),
               # RecBole's samples are its training positions (one per prefix, none truncated)
               "tokens_per_second": round((res["samples_per_epoch"] if partial
                                           else stats["tokens_per_epoch"]) / sec),
               "epochs_in_budget": (f"{sum(e['fraction_of_epoch'] for e in res['epochs']):.3f}"
                                    if partial else len(res["epochs"])),
               "best_valid_sampled_ndcg10": max(e["valid_sampled_ndcg10"] for e in res["epochs"]),
               "time_to_target": (f"{res['time_to_target_seconds']} s"
                                  if res["time_to_target_seconds"] is not None else
                                  f"not in {res['train_seconds']} s (best "
                                  f"{max(e['valid_sampled_ndcg10'] for e in res['epochs'])})"),
               "full_ranking_users_per_second": round(res["users"] / res["full_ranking_seconds"]),
               "latency_ms": f"{res['latency']['p50_ms']} / {res['latency']['p99_ms']}",
               "peak_rss_mb": round(rss), "raw": res}
        if impl == "retr":
            achieved = epoch_gflop(model, loss, stats["items"], max_len, hidden, windows) / sec
            row["model_gflops_per_second"] = round(achieved, 1)
            row["fp32_matmul_utilisation_percent"] = round(100 * achieved / fp32, 1)
        rows.append(row)
        print(f"[speed] {json.dumps({k: v for k, v in row.items() if k != 'raw'})}", flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} threads per run; torch {torch.__version__}; matmul 2048² "
               f"{fp32:.0f} GFLOP/s fp32, {bf16:.0f} GFLOP/s bf16")
    note = (f"ml-1m, d={hidden}, 2 layers, 2 heads, batch {batch}, sequence length N and "
            "training budget per row (stopped early once validation sampled NDCG@10 reaches "
            f"{args.target}); {stats['users']} users. s/epoch is the median epoch; validation "
            "time excluded. Model FLOP/s count the FLOPs the real tokens need (each history at "
            "its own length, no padding work) per second of training.")
    for row in rows:
        row["machine"] = machine
    write_rows(args.out, rows, {"note": note, "data": stats})
    print(f"[speed] wrote {args.out}")


if __name__ == "__main__":
    main()
