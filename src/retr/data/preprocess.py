"""Raw interaction log -> filtered, chronologically sorted, compactly stored sequences.

The raw log is a DataFrame with columns ``user``, ``item`` and optionally ``timestamp`` and
``rating``, one row per interaction, in file order (see :mod:`retr.data.readers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from retr.data.dataset import SequenceDataset, Vocabulary
from retr.errors import DataError


@dataclass(frozen=True)
class Preprocessing:
    """How a raw log becomes sequences.

    min_user_interactions / min_item_interactions: iterative k-core thresholds (the paper
    uses 5 and 5); 0 turns a side off. rating_threshold: keep rows with rating >= it
    (None keeps all). dedupe_consecutive: drop an interaction equal to the previous one of
    the same user (off by default: repeats are real behaviour in Yelp or LastFM).
    """

    min_user_interactions: int = 5
    min_item_interactions: int = 5
    rating_threshold: float | None = None
    dedupe_consecutive: bool = False

    def __post_init__(self) -> None:
        if self.min_user_interactions < 0 or self.min_item_interactions < 0:
            raise DataError("k-core thresholds must be >= 0 (0 turns filtering off)")


NO_PREPROCESSING = Preprocessing(min_user_interactions=0, min_item_interactions=0)


def kcore_mask(user_codes: np.ndarray, item_codes: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Boolean mask of rows surviving iterative k-core filtering (repeated to a fixed point).

    Each pass drops rows whose user has fewer than ``min_user`` kept rows or whose item has
    fewer than ``min_item``; it stops when a pass drops nothing.
    """
    keep = np.ones(len(user_codes), dtype=bool)
    if min_user <= 0 and min_item <= 0:
        return keep
    n_users = int(user_codes.max()) + 1 if len(user_codes) else 0
    n_items = int(item_codes.max()) + 1 if len(item_codes) else 0
    while True:
        u_cnt = np.bincount(user_codes[keep], minlength=n_users)
        i_cnt = np.bincount(item_codes[keep], minlength=n_items)
        bad = np.zeros(len(user_codes), dtype=bool)
        if min_user > 0:
            bad |= u_cnt[user_codes] < min_user
        if min_item > 0:
            bad |= i_cnt[item_codes] < min_item
        new_keep = keep & ~bad
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def build_dataset(log: pd.DataFrame, prep: Preprocessing = Preprocessing(), name: str = "dataset",
                  source: str = "input") -> SequenceDataset:
    """Filter, sort and index a raw log.

    Order: rows are sorted stably by (user, timestamp, original row); without a timestamp
    column the file order within each user is the time order. Users and items get internal
    ids in order of first appearance in that sorted log.
    """
    for col in ("user", "item"):
        if col not in log.columns:
            raise DataError(f"{source}: no '{col}' column after reading; map it with --{col}-col")
    if len(log) == 0:
        raise DataError(f"{source}: no interactions found (is the file empty?)")
    user_codes, user_uniques = pd.factorize(log["user"].astype(str), sort=False)
    item_codes, item_uniques = pd.factorize(log["item"].astype(str), sort=False)
    ts = log["timestamp"].to_numpy(dtype=np.float64) if "timestamp" in log.columns else None
    ratings = log["rating"].to_numpy(dtype=np.float64) if "rating" in log.columns else None
    return build_dataset_from_arrays(user_codes, item_codes, np.asarray(user_uniques),
                                     np.asarray(item_uniques), ts, ratings, prep, name=name,
                                     source=source)


