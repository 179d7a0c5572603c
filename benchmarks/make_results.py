"""Turn the benchmark JSON records into RESULTS.md: mean ± std over seeds, both protocols.

Usage:
    python -m benchmarks.make_results benchmarks/results --out RESULTS.md

Reads the run records written by `grid.py`, `cross_domain.py` and `pathway_only.py`
(``*.json`` with a ``results`` field), plus, when present, ``speed.json`` (`bench_speed.py`),
``params_flops.json`` (`params_flops.py --json-out`) and ``notes-<table>.md`` (observations
placed under that table's heading, such as a seed that stopped early).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .grid import load_grid

METRICS = ("HR@10", "NDCG@10", "MRR")

# Published rows: dataset, protocol (ours: "full" or "sampled"; its words), model, published
# HR@10 and NDCG@10 (or MRR alone), our row of the same model and loss at the paper's recipe,
# and our RETR row.
FULL, SAMPLED_100, SAMPLED_99 = ("full", "full ranking"), ("sampled", "100 uniform negatives"), \
    ("sampled", "99 uniform negatives")
PUBLISHED: list[tuple[str, tuple[str, str], str, tuple[float, ...], str | None, str]] = [
    ("ML-1M", SAMPLED_100, "SASRec", (0.8245, 0.5905), "sasrec-bpr-ml-1m-paper",
     "retr-bpr-ml-1m-paper"),
    ("ML-1M", FULL, "SASRec (BCE, 1 negative)", (0.2500, 0.1341), "sasrec-bpr-ml-1m-paper",
     "retr-bpr-ml-1m-paper"),
    ("ML-1M", FULL, "SASRec with cross-entropy", (0.3152, 0.1821), "sasrec-ce-ml-1m-paper",
     "retr-ce-ml-1m-paper"),
    ("ML-1M", FULL, "BERT4Rec", (0.2843, 0.1537), "bert4rec-ml-1m-paper", "retr-ce-ml-1m-paper"),
    ("ML-1M", FULL, "gSASRec", (0.3003, 0.1726), None, "retr-ce-ml-1m-paper"),
    ("ML-1M", FULL, "HSTU-large", (0.3294, 0.1893), None, "retr-ce-ml-1m-paper"),
    ("Beauty (S3-Rec data)", FULL, "SASRec", (0.0605, 0.0318), "sasrec-bpr-beauty-paper",
     "retr-bpr-beauty-paper"),
    ("Beauty (S3-Rec data)", FULL, "SASRec with sampled softmax", (0.0921, 0.0531),
     "sasrec-ce-beauty-paper", "retr-ce-beauty-paper"),
    ("Sports (S3-Rec data)", FULL, "SASRec with sampled softmax", (0.0569, 0.0314),
     "sasrec-ce-sports-paper", "retr-ce-sports-paper"),
    ("Yelp (S3-Rec data)", SAMPLED_99, "SASRec", (0.3927,), "sasrec-ce-yelp-paper",
     "retr-ce-yelp-paper"),
    ("Yelp (S3-Rec data)", SAMPLED_99, "S3-Rec", (0.4190,), None, "retr-ce-yelp-paper"),
    ("Yelp (S3-Rec data)", SAMPLED_99, "RETR (its paper)", (0.4354,), None, "retr-ce-yelp-paper"),
]


def published_beside_ours(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The numbers everyone quotes beside ours (paper-recipe rows, mean over their seeds)."""
    lines = ["## Published numbers beside ours", "",
             "HR@10 / NDCG@10 (MRR alone on the Yelp rows, whose published protocol reports it); "
             "each published row under its paper's protocol, ours under the same protocol "
             "(candidates as in our row) at the paper's recipe, mean over the seeds of the "
             "table above. Our row of the same model is trained with the loss its label names "
             "(full CE where the published row used a sampled softmax). The last column is "
             "RETR's NDCG@10 (MRR) against the published one.", "",
             "| dataset | protocol | model | published | ours, same model | ours, RETR "
             "| RETR vs published |", "|---|---|---|---|---|---|---|"]

    def ours(label: str | None, protocol: str, mrr: bool) -> tuple[str, float | None]:
        rs = groups.get(label or "", [])
        res = _test(rs[0], protocol) if rs else None
        if res is None:
            return "-", None
        names = ("MRR",) if mrr else ("HR@10", "NDCG@10")
        means = [statistics.fmean(metric_values(rs, protocol, m)) for m in names]
        cand = f"1 + {res['negatives']}, " if protocol == "sampled" else ""
        return f"{' / '.join(f'{v:.4f}' for v in means)} ({cand}`{label}`)", means[-1]

    for dataset, (protocol, where), model, published, same, retr in PUBLISHED:
        mrr = len(published) == 1
        shown = ("MRR " if mrr else "") + " / ".join(f"{v:.4f}" for v in published)
        ours_same, _ = ours(same, protocol, mrr)
        ours_retr, value = ours(retr, protocol, mrr)
        gap = f"{100 * (value / published[-1] - 1):+.1f} %" if value is not None else "-"
        lines.append(f"| {dataset} | {where} | {model} | {shown} | {ours_same} | {ours_retr} "
                     f"| {gap} |")
    return lines + [""]

