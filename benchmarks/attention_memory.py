"""Peak memory and time of one training step at long windows: chunked attention vs [N, N].

Usage: python -m benchmarks.attention_memory --lengths 512 1024 2048 [--json-out FILE]

Each (N, path) runs in its own interpreter (peak RSS is per process): SASRec with pathway-free
self-attention, d=64, 2 heads, 2 blocks, batch 8, full-softmax loss over 3,000 items, one
forward + backward on one thread. "dense" forces the [N, N] path; "chunked" is the default
above 256 positions on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STEP = """
import resource, sys, time, torch
import retr
import retr.models.layers as layers
n, path = int(sys.argv[1]), sys.argv[2]
if path == "dense":
    layers.ATTENTION_CHUNK = 1 << 30
torch.set_num_threads(1)
torch.manual_seed(0)
model = retr.build_model("sasrec", 3000, {"hidden_size": 64, "num_heads": 2, "max_len": n})
seqs = torch.randint(1, 3001, (8, n))
targets = torch.randint(1, 3001, (8 * n,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
hidden = model(seqs).hidden.reshape(8 * n, -1)
logits = hidden @ model.item_representation(torch.arange(3001)).T
torch.nn.functional.cross_entropy(logits, targets).backward()
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def measure(n: int, path: str) -> dict[str, float | int | str]:
    out = subprocess.run([sys.executable, "-c", STEP, str(n), path], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds, kib = out.stdout.split()
    return {"N": n, "path": path, "seconds": round(float(seconds), 3),
            "peak_rss_growth_mb": round(int(kib) / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--json-out")
    args = p.parse_args()
    rows = [measure(n, path) for n in args.lengths for path in ("dense", "chunked")]
    for row in rows:
        print(f"N={row['N']:5d}  {row['path']:8s}  {row['seconds']:7.2f} s  "
              f"{row['peak_rss_growth_mb']:6d} MB")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"command": " ".join(["python -m benchmarks.attention_memory",
                                            *sys.argv[1:]]),
                       "threads": 1, "rows": rows,
                       "max_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                       // 1024, "measured_at": time.strftime("%Y-%m-%d")}, fh, indent=2)


if __name__ == "__main__":
    main()
