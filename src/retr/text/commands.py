"""``retr pretrain`` and ``retr finetune``: cross-domain transfer through item text.

pretrain: several domains side by side (``data.domains``), items seen only through their text
(``item_repr.kind = "text"``, no ID vectors), trained and evaluated like any run.
finetune: a pre-trained run's weights moved to a target dataset: its items get ID vectors
(plus the pre-trained text adaptor unless ``--no-text``), the backbone is optionally frozen,
and the normal trainer trains and evaluates it. ``--zero-shot`` evaluates the text-only
pre-trained model on the target with no training at all. Every run directory written here is
an ordinary one: ``retr evaluate``, ``retr recommend`` and ``retr train --resume`` read it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from retr.cli_args import add_config_args, resolve_args
from retr.data.load import load_dataset
from retr.errors import ConfigError
from retr.evaluation.report import results_table, run_results_rows
from retr.models import build_run_model
from retr.runs import load_config, train
from retr.text.transfer import finetune_config, load_pretrained, read_weights
from retr.utils import log


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory to create")
    add_config_args(p)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pre-train on several domains with text-only item representations")
    p.add_argument("--data", action="append", default=[], metavar="SOURCE",
                   help="a source domain (registry name, synthetic[:k=v,...] or file); repeat it")
    p.add_argument("--model", help="model name (retr, sasrec, bert4rec, gru4rec)")
    _common(p)

    f = subparsers.add_parser(
        "finetune", help="move a pre-trained run to a target dataset and train it there")
    f.add_argument("pretrained", metavar="RUN_DIR", help="the pre-training run directory")
    f.add_argument("--data", required=True, help="the target dataset")
    _common(f)
    f.add_argument("--freeze-backbone", action="store_true",
                   help="keep transformer blocks, positions and routers fixed")
    text = f.add_mutually_exclusive_group()
    text.add_argument("--keep-text", dest="keep_text", action="store_true", default=True,
                      help="items = text adaptor + ID vectors (default)")
    text.add_argument("--no-text", dest="keep_text", action="store_false",
                      help="items = ID vectors only; the pre-trained adaptor is dropped")
    f.add_argument("--no-id", action="store_true",
                   help="items = text adaptor only, no ID vectors (inductive)")
    f.add_argument("--zero-shot", action="store_true",
                   help="evaluate the text-only pre-trained model on the target, no training")


def _print_results(results: dict[str, Any], run_dir: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(results_table(run_results_rows(results)))
        print(f"\nrun directory: {run_dir}")


def _new_run_dir(out: str | None, command: str) -> Path:
    if not out:
        raise ConfigError(f"retr {command}: --out RUN_DIR is required")
    run_dir = Path(out)
    if (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir}: already holds a run; pick a new --out")
    return run_dir


def cmd_pretrain(args: argparse.Namespace) -> int:
    run_dir = _new_run_dir(args.out, "pretrain")
    sets = []
    if args.data:
        sets += [f"data.domains={json.dumps(args.data)}", f"data.source={json.dumps('+'.join(args.data))}"]
    sets += list(args.set) + ['item_repr.kind="text"', "item_repr.id_embedding=false"]
    cfg = resolve_args(argparse.Namespace(**{**vars(args), "data": None, "set": sets}))
    if not cfg.data.domains:
        raise ConfigError("retr pretrain: name the source domains with --data A --data B (or "
                          "data.domains in the config)")
    dataset = load_dataset(cfg.data)
    results = train(cfg, dataset, run_dir, log=log)
    _print_results(results, run_dir, args.json)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    pretrained = Path(args.pretrained)
    pre_cfg = load_config(pretrained)
    if args.keep_text and pre_cfg.item_repr.kind != "text":
        raise ConfigError(f"{pretrained}: was not pre-trained on text (item_repr.kind = "
                          f"{pre_cfg.item_repr.kind!r}); fine-tune it with --no-text")
    run_dir = _new_run_dir(args.out, "finetune")
    cfg = finetune_config(pretrained, args.data, keep_text=args.keep_text, use_id=not args.no_id,
                          freeze=args.freeze_backbone, zero_shot=args.zero_shot,
                          config_file=args.config, overrides=args.set, seed=args.seed)
    dataset = load_dataset(cfg.data)
    model = build_run_model(cfg, dataset.n_items, dataset)
    report = load_pretrained(model, cfg, read_weights(pretrained / "model.safetensors"),
                             str(pretrained))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"from {pretrained}: {len(report['loaded'])} tensors loaded, {len(report['fresh'])} "
         f"item-specific ones fresh, {len(report['unused'])} unused; {frozen:,} of {total:,} "
         "parameters frozen")
    if args.quiet:
        cfg.train.progress = False
    results = train(cfg, dataset, run_dir, log=log, model=model, fit_model=not args.zero_shot)
    _print_results(results, run_dir, args.json)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "finetune": cmd_finetune}
