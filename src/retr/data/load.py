"""One entry point from a ``DataConfig`` to a preprocessed :class:`SequenceDataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from retr.config import DataConfig
from retr.data import registry, synthetic
from retr.data.dataset import SequenceDataset
from retr.data.ingest import (
    DELIMITED,
    build_dataset_from_codes,
    read_delimited_codes,
    read_parquet_codes,
)
from retr.data.multidomain import domain_config, domain_labels, side_by_side
from retr.data.preprocess import Preprocessing, build_dataset
from retr.data.readers import ColumnMap, detect_format, read_interactions
from retr.errors import DataError


def preprocessing_of(cfg: DataConfig) -> Preprocessing:
    return Preprocessing(min_user_interactions=cfg.min_user_interactions,
                         min_item_interactions=cfg.min_item_interactions,
                         rating_threshold=cfg.rating_threshold,
                         dedupe_consecutive=cfg.dedupe_consecutive)


IN_MEMORY = "dataframe"  # data.source of a run trained on a DataFrame: its run keeps the data


def read_log(cfg: DataConfig) -> tuple[pd.DataFrame, str]:
    """The raw log of ``cfg.source`` (synthetic spec, registry name or file) and a display name."""
    source = cfg.source
    if source == IN_MEMORY:
        raise DataError(f"data.source {IN_MEMORY!r}: the interactions were given in memory (a "
                        "DataFrame); a run trained on them keeps them in its run directory, "
                        "so load that run (retr.load(RUN_DIR), retr evaluate RUN_DIR)")
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
        labels = domain_labels(cfg)  # checked before any domain is read
        return side_by_side(labels, [load_dataset(domain_config(cfg, s)) for s in cfg.domains])
    found = _file_format(cfg)
    if found is not None:  # streamed: never holds the ids as a DataFrame of strings
        path, fmt = found
        codes = read_parquet_codes(path, column_map(cfg)) if fmt == "parquet" else \
            read_delimited_codes(path, fmt, column_map(cfg)) if fmt in DELIMITED else None
        if codes is not None:  # None: a csv/tsv case (or error) left to the DataFrame reader
            return build_dataset_from_codes(codes, preprocessing_of(cfg), name=path.name,
                                            source=cfg.source)
    log, name = read_log(cfg)
    return build_dataset(log, preprocessing_of(cfg), name=name, source=cfg.source)


FRAME_DEFAULTS = {"user": ("user", "user_id", "userId"), "item": ("item", "item_id", "itemId"),
                  "timestamp": ("timestamp", "time", "datetime"), "rating": ("rating",)}


def dataset_from_frame(frame: pd.DataFrame, cfg: DataConfig,
                       name: str = "dataframe") -> SequenceDataset:
    """A preprocessed dataset from a DataFrame of interactions (one row each).

    Columns are ``cfg.user_col`` / ``item_col`` / ``time_col`` / ``rating_col`` when given,
    otherwise the usual names (user/user_id/userId, item/item_id/itemId,
    timestamp/time/datetime, rating); a timestamp column may hold numbers or datetimes. Ids are
    read as text. Without a timestamp, row order is time order within each user.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame of interactions, got {type(frame).__name__}")
    given = {"user": cfg.user_col, "item": cfg.item_col, "timestamp": cfg.time_col,
             "rating": cfg.rating_col}
    columns = [str(c) for c in frame.columns]
    log: dict[str, object] = {}
    for role, defaults in FRAME_DEFAULTS.items():
        flag = "time_col" if role == "timestamp" else f"{role}_col"
        wanted = given[role]
        if wanted is not None and wanted not in columns:
            raise DataError(f"{name}: no {role} column {wanted!r}; columns: {', '.join(columns)}")
        found = [wanted] if wanted is not None else [c for c in defaults if c in columns]
        if len(found) > 1:
            raise DataError(f"{name}: several {role} columns ({', '.join(found)}); pick one "
                            f"with {flag}=")
        if not found:
            if role in ("user", "item"):
                raise DataError(f"{name}: no {role} column (looked for {', '.join(defaults)}); "
                                f"name it with {flag}=; columns: {', '.join(columns)}")
            continue
        values = frame[found[0]]
        if values.isna().any():
            row = int(values.isna().to_numpy().nonzero()[0][0])
            raise DataError(f"{name}: row {values.index[row]!r}: the {role} column "
                            f"{found[0]!r} is empty")
        if role in ("timestamp", "rating"):
            values = _as_numbers(values, role, found[0], name)
        log[role] = values.to_numpy()
    return build_dataset(pd.DataFrame(log), preprocessing_of(cfg), name=name, source=name)


def _as_numbers(values: pd.Series, role: str, column: str, name: str) -> pd.Series:
    """Numbers as floats; datetimes as seconds since the epoch."""
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = pd.to_datetime(values, utc=True)
        return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        row = int(numbers.isna().to_numpy().nonzero()[0][0])
        raise DataError(f"{name}: row {values.index[row]!r}: {role} {values.iloc[row]!r} in "
                        f"column {column!r} is not a number")
    return numbers.astype(np.float64)
