"""The run directory: everything a run writes and reads back, and the run-level ``train``.

A run directory holds ``config.json`` (the resolved config), ``env.json`` (versions and the
data fingerprint), the split (``split.npz``), the sampled negatives of validation and test,
``vocab.json``, ``item_counts.npy`` (training-input popularity, for serving), the checkpoints
the training loop writes (``model.safetensors``, ``last.safetensors``, ``metrics.jsonl``,
``trainer_state.pt``) and ``results.json`` (the final evaluation and how training ended). A run
trained on an in-memory DataFrame (``data.source = "dataframe"``) also keeps its dataset
(``data_items.npy``, ``data_offsets.npy``, ``data_timestamps.npy``), having no file to re-read.
:func:`train` makes one; :func:`load_run` and :func:`load_config` read one back.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from retr import __version__
from retr.config import CONFIG_FORMAT_VERSION, RunConfig
from retr.data.dataset import SequenceDataset, Vocabulary
from retr.data.load import IN_MEMORY, load_dataset
from retr.data.negatives import sample_negatives
from retr.data.splits import RunData, Split, make_split
from retr.errors import DataError, RunDirError
from retr.evaluation.protocol import evaluate
from retr.evaluation.routes import route_statistics
from retr.manifest import check_format_version, remove_manifest, verify_manifest, write_manifest
from retr.models import build_run_model
from retr.models.base import SequentialRecommender
from retr.models.pathway import LEGACY_OPTIONS
from retr.training import distributed
from retr.training.checkpoint import (
    RUN_FORMAT_VERSION,
    load_array,
    load_weights,
    save_array,
    save_weights,
)
from retr.training.trainer import FitSummary, fit, setup_torch, summary_writer_class
from retr.utils import atomic_write_json, atomic_write_text, log, progress_bars, read_json

ITEM_COUNTS_FILE = "item_counts.npy"


@dataclass
class LoadedRun:
    config: RunConfig
    data: RunData
    model: SequentialRecommender
    run_dir: Path


def load_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run was made with.

    A router model's config.json written before a router option existed is read with the
    behaviour that code had (``LEGACY_OPTIONS``: the weighted sampling, the query bias on
    every token), so an old run evaluates as it did.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    raw = read_json(run_dir / "config.json")
    check_format_version(raw, run_dir / "config.json", (CONFIG_FORMAT_VERSION,))
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and "router" in model:
        raw = {**raw, "model": {**LEGACY_OPTIONS, **model}}
    return RunConfig.from_dict(raw, str(run_dir / "config.json"))


def load_run(run_dir: str | Path, weights: str = "model.safetensors") -> LoadedRun:
    """Rebuild the run's model with its selected weights, and its data split and negatives."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        verify_manifest(run_dir)
    cfg = load_config(run_dir)
    dataset = run_dataset(cfg, run_dir)
    data = load_run_data(cfg, dataset, run_dir)
    model = build_run_model(cfg, dataset.n_items)
    load_weights(model, run_dir / weights)
    model.eval()
    return LoadedRun(cfg, data, model, run_dir)


def run_dataset(cfg: RunConfig, run_dir: str | Path) -> SequenceDataset:
    """The run's data: re-read from its source, or the copy an in-memory source left here."""
    if cfg.data.source != IN_MEMORY:
        return load_dataset(cfg.data)
    run_dir = Path(run_dir)
    vocab = Vocabulary.load(run_dir / "vocab.json")
    stamps = run_dir / "data_timestamps.npy"
    try:
        return SequenceDataset(items=load_array(run_dir / "data_items.npy"),
                               offsets=load_array(run_dir / "data_offsets.npy"), vocab=vocab,
                               timestamps=load_array(stamps) if stamps.is_file() else None,
                               name=IN_MEMORY)
    except DataError as exc:
        raise RunDirError(f"{run_dir}: corrupted stored dataset ({exc})") from None


def _store_dataset(run_dir: Path, dataset: SequenceDataset) -> None:
    save_array(run_dir / "data_items.npy", np.asarray(dataset.items, dtype=np.int64))
    save_array(run_dir / "data_offsets.npy", np.asarray(dataset.offsets, dtype=np.int64))
    if dataset.timestamps is not None:
        save_array(run_dir / "data_timestamps.npy", np.asarray(dataset.timestamps))