INTROS = {
    "intra-domain": "Fast recipes (`configs/<model>-<dataset>-fast.toml`: d=64, h=2, L=2, N=200 "
                    "on ml-1m and 50 elsewhere, batch 256, Adam 1e-3), one thread per run, "
                    "`benchmarks/grids/cpu.toml`. Epochs run / epoch cap (early stopping on "
                    "validation full NDCG@10, patience 5); where recorded, each seed's best "
                    "validation epoch and how its training ended. Yelp keeps repeat "
                    "visits as candidates and samples 99 negatives (its published protocol).",
    "paper-recipe": "The paper's recipes (`configs/<model>-<dataset>.toml`: d=256, h=4, L=2, "
                    "N=200 on ml-1m and 100 elsewhere, batch 512, Adam 1e-3, up to 300 epochs, "
                    "early stopping on validation full NDCG@10 with patience 10) on a GPU, "
                    "`benchmarks/grids/paper.toml`, several runs sharing the GPU at once (LastFM "
                    "and Pop on the CPU). A `train.max_minutes` in a row's command is the "
                    "wall-clock cap of a lent machine; the epochs column says, per seed, the "
                    "best validation epoch and whether training ended by patience or by that "
                    "cap (then not at convergence).",
    "ablation": "RETR with CE, one switch per row (`benchmarks/grids/ablations.toml`), beside "
                "the unablated `retr-ce-<dataset>` row of the intra-domain grid (same recipe, "
                "budget and seeds).",
    "pathway-only": "`benchmarks/pathway_only.py`: a trained RETR routes each user's history "
                    "(deterministic route of the last layer); models are retrained on the kept "
                    "tokens (`pathway`), the dropped ones (`off-pathway`) or the unchanged "
                    "window (`all`), each followed by the same validation and test targets.",
    "cross-domain": "`benchmarks/cross_domain.py`: pre-training on ml-1m + ml-100k + "
                    "Magazine_Subscriptions with items seen only through MiniLM text vectors "
                    "(UniSRec adaptor, 8 experts), then per target: ID-only RETR from scratch; "
                    "X-RETR / X-SASRec = the pre-trained model with new item-ID vectors beside "
                    "the text adaptor, backbone frozen; zero-shot = the text-only pre-trained "
                    "model, no training on the target. d=64, h=2, L=2, N=50, CE, one thread. "
                    "The paper's Amazon source categories are not available offline: this is "
                    "the closest honest setting, not the paper's.",
}


