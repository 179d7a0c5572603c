"""Every shipped recipe and every benchmark grid row resolves to a valid config, and the
recipes that stand for measured rows are exactly those rows' settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.grid import load_grid
from retr.cli_args import resolve_args
from retr.config import load_toml, resolve_config
from retr.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.toml") if not p.name.startswith("space-"))
GRIDS = sorted((ROOT / "benchmarks" / "grids").glob("*.toml"))
# Benchmark settings of a grid that a recipe leaves to the user's machine.
MACHINE = ("threads", "max_minutes", "progress", "device", "deterministic")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_and_builds(path: Path) -> None:
    """A recipe with [models.NAME] tables (for ``retr compare``) resolves once per model."""
    names = list(load_toml(path).get("models", {})) or [None]
    for name in names:
        cfg = resolve_args(argparse.Namespace(config=str(path)), model=name)
        assert build_model(cfg.model_name, 20, cfg.model).name == (name or cfg.model_name)


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_grid_row_resolves(path: Path) -> None:
    runs, seeds, _ = load_grid(path)
    assert seeds
    for run in runs:
        resolve_config(ROOT / run["config"], run["set"], where=f"{path.name}: {run['label']}")


def _settings(path: Path, overrides: list[str]) -> dict:
    raw = resolve_config(path, overrides).to_dict()
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in MACHINE}
    return raw


@pytest.mark.parametrize(("recipe", "grid", "label"), [
    ("retr-ml-1m-modern.toml", "converged.toml", "retr-ce-ml-1m-converged-modern-wide-windows"),
    ("retr-lastfm-windows.toml", "lastfm-gap.toml", "retr-ce-lastfm-paper-windows"),
])
def test_recipe_is_the_measured_row(recipe: str, grid: str, label: str) -> None:
    runs, _, _ = load_grid(ROOT / "benchmarks" / "grids" / grid)
    row = next(r for r in runs if r["label"] == label)
    assert _settings(ROOT / "configs" / recipe, []) == _settings(ROOT / row["config"], row["set"])
