"""The cross-domain protocol (X-RETR), as close to the paper as the data here allows.

Usage:
    python -m benchmarks.cross_domain --out benchmarks/results [--seeds 0,1,2] [--dry-run]

The paper pre-trains on five Amazon categories and fine-tunes on others; those exact sets are
not available offline. Here the sources are every set with item text that is neither target
(ml-1m, ml-100k, Magazine_Subscriptions), pre-trained together with items seen only through
their MiniLM text vectors; the targets are Office and Musical_Instruments. Per seed:

- ``pretrain``: X-RETR and X-SASRec on the sources (text only, no item IDs);
- ``scratch``: ID-only RETR trained on the target alone;
- ``x-retr`` / ``x-sasrec``: the pre-trained model fine-tuned on the target with new item-ID
  vectors beside the text adaptor and the backbone frozen (the paper's setting);
- ``zero-shot``: the pre-trained text-only model evaluated on the target, no training step.

Every model shares one small CPU recipe (below) and one epoch budget. Records go to
``<out>/xd-*.json`` in the grid's format; `python -m benchmarks.make_results` renders them.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .common import run_and_record

SOURCES = ["ml-1m", "ml-100k", "magazine"]
TARGETS = ["office", "musical-instruments"]
COMMON = ["model.hidden_size=64", "model.num_heads=2", "model.num_layers=2", "model.max_len=50",
          "train.loss=ce", "train.batch_size=256", "train.threads=1", "train.progress=false"]
MODEL_SETS = {"retr": ["model.ffn_size=64"], "sasrec": []}
# 5 of Magazine's 138 5-core items have no description: they get the empty text.
PRETRAIN_EPOCHS = ["train.epochs=20", "train.patience=3", "item_repr.missing_text=empty"]
TARGET_EPOCHS = ["train.epochs=60", "train.patience=5"]


def _sets(*groups: list[str]) -> list[str]:
    return [a for g in groups for s in g for a in ("--set", s)]


def _target_step(target: str, kind: str, seed: int, argv: list[str],
                 run_dir: Path) -> tuple[str, list[str], Path, dict[str, object]]:
    label = f"xd-{target}-{kind}"
    return f"{label}-seed{seed}", argv, run_dir, {"table": "cross-domain", "label": label,
                                                  "seed": seed}


def plan(out: Path, seeds: list[int]) -> list[tuple[str, list[str], Path, dict[str, object]]]:
    """Every step in dependency order: (record name, retr argv, run dir, record fields)."""
    runs = out / "runs"
    steps: list[tuple[str, list[str], Path, dict[str, object]]] = []
    for seed in seeds:
        pre: dict[str, Path] = {}
        for model in ("retr", "sasrec"):
            name = f"xd-pretrain-x{model}-seed{seed}"
            pre[model] = runs / name
            argv = ["pretrain", *[a for s in SOURCES for a in ("--data", s)], "--model", model,
                    "--out", str(pre[model]), "--seed", str(seed), "--json",
                    *_sets(COMMON, MODEL_SETS[model], PRETRAIN_EPOCHS)]
            steps.append((name, argv, pre[model],
                          {"table": "pretrain", "label": f"xd-pretrain-x{model}", "seed": seed}))
        for target in TARGETS:
            d = runs / f"xd-{target}-scratch-retr-seed{seed}"
            argv = ["train", "--data", target, "--model", "retr", "--out", str(d), "--seed",
                    str(seed), "--json", *_sets(COMMON, MODEL_SETS["retr"], TARGET_EPOCHS)]
            steps.append(_target_step(target, "scratch-retr", seed, argv, d))
            for model in ("retr", "sasrec"):
                d = runs / f"xd-{target}-x{model}-seed{seed}"
                argv = ["finetune", str(pre[model]), "--data", target, "--out", str(d),
                        "--freeze-backbone", "--seed", str(seed), "--json", *_sets(TARGET_EPOCHS)]
                steps.append(_target_step(target, f"x{model}-frozen", seed, argv, d))
                d = runs / f"xd-{target}-zeroshot-x{model}-seed{seed}"
                argv = ["finetune", str(pre[model]), "--data", target, "--out", str(d),
                        "--zero-shot", "--seed", str(seed), "--json"]
                steps.append(_target_step(target, f"zeroshot-x{model}", seed, argv, d))
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    done: set[Path] = set()
    for name, argv, run_dir, extra in plan(args.out, seeds):
        if args.dry_run:
            print(" ".join(shlex.quote(a) for a in ["retr", *argv]))
            continue
        needs = Path(argv[1]) if argv[0] == "finetune" else None
        if needs is not None and needs not in done and not (needs / "model.safetensors").exists():
            print(f"[xd] {name}: skipped, {needs} did not finish", flush=True)
            continue
        if run_and_record(args.out, name, argv, run_dir, extra):
            done.add(run_dir)


if __name__ == "__main__":
    main()