def _fmt(values: list[float]) -> str:
    """Mean ± std over seeds; one seed has no spread to show (a "± 0" would claim one)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def _test(record: dict[str, Any], protocol: str) -> dict[str, Any] | None:
    for res in record["results"]["results"]:
        if res["split"] == "test" and res["protocol"] == protocol:
            return res
    return None


def _cap(record: dict[str, Any]) -> str:
    """The epoch cap the run trained under (its recipe and ``--set`` overrides, resolved as
    ``retr train`` resolves them), and the wall-clock cap when there is one."""
    from retr import RetrError, resolve_config

    argv = shlex.split(record["command"])
    sets = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    config = record.get("config") or (argv[argv.index("--config") + 1]
                                      if "--config" in argv[:-1] else None)
    try:
        train = resolve_config(config if config and Path(config).is_file() else None, sets).train
    except RetrError:
        return "-"
    return f"{train.epochs}" + (f", ≤ {train.max_minutes:g} min" if train.max_minutes > 0 else "")


def _stops(rs: list[dict[str, Any]]) -> str:
    """How the seeds' training ended (grid records since ``stopped_by`` was recorded), e.g.
    "; best 8, 8, 6; stopped: time cap 2, patience 1"."""
    known = [r for r in rs if r.get("stopped_by")]
    if not known:
        return ""
    reasons = Counter(r["stopped_by"] for r in known)
    return ("; best " + ", ".join(str(r["best_epoch"]) for r in known) + "; stopped: "
            + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())))


def metric_values(rs: list[dict[str, Any]], protocol: str, metric: str) -> list[float]:
    out = []
    for r in rs:
        res = _test(r, protocol)
        if res is not None:
            out.append(res["metrics"][metric])
    return out


def table(groups: dict[str, list[dict[str, Any]]], protocol: str) -> list[str]:
    lines = ["| run | dataset | seeds | candidates | " + " | ".join(METRICS)
             + " | epochs run / cap; how it stopped | train s/epoch (median) | command (first seed) |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|---|"]
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        candidates = "all items"
        if protocol == "sampled":
            res = _test(rs[0], "sampled")
            if res is None:
                continue
            candidates = f"1 + {res['negatives']} {res['negative_sampling']}"
        epochs = statistics.fmean(r["epochs"] for r in rs)
        trained = [r.get("median_epoch_seconds") or r["train_seconds"] / r["epochs"]
                   for r in rs if r["epochs"]]
        per_epoch = f"{statistics.median(trained):.1f}" if trained else "-"
        seeds = ",".join(str(r["seed"]) for r in rs)
        budget = f"{epochs:.0f} / {_cap(rs[0])}{_stops(rs)}" if epochs else "no training"
        lines.append(f"| {label} | {rs[0]['results']['dataset']} | {seeds} | {candidates} | "
                     + " | ".join(_fmt(metric_values(rs, protocol, m)) for m in METRICS)
                     + f" | {budget} | {per_epoch} | "
                     f"`{rs[0]['command']}` |")
    return lines


def head_to_head(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """RETR vs SASRec (and pathway variants vs their base) at the same loss and dataset,
    over the seeds both have."""
    pairs = []
    for label in sorted(groups):
        if label.startswith("retr-"):
            pairs.append((label, "sasrec-" + label[len("retr-"):]))
        elif label.startswith("sasrec-pathway-"):
            pairs.append((label, "sasrec-" + label[len("sasrec-pathway-"):]))
        elif label.startswith("bert4rec-pathway-"):
            pairs.append((label, "bert4rec-" + label[len("bert4rec-pathway-"):]))
    return delta_table(groups, pairs, [("full", "NDCG@10"), ("sampled", "NDCG@10")])


def ablation_deltas(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each ablation against the unablated row its label extends, over the seeds both have."""
    pairs = []
    for label in sorted(groups):
        bases = [b for b in groups if label.startswith(b + "-")]
        if bases:
            pairs.append((label, max(bases, key=len)))
    return delta_table(groups, pairs, [("full", "NDCG@10"), ("sampled", "NDCG@10"),
                                       ("sampled", "MRR")])


