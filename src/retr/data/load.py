"""One entry point from a ``DataConfig`` to a preprocessed :class:`SequenceDataset`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from retr.config import DataConfig
from retr.data.dataset import SequenceDataset
from retr.data.preprocess import Preprocessing, build_dataset
from retr.data.readers import ColumnMap, detect_format, read_interactions
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
    return read_interactions(path, fmt=cfg.format, columns=column_map(cfg)), path.name


def column_map(cfg: DataConfig) -> ColumnMap:
    return ColumnMap(user=cfg.user_col, item=cfg.item_col, timestamp=cfg.time_col,
                     rating=cfg.rating_col)


def parquet_file(cfg: DataConfig) -> Path | None:
    """The source as a path when it is a parquet file (given or detected), else None."""
    found = _file_format(cfg)
    return found[0] if found is not None and found[1] == "parquet" else None


def _file_format(cfg: DataConfig) -> tuple[Path, str] | None:
    """The source as a path and its format (given or detected) when it is a file, else None."""
    from retr.data import registry

    source = cfg.source
    if source == "synthetic" or source.startswith("synthetic:") or registry.is_registered(source):
        return None
    path = Path(source)
    if not path.is_file():
        return None
    try:
        return path, (cfg.format if cfg.format is not None else detect_format(path))
    except DataError:  # read_log reports it
        return None


def load_dataset(cfg: DataConfig) -> SequenceDataset:
    """Read and preprocess the configured source (or every one of ``cfg.domains``, side by side)."""
    if cfg.domains:
        from retr.data.multidomain import load_multidomain

        return load_multidomain(cfg)
    found = _file_format(cfg)
    if found is not None:  # streamed: never holds the ids as a DataFrame of strings
        from retr.data.ingest import (
            DELIMITED,
            build_dataset_from_codes,
            read_delimited_codes,
            read_parquet_codes,
        )

        path, fmt = found
        codes = read_parquet_codes(path, column_map(cfg)) if fmt == "parquet" else \
            read_delimited_codes(path, fmt, column_map(cfg)) if fmt in DELIMITED else None
        if codes is not None:  # None: a csv/tsv case (or error) left to the DataFrame reader
            return build_dataset_from_codes(codes, preprocessing_of(cfg), name=path.name,
                                            source=cfg.source)
    log, name = read_log(cfg)
    return build_dataset(log, preprocessing_of(cfg), name=name, source=cfg.source)