def save_item_counts(run_dir: str | Path, counts: np.ndarray) -> None:
    """Store training-input item counts [n_items + 1] so the popularity fallback needs no data.

    :func:`prepare_run_data` calls it with ``split.train_item_counts(dataset)``: the same
    counts that the ``pop`` baseline is fitted on, so the fallback never sees validation or
    test items.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or len(counts) < 1 or (counts < 0).any():
        raise ValueError("item counts must be a non-negative vector [n_items + 1]")
    save_array(Path(run_dir) / ITEM_COUNTS_FILE, counts.astype(np.int64))


def load_item_counts(run_dir: str | Path, n_items: int) -> np.ndarray | None:
    """The run's stored item counts, or None when the run has none."""
    path = Path(run_dir) / ITEM_COUNTS_FILE
    if not path.is_file():
        return None
    counts = load_array(path)
    if counts.shape != (n_items + 1,):
        raise RunDirError(f"{path}: holds {counts.shape} counts, the vocabulary needs "
                          f"({n_items + 1},); the file does not belong to this run")
    return counts


def make_run_split(cfg: RunConfig, dataset: SequenceDataset) -> Split:
    """The split ``cfg.split`` asks for (seeded: the same config gives the same split)."""
    return make_split(dataset, cfg.split.kind, seed=cfg.seed, valid_cutoff=cfg.split.valid_cutoff,
                      test_cutoff=cfg.split.test_cutoff, rolling_steps=cfg.split.rolling_steps)


def prepare_run_data(cfg: RunConfig, dataset: SequenceDataset, run_dir: Path) -> RunData:
    """Make the split and its sampled negatives once, and store them in the run directory."""
    split = make_run_split(cfg, dataset)
    pop = split.train_item_counts(dataset) if cfg.eval.negative_sampling == "popularity" else None
    negatives = {}
    for offset, part in enumerate(("valid", "test")):
        negatives[part] = sample_negatives(dataset, split.examples(part), cfg.eval.negatives,
                                           seed=cfg.seed * 2 + offset, popularity=pop)
        save_array(run_dir / f"negatives_{part}.npy", negatives[part])
    split.save(run_dir / "split.npz")
    save_item_counts(run_dir, split.train_item_counts(dataset))  # popularity fallback in serving
    dataset.vocab.save(run_dir / "vocab.json")
    if cfg.data.source == IN_MEMORY:
        _store_dataset(run_dir, dataset)
    return RunData(dataset, split, negatives)


def load_run_data(cfg: RunConfig, dataset: SequenceDataset, run_dir: Path) -> RunData:
    """Reload a run's stored split and negatives, checking they belong to ``dataset``."""
    env = read_json(run_dir / "env.json")
    if env.get("data_fingerprint") != dataset.fingerprint():
        raise RunDirError(f"{run_dir}: the data of {cfg.data.source!r} changed since this run was "
                          f"made (fingerprint {dataset.fingerprint()} now, {env.get('data_fingerprint')} "
                          "recorded in env.json)")
    split = Split.load(run_dir / "split.npz")
    _check_split(split, dataset, run_dir / "split.npz")
    negatives = {p: load_array(run_dir / f"negatives_{p}.npy") for p in ("valid", "test")}
    for part, neg in negatives.items():
        rows = len(split.examples(part))
        if (neg.ndim != 2 or neg.shape[0] != rows or not np.issubdtype(neg.dtype, np.integer)
                or (neg.size and (neg.min() < 1 or neg.max() > dataset.n_items))):
            raise RunDirError(f"{run_dir / f'negatives_{part}.npy'}: corrupted: expected {rows} "
                              f"rows of item ids in 1..{dataset.n_items}, found {neg.dtype} "
                              f"{neg.shape}; delete the run directory and train again")
    return RunData(dataset, split, negatives)


def _check_split(split: Split, dataset: SequenceDataset, path: Path) -> None:
    """Refuse a split whose arrays point outside the data: a damaged file, not a crash later."""
    lengths = dataset.lengths
    parts = [("train", split.train_users, split.train_lengths, None, 0),
             ("valid", split.valid.users, split.valid.lengths, split.valid.targets, 1),
             ("test", split.test.users, split.test.lengths, split.test.targets, 1)]
    for name, users, lens, targets, room in parts:
        arrays = [users, lens] + ([targets] if targets is not None else [])
        ok = all(a.ndim == 1 and len(a) == len(users) and np.issubdtype(a.dtype, np.integer)
                 for a in arrays)
        if ok and len(users):
            ok = bool(users.min() >= 0 and users.max() < dataset.n_users)
            ok = ok and bool((lens >= 1).all() and (lens + room <= lengths[users]).all())
            if targets is not None:
                ok = ok and bool((targets == dataset.items[dataset.offsets[users] + lens]).all())
        if not ok:
            raise RunDirError(f"{path}: corrupted: the {name} part does not fit the data "
                              "(ids or lengths out of range); delete the run directory and "
                              "train again")


def _env(dataset: SequenceDataset) -> dict[str, Any]:
    return {"retr": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "run_format_version": RUN_FORMAT_VERSION, "data_fingerprint": dataset.fingerprint(),
            "data": dataset.describe()}


