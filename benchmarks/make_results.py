"""Turn the benchmark JSON records into RESULTS.md: mean ± std over seeds, both protocols.

Usage:
    python -m benchmarks.make_results benchmarks/results --out RESULTS.md

Reads the run records written by `grid`, `cross_domain` and `pathway_only` (``*.json`` with a
``results`` field), plus, when present, ``speed.json`` (`bench_speed`), ``params_flops.json``
(`params_flops --json-out`) and ``notes-<table>.md`` (observations placed under that table's
heading, such as a seed that stopped early). The prose is ``results_text.md`` beside this file
and the literature's numbers ``published.toml``: this module holds only the logic.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import tomllib
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path
from typing import Any

from .grid import load_grid

METRICS = ("HR@10", "NDCG@10", "MRR")

HERE = Path(__file__).resolve().parent
TABLES = ("intra-domain", "paper-recipe", "ablation", "pathway-only", "cross-domain")
PROTOCOLS = ("full", "sampled")
BLOCK = re.compile(r"^<!-- (.+?) -->$", re.M)


@cache
def _blocks(path: Path = HERE / "results_text.md") -> dict[str, str]:
    """The prose blocks of RESULTS.md by name: the text under each ``<!-- name -->`` line."""
    parts = BLOCK.split(path.read_text(encoding="utf-8"))
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def text(name: str, **fields: Any) -> str:
    """The prose block ``name`` with its ``{placeholders}`` filled from ``fields``."""
    blocks = _blocks()
    if name not in blocks:
        raise KeyError(f"results_text.md has no block {name!r}")
    return blocks[name].format(**fields)


def load_published(path: Path = HERE / "published.toml") -> list[dict[str, Any]]:
    """The published rows (see the file's header), checked."""
    rows = tomllib.loads(path.read_text(encoding="utf-8")).get("row", [])
    for i, row in enumerate(rows, 1):
        metrics = row.get("metrics") or {}
        if row.get("protocol") not in PROTOCOLS or not metrics or not set(metrics) <= set(METRICS):
            raise ValueError(f"{path}: row {i} needs protocol in {PROTOCOLS} and metrics among "
                             f"{METRICS}")
    return rows


def published_beside_ours(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The numbers everyone quotes beside ours (paper-recipe rows, mean over their seeds)."""
    lines = [text("published"), "",
             "| dataset | protocol | model | published | ours, same model | ours, RETR "
             "| RETR vs published |", "|---|---|---|---|---|---|---|"]

    def ours(label: str | None, protocol: str,
             names: tuple[str, ...]) -> tuple[str, float | None]:
        rs = groups.get(label or "", [])
        res = _test(rs[0], protocol) if rs else None
        if res is None:
            return "-", None
        means = [statistics.fmean(metric_values(rs, protocol, m)) for m in names]
        cand = f"1 + {res['negatives']}, " if protocol == "sampled" else ""
        return f"{' / '.join(f'{v:.4f}' for v in means)} ({cand}`{label}`)", means[-1]

    for row in load_published():
        names, published = tuple(row["metrics"]), list(row["metrics"].values())
        named = "" if names == ("HR@10", "NDCG@10") else " / ".join(names) + " "
        shown = named + " / ".join(f"{v:.4f}" for v in published)
        ours_same, _ = ours(row.get("ours_same"), row["protocol"], names)
        ours_retr, value = ours(row["ours_retr"], row["protocol"], names)
        gap = f"{100 * (value / published[-1] - 1):+.1f} %" if value is not None else "-"
        lines.append(f"| {row['dataset']} | {row['protocol_text']} | {row['model']} | {shown} "
                     f"| {ours_same} | {ours_retr} | {gap} |")
    return lines + [""]


GOAL_TABLES = ("intra-domain", "paper-recipe", "ablation", "options")  # same data and split


def _valid(record: dict[str, Any], metric: str = "NDCG@10") -> float | None:
    for res in record["results"]["results"]:
        if res["split"] == "valid" and res["protocol"] == "full":
            return float(res["metrics"][metric])
    return None


def best_on_validation(groups: dict[str, list[dict[str, Any]]], dataset: str,
                       model: str) -> tuple[str, list[dict[str, Any]]] | None:
    """The row (label) of ``model`` on ``dataset`` with the best mean validation full NDCG@10
    over its seeds (test metrics never choose), among rows with at least 3 seeds."""
    best: tuple[float, str, list[dict[str, Any]]] | None = None
    for label, rs in groups.items():
        r0 = rs[0]["results"]
        if r0.get("dataset") != dataset or r0.get("model") != model or "pathway" in label \
                or len(rs) < 3:
            continue
        valid = [v for r in rs if (v := _valid(r)) is not None]
        if len(valid) != len(rs) or not metric_values(rs, "full", "NDCG@10"):
            continue
        mean = statistics.fmean(valid)
        if best is None or mean > best[0]:
            best = (mean, label, rs)
    return None if best is None else (best[1], best[2])


def fewer_seeds(groups: dict[str, list[dict[str, Any]]], dataset: str,
                found: dict[str, tuple[str, list[dict[str, Any]]] | None],
                ) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(model, label, records) of the RETR and SASRec rows with fewer than 3 seeds whose mean
    validation NDCG@10 beats the eligible row's: runs still under way (a converged recipe's
    first seeds), shown but never chosen."""
    bars = {model: statistics.fmean(v for r in hit[1] if (v := _valid(r)) is not None)
            if hit else float("-inf") for model, hit in found.items()}
    out = []
    for label, rs in groups.items():
        r0 = rs[0]["results"]
        model = r0.get("model")
        if r0.get("dataset") != dataset or model not in bars or len(rs) >= 3 \
                or "pathway" in label or not metric_values(rs, "full", "NDCG@10"):
            continue
        valid = [v for r in rs if (v := _valid(r)) is not None]
        if len(valid) == len(rs) and statistics.fmean(valid) > bars[model]:
            out.append((model, label, rs))
    return out


def _space_text(spec: dict[str, Any]) -> str:
    if spec.get("choices"):
        return "{" + ", ".join(str(c) for c in spec["choices"]) + "}"
    return f"[{spec['low']:g}, {spec['high']:g}]" + (" log" if spec.get("log") else "")


def tuning_section(results_dir: Path) -> list[str]:
    """One row per ``retr tune`` study: the space, the trials (complete / pruned), the budget
    and the best trial, so a tuned row's search stands beside it."""
    studies = []
    for path in sorted(results_dir.glob("tune-*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rec, dict) and "trials" in rec and "space" in rec:
            studies.append((path, rec))
    if not studies:
        return []
    lines = [text("tuning"), "", "| study | base recipe | space | trials: complete / pruned / "
             "asked | budget | best trial (validation) |", "|---|---|---|---|---|---|"]
    for path, rec in studies:
        base = rec["base_config"]
        states = Counter(t["state"] for t in rec["trials"])
        minutes = sum(t["seconds"] or 0 for t in rec["trials"]) / 60
        budget = (f"{rec['timeout_minutes']:g} min per study" if rec.get("timeout_minutes")
                  else "no study limit")
        cap = base.get("train", {}).get("max_minutes")
        budget += f", {cap:g} min per trial" if cap else ""
        budget += f"; {minutes:.0f} min used; pruner: {rec['pruner']}"
        best = rec.get("best")
        best_text = "-" if best is None else (
            f"{best['number']} ({best['valid']:.4f}): " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in best["params"].items()))
        space = "; ".join(f"{k} {_space_text(v)}" for k, v in rec["space"].items())
        lines.append(f"| `{path.stem}` | {base['model']['name']} on {base['data']['source']}, "
                     f"loss {base['train'].get('loss', '-')} | {space} | "
                     f"{states.get('complete', 0)} / {states.get('pruned', 0)} / "
                     f"{rec['trials_asked']} | {budget} | {best_text} |")
    return [*lines, ""]


def goal_section(tables: dict[str, dict[str, list[dict[str, Any]]]],
                 path: Path = HERE / "published.toml",
                 plot_dir: Path | None = None) -> list[str]:
    """Best RETR and SASRec rows per dataset (chosen on validation) beside the anchors and the
    goal, met or not, with the exact command of each row; with ``plot_dir``, a picture of the
    first goal's dataset."""
    spec = tomllib.loads(path.read_text(encoding="utf-8"))
    groups = {label: rs for key in GOAL_TABLES for label, rs in tables.get(key, {}).items()}
    lines = [text("goal"), "", "| dataset | row | seeds | test HR@10 | test NDCG@10 | "
             "vs goal | command (first seed) |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for goal in spec.get("goal", []):
        ds, targets = goal["dataset"], goal["metrics"]
        found = {m: best_on_validation(groups, ds, m) for m in ("retr", "sasrec")}
        means = {}
        for model, hit in found.items():
            if hit is None:
                lines.append(f"| {ds} | best {model}: no row with 3 seeds | - | - | - | - | - |")
                continue
            label, rs = hit
            hr, ndcg = (statistics.fmean(metric_values(rs, "full", m)) for m in
                        ("HR@10", "NDCG@10"))
            means[model] = ndcg
            vs = "-"
            if model == "retr" and targets:
                vs = ", ".join(f"{m} {t:.3f}: " + ("met" if {"HR@10": hr, "NDCG@10": ndcg}[m]
                                                    >= t else "not met")
                               for m, t in targets.items())
            lines.append(f"| {ds} | best {model}: `{label}` | {len(rs)} | "
                         f"{_fmt(metric_values(rs, 'full', 'HR@10'))} | "
                         f"{_fmt(metric_values(rs, 'full', 'NDCG@10'))} | {vs} | "
                         f"`{rs[0]['command']}` |")
        for model, label, rs in fewer_seeds(groups, ds, found):
            lines.append(f"| {ds} | {model}, {len(rs)} seed{'s' * (len(rs) > 1)} (not yet "
                         f"eligible): `{label}` | {len(rs)} | "
                         f"{_fmt(metric_values(rs, 'full', 'HR@10'))} | "
                         f"{_fmt(metric_values(rs, 'full', 'NDCG@10'))} | - | "
                         f"`{rs[0]['command']}` |")
        for a in spec.get("anchor", []):
            if a["dataset"] == ds:
                m = a["metrics"]
                lines.append(f"| {ds} | {a['model']} (anchor) | - | {m['HR@10']:.4f} | "
                             f"{m['NDCG@10']:.4f} | - | {a['source']} |")
        if found["retr"] is not None:
            verdicts.append(f"{ds}: " + same_options_verdict(groups, *found["retr"]))
        if "retr" in means and "sasrec" in means:
            gap = 100 * (means["retr"] / means["sasrec"] - 1)
            verdicts[-1] += f"; best RETR {gap:+.1f} % against best SASRec"
    lines += ["", text("goal-verdicts", verdicts="; ".join(verdicts) or "none measured"), ""]
    if plot_dir is not None and spec.get("goal"):
        goal = spec["goal"][0]
        out = plot_dir / f"goal_{goal['dataset']}.png"
        if goal_plot(groups, goal, [a for a in spec.get("anchor", [])
                                    if a["dataset"] == goal["dataset"]], out):
            lines += [text("goal-plot", dataset=goal["dataset"], file=out.name), ""]
    return lines


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib (the plots
    are optional: their tables say the same)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def goal_plot(groups: dict[str, list[dict[str, Any]]], goal: dict[str, Any],
              anchors: list[dict[str, Any]], out: Path) -> bool:
    """Test full NDCG@10 of every RETR and SASRec cross-entropy row trained to early stopping
    on the goal's dataset (``-ce-`` with ``-converged`` or ``-paper`` labels; mean and the
    seeds' spread), beside the anchors and the goal."""
    rows = []
    for label, rs in groups.items():
        r0 = rs[0]["results"]
        if r0.get("dataset") != goal["dataset"] or r0.get("model") not in ("retr", "sasrec") \
                or "-ce-" not in label or not ("-converged" in label or "-paper" in label):
            continue
        values = metric_values(rs, "full", "NDCG@10")
        if values:
            rows.append((statistics.fmean(values), min(values), max(values), len(values),
                         label, r0["model"]))
    plt = _pyplot()
    if not rows or plt is None:
        return False
    rows.sort()
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    for y, (mean, lo, hi, n, _label, model) in enumerate(rows):
        color = "tab:red" if model == "retr" else "tab:blue"
        ax.plot([lo, hi], [y, y], color=color, alpha=0.5, linewidth=3)
        ax.plot([mean], [y], "o", color=color)
        ax.text(hi + 0.0005, y, f" {n} seed{'s' * (n > 1)}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[4] for r in rows], fontsize=7)
    top = len(rows) + 5.8  # anchor names run down from the top, above the rows
    for a in anchors:
        x = a["metrics"]["NDCG@10"]
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, top, f"{a['model']} {x:.4f}", rotation=90, fontsize=7, ha="right",
                va="top", color="dimgrey")
    target = goal["metrics"].get("NDCG@10")
    if target is not None:
        ax.axvline(target, color="black", linestyle="--", linewidth=1)
        ax.text(target, top, f"goal {target:.3f}", rotation=90, fontsize=7, ha="right",
                va="top")
    ax.set_ylim(-0.7, len(rows) + 6)
    ax.set_xlabel("test NDCG@10, full ranking (dot: mean over seeds; bar: lowest to highest "
                  "seed); red RETR, blue SASRec")
    ax.set_title(f"{goal['dataset']}: rows trained to early stopping, the anchors (dotted) "
                 f"and the goal (dashed)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def same_options_verdict(groups: dict[str, list[dict[str, Any]]], label: str,
                         rs: list[dict[str, Any]]) -> str:
    """The best RETR row against SASRec with the same options and budget (the row whose label
    differs only in the model's name), mean test full NDCG@10 over the seeds both have: the
    comparison the goal asks for, met or not."""
    twin = "sasrec" + label.removeprefix("retr")
    common = sorted({r["seed"] for r in rs} & {r["seed"] for r in groups.get(twin, [])})
    if not common:
        return f"SASRec with the options of `{label}` not measured (`{twin}`)"
    ours, theirs = ([r for r in g if r["seed"] in common] for g in (rs, groups[twin]))
    gap = 100 * (statistics.fmean(metric_values(ours, "full", "NDCG@10"))
                 / statistics.fmean(metric_values(theirs, "full", "NDCG@10")) - 1)
    seeds = ",".join(str(x) for x in common)
    return (f"`{label}` {gap:+.1f} % against `{twin}` (same options and budget, "
            f"seed{'s' * (len(common) > 1)} {seeds}: {'met' if gap >= 0 else 'not met'})")


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


def route_keep(rs: list[dict[str, Any]]) -> str:
    """Keep rate per layer of a router model's test route, mean over the seeds that recorded
    it: "inference (training draw)" per layer; "-" for a model without a router."""
    stats = [r["results"]["routes"] for r in rs if (r["results"].get("routes") or {}).get("layers")]
    if not stats:
        routed = rs[0]["results"].get("model") == "retr" or "pathway" in rs[0]["label"]
        return "not recorded" if routed else "-"
    layers = len(stats[0]["layers"])
    cells = []
    for i in range(layers):
        inf = statistics.fmean(s["layers"][i]["keep_rate"] for s in stats)
        drawn = statistics.fmean(s["layers"][i]["keep_rate_sampled"] for s in stats)
        cells.append(f"{inf:.2f} ({drawn:.2f})")
    return " / ".join(cells) + ("" if len(stats) == len(rs) else f" ({len(stats)} seeds)")


def table(groups: dict[str, list[dict[str, Any]]], protocol: str) -> list[str]:
    lines = ["| run | dataset | seeds | candidates | " + " | ".join(METRICS)
             + " | route keep per layer: inference (training draw) | epochs run / cap; how it "
             "stopped | train s/epoch (median) | command (first seed) |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|---|---|"]
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
                     + f" | {route_keep(rs)} | {budget} | {per_epoch} | "
                     f"`{rs[0]['command']}` |")
    return lines


def _floor_free(baseline: str, groups: dict[str, list[dict[str, Any]]]) -> str:
    """``baseline``, or, when it is missing and ends in ``-min<N>`` (a rerun with no early stop
    before epoch N), the row without that suffix if every one of its runs went past epoch N
    anyway: the floor could not have changed them."""
    match = re.search(r"-min(\d+)$", baseline)
    if baseline in groups or match is None:
        return baseline
    plain = baseline[:match.start()]
    runs = groups.get(plain, [])
    return plain if runs and all(r.get("epochs", 0) >= int(match.group(1)) for r in runs) \
        else baseline


def head_to_head(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """RETR vs SASRec (and pathway variants vs their base) at the same loss and dataset,
    over the seeds both have."""
    pairs = []
    for label in sorted(groups):
        if label.startswith("retr-"):
            pairs.append((label, _floor_free("sasrec-" + label[len("retr-"):], groups)))
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
    lines = [text("speed-goals", max_len=max_len), "",
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


def module_form(command: str) -> str:
    """A recorded ``python benchmarks/<script>.py ...`` command as it runs today,
    ``python -m benchmarks.<script> ...`` (the records keep the command that made them)."""
    return re.sub(r"^python benchmarks/(\w+)\.py\b", r"python -m benchmarks.\1", command)


def speed_section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = [text("speed"), "", data.get("note", ""), "",
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
            commands.append(r["command"])  # as recorded; shown in today's form below
        lines.append("| " + " | ".join(str(r.get(k, "-")) for k in (
            "implementation", "loss", "max_len", "budget_minutes", "seconds_per_epoch",
            "sequences_per_second", "tokens_per_second", "epochs_in_budget", "time_to_target",
            "full_ranking_users_per_second", "latency_ms", "peak_rss_mb"))
            + f" | {util} | {commands.index(r['command']) + 1} |")
    lines += ["", *speed_goals(data["rows"]), text("speed-commands"), ""]
    for i, c in enumerate(commands, 1):
        codes = sorted({r["code"] for r in data["rows"] if r["command"] == c and "code" in r})
        lines.append(f"{i}. `{module_form(c)}`" + (f" (code {', '.join(codes)})" if codes else ""))
    machines = sorted({r["machine"] for r in data["rows"] if "machine" in r})
    if machines:
        lines += ["", text("speed-machine", machines="; ".join(machines))]
    if speed_curves(data, path.parent / "speed_curves.png"):
        lines += ["", text("speed-curves")]
    lines += ["", text("speed-notes")]
    return lines + [""]


def long_history_section(results_dir: Path) -> list[str]:
    """Windows of 200 to 2,048 (``benchmarks.long_history``), the goals at N = 1,024, and the
    memory and sparse-path measurements behind them when present."""
    data = json.loads((results_dir / "long_history.json").read_text())
    rows = sorted(data["rows"], key=lambda r: (r["max_len"], r["label"].startswith("RecTools"),
                                               r["label"]))
    loss = {"bce": "binary cross-entropy with one uniform negative per position (SASRec's loss)",
            "ce": "full-softmax cross-entropy"}[data.get("loss", "ce")]
    lines = [text("long", minutes=data["minutes"], hidden=data["hidden"], batch=data["batch"],
                  loss=loss),
             "", "| N | implementation | s/epoch | tokens/s | vs retr SASRec | epochs in budget | "
             "valid NDCG@10 (all items) at the budget | full-ranking users/s | single-history "
             "p50 / p99 ms | peak RSS MB | inference keep per layer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["max_len"]: r for r in rows if r["label"] == "retr SASRec" and "failed" not in r}
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['max_len']} | {r['label']} | failed: {r['failed']} |"
                         + " - |" * 8)
            continue
        ref = base.get(r["max_len"])
        ratio = f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x" if ref else "-"
        keep = " / ".join(f"{k:.2f}" for k in r["route_keep"]) or "-"
        lines.append(f"| {r['max_len']} | {r['label']} | {r['seconds_per_epoch']} | "
                     f"{r['tokens_per_second']} | {ratio} | {r['epochs_in_budget']} | "
                     f"{r['valid_full_ndcg10']:.4f} | {r['full_ranking_users_per_second']} | "
                     f"{r['latency_p50_ms']} / {r['latency_p99_ms']} | {r['peak_rss_mb']} | "
                     f"{keep} |")
    codes: dict[str, set[str]] = defaultdict(set)  # command -> the code its rows ran
    for r in rows:
        if "failed" not in r:
            codes[r.get("command", data["command"])].add(r.get("code", data["code"]))
    commands = "; ".join(f"`{c}` (code {', '.join(sorted(k))})" for c, k in sorted(codes.items()))
    lines += ["", *long_history_goals(rows),
              text("long-commands", commands=commands, machine=data["machine"]), "",
              text("long-notes"), ""]
    memory = results_dir / "attention_memory.json"
    if memory.exists():
        mem = json.loads(memory.read_text())
        lines += [text("long-memory", command=mem["command"]), "",
                  "| N | path | step s | peak RSS growth MB |", "|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['path']} | {r['seconds']} | {r['peak_rss_growth_mb']} |"
                  for r in mem["rows"]]
        lines.append("")
    lines += step_memory_lines(results_dir)
    sparse = results_dir / "pathway_speed.json"
    if sparse.exists():
        sp = json.loads(sparse.read_text())
        by = {(r["N"], r["keep"], r["path"]): r for r in sp["rows"]}
        lines += [text("long-sparse", command=sp["command"], batch=sp["batch"]), "",
                  "| N | keep | training step dense / sparse s | speed-up | evaluation forward "
                  "dense / sparse s | speed-up |", "|---|---|---|---|---|---|"]
        for (n, keep, path), r in sorted(by.items()):
            if path != "sparse" or (n, keep, "dense") not in by:
                continue
            d = by[(n, keep, "dense")]
            lines.append(f"| {n} | {keep} | {d['train_step_seconds']} / "
                         f"{r['train_step_seconds']} | "
                         f"{d['train_step_seconds'] / r['train_step_seconds']:.2f}x | "
                         f"{d['eval_forward_seconds']} / {r['eval_forward_seconds']} | "
                         f"{d['eval_forward_seconds'] / r['eval_forward_seconds']:.2f}x |")
        lines.append("")
    return lines


def long_history_goals(rows: list[dict[str, Any]], n: int = 1024) -> list[str]:
    """The long-history goals at N = ``n``: each RETR row at ρ = 0.25 (with and without the
    router recomputed) against SASRec and RecTools."""
    at = {r["label"]: r for r in rows if r["max_len"] == n and "failed" not in r}
    ours = [r for label, r in at.items() if label.startswith("retr RETR") and "0.25" in label]
    sasrec, peer = at.get("retr SASRec"), at.get("RecTools 0.19 SASRec")
    if not ours or sasrec is None:
        return []
    ours.sort(key=lambda r: len(r["label"]))  # the plain budget first
    names = [r["label"].removeprefix("retr RETR, ").removesuffix(" (ours)") for r in ours]
    lines = [text("long-goals", n=n), "",
             "| goal | " + " | ".join(f"{name} | met" for name in names) + " |",
             "|---|" + "---|---|" * len(ours)]
    others = [r for r in (sasrec, peer) if r is not None]

    def add(goal: str, cells: list[tuple[str, bool]]) -> None:
        lines.append(f"| {goal} | " + " | ".join(f"{m} | {'yes' if ok else 'no'}"
                                                 for m, ok in cells) + " |")

    def speed(ref: dict[str, Any], times: float) -> list[tuple[str, bool]]:
        return [(f"{r['tokens_per_second']} vs {ref['tokens_per_second']}: "
                 f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x",
                 r["tokens_per_second"] / ref["tokens_per_second"] >= times) for r in ours]

    add("training tokens/s ≥ 1.5x SASRec's", speed(sasrec, 1.5))
    if peer is not None:
        add("training tokens/s ≥ 5x RecTools'", speed(peer, 5))
    add("peak RSS below " + " and ".join(r["label"] for r in others),
        [(" vs ".join(f"{x['peak_rss_mb']} MB" for x in (r, *others)),
          all(r["peak_rss_mb"] < x["peak_rss_mb"] for x in others)) for r in ours])
    add("validation NDCG@10 (all items) at the budget no worse than SASRec's",
        [(f"{r['valid_full_ndcg10']:.4f} vs {sasrec['valid_full_ndcg10']:.4f}",
          r["valid_full_ndcg10"] >= sasrec["valid_full_ndcg10"]) for r in ours])
    return lines + [""]


def step_memory_lines(results_dir: Path) -> list[str]:
    """One training step's peak live bytes and saved activations (``benchmarks.step_memory``)."""
    path = results_dir / "step_memory.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    base = {r["max_len"]: r for r in data["rows"] if r["label"] == "retr SASRec"}
    lines = [text("long-step", command=data["command"], code=data["code"]), "",
             "| N | row | peak live MB | vs retr SASRec | saved activations MB | training-route "
             "keep per layer |", "|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (r["max_len"], r["label"])):
        ref = base.get(r["max_len"])
        ratio = f"{r['peak_live_mb'] / ref['peak_live_mb']:.2f}x" if ref else "-"
        keep = " / ".join(f"{k:.2f}" for k in r["route_keep"]) or "-"
        lines.append(f"| {r['max_len']} | {r['label']} | {r['peak_live_mb']:.0f} | {ratio} | "
                     f"{r['saved_mb']:.0f} | {keep} |")
    return lines + [""]


def speed_curves(data: dict[str, Any], out: Path) -> bool:
    """Validation sampled NDCG@10 against cumulative training seconds, one line per run."""
    plt = _pyplot()
    if plt is None:
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
    lines = [text("params", hidden=c["hidden"], heads=c["heads"], layers=c["layers"],
                  max_len=c["max_len"], items=c["items"]), "",
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
            lines.append(text("not-measured-grid", grid=path.as_posix(), missing=len(missing),
                              rows=len(runs), labels=", ".join(missing)))
    if not lines:
        return []
    return [text("not-measured"), "", *lines, ""]


def pathways_section(path: Path) -> list[str]:
    """The route measurements table (``python -m benchmarks.pathway_routes`` writes it), one
    heading level down, under the section's introduction."""
    body = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            continue  # its title: the section heading replaces it
        body.append("#" + line if line.startswith("##") else line)
    return [text("pathways"), "", "\n".join(body).strip(), ""]


BUDGET_BASELINES = {  # RETR with a route budget -> the unbudgeted rows of the same recipe, the
    # first one present (today's defaults) decides the target
    "retr-ce-ml-1m-distilled25": ("retr-ce-ml-1m-faithful",),
    "retr-ce-beauty-distilled25": ("retr-ce-beauty-faithful", "retr-ce-beauty"),
    "retr-ce-ml-1m-keys-distilled25": ("retr-ce-ml-1m-faithful",),
    "retr-ce-beauty-keys-distilled25": ("retr-ce-beauty-faithful", "retr-ce-beauty")}
VARIANT_ORDER = ("all", "pathway", "random", "off-pathway")
KEEP_SHARE = 0.95  # pathway-only retraining must keep this share of the all-token NDCG@10


def _ndcg(rs: list[dict[str, Any]], protocol: str = "full") -> list[float]:
    return [t["metrics"]["NDCG@10"] for r in sorted(rs, key=lambda r: r["seed"])
            if (t := _test(r, protocol)) is not None]


def _newest(rs: list[dict[str, Any]]) -> str:
    """How often the route kept the window's newest behaviour, where the record says."""
    shares = [r["routes"]["last_token_kept"] for r in rs if "last_token_kept" in r["routes"]]
    return f"{statistics.fmean(shares):.3f} ({len(shares)})" if shares else "-"


def _keep(rs: list[dict[str, Any]]) -> str:
    """Mean inference keep rate per layer over the runs (their results.json route stats)."""
    layers = [r["results"].get("routes", {}).get("layers", []) for r in rs]
    if not all(layers):
        return "-"
    return " / ".join(f"{statistics.fmean(ls[i]['keep_rate'] for ls in layers):.3f}"
                      for i in range(len(layers[0])))


def pathway_budget_section(tables: dict[str, dict[str, list[dict[str, Any]]]],
                           results_dir: Path) -> list[str]:
    """Ours, on real data: pathway-only retraining at the route budget (all / pathway /
    random, per dataset and router tag), RETR with the budget against unbudgeted RETR, the
    deletion test (``routes-real/deletion.md``) and whether each target is met."""
    po = [rs for rs in tables.get("pathway-only", {}).values() if "tag" in rs[0]]
    budget = tables.get("pathway-budget", {})
    deletion = results_dir / "routes-real" / "deletion.md"
    if not po and not budget and not deletion.exists():
        return []
    lines = [text("pathway-budget"), ""]
    verdicts: list[str] = []
    if po:
        lines += [text("pathway-budget-po"), "",
                  "| dataset | router | retrained on | seeds | test NDCG@10 (full) | ÷ all "
                  "(ratio of means) | ÷ all per seed | tokens kept (share of window) "
                  "| users | sampled NDCG@10 | newest behaviour on the route (seeds recorded) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(dict)
        for rs in po:
            r0 = rs[0]
            groups[(r0["source"], r0["tag"])][f"{r0['model']}:{r0['variant']}"] = rs
        for (source, tag), by_variant in sorted(groups.items()):
            found = {v: sorted(by_variant[f"sasrec:{v}"], key=lambda r: r["seed"])
                     for v in VARIANT_ORDER if by_variant.get(f"sasrec:{v}")}
            values = {v: _ndcg(rs) for v, rs in found.items()}
            means = {v: statistics.fmean(x) for v, x in values.items()}
            sds = {v: statistics.stdev(x) if len(x) > 1 else 0.0 for v, x in values.items()}
            base = {r["seed"]: x for r, x in zip(found.get("all", []), values.get("all", []),
                                                 strict=True)}
            for variant, rs in found.items():
                ratios = [x / base[r["seed"]] for r, x in zip(rs, values[variant], strict=True)
                          if r["seed"] in base]
                ratio = f"{means[variant] / means['all']:.3f}" if "all" in means else "-"
                share = [r["variant_stats"]["share_of_window"] for r in rs]
                lines.append(
                    f"| {source} | {tag} | {variant} (SASRec) "
                    f"| {','.join(str(r['seed']) for r in rs)} "
                    f"| {_fmt(values[variant])} | {ratio} | {', '.join(f'{x:.3f}' for x in ratios)} "
                    f"| {statistics.fmean(share):.3f} | {rs[0]['routes']['users_evaluated']} "
                    f"| {_fmt(_ndcg(rs, 'sampled'))} | {_newest(rs) if variant == 'pathway' else '-'} |")
            if "all" in means and "pathway" in means:
                kept = means["pathway"] / means["all"]
                seeds = len(values["pathway"])
                verdicts.append(
                    f"- {source}, {tag}: pathway-only keeps {kept:.1%} of the all-token test "
                    f"NDCG@10 ({seeds} seed{'s' * (seeds > 1)}): target ≥ {KEEP_SHARE:.0%} "
                    f"**{'met' if kept >= KEEP_SHARE else 'not met'}**.")
            if "all" in means and "pathway" in means and "random" in means:
                pm, rm = means["pathway"], means["random"]
                clear = rm + sds["random"] < pm - sds["pathway"] and rm / means["all"] < KEEP_SHARE
                seeds = len(values["random"])
                verdict = ("met" if clear else "not met") if min(
                    len(values["random"]), len(values["pathway"])) > 1 else "undecided (one seed)"
                verdicts.append(
                    f"- {source}, {tag}: random tokens at the same per-user count keep "
                    f"{rm / means['all']:.1%} ({seeds} seed{'s' * (seeds > 1)}); \"clearly "
                    f"less\" than the pathway (mean + sd below the pathway's mean − sd, and "
                    f"under {KEEP_SHARE:.0%}) **{verdict}**.")
        lines.append("")
    if budget:
        lines += [text("pathway-budget-retr"), "",
                  "| run (ours) | seeds | test NDCG@10 (full) | unbudgeted run | seeds "
                  "| test NDCG@10 (full) | difference | lowest unbudgeted seed | sampled "
                  "NDCG@10, budget / unbudgeted | keep rate L1 / L2 (test, inference) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, rs in sorted(budget.items()):
            ours = _ndcg(rs)
            intra = tables.get("intra-domain", {})
            refs = [(ref_label, intra[ref_label]) for ref_label in BUDGET_BASELINES.get(label, ())
                    if intra.get(ref_label)]
            if not refs:
                lines.append(f"| {label} | {len(ours)} | {_fmt(ours)} | - | - | - | - | - | - "
                             "| - |")
            for ref_label, ref in refs:
                theirs = _ndcg(ref)
                diff = statistics.fmean(ours) - statistics.fmean(theirs)
                lines.append(
                    f"| {label} | {','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} "
                    f"| {_fmt(ours)} | {ref_label} "
                    f"| {','.join(str(r['seed']) for r in sorted(ref, key=lambda r: r['seed']))} "
                    f"| {_fmt(theirs)} | {diff:+.4f} ({diff / statistics.fmean(theirs):+.1%}) "
                    f"| {min(theirs):.4f} | {_fmt(_ndcg(rs, 'sampled'))} / {_fmt(_ndcg(ref, 'sampled'))} "
                    f"| {_keep(rs)} |")
            if refs:
                ref_label, ref = refs[0]
                theirs = _ndcg(ref)
                ok = statistics.fmean(ours) >= min(theirs)
                verdicts.append(
                    f"- {label} ({len(ours)} seed{'s' * (len(ours) > 1)}) against {ref_label}: "
                    f"mean test NDCG@10 {statistics.fmean(ours):.4f} vs "
                    f"{statistics.fmean(theirs):.4f}; within the unbudgeted seed spread or above "
                    f"(mean ≥ its lowest seed, {min(theirs):.4f}) **{'met' if ok else 'not met'}**.")
    if budget:
        lines.append("")
    if deletion.exists():
        body = [text("pathway-budget-deletion"), ""]
        for line in deletion.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                continue
            body.append("##" + line if line.startswith("## ") else line)
        lines += ["\n".join(body).strip(), ""]
    if verdicts:
        lines += [text("pathway-budget-targets"), "", *verdicts, "",
                  text("pathway-budget-notes"), ""]
    return lines


def build(records: list[dict[str, Any]], results_dir: Path,
          grids: list[Path] | None = None) -> str:
    tables: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        tables[r.get("table", "intra-domain")][r["label"]].append(r)
    lines = [text("header"), ""]
    for key in TABLES:
        groups = tables.get(key)
        if not groups:
            continue
        section = text(f"table {key}")  # "## <title>", then the table's introduction
        title = section.splitlines()[0].removeprefix("## ")
        lines += [section, ""]
        notes = results_dir / f"notes-{key}.md"  # what the numbers alone do not say
        if notes.exists():
            lines += [notes.read_text(encoding="utf-8").strip(), ""]
        machines = sorted({r["hardware"] for rs in groups.values() for r in rs if "hardware" in r})
        if key == "paper-recipe" and machines:
            lines += [text("hardware", machines="; ".join(machines)), ""]
        codes = Counter(r.get("code", "not recorded") for rs in groups.values() for r in rs)
        if set(codes) != {"not recorded"}:
            lines += [text("codes", codes=", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))),
                      ""]
        if key in ("intra-domain", "paper-recipe"):
            lines += [text("head-to-head"), "", *head_to_head(groups), ""]
        converged = {label: rs for label, rs in groups.items() if "-converged" in label}
        if key == "intra-domain" and converged:
            lines += [text("option-deltas"), "", *ablation_deltas(converged), ""]
        deltas = ablation_deltas(groups) if key == "paper-recipe" else []
        if len(deltas) > 2:  # rows beyond the header: some label extends another
            lines += [text("option-deltas paper-recipe"), "", *deltas, ""]
        if key == "ablation":  # the unablated rows beside their ablations
            intra = tables.get("intra-domain", {})
            groups = {**{label: rs for label, rs in intra.items()
                         if any(a.startswith(label + "-") for a in groups)}, **groups}
            lines += [text("ablation-deltas"), "", *ablation_deltas(groups), ""]
        if key == "pathway-only":  # the untagged (paper-default router) rows' routes
            untagged = [rs for rs in groups.values() if "tag" not in rs[0]] or list(groups.values())
            stats = untagged[0][0].get("routes", {})
            lines += [text("route-statistics", stats=json.dumps(stats)), ""]
        for protocol in PROTOCOLS:
            lines += [text(f"ranking {protocol}", title=title), "", *table(groups, protocol), ""]
        if key == "paper-recipe" or (key == "intra-domain" and "paper-recipe" not in tables):
            lines += published_beside_ours(tables.get("paper-recipe", {}))
    if "pretrain" in tables:
        lines += [text("pretrain", runs="; ".join(
            f"{label}: {statistics.fmean(r['epochs'] for r in rs):.0f} epochs, "
            f"{statistics.fmean(r['train_seconds'] for r in rs) / 60:.1f} min"
            for label, rs in sorted(tables["pretrain"].items()))), ""]
    lines += goal_section(tables, plot_dir=results_dir)
    lines += tuning_section(results_dir)
    if (results_dir / "routes" / "pathways.md").exists():
        lines += pathways_section(results_dir / "routes" / "pathways.md")
    lines += pathway_budget_section(tables, results_dir)
    lines += coverage(records, grids or [])
    if (results_dir / "params_flops.json").exists():
        lines += params_section(results_dir / "params_flops.json")
    if (results_dir / "speed.json").exists():
        lines += speed_section(results_dir / "speed.json")
    if (results_dir / "long_history.json").exists():
        lines += long_history_section(results_dir)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--grid", type=Path, action="append",
                   help="grid files whose missing runs are listed (default: every "
                        "benchmarks/grids/*.toml)")
    args = p.parse_args()
    grid_dir = HERE / "grids"
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
