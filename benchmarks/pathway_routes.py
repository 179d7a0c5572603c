"""Routes you can measure: the paper's router, a random one and the budgeted ones (ours).

Usage:
    python -m benchmarks.pathway_routes [--variants paper,random25,...] [--seeds 0,1,2]
        [--runs runs/routes] [--out benchmarks/results/routes] [--collect-only]

Every variant trains RETR on the planted-pathway log with ``configs/synthetic.toml``'s RETR
settings (one thread), one run per seed, with the command recorded next to its numbers; a run
directory that already holds results.json is collected, not retrained (and a run whose
directory is gone but whose record is in ``--out`` keeps that record). Route statistics come
from :func:`retr.evaluation.routes.route_statistics` on the test histories (recomputed from
the run's weights when results.json predates them: the same function, the same seed). Writes
one JSON record per run into ``--out`` and the table ``pathways.md`` there.

Targets (issue "Behavior pathways you can measure and trust"), for the budgeted variants at
ρ = 0.25: route AUC >= 0.80 and precision >= 3x the base rate at the last layer in every
seed; inference and sampled keep rates within ±0.05 of ρ; test NDCG@10 within the seed
spread of the unbudgeted model (the paper's default).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from retr import DELETION_METHODS, deletion_test, load_run, route_statistics

RHO = 0.25
DELETE_K = 3  # the planted pathway has 3 behaviors
BASE = ["--config", "configs/synthetic.toml", "--model", "retr", "--set", "train.threads=1"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "paper": ("the paper's router (defaults)", []),
    "random25": ("random router, p = 0.25 (control)",
                 ['model.router="random"', "model.random_keep_prob=0.25"]),
    "budget25": ("ours: budget penalty λ = 1, ω floor 0.1, threshold rule",
                 ["model.keep_target=0.25", "model.keep_weight=1.0", "model.omega_floor=0.1",
                  'model.inference_rule="threshold"']),
    "distilled25": ("ours: router distilled from the last query's attention, threshold rule, "
                    "no hierarchy",
                    ["model.keep_target=0.25", 'model.inference_rule="threshold"',
                     'model.router_target="attention"', 'model.distill_source="last"',
                     "model.hierarchical=false"]),
    "distilled25-bq": ("ours: distilled25 with the query bias on off-route tokens too",
                       ["model.keep_target=0.25", 'model.inference_rule="threshold"',
                        'model.router_target="attention"', 'model.distill_source="last"',
                        "model.hierarchical=false", 'model.query_bias="always"']),
    "keys25": ("ours: key gates (the route decides which keys every query reads), budget "
               "penalty λ = 1, ω floor 0.1, threshold rule",
               ["model.keep_target=0.25", "model.keep_weight=1.0", "model.omega_floor=0.1",
                'model.inference_rule="threshold"', 'model.gate="keys"']),
    "keys-distilled25": ("ours: key gates, router distilled from the last query's attention, "
                         "threshold rule, no hierarchy",
                         ["model.keep_target=0.25", 'model.inference_rule="threshold"',
                          'model.router_target="attention"', 'model.distill_source="last"',
                          "model.hierarchical=false", 'model.gate="keys"']),
}
BUDGETED = ("budget25", "distilled25", "distilled25-bq", "keys25", "keys-distilled25")


def command(variant: str, seed: int, runs: Path) -> list[str]:
    sets = [x for s in VARIANTS[variant][1] for x in ("--set", s)]
    return ["python", "-m", "retr", "train", *BASE, "--out", str(runs / f"{variant}-s{seed}"),
            "--seed", str(seed), "--quiet", *sets]


def train(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = Path(cmd[cmd.index("--out") + 1] + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        subprocess.run([sys.executable, *cmd[1:]], check=True, env=env, stdout=fh,
                       stderr=subprocess.STDOUT)


def test_ndcg(results: dict[str, Any]) -> float:
    return next(r["metrics"]["NDCG@10"] for r in results["results"]
                if r["split"] == "test" and r["protocol"] == "full")


def collect(variant: str, seed: int, runs: Path, cmd: list[str], out: Path) -> dict[str, Any]:
    """The record of one run: read back when ``out`` holds one for the same command and run
    and every explanation the deletion test now compares (older records are measured again)."""
    run_dir = runs / f"{variant}-s{seed}"
    results = json.loads((run_dir / "results.json").read_text())
    stored = out / f"{variant}-s{seed}.json"
    if stored.is_file():
        record = json.loads(stored.read_text())
        if record.get("command") == shlex.join(cmd) and record.get("test_ndcg@10") == \
                test_ndcg(results) and "recency" in record["deletion"]["methods"]:
            return dict(record)
    run = load_run(run_dir)
    test = run.data.split.examples("test")
    routes = results.get("routes")
    if routes is None:
        routes = route_statistics(run.model, run.data.dataset, test, run.config.data.source,
                                  seed=run.config.seed)
    deletion = deletion_test(run.model, run.data.dataset, test, k=DELETE_K, seed=run.config.seed)
    return {"variant": variant, "description": VARIANTS[variant][0], "seed": seed,
            "command": shlex.join(cmd), "test_ndcg@10": test_ndcg(results),
            "training": results.get("training"), "routes": routes, "deletion": deletion}


def _ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(records: list[dict[str, Any]]) -> str:
    head = ("| variant | seed | test NDCG@10 | keep L1 / L2 (inference) | keep L1 / L2 (sampled) "
            "| ω=0 L2 | L2 AUC(α) | L2 precision (÷ base) | L2 recall | L2 last-query "
            "attention mass / AUC |")
    lines = [head, "|" + "---|" * 10]
    for r in records:
        st = r["routes"]
        l1, l2 = st["layers"][0], st["layers"][-1]
        prec = l2.get("precision")
        ratio = prec / st["base_rate"] if prec is not None else None
        omega = l2["omega_zero_share"]
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['test_ndcg@10']:.4f} "
            f"| {l1['keep_rate']:.3f} / {l2['keep_rate']:.3f} "
            f"| {l1['keep_rate_sampled']:.3f} / {l2['keep_rate_sampled']:.3f} "
            f"| {'-' if omega is None else f'{omega:.3f}'} "
            f"| {l2['auc']:.3f} | {'-' if prec is None else f'{prec:.3f} ({ratio:.1f}x)'} "
            f"| {l2['recall']:.3f} | {l2['attention_mass']:.3f} / {l2['attention_auc']:.3f} |")
    return "\n".join(lines)


def summary(records: list[dict[str, Any]]) -> str:
    out = ["| variant | seeds | test NDCG@10 | L2 keep (inference) | L2 keep (sampled) "
           "| L2 AUC(α) | L2 precision ÷ base |", "|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == variant]
        last = [r["routes"]["layers"][-1] for r in rs]
        ratios = [e["precision"] / r["routes"]["base_rate"] for e, r in zip(last, rs, strict=True)
                  if e.get("precision") is not None]
        out.append(f"| {variant} | {','.join(str(r['seed']) for r in rs)} "
                   f"| {_ms([r['test_ndcg@10'] for r in rs])} "
                   f"| {_ms([e['keep_rate'] for e in last])} "
                   f"| {_ms([e['keep_rate_sampled'] for e in last])} "
                   f"| {_ms([e['auc'] for e in last])} | {_ms(ratios)} |")
    return "\n".join(out)


def targets(records: list[dict[str, Any]]) -> list[str]:
    """One line per budgeted variant: which targets every seed met."""
    base = [r["test_ndcg@10"] for r in records if r["variant"] == "paper"]
    lines = []
    for variant in BUDGETED:
        rs = [r for r in records if r["variant"] == variant]
        if not rs:
            continue
        last = [r["routes"]["layers"][-1] for r in rs]
        auc_ok = all(e["auc"] >= 0.80 for e in last)
        prec_ok = all(e.get("precision") is not None
                      and e["precision"] >= 3 * r["routes"]["base_rate"]
                      for e, r in zip(last, rs, strict=True))
        keep_ok = all(abs(e["keep_rate"] - RHO) <= 0.05 and abs(e["keep_rate_sampled"] - RHO)
                      <= 0.05 for e in last)
        ndcg_ok = bool(base) and all(min(base) - (max(base) - min(base)) <= r["test_ndcg@10"]
                                     for r in rs)
        verdict = {"AUC >= 0.80": auc_ok, "precision >= 3x base": prec_ok,
                   "keep within ±0.05 of ρ": keep_ok,
                   "NDCG@10 within the paper default's seed spread": ndcg_ok}
        lines.append(f"- {variant}: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}"
                                                   for k, v in verdict.items()))
    return lines


def deletion_table(records: list[dict[str, Any]]) -> str:
    out = ["| variant | seeds | intact | " + " | ".join(
        f"{m}: top-{DELETE_K} / bottom-{DELETE_K} deleted" for m in DELETION_METHODS) + " |",
           "|---" * (3 + len(DELETION_METHODS)) + "|"]
    for variant in dict.fromkeys(r["variant"] for r in records):
        rs = [r["deletion"] for r in records if r["variant"] == variant]
        cells = []
        for m in DELETION_METHODS:
            if all(m in d["methods"] for d in rs):
                top = statistics.mean(d["methods"][m]["top"]["HR@10"] for d in rs)
                bottom = statistics.mean(d["methods"][m]["bottom"]["HR@10"] for d in rs)
                cells.append(f"{top:.3f} / {bottom:.3f}")
            else:
                cells.append("-")
        intact = statistics.mean(d["intact"]["HR@10"] for d in rs)
        seeds = ",".join(str(r["seed"]) for r in records if r["variant"] == variant)
        out.append(f"| {variant} | {seeds} | {intact:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", type=Path, default=Path("runs/routes"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routes"))
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for variant in variants:
        for seed in seeds:
            cmd = command(variant, seed, args.runs)
            done = (args.runs / f"{variant}-s{seed}" / "results.json").is_file()
            kept = args.out / f"{variant}-s{seed}.json"
            if not done and kept.is_file():  # measured before; its run directory is gone
                records.append(json.loads(kept.read_text()))
                continue
            if not done:
                if args.collect_only:
                    continue
                print(f"training {variant} seed {seed}: {shlex.join(cmd)}", flush=True)
                train(cmd)
            record = collect(variant, seed, args.runs, cmd, args.out)
            (args.out / f"{variant}-s{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
            records.append(record)
    md = ["# Pathway routes on the planted-pathway log", "",
          "RETR with `configs/synthetic.toml`'s settings (d = 64, h = 2, N = 50, CE, 30-epoch cap, "
          "patience 5), one thread, test split (2,000 users, leave-one-out). Route statistics "
          "at the last layer (L2) unless said; the planted-token base rate is "
          f"{records[0]['routes']['base_rate']:.3f}. AUC scores the keep probability α against "
          "the planted positions; precision and recall score the inference route. Written by "
          "`python -m benchmarks.pathway_routes`.", "", "## Per variant (mean ± sd over seeds)",
          "", summary(records), "", "## Targets at ρ = 0.25", "",
          "Met means: in every seed, at the last layer, AUC(α) >= 0.80, precision >= 3x the "
          "base rate, inference and sampled keep rates within ±0.05 of ρ; test NDCG@10 at or "
          "above the lowest paper-default seed minus the paper default's max-min spread.", "",
          *targets(records), "",
          "## Every run", "", table(records), "",
          f"## Deletion test (k = {DELETE_K}, mean over seeds)", "",
          "HR@10 of the true next item ranked among all items, after deleting from each test "
          f"history the {DELETE_K} behaviors an explanation ranks highest / lowest "
          "(`retr.explain.deletion`); histories with more than "
          f"{2 * DELETE_K} behaviors. route: α of the last layer; attention: the last query's "
          "attention at the last layer; gradient: gradient x input of the target's score "
          "(gradient_abs: its magnitude); recency: newest first, a control; random: a random "
          "order. A faithful explanation makes the first number much lower than the second. "
          "Records made before gradient_abs and recency were added show \"-\" there.", "",
          deletion_table(records), "", "## Commands", ""]
    md += [f"- `{r['variant']}` seed {r['seed']}: `OMP_NUM_THREADS=1 {r['command']}`"
           for r in records]
    (args.out / "pathways.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