def _first_appearance(codes: np.ndarray, uniques: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber ``codes`` in order of first appearance (a no-op when they already are).

    Negative codes (missing ids, as ``pd.factorize`` marks them) stay -1.
    """
    if len(codes) == 0 or (codes[0] <= 0 and bool(
            np.all(codes[1:] <= np.maximum.accumulate(codes)[:-1] + 1))):
        return codes, uniques
    if bool((codes < 0).any()):
        new_codes, old = pd.factorize(np.where(codes < 0, np.nan, codes), sort=False)
        return new_codes, uniques[np.asarray(old).astype(np.int64)]
    new_codes, old = pd.factorize(codes, sort=False)
    return new_codes, uniques[np.asarray(old)]


def build_dataset_from_arrays(user_codes: np.ndarray, item_codes: np.ndarray,
                              user_uniques: np.ndarray, item_uniques: np.ndarray,
                              ts: np.ndarray | None, ratings: np.ndarray | None,
                              prep: Preprocessing = Preprocessing(), name: str = "dataset",
                              source: str = "input") -> SequenceDataset:
    """:func:`build_dataset` on integer-coded rows in file order.

    ``user_codes[r]`` indexes ``user_uniques`` (external ids; ``str()`` of each is the vocabulary
    entry), likewise for items; ``ts`` and ``ratings`` are float64 per row or None.
    """
    if len(user_codes) == 0:
        raise DataError(f"{source}: no interactions found (is the file empty?)")
    if prep.rating_threshold is not None:
        if ratings is None:
            raise DataError(f"{source}: a rating threshold was set but the data has no rating "
                            "column; map one with --rating-col or drop the threshold")
        passed = np.asarray(ratings, dtype=np.float64) >= prep.rating_threshold
        user_codes, item_codes = user_codes[passed], item_codes[passed]
        ts = ts[passed] if ts is not None else None
    # Users are sorted by code, so codes must follow first appearance among the rows kept.
    user_codes, user_uniques = _first_appearance(np.asarray(user_codes), np.asarray(user_uniques))
    if ts is not None and np.isnan(ts).any():
        bad = int(np.flatnonzero(np.isnan(ts))[0])
        raise DataError(f"{source}: missing or unparsable timestamp in data row {bad + 1}; "
                        "fix the row or read without --time-col")
    # lexsort is stable, so equal (user, timestamp) keys keep their original row order.
    order = np.lexsort((ts, user_codes)) if ts is not None else np.argsort(user_codes, kind="stable")
    user_codes, item_codes = user_codes[order], item_codes[order]
    ts = ts[order] if ts is not None else None
    del order
    if prep.dedupe_consecutive and len(user_codes) > 1:
        dup = np.zeros(len(user_codes), dtype=bool)
        dup[1:] = (user_codes[1:] == user_codes[:-1]) & (item_codes[1:] == item_codes[:-1])
        user_codes, item_codes = user_codes[~dup], item_codes[~dup]
        ts = ts[~dup] if ts is not None else None
    keep = kcore_mask(user_codes, item_codes, prep.min_user_interactions, prep.min_item_interactions)
    user_codes, item_codes = user_codes[keep], item_codes[keep]
    ts = ts[keep] if ts is not None else None
    if len(user_codes) == 0:
        raise DataError(
            f"{source}: no interactions left after filtering (k-core users>="
            f"{prep.min_user_interactions}, items>={prep.min_item_interactions}"
            + (f", rating>={prep.rating_threshold}" if prep.rating_threshold is not None else "")
            + "); lower the thresholds, e.g. --set data.min_user_interactions=0")
    # Re-index to dense ids in order of first appearance of the (sorted) survivors.
    u_first_order = np.asarray(pd.unique(user_codes))
    u_map = np.full(len(user_uniques), -1, dtype=np.int64)
    u_map[u_first_order] = np.arange(len(u_first_order))
    i_first_order = np.asarray(pd.unique(item_codes))
    i_map = np.zeros(len(item_uniques), dtype=np.int64)
    i_map[i_first_order] = np.arange(1, len(i_first_order) + 1)
    users = u_map[user_codes]
    items = i_map[item_codes]
    del user_codes, item_codes
    # Rows are grouped by user code; re-sort by the new dense user id when that order differs
    # (stable keeps time order).
    if len(users) > 1 and bool(np.any(users[1:] < users[:-1])):
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
        ts = ts[order] if ts is not None else None
    counts = np.bincount(users, minlength=len(u_first_order))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    vocab = Vocabulary(users=[str(x) for x in np.asarray(user_uniques)[u_first_order]],
                       items=[str(x) for x in np.asarray(item_uniques)[i_first_order]])
    return SequenceDataset(items=items.astype(np.int64), offsets=offsets, vocab=vocab,
                           timestamps=ts, name=name)
