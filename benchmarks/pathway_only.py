"""The pathway-only experiment (spec "Claims"): retrain on the tokens a trained RETR keeps.

Usage:
    python -m benchmarks.pathway_only RETR_RUN_DIR --out benchmarks/results [--seeds 0,1,2]
        [--tag distilled25] [--variants all,pathway,random] [--set train.epochs=5 ...]

A trained RETR run (leave-one-out split) routes every user's training history (the last
``max_len`` items before the validation target, deterministic inference route of the last
layer; with the hierarchical update a token kept there was kept in every layer). Three
datasets are written, each user's history followed by the same validation and test targets,
for the users with at least one token on and one off the route (so every variant is evaluated
on the same users):

- ``all``: the window unchanged (the baseline: same truncation, no k-core, as the others);
- ``pathway``: only the tokens on the route;
- ``off-pathway``: only the tokens off it;
- ``random`` (ours, the control at the same keep rate): for each user, a uniformly random
  subset of the window's real tokens of exactly the size of that user's pathway, in their
  original order, drawn with the retraining's seed.

``--variants`` chooses the retrainings: ``VARIANT`` trains SASRec on that dataset,
``MODEL:VARIANT`` another model (default ``all,pathway,off-pathway,retr:pathway``: SASRec on
the three, RETR on the pathway). Each runs with the run's fast recipe
(``configs/<model>-<dataset>-fast.toml``) and its loss. ``--tag`` goes into the record names
and labels (``po-sasrec-ce-ml-1m-distilled25-pathway-seed0``), so routes from different
routers keep apart; without it the names are today's. Each record holds the route statistics
and its own dataset's token count and share of the window. The paper's claim: pathway-only
loses little, off-pathway hurts badly. Items that never occur any more leave the catalogue,
so full ranking runs over a slightly smaller item set on the filtered data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from retr import load_run

from .common import run_and_record

BATCH = 256
DEFAULT_VARIANTS = "all,pathway,off-pathway,retr:pathway"
DATASETS = ("all", "pathway", "off-pathway", "random")


def routes(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, object]]:
    """Users, padded windows [U, N], keep mask [U, N], targets [U, 2], and route stats."""
    run = load_run(run_dir)
    if run.config.split.kind != "loo":
        raise SystemExit(f"{run_dir}: the experiment needs a leave-one-out run")
    if run.config.model_name != "retr":
        raise SystemExit(f"{run_dir}: not a RETR run (model {run.config.model_name!r})")
    dataset, split = run.data.dataset, run.data.split
    valid = split.examples("valid")
    seqs = dataset.padded_prefixes(valid.users, valid.lengths, run.model.max_len)  # [U, N]
    keep = np.zeros(seqs.shape, dtype=bool)
    model = run.model.eval()
    with torch.no_grad():
        for start in range(0, len(seqs), BATCH):
            batch = torch.from_numpy(seqs[start:start + BATCH])
            out = model(batch, output_attentions=True)
            assert out.routes is not None
            keep[start:start + BATCH] = (out.routes[-1] > 0.5).numpy() & (batch > 0).numpy()
    ends = dataset.offsets[valid.users] + valid.lengths
    targets = np.stack([dataset.items[ends], dataset.items[ends + 1]], axis=1)  # [U, 2]
    real = seqs > 0
    stats = {"users": int(len(seqs)), "window_tokens": int(real.sum()),
             "kept_fraction": round(float(keep.sum() / max(real.sum(), 1)), 4),
             "users_with_empty_pathway": int(((keep.sum(1) == 0)).sum()),
             "users_with_empty_off_pathway": int(((real & ~keep).sum(1) == 0).sum()),
             # the newest behaviour (the window's last real token, left padding) on the route
             "last_token_kept": round(float(keep[:, -1][real[:, -1]].mean()), 4)}
    return [dataset.vocab.users[u] for u in valid.users], seqs, keep, targets, stats


def write_variant(path: Path, users: list[str], seqs: np.ndarray, keep: np.ndarray,
                  targets: np.ndarray, item_names: list[str]) -> None:
    """One ``user item ...`` line per user: the kept history, then the two held-out targets."""
    lines = []
    for u, row, k, tg in zip(users, seqs, keep, targets, strict=True):
        items = [item_names[i] for i in row[k]] + [item_names[i] for i in tg]
        lines.append(" ".join([u, *items]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def random_mask(real: np.ndarray, keep: np.ndarray, seed: int) -> np.ndarray:
    """[U, N] per user, a uniformly random subset of the real tokens as large as its route."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(keep)
    for u in range(len(real)):
        positions = np.flatnonzero(real[u])
        out[u, rng.choice(positions, size=int(keep[u].sum()), replace=False)] = True
    return out


