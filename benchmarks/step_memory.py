"""Live memory of one training step at long windows: SASRec, RETR and RETR with a budget.

Usage:
    python -m benchmarks.step_memory [--lengths 200 512 1024 2048] [--rows 1,2,4,6]
        [--out benchmarks/results/step_memory.json]

Peak RSS (``benchmarks.long_history``) is what a user's machine sees, but it also holds the
allocator's fragmentation and the evaluation's peaks, and it moves by ±100 MB between runs of
the same code. This benchmark measures the step itself, exactly: ml-1m, d=64, 2 blocks, 2
heads, BCE, one batch of the 128 longest training histories cut to the window N (the epoch's
largest batch), one warm-up step, then one measured step:

- peak live bytes: the highest sum of the tensors allocated during the step (forward,
  backward and the optimiser), from the torch profiler's allocation events;
- saved activations: the bytes autograd keeps between the passes (each storage once);
- the share of real tokens on the training route per layer (an untrained router: the keep
  rate of the first steps, not of the converged route).

The rows are ``benchmarks.long_history``'s retr rows (same numbers); each runs in a fresh
interpreter on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .bench_speed import HERE, prepare
from .common import code_version
from .long_history import ROWS

STEP = r"""
import argparse, json, sys
from pathlib import Path
import numpy as np, torch
from torch.profiler import ProfilerActivity, profile
import retr
from benchmarks.speed_worker import RetrSide

work, model_name, n, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
side = RetrSide(argparse.Namespace(  # long_history's model and training settings
    model=model_name, threads=1, hidden=64, heads=2, layers=2, max_len=n, set=keys, seed=0,
    loss="bce", batch_size=128, precision="fp32", length_groups=1), Path(work))
model, data, opt, cfg = side.model, side.dataset, side.opt, side.cfg
users = np.argsort(-data.lengths, kind="stable")[:128]
retr.train_epoch(model, data, users, data.lengths, opt, cfg.train, 0, 1)  # warm-up step
routes = []
hooks = [m.register_forward_hook(lambda _m, _i, out: routes.append(out[2].detach()))
         for m in model.modules() if getattr(m, "routed", False) and hasattr(m, "router")]
saved, seen = 0, set()


def pack(t):
    global saved
    storage = t.untyped_storage()
    if storage.data_ptr() not in seen:
        seen.add(storage.data_ptr())
        saved += storage.nbytes()
    return t


with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    retr.train_epoch(model, data, users, data.lengths, opt, cfg.train, 0, 2)
events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                key=lambda e: e.start_ns())
live = peak = 0
for e in events:
    live += e.nbytes()
    peak = max(peak, live)
seqs = torch.from_numpy(data.padded_prefixes(users, data.lengths[users], n))
real = (seqs > 0).float().sum()
on = [seqs[:, -r.shape[1]:] > 0 for r in routes]  # the trainer cut the batch's padding
keep = [round(float(r[m].sum() / real), 3) for r, m in zip(routes, on)]
print(json.dumps({"peak_live_mb": round(peak / 2**20, 1), "saved_mb": round(saved / 2**20, 1),
                  "route_keep": keep, "tokens": int(real)}))
"""


def measure(work: Path, model: str, n: int, keys: list[str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", STEP, str(work), model, str(n), json.dumps(keys)],
                         check=True, capture_output=True, text=True, cwd=HERE.parent,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[200, 512, 1024, 2048])
    p.add_argument("--rows", default="1,2,3,4,6", help="long_history's row numbers (retr rows)")
    p.add_argument("--work", type=Path, default=HERE / ".peers" / "work-step")
    p.add_argument("--out", type=Path, default=HERE / "results" / "step_memory.json")
    args = p.parse_args()
    only = {int(x) for x in args.rows.split(",") if x}
    rows = []
    for n in args.lengths:
        work = (args.work / str(n)).resolve()
        prepare(work, n)
        for number, (label, impl, model, keys) in enumerate(ROWS, 1):
            if number not in only or impl != "retr":
                continue
            row = {"label": label, "max_len": n, "model_keys": keys, **measure(work, model, n,
                                                                                 keys)}
            rows.append(row)
            print(f"[step] {json.dumps(row)}", flush=True)
    command = "python -m benchmarks.step_memory " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "code": code_version(),
                                    "batch": 128, "hidden": 64, "rows": rows}, indent=2) + "\n")
    print(f"[step] wrote {args.out}")


if __name__ == "__main__":
    main()
