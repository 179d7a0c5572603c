"""One entry point from a ``DataConfig`` to a preprocessed :class:`SequenceDataset`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from retr.config import DataConfig
from retr.data.dataset import SequenceDataset
from retr.data.preprocess import Preprocessing, build_dataset
from retr.data.readers import ColumnMap, read_interactions
from retr.errors import DataError


def preprocessing_of(cfg: DataConfig) -> Preprocessing:
    return Preprocessing(min_user_interactions=cfg.min_user_interactions,
                         min_item_interactions=cfg.min_item_interactions,
                         rating_threshold=cfg.rating_threshold,
                         dedupe_consecutive=cfg.dedupe_consecutive)


def read_log(cfg: DataConfig) -> tuple[pd.DataFrame, str]:
    """The raw log of ``cfg.source`` (synthetic spec, registry name or file) and a display name."""
    from retr.data import registry, synthetic

    source = cfg.source
    if source == "synthetic" or source.startswith("synthetic:"):
        return synthetic.generate(synthetic.parse_synthetic_spec(source)).log, source
    if registry.is_registered(source):
        return registry.load_log(source), source
    path = Path(source)
    if not path.exists():
        names = ", ".join(e.name for e in registry.list_datasets())
        raise DataError(f"{source}: neither a file nor a known dataset; known datasets: synthetic, "
                        f"{names}")
    columns = ColumnMap(user=cfg.user_col, item=cfg.item_col, timestamp=cfg.time_col,
                        rating=cfg.rating_col)
    return read_interactions(path, fmt=cfg.format, columns=columns), path.name


def load_dataset(cfg: DataConfig) -> SequenceDataset:
    """Read and preprocess the configured source (or every one of ``cfg.domains``, side by side)."""
    if cfg.domains:
        from retr.data.multidomain import load_multidomain

        return load_multidomain(cfg)
    log, name = read_log(cfg)
    return build_dataset(log, preprocessing_of(cfg), name=name, source=cfg.source)
