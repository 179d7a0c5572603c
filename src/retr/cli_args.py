"""The command-line options that several command modules share, and how they become a config.

``retr.cli`` and the command modules of ``retr.serving`` and ``retr.text`` all build their
parsers from these, so a flag means the same thing in every command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from retr.config import RunConfig, load_toml, merge_dicts, resolve_config
from retr.errors import ConfigError


def add_data_args(p: argparse.ArgumentParser) -> None:
    """How a file of interactions is read: its format and which column holds what."""
    p.add_argument("--format", dest="fmt", help="reader format (auto-detected when unambiguous)")
    p.add_argument("--user-col", help="column holding user ids")
    p.add_argument("--item-col", help="column holding item ids")
    p.add_argument("--time-col", help="column holding timestamps")
    p.add_argument("--rating-col", help="column holding ratings")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The options every training command shares: config file, overrides, seed, JSON output."""
    p.add_argument("--config", help="TOML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print the final results as JSON")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, only one line per epoch (= train.progress=false)")


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The data flags given, as ``--set data.KEY=VALUE`` overrides."""
    out = []
    for flag, key in (("fmt", "format"), ("user_col", "user_col"), ("item_col", "item_col"),
                      ("time_col", "time_col"), ("rating_col", "rating_col")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"data.{key}={json.dumps(value)}")
    return out


def resolve_args(args: argparse.Namespace, model: str | None = None) -> RunConfig:
    """Config file <- command-line flags <- --set overrides.

    A config file may hold ``[models.NAME]`` tables (for ``retr compare``); the one of the
    chosen model becomes its ``[model]`` section.
    """
    config_file = getattr(args, "config", None)
    raw: dict[str, Any] = load_toml(config_file) if config_file else {}
    per_model = raw.pop("models", {})
    table = raw.get("model", {})
    name = model or getattr(args, "model", None) or (
        table.get("name") if isinstance(table, dict) else None)
    if name and isinstance(per_model, dict) and name in per_model:
        if not isinstance(per_model[name], dict):
            raise ConfigError(f"{config_file}: [models.{name}] must be a table of model "
                              f"settings, got {per_model[name]!r}")
        raw = merge_dicts(raw, {"model": dict(per_model[name])})
    flags: dict[str, Any] = {}
    if getattr(args, "data", None):
        flags["data"] = {"source": args.data}
    if name:
        flags.setdefault("model", {})["name"] = name
    if getattr(args, "seed", None) is not None:
        flags["seed"] = args.seed
    overrides = data_overrides(args) + list(getattr(args, "set", []) or [])
    if getattr(args, "quiet", False):
        overrides.append("train.progress=false")
    where = str(config_file) if config_file else "config"
    if config_file and overrides:
        where += " with command-line overrides"
    return resolve_config(None, overrides, base=merge_dicts(raw, flags), where=where)
