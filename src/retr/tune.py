"""Hyper-parameter search on validation with Optuna: resumable studies, pruning, never the test.

A search space is a TOML table of config keys (the ``--set`` names) and their ranges::

    [space]
    "train.lr" = { low = 1e-4, high = 1e-2, log = true }
    "model.dropout" = { low = 0.0, high = 0.5 }
    "model.num_layers" = { low = 1, high = 3 }               # integers when both bounds are
    "train.loss" = { choices = ["ce", "sampled_softmax"] }

Every trial is an ordinary run (``OUT/trial-NNNN``) of the base config with the trial's values,
scored by its best ``train.valid_metric`` under ``train.valid_protocol`` (the value the early
stopping selected on); test metrics are computed by each run as always but never read here.
Trials that trail the median of earlier trials at the same epoch are pruned (Optuna's
``MedianPruner``, after three finished trials and from epoch ``prune_after_epochs`` on: the
first validations are noisy and favour configurations that start fast, such as a high
learning rate). The study lives in a journal file (``OUT/study.log``), so a killed search
resumes where it stopped, and ``OUT/tune.json`` records the space, the trial count, the budget,
every trial and the best one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retr.config import RunConfig, apply_overrides, load_toml
from retr.data.dataset import SequenceDataset
from retr.errors import ConfigError, RetrError
from retr.runs import train
from retr.utils import atomic_write_json, log

TUNE_FILE = "tune.json"
STUDY_FILE = "study.log"


@dataclass(frozen=True)
class Dimension:
    """One searched key: a float or integer range (``log`` scale optional) or a choice."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def to_dict(self) -> dict[str, Any]:
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}


def read_space(path: str | Path) -> list[Dimension]:
    """The ``[space]`` table of a TOML file, checked: every key is section.name, every range
    has low < high (and low > 0 on a log scale), every choice list is non-empty."""
    raw = load_toml(path).get("space")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: needs a non-empty [space] table, e.g. "
                          '"train.lr" = { low = 1e-4, high = 1e-2, log = true }')
    dims = []
    for key, spec in raw.items():
        where = f"{path}: space.{key}"
        if "." not in key or not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected \"section.key\" = {{ low = ..., high = ... }} "
                              "or {{ choices = [...] }}")
        unknown = sorted(set(spec) - {"low", "high", "log", "choices"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; use low, high, "
                              "log or choices")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            dims.append(Dimension(key, choices=tuple(spec["choices"])))
            continue
        low, high, is_log = spec.get("low"), spec.get("high"), spec.get("log", False)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not low < high or (is_log and low <= 0):  # type: ignore[operator]
            raise ConfigError(f"{where}: needs numbers low < high (low > 0 with log = true), "
                              f"got low={low!r}, high={high!r}")
        dims.append(Dimension(key, low, high, bool(is_log)))
    return dims


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RetrError("retr tune needs optuna: pip install 'retr[tune]' (or pip install "
                        "optuna)") from None
    return optuna


def _suggest(trial: Any, dim: Dimension) -> Any:
    if dim.choices:
        return trial.suggest_categorical(dim.key, list(dim.choices))
    if dim.integer:
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log)  # type: ignore[arg-type]
    return trial.suggest_float(dim.key, float(dim.low), float(dim.high), log=dim.log)  # type: ignore[arg-type]


def _value_text(value: Any) -> str:
    """A trial value as the TOML text of a ``--set`` override."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def tune(base: dict[str, Any], dataset: SequenceDataset, space: list[Dimension], out: str | Path,
         trials: int, timeout_minutes: float = 0.0, seed: int = 0,
         prune: bool = True, prune_after_epochs: int = 0) -> dict[str, Any]:
    """Search ``space`` around the raw config ``base`` for ``trials`` trials in total (trials a
    previous call left in ``out`` count), or until ``timeout_minutes``; returns the record
    written to ``out/tune.json``."""
    optuna = _optuna()
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if prune_after_epochs < 0:
        raise ConfigError(f"--prune-after-epochs must be >= 0, got {prune_after_epochs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    RunConfig.from_dict(base, "tune: base config")  # a bad base fails before any trial
    for dim in space:  # and so does a key the config does not have
        probe = dim.choices[0] if dim.choices else dim.low
        RunConfig.from_dict(apply_overrides(base, [f"{dim.key}={_value_text(probe)}"]),
                            f"tune: space key {dim.key}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=prune_after_epochs) \
        if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name="retr", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner,
                                load_if_exists=True)
    metric = RunConfig.from_dict(base).train.valid_metric
    done = [t for t in study.trials if t.state.is_finished()]
    started = time.perf_counter()

    def objective(trial: Any) -> float:
        values = {dim.key: _suggest(trial, dim) for dim in space}
        overrides = [f"{k}={_value_text(v)}" for k, v in values.items()]
        cfg = RunConfig.from_dict(apply_overrides(base, overrides), f"trial {trial.number}")
        run_dir = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        log(f"trial {trial.number}: {', '.join(overrides)}")

        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4f} at epoch {epoch}")

        results = train(cfg, dataset, run_dir, on_validation=report)
        best = results["training"]["best_valid"]
        return float(best) if best is not None else -math.inf

    remaining = trials - len(done)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining,
                       timeout=timeout_minutes * 60 if timeout_minutes else None,
                       catch=(RetrError,))
    pruner_text = "none" if not prune else "median (3 startup trials" + (
        f", none before epoch {prune_after_epochs})" if prune_after_epochs else ")")
    record = _record(study, space, base, trials, timeout_minutes, seed, pruner_text, metric,
                     time.perf_counter() - started)
    atomic_write_json(out / TUNE_FILE, record)
    return record


def _record(study: Any, space: list[Dimension], base: dict[str, Any], trials: int,
            timeout_minutes: float, seed: int, pruner: str, metric: str,
            seconds: float) -> dict[str, Any]:
    rows = [{"number": t.number, "state": t.state.name.lower(), "params": t.params,
             "valid": t.value, "run_dir": t.user_attrs.get("run_dir"),
             "epochs": len(t.intermediate_values),
             "seconds": round(t.duration.total_seconds(), 1) if t.duration else None}
            for t in study.trials]
    complete = [r for r in rows if r["state"] == "complete" and r["valid"] is not None]
    best = max(complete, key=lambda r: r["valid"]) if complete else None
    return {"objective": f"best validation {metric} (never test)", "space":
            {d.key: d.to_dict() for d in space}, "trials_asked": trials,
            "trials": rows, "timeout_minutes": timeout_minutes or None, "sampler": "TPE",
            "sampler_seed": seed, "pruner": pruner,
            "seconds_this_call": round(seconds, 1), "base_config": base, "best": best}