def train(cfg: RunConfig, dataset: SequenceDataset, run_dir: str | Path, resume: bool = False,
          log: Any = log, model: SequentialRecommender | None = None,
          fit_model: bool = True,
          on_validation: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.model_name`` on ``dataset`` into ``run_dir``; return the final results.

    ``model`` replaces the freshly built one (fine-tuning starts from transferred weights);
    ``fit_model=False`` evaluates it as it is, with no training (zero-shot transfer).

    With ``resume`` the run continues from ``run_dir/trainer_state.pt`` and ends with the same
    weights an uninterrupted run would have (CPU, deterministic mode). ``on_validation(epoch,
    value)`` is called after each validation (see :func:`retr.training.trainer.fit`).
    """
    run_dir = Path(run_dir)
    setup_torch(cfg)
    if model is None:  # before the run directory is touched: item text errors come first
        model = build_run_model(cfg, dataset.n_items, dataset)
    ctx, device = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, dataset, run_dir, resume, log if ctx.is_main else _quiet, model,
                      fit_model, ctx, device, on_validation)
    finally:
        distributed.cleanup(ctx)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0: one voice is enough."""


def _train(cfg: RunConfig, dataset: SequenceDataset, run_dir: Path, resume: bool, log: Any,
           model: SequentialRecommender, fit_model: bool, ctx: distributed.Context,
           device: torch.device,
           on_validation: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    if cfg.train.tensorboard and ctx.is_main:
        summary_writer_class()  # fail before anything is written, not after the first epoch
    if ctx.is_main:
        _remove_stale_temporaries(run_dir)
        remove_manifest(run_dir)  # files change from here on; write_manifest ends the run
    trainable = getattr(model, "trainable", True)
    if resume and trainable and fit_model and not (run_dir / "trainer_state.pt").is_file():
        log(f"{run_dir}: no epoch had finished; starting the run over from its config.json")
        resume = False
    if resume:
        data = load_run_data(cfg, dataset, run_dir)
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", cfg.to_json())
        atomic_write_json(run_dir / "env.json", _env(dataset))
        data = prepare_run_data(cfg, dataset, run_dir)
    else:  # the split rank 0 stores, made here too (it is seeded): no shared filesystem needed
        data = RunData(dataset, make_run_split(cfg, dataset), {})
    model = model.to(device)
    distributed.seed_rank(cfg.seed, ctx)
    if not ctx.is_main and (not trainable or not fit_model):
        return {"model": cfg.model_name, "results": []}
    if not trainable or not fit_model:
        if not trainable:
            cast(Any, model).fit_counts(data.split.train_item_counts(dataset))
        meta = {"model": cfg.model_name, "dataset": dataset.name}
        save_weights(model, run_dir / "model.safetensors", meta)
        save_weights(model, run_dir / "last.safetensors", meta)
        summary = FitSummary(0, 0, None, "not trained")
        return final_evaluation(cfg, model, data, run_dir, summary)
    summary = fit(cfg, model, data, run_dir, resume, device, log, ctx, on_validation)
    if not ctx.is_main:
        return {"model": cfg.model_name, "results": []}
    load_weights(model, run_dir / "model.safetensors")
    return final_evaluation(cfg, model, data, run_dir, summary)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the half-written temporaries (``.NAME.XXXX.tmp``) a killed write left behind."""
    if not run_dir.is_dir():
        return
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()


def final_evaluation(cfg: RunConfig, model: SequentialRecommender, data: RunData, run_dir: Path,
                     summary: FitSummary | None = None) -> dict[str, Any]:
    """Evaluate the selected weights on validation and, once, on test; write results.json.

    ``summary`` (how training ended: epochs run, best epoch, what stopped it) is recorded
    under ``"training"``; a model with a pathway router also gets its route statistics on
    the test examples under ``"routes"`` (:func:`retr.evaluation.routes.route_statistics`).
    """
    results: dict[str, Any] = {
        "model": cfg.model_name, "dataset": data.dataset.name, "seed": cfg.seed,
        "split": cfg.split.kind, "data_fingerprint": data.dataset.fingerprint(),
        "n_items": data.dataset.n_items, "results": [],
    }
    if summary is not None:
        results["training"] = summary.to_dict()
    for part in ("valid", "test"):
        for protocol in cfg.eval.protocols:
            res = evaluate(model, data.dataset, data.split.examples(part), protocol, cfg.eval,
                           data.negatives[part], progress=progress_bars(cfg.train.progress))
            results["results"].append({"split": part, **res})
    source = None if cfg.data.domains else cfg.data.source  # planted pathways: one source
    routes = route_statistics(model, data.dataset, data.split.examples("test"), source,
                              seed=cfg.seed)
    if routes is not None:
        results["routes"] = routes
    atomic_write_json(run_dir / "results.json", results)
    write_manifest(run_dir)  # last: the run is complete
    return results
