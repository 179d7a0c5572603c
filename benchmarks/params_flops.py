"""Parameters and forward FLOPs per sequence: RETR vs SASRec (the paper: "the router is light").

Usage:
    python -m benchmarks.params_flops [--hidden 256 --heads 4 --layers 2 --max-len 200 --items 3416]
        [--json-out benchmarks/results/params_flops.json]

FLOPs are counted by torch's FlopCounterMode on one full-length sequence (matrix products and
attention; element-wise work is not counted), excluding the final scoring against all items,
which is the same for both models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import retr


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters (every one, in a freshly built model)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--items", type=int, default=3416)
    p.add_argument("--json-out", type=Path, help="also write the JSON here (benchmarks.make_results reads it)")
    a = p.parse_args()
    common = {"hidden_size": a.hidden, "num_heads": a.heads, "num_layers": a.layers,
              "max_len": a.max_len}
    variants = {
        "sasrec": ("sasrec", common),
        "sasrec+pathway": ("sasrec", {**common, "attention": "pathway"}),
        "retr": ("retr", {**common, "ffn_size": a.hidden}),
    }
    seqs = torch.randint(1, a.items + 1, (1, a.max_len))
    rows = {}
    for label, (name, cfg) in variants.items():
        model = retr.build_model(name, a.items, cfg).eval()
        with FlopCounterMode(display=False) as counter:
            model(seqs)
        emb = a.items + 1
        rows[label] = {"parameters": count_parameters(model),
                       "parameters_without_item_table": count_parameters(model) - emb * a.hidden,
                       "forward_gflops_per_sequence": round(counter.get_total_flops() / 1e9, 4)}
    base = rows["sasrec"]
    for r in rows.values():
        r["parameters_vs_sasrec"] = round(r["parameters"] / base["parameters"], 3)
        r["flops_vs_sasrec"] = round(r["forward_gflops_per_sequence"]
                                     / base["forward_gflops_per_sequence"], 3)
    config = {k: v for k, v in vars(a).items() if k != "json_out"}
    text = json.dumps({"config": config, "models": rows}, indent=2)
    print(text)
    if a.json_out:
        a.json_out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