def delta_table(groups: dict[str, list[dict[str, Any]]], pairs: list[tuple[str, str]],
                columns: list[tuple[str, str]]) -> list[str]:
    """Mean of each (protocol, metric) for a row and its baseline over their common seeds."""
    head = "".join(f" {p} {m} | baseline | change |" for p, m in columns)
    lines = ["| model | baseline | seeds |" + head, "|---|---|---|" + "---|---|---|" * len(columns)]
    for ours, base in pairs:
        if base not in groups:
            continue
        common = {r["seed"] for r in groups[ours]} & {r["seed"] for r in groups[base]}
        if not common:
            continue
        mine = [r for r in groups[ours] if r["seed"] in common]
        theirs = [r for r in groups[base] if r["seed"] in common]
        row = [ours, base, ",".join(str(x) for x in sorted(common))]
        for protocol, metric in columns:
            a = metric_values(mine, protocol, metric)
            b = metric_values(theirs, protocol, metric)
            if not a or not b:
                row += ["-", "-", "-"]
                continue
            ma, mb = statistics.fmean(a), statistics.fmean(b)
            change = round((ma - mb) / mb * 100, 1) + 0.0  # + 0.0: no "-0.0"
            row += [f"{ma:.4f}", f"{mb:.4f}", f"{change:+.1f} %"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def speed_goals(rows: list[dict[str, Any]], max_len: int = 200) -> list[str]:
    """The speed goals of the benchmark brief, each with the rows that decide it (N=max_len)."""
    needed = ("seconds_per_epoch", "full_ranking_users_per_second", "peak_rss_mb")
    at_n = [r for r in rows if int(r.get("max_len", 200)) == max_len
            and all(k in r for k in needed)]
    ours = [r for r in at_n if r["implementation"].startswith("retr")]
    peers = [r for r in at_n if not r["implementation"].startswith("retr")]
    rectools = [r for r in peers if r["implementation"].startswith("RecTools")]
    if not ours:
        return []
    lines = [f"Against the goals (N={max_len}; each ratio from the rows above):", "",
             "| goal | measured | met |", "|---|---|---|"]

    def add(goal: str, measured: str, met: bool) -> None:
        lines.append(f"| {goal} | {measured} | {'yes' if met else 'no'} |")

    reached = [(t, r) for r in ours if (t := r["raw"].get("time_to_target_seconds")) is not None]
    if reached:
        t, r = min(reached, key=lambda x: x[0])
        add("validation sampled NDCG@10 0.55 in under 3 minutes of training",
            f"{t:.0f} s ({r['implementation']}, {r['loss']})", t < 180)
    else:
        add("validation sampled NDCG@10 0.55 in under 3 minutes of training",
            "not reached in any row's budget", False)
    ce = [r for r in ours if r["loss"] == "full softmax CE" and "SASRec" in r["implementation"]]
    peer_ce = [r for r in rectools if r["loss"] == "full softmax CE"]
    if ce and peer_ce:
        ratio = peer_ce[0]["seconds_per_epoch"] / ce[0]["seconds_per_epoch"]
        add("full-softmax CE epoch at least 3x faster than RecTools'",
            f"{ce[0]['seconds_per_epoch']} vs {peer_ce[0]['seconds_per_epoch']} s: {ratio:.1f}x",
            ratio >= 3)
    sasrec = [r for r in ours if "SASRec" in r["implementation"]]
    if rectools and sasrec:  # like with like: retr's SASRec against RecTools' SASRec
        peer = max(r["full_ranking_users_per_second"] for r in rectools)
        mine = min(r["full_ranking_users_per_second"] for r in sasrec)
        others = "; ".join(f"{r['implementation']} {r['loss']}: "
                           f"{r['full_ranking_users_per_second'] / peer:.1f}x"
                           for r in ours if r not in sasrec)
        add("full ranking of all users at least 3x faster than RecTools (SASRec)",
            f"{mine} vs {peer} users/s: {mine / peer:.1f}x" + (f" ({others})" if others else ""),
            mine >= 3 * peer)
    if peers:
        verdicts = []
        for r in ours:
            same = [p["peak_rss_mb"] for p in peers if p["loss"] == r["loss"]]
            if same:
                verdicts.append((r, min(same)))
        if verdicts:
            add("peak memory below every peer (same loss)",
                "; ".join(f"{r['implementation']} {r['loss']} {r['peak_rss_mb']} vs {m} MB"
                          for r, m in verdicts),
                all(r["peak_rss_mb"] < m for r, m in verdicts))
    util = [r for r in ours if "fp32_matmul_utilisation_percent" in r]
    if util:
        top = max(util, key=lambda r: r["fp32_matmul_utilisation_percent"])
        add("at least 30 % of the measured fp32 matmul FLOP/s in training",
            ", ".join(f"{r['implementation']} {r['loss']} {r['fp32_matmul_utilisation_percent']} %"
                      for r in util), top["fp32_matmul_utilisation_percent"] >= 30)
    return lines + [""]


def speed_section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = ["## Speed and memory, side by side", "", data.get("note", ""), "",
             "| implementation | loss | N | budget min | s/epoch | sequences/s | tokens/s | "
             "epochs in budget | time to valid sampled NDCG@10 ≥ target | full-ranking users/s "
             "(top-10, all users) | single-history p50 / p99 ms | peak RSS MB | model GFLOP/s "
             "(% of fp32 matmul) | command |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    commands: list[str] = []
    rows = sorted(data["rows"], key=lambda r: (-int(r.get("max_len", 200)),
                                               not r["implementation"].startswith("retr")))
    for r in rows:
        util = (f"{r['model_gflops_per_second']} ({r['fp32_matmul_utilisation_percent']} %)"
                if "model_gflops_per_second" in r else "-")
        if r["command"] not in commands:
            commands.append(r["command"])
        lines.append("| " + " | ".join(str(r.get(k, "-")) for k in (
            "implementation", "loss", "max_len", "budget_minutes", "seconds_per_epoch",
            "sequences_per_second", "tokens_per_second", "epochs_in_budget", "time_to_target",
            "full_ranking_users_per_second", "latency_ms", "peak_rss_mb"))
            + f" | {util} | {commands.index(r['command']) + 1} |")
    lines += ["", *speed_goals(data["rows"]), "Commands:", ""]
    for i, c in enumerate(commands, 1):
        codes = sorted({r["code"] for r in data["rows"] if r["command"] == c and "code" in r})
        lines.append(f"{i}. `{c}`" + (f" (code {', '.join(codes)})" if codes else ""))
    machines = sorted({r["machine"] for r in data["rows"] if "machine" in r})
    if machines:
        lines += ["", "Machine: " + "; ".join(machines)]
    if speed_curves(data, path.parent / "speed_curves.png"):
        lines += ["", "![validation NDCG@10 against training time](benchmarks/results/"
                  "speed_curves.png)"]
    lines += ["", "Tokens are the real (non-padding) training positions. retr and RecTools "
              "train each user's last N items per epoch, every position at once (as SASRec "
              "does); retr runs each batch in its default `train.length_groups = 4` groups of "
              "similar length, each cut to its longest history (the same loss, less work on "
              "padding), and computes its full-softmax loss and gradient in one buffer. RecBole trains on every prefix of every sequence, one target per sample "
              "(about a million samples per ml-1m epoch), so its budget ends inside its first "
              "epoch: its epochs in budget is the share of one epoch done, its s/epoch the time "
              "a whole epoch would take at that pace, and its tokens/s its samples/s. RecBole's "
              "single-history requests start from internal item ids (no id mapping), retr's "
              "and RecTools' from external ids. For reference "
              "only (not run here): the SASRec.pytorch script (hidden 50, maxlen 200, batch 128, "
              "BCE) has been measured on this kind of machine at about 20 s per ml-1m epoch "
              "(≈ 300 sequences/s, 1.0 GB) reaching validation sampled NDCG@10 0.51 after 15 "
              "epochs and 0.567 after 25."]
    return lines + [""]


def speed_curves(data: dict[str, Any], out: Path) -> bool:
    """Validation sampled NDCG@10 against cumulative training seconds, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional: the table says the same
        return False
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for r in data["rows"]:
        epochs = r.get("raw", {}).get("epochs", [])
        if not epochs:
            continue
        t = [0.0]
        for e in epochs:
            t.append(t[-1] + e["seconds"])
        style = "-" if r["implementation"].startswith("retr") else "--"
        ax.plot(t[1:], [e["valid_sampled_ndcg10"] for e in epochs], style, marker="o",
                markersize=3, label=f"{r['implementation']}, {r['loss']}, N={r.get('max_len', 200)}")
    ax.set_xlabel("training seconds (validation excluded)")
    ax.set_ylabel("validation NDCG@10, 100 sampled negatives")
    ax.set_xscale("log")  # seconds-long epochs beside a peer's quarter-hour budget
    ax.set_title("ml-1m, d=64: quality reached per training second")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def params_section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    c = data["config"]
    lines = ["## Parameters and FLOPs", "",
             f"`python benchmarks/params_flops.py` (d={c['hidden']}, h={c['heads']}, "
             f"L={c['layers']}, N={c['max_len']}, {c['items']} items; forward FLOPs of one "
             "sequence, final scoring excluded).", "",
             "| model | parameters | vs SASRec | GFLOP / sequence | vs SASRec |",
             "|---|---|---|---|---|"]
    for name, r in data["models"].items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['parameters_vs_sasrec']}x | "
                     f"{r['forward_gflops_per_sequence']} | {r['flops_vs_sasrec']}x |")
    return lines + [""]


def coverage(records: list[dict[str, Any]], grids: list[Path]) -> list[str]:
    """The grid runs with no record yet: what RESULTS.md does not cover."""
    have = {(r["label"], r["seed"]) for r in records}
    lines = []
    for path in grids:
        if not path.exists():
            continue
        runs, seeds, _ = load_grid(path)
        missing = []
        for run in runs:
            absent = [x for x in seeds if (run["label"], x) not in have]
            if absent:
                missing.append(run["label"] if len(absent) == len(seeds)
                               else f"{run['label']} (seed {','.join(map(str, absent))})")
        if missing:
            lines.append(f"- `{path.as_posix()}`: {len(missing)} of {len(runs)} "
                         f"rows incomplete: {', '.join(missing)}.")
    if not lines:
        return []
    return ["## Not yet measured", "", "Grid rows without all their seeds (rerun the grid "
            "command: finished runs are skipped):", "", *lines, ""]


def build(records: list[dict[str, Any]], results_dir: Path,
          grids: list[Path] | None = None) -> str:
    tables: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        tables[r.get("table", "intra-domain")][r["label"]].append(r)
    lines = ["# Results", "",
             "Generated by `python benchmarks/make_results.py benchmarks/results` from the JSON",
             "records the benchmark scripts write (`benchmarks/results/*.json`, one per run and",
             "seed). Test split, model selected on validation; mean ± std over the seeds listed;",
             "every row gives the exact command of its first seed (the others differ only in",
             "`--seed`). Data are read from `$RETR_DATA_DIR`. Runs on a 2-core CPU machine unless",
             "a section names other hardware.", ""]
    titles = {"intra-domain": "Intra-domain", "paper-recipe": "Intra-domain, the paper's recipe",
              "ablation": "Ablations",
              "pathway-only": "Pathway-only retraining", "cross-domain": "Cross-domain (X-RETR)"}
    for key, title in titles.items():
        groups = tables.get(key)
        if not groups:
            continue
        lines += [f"## {title}", "", INTROS[key], ""]
        notes = results_dir / f"notes-{key}.md"  # what the numbers alone do not say
        if notes.exists():
            lines += [notes.read_text(encoding="utf-8").strip(), ""]
        machines = sorted({r["hardware"] for rs in groups.values() for r in rs if "hardware" in r})
        if key == "paper-recipe" and machines:
            lines += [f"Hardware: {'; '.join(machines)}.", ""]
        codes = Counter(r.get("code", "not recorded") for rs in groups.values() for r in rs)
        if set(codes) != {"not recorded"}:
            lines += ["Code of the records (commit: records; older records did not note it): "
                      + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + ".", ""]
        if key in ("intra-domain", "paper-recipe"):
            lines += ["### Pathway attention vs its base model (mean test NDCG@10, same recipe, "
                      "budget and seeds)", "",
                      *head_to_head(groups), ""]
        if key == "ablation":  # the unablated rows beside their ablations
            intra = tables.get("intra-domain", {})
            groups = {**{label: rs for label, rs in intra.items()
                         if any(a.startswith(label + "-") for a in groups)}, **groups}
            lines += ["### Each switch against unablated RETR (mean test metric over the seeds "
                      "both have)", "", *ablation_deltas(groups), ""]
        if key == "pathway-only":
            stats = next(iter(groups.values()))[0].get("routes", {})
            lines += [f"Route statistics: `{json.dumps(stats)}`", ""]
        for protocol in ("full", "sampled"):
            name = "Full ranking" if protocol == "full" else "Sampled ranking (the paper's protocol)"
            lines += [f"### {title}: {name.lower()}", "", *table(groups, protocol), ""]
        if key == "paper-recipe" or (key == "intra-domain" and "paper-recipe" not in tables):
            lines += published_beside_ours(tables.get("paper-recipe", {}))
    if "pretrain" in tables:
        lines += ["Pre-training runs (validation on the merged sources): "
                  + "; ".join(f"{label}: {statistics.fmean(r['epochs'] for r in rs):.0f} epochs, "
                              f"{statistics.fmean(r['train_seconds'] for r in rs) / 60:.1f} min"
                              for label, rs in sorted(tables["pretrain"].items())), ""]
    lines += coverage(records, grids or [])
    if (results_dir / "params_flops.json").exists():
        lines += params_section(results_dir / "params_flops.json")
    if (results_dir / "speed.json").exists():
        lines += speed_section(results_dir / "speed.json")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--grid", type=Path, action="append",
                   help="grid files whose missing runs are listed (default: every "
                        "benchmarks/grids/*.toml)")
    args = p.parse_args()
    grid_dir = Path(__file__).resolve().parent / "grids"
    if grid_dir.is_relative_to(Path.cwd()):  # shown as typed: benchmarks/grids/cpu.toml
        grid_dir = grid_dir.relative_to(Path.cwd())
    grids = args.grid or sorted(grid_dir.glob("*.toml"))
    records = []
    for f in sorted(args.results.glob("*.json")):
        obj = json.loads(f.read_text())
        if isinstance(obj, dict) and "results" in obj and "label" in obj:
            records.append(obj)
    if not records:
        raise SystemExit(f"{args.results}: no result records")
    args.out.write_text(build(records, args.results, grids), encoding="utf-8")
    print(f"wrote {args.out} from {len(records)} runs")


if __name__ == "__main__":
    main()
