"""Load a finished (or interrupted) run directory back: config, data, split, model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retr.config import CONFIG_FORMAT_VERSION, RunConfig
from retr.data.load import load_dataset
from retr.errors import RunDirError
from retr.manifest import check_format_version, verify_manifest
from retr.models.base import SequentialRecommender
from retr.text.transfer import build_run_model
from retr.training.checkpoint import load_weights
from retr.training.trainer import RunData, load_run_data
from retr.utils import read_json


@dataclass
class LoadedRun:
    config: RunConfig
    data: RunData
    model: SequentialRecommender
    run_dir: Path


def load_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    raw = read_json(run_dir / "config.json")
    check_format_version(raw, run_dir / "config.json", (CONFIG_FORMAT_VERSION,))
    return RunConfig.from_dict(raw, str(run_dir / "config.json"))


def load_run(run_dir: str | Path, weights: str = "model.safetensors") -> LoadedRun:
    """Rebuild the run's model with its selected weights, and its data split and negatives."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        verify_manifest(run_dir)
    cfg = load_config(run_dir)
    dataset = load_dataset(cfg.data)
    data = load_run_data(cfg, dataset, run_dir)
    model = build_run_model(cfg, dataset.n_items)
    load_weights(model, run_dir / weights)
    model.eval()
    return LoadedRun(cfg, data, model, run_dir)