def parse_variants(text: str) -> list[tuple[str, str]]:
    """``all,retr:pathway`` -> [("sasrec", "all"), ("retr", "pathway")]."""
    runs = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        model, _, variant = item.rpartition(":")
        if variant not in DATASETS:
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(DATASETS)}")
        runs.append((model or "sasrec", variant))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a trained RETR run directory (leave-one-out)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    p.add_argument("--tag", default="", help="goes into record names and labels (the router)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"retrainings, VARIANT (SASRec) or MODEL:VARIANT (default {DEFAULT_VARIANTS})")
    args = p.parse_args()
    runs = parse_variants(args.variants)
    cfg = json.loads((args.run / "config.json").read_text())
    source, loss = cfg["data"]["source"], cfg["train"]["loss"]
    data_dir = args.out / "runs" / f"pathway-data-{args.run.name}"
    data_dir.mkdir(parents=True, exist_ok=True)
    users, seqs, keep, targets, stats = routes(args.run)
    print(f"[pathway] {args.run}: {stats}", flush=True)
    vocab = json.loads((args.run / "vocab.json").read_text())
    item_names = ["<pad>", *[str(i) for i in vocab["items"]]]
    real = seqs > 0
    variants = {"all": real, "pathway": keep, "off-pathway": real & ~keep}
    # every variant evaluates the same users: those with a token on and a token off the route
    both = keep.any(1) & (real & ~keep).any(1)
    stats["users_evaluated"] = int(both.sum())
    stats["kept_fraction_evaluated"] = round(float(keep[both].sum() / max(real[both].sum(), 1)), 4)
    (data_dir / "routes.json").write_text(json.dumps(stats, indent=2) + "\n")
    chosen = [u for u, b in zip(users, both, strict=True) if b]
    for name, mask in variants.items():
        write_variant(data_dir / f"{name}.txt", chosen, seqs[both], mask[both], targets[both],
                      item_names)
    for seed in [int(s) for s in args.seeds.split(",")]:
        if any(v == "random" for _, v in runs):  # the control, drawn with this seed
            variants["random"] = random_mask(real, keep, seed) & both[:, None]
            (data_dir / f"random-seed{seed}").mkdir(exist_ok=True)
            write_variant(data_dir / f"random-seed{seed}" / "random.txt", chosen, seqs[both],
                          variants["random"][both], targets[both], item_names)
        for model, variant in runs:
            label = "-".join(x for x in (model, loss, source, args.tag, variant) if x)
            name = f"po-{label}-seed{seed}"
            run_dir = args.out / "runs" / name
            source_file = data_dir / f"random-seed{seed}" / "random.txt" \
                if variant == "random" else data_dir / f"{variant}.txt"
            mask = variants[variant][both]
            variant_stats = {"tokens": int(mask.sum()),
                             "share_of_window": round(float(mask.sum() / max(real[both].sum(), 1)),
                                                      4)}
            argv = ["train", "--config", f"configs/{model}-{source}-fast.toml",
                    "--out", str(run_dir), "--seed", str(seed), "--json",
                    "--set", f"data.source={source_file}",
                    "--set", "data.format=user-lines", "--set", "data.min_user_interactions=0",
                    "--set", "data.min_item_interactions=0", "--set", f"train.loss={loss}",
                    "--set", "train.progress=false", "--set", "train.threads=1"]
            for s in args.set:
                argv += ["--set", s]
            run_and_record(args.out, name, argv, run_dir,
                           {"table": "pathway-only", "label": label, "seed": seed,
                            "routes": stats, "retr_run": str(args.run), "variant": variant,
                            "source": source, "model": model, "variant_stats": variant_stats, **({"tag": args.tag} if args.tag else {})})


if __name__ == "__main__":
    main()
