"""The ``retr`` command line: thin commands over the library API.

Every user mistake surfaces as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from retr import __version__
from retr.cli_args import add_config_args, add_data_args, data_overrides, resolve_args
from retr.config import resolve_config
from retr.data import registry, synthetic
from retr.data.load import load_dataset
from retr.errors import ConfigError, RetrError
from retr.evaluation.protocol import evaluate
from retr.evaluation.report import results_table, run_results_rows
from retr.evaluation.routes import route_statistics, routes_table
from retr.runs import load_config, load_run, train
from retr.serving.commands import COMMANDS as SERVING_COMMANDS
from retr.serving.commands import register as register_serving
from retr.text.commands import COMMANDS as TEXT_COMMANDS
from retr.text.commands import register as register_text
from retr.training.distributed import is_main_process
from retr.tune import read_space, tune
from retr.utils import log, progress_bars


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too, like every other retr error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="retr",
        description="Sequential recommendation with RETR and pathway attention: data, training, "
                    "honest evaluation, baselines, recommendations, explanations, serving.",
        epilog="Run 'retr COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    data = sub.add_parser("data", help="inspect, list, download and generate datasets")
    dsub = data.add_subparsers(dest="data_command")
    d = dsub.add_parser("describe", help="statistics of a dataset after preprocessing")
    d.add_argument("source", help="registry name, synthetic[:k=v,...] or a file path")
    add_data_args(d)
    d.add_argument("--min-user", type=int, help="k-core threshold for users (default 5; 0 = off)")
    d.add_argument("--min-item", type=int, help="k-core threshold for items (default 5; 0 = off)")
    d.add_argument("--no-filter", action="store_true", help="no k-core filtering at all")
    d.add_argument("--rating-threshold", type=float, help="keep interactions with rating >= this")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dsub.add_parser("list", help="datasets known to the registry")
    dl = dsub.add_parser("download", help="download a registry dataset into the data directory")
    dl.add_argument("name")
    dl.add_argument("--allow-unverified", action="store_true",
                    help="accept a download with no recorded checksum")
    sy = dsub.add_parser("synthetic", help="write a synthetic log with planted pathways")
    sy.add_argument("out", help="output directory")
    sy.add_argument("--spec", default="synthetic",
                    help="generator settings, e.g. synthetic:n_users=5000,seed=1")

    t = sub.add_parser("train", help="train a model and evaluate it")
    t.add_argument("--data", help="registry name, synthetic[:k=v,...] or a file path")
    t.add_argument("--model", help="model name (retr, sasrec, bert4rec, gru4rec, pop)")
    t.add_argument("--out", help="run directory to create")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    add_config_args(t)
    add_data_args(t)

    e = sub.add_parser("evaluate", help="evaluate a run's selected weights")
    e.add_argument("run_dir")
    e.add_argument("--protocol", choices=["full", "sampled"], action="append",
                   help="protocol(s) to run (default: the run's eval.protocols)")
    e.add_argument("--split", choices=["valid", "test"], default="test")
    e.add_argument("--json", action="store_true")
    e.add_argument("--keep-history", action="store_true",
                   help="full ranking keeps the user's past items as candidates")

    c = sub.add_parser("compare", help="train several models on one split and print one table")
    c.add_argument("--data", default="synthetic")
    c.add_argument("--models", default="pop,sasrec,retr", help="comma-separated model names")
    c.add_argument("--out", default="runs/compare")
    add_config_args(c)
    add_data_args(c)

    tu = sub.add_parser("tune", help="search hyper-parameters on validation (Optuna; resumable)")
    tu.add_argument("--space", required=True, help="TOML file with a [space] table of ranges")
    tu.add_argument("--trials", type=int, required=True,
                    help="trials in total (those of an earlier call in --out count)")
    tu.add_argument("--out", required=True, help="directory of the study and its trial runs")
    tu.add_argument("--timeout-minutes", type=float, default=0.0,
                    help="stop starting trials after this long (0 = no limit)")
    tu.add_argument("--no-prune", action="store_true",
                    help="train every trial to its end (default: prune below-median trials)")
    tu.add_argument("--prune-after-epochs", type=int, default=0, metavar="N",
                    help="prune no trial before epoch N (early validations are noisy; default 0)")
    tu.add_argument("--data", help="registry name, synthetic[:k=v,...] or a file path")
    tu.add_argument("--model", help="model name (retr, sasrec, bert4rec, gru4rec, pop)")
    add_config_args(tu)
    add_data_args(tu)

    cfg = sub.add_parser("config", help="show the resolved configuration")
    csub = cfg.add_subparsers(dest="config_command")
    cs = csub.add_parser("show", help="print the resolved config as TOML-like JSON")
    cs.add_argument("--config")
    cs.add_argument("--model")
    cs.add_argument("--data")
    cs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    register_serving(sub)
    register_text(sub)
    return parser


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        for e in registry.list_datasets():
            print(f"{e.name:22s} {e.description}")
        print(f"{'synthetic':22s} generated log with planted behavior pathways (embedded default)")
        print(f"\ndata directory: {registry.data_dir()} (set RETR_DATA_DIR to change)")
        return 0
    if args.data_command == "download":
        path = registry.download_dataset(args.name, allow_unverified=args.allow_unverified)
        print(f"downloaded {args.name} to {path}")
        return 0
    if args.data_command == "synthetic":
        generated = synthetic.generate(synthetic.parse_synthetic_spec(args.spec))
        generated.save(args.out)
        print(f"wrote {len(generated.log)} interactions of {generated.log['user'].nunique()} "
              f"users to {args.out}")
        return 0
    if args.data_command == "describe":
        sets = [f"data.source={json.dumps(args.source)}"] + data_overrides(args)
        if args.no_filter:
            sets += ["data.min_user_interactions=0", "data.min_item_interactions=0"]
        if args.min_user is not None:
            sets.append(f"data.min_user_interactions={args.min_user}")
        if args.min_item is not None:
            sets.append(f"data.min_item_interactions={args.min_item}")
        if args.rating_threshold is not None:
            sets.append(f"data.rating_threshold={args.rating_threshold}")
        cfg = resolve_config(None, sets, base={"model": {"name": "pop"}})
        stats = load_dataset(cfg.data).describe()
        stats["preprocessing"] = {k: getattr(cfg.data, k) for k in (
            "min_user_interactions", "min_item_interactions", "rating_threshold")}
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            print(format_describe(stats))
        return 0
    raise ConfigError("retr data: choose one of describe, list, download, synthetic")


def format_describe(s: dict[str, Any]) -> str:
    p = s["length_percentiles"]
    lines = [
        f"dataset        {s['name']}",
        f"users          {s['users']:,}",
        f"items          {s['items']:,}",
        f"interactions   {s['interactions']:,}",
        f"density        {s['density']:.6f}",
        f"length         avg {s['avg_length']:.2f}  min {s['min_length']}  max {s['max_length']}",
        "percentiles    " + "  ".join(f"{k} {v:g}" for k, v in p.items()),
        f"timestamps     {'yes' if s['has_timestamps'] else 'no (order only)'}",
        f"preprocessing  {s['preprocessing']}",
        f"fingerprint    {s['fingerprint']}",
    ]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = load_config(args.resume)
        run_dir = Path(args.resume)
        resume = True
    else:
        if not args.out:
            raise ConfigError("retr train: --out RUN_DIR is required (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        # under torchrun only rank 0 checks: the others could see the config.json it just wrote
        if is_main_process() and (run_dir / "config.json").exists():
            raise ConfigError(f"{run_dir}: already holds a run; pick a new --out, or continue it "
                              f"with --resume {run_dir}")
        cfg = resolve_args(args)
        resume = False
    if args.quiet:  # a resumed run may go quiet too
        cfg.train.progress = False
    dataset = load_dataset(cfg.data)
    results = train(cfg, dataset, run_dir, resume=resume, log=log)
    if not is_main_process():  # rank 0 prints the results of a multi-process run
        return 0
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(results_table(run_results_rows(results)))
        print(f"\nrun directory: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    cfg = run.config
    if args.keep_history:
        cfg.eval.exclude_history = False
    rows = []
    for protocol in args.protocol or cfg.eval.protocols:
        res = evaluate(run.model, run.data.dataset, run.data.split.examples(args.split), protocol,
                       cfg.eval, run.data.negatives[args.split],
                       progress=progress_bars(cfg.train.progress))
        rows.append((cfg.model_name, {"split": args.split, **res}))
    source = None if cfg.data.domains else cfg.data.source  # planted pathways: one source
    routes = route_statistics(run.model, run.data.dataset, run.data.split.examples(args.split),
                              source, seed=cfg.seed)
    if args.json:
        out = {"model": cfg.model_name, "dataset": run.data.dataset.name, "seed": cfg.seed,
               "split_kind": cfg.split.kind, "data_fingerprint": run.data.dataset.fingerprint(),
               "results": [r for _, r in rows]}
        if routes is not None:
            out["routes"] = routes
        print(json.dumps(out, indent=2))
    else:
        print(results_table(rows))
        if routes is not None:
            print()
            print(routes_table(routes))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names:
        raise ConfigError("--models needs at least one model name")
    configs = [resolve_args(args, model=name) for name in names]
    dataset = load_dataset(configs[0].data)
    out = Path(args.out)
    rows, all_results = [], []
    for name, cfg in zip(names, configs, strict=True):
        run_dir = out / name
        if (run_dir / "config.json").exists():
            raise ConfigError(f"{run_dir}: already holds a run; choose another --out")
        log(f"== {name} ==")
        res = train(cfg, dataset, run_dir, log=log)
        rows += [r for r in run_results_rows(res) if r[1]["split"] == "test"]
        all_results.append(res)
    if args.json:
        print(json.dumps(all_results, indent=2))
    else:
        print(results_table(rows))
        print(f"\nrun directories under {out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    base = resolve_args(args)
    record = tune(base.to_dict(), load_dataset(base.data), read_space(args.space), args.out,
                  args.trials, args.timeout_minutes, seed=base.seed, prune=not args.no_prune,
                  prune_after_epochs=args.prune_after_epochs)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    for row in record["trials"]:
        value = f"{row['valid']:.4f}" if row["valid"] is not None else "-"
        print(f"trial {row['number']:3d}  {row['state']:8s}  valid {value}  {row['params']}")
    best = record["best"]
    print(f"\nbest: trial {best['number']} ({record['objective']}: {best['valid']:.4f}) "
          f"{best['params']}, run {best['run_dir']}" if best else "\nno trial completed")
    print(f"study: {Path(args.out) / 'tune.json'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command != "show":
        raise ConfigError("retr config: use 'retr config show'")
    cfg = resolve_args(args)
    print(cfg.to_json(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"retr {__version__}")
        return 0
    commands = {"data": cmd_data, "train": cmd_train, "evaluate": cmd_evaluate,
                "compare": cmd_compare, "config": cmd_config, "tune": cmd_tune,
                **SERVING_COMMANDS, **TEXT_COMMANDS}
    if args.command not in commands:
        parser.print_help()
        return 2
    try:
        return commands[args.command](args)
    except RetrError as exc:
        print(f"retr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("retr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
