"""Shared tiny fixtures. Real datasets come only from RETR_DATA_DIR (slow tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings

from retr.data.dataset import SequenceDataset
from retr.data.preprocess import NO_PREPROCESSING, build_dataset

# CI runs a fixed set of generated examples (reproducible, never flaky); local runs explore.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def make_log(seqs: dict[str, list[str]], with_time: bool = True) -> pd.DataFrame:
    rows = []
    for u, items in seqs.items():
        for t, i in enumerate(items):
            rows.append({"user": u, "item": i, "timestamp": float(t)})
    df = pd.DataFrame(rows)
    return df if with_time else df.drop(columns="timestamp")


@pytest.fixture
def tiny_dataset() -> SequenceDataset:
    """Six users over ten items, every user with >= 4 interactions."""
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": [f"i{x}" for x in rng.integers(0, 10, size=4 + u)] for u in range(6)}
    return build_dataset(make_log(seqs), NO_PREPROCESSING, name="tiny")


@pytest.fixture
def data_dir() -> Path:
    """The real benchmark data directory, or skip."""
    value = os.environ.get("RETR_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("RETR_DATA_DIR is not set to a directory with the benchmark data")
    return Path(value)
