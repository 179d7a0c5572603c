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
        if min_user > 0:  # per-id flags gathered as bools: no row-sized integer temporaries
            bad |= (u_cnt < min_user)[user_codes]
        if min_item > 0:
            bad |= (i_cnt < min_item)[item_codes]
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
    rows = {"users": user_codes, "items": item_codes, "ts": ts, "ratings": ratings}
    return build_dataset_from_rows(rows, user_uniques, item_uniques, prep, name=name,
                                   source=source)


SORT_CHUNK_ROWS = 1 << 19  # at least this many rows are sorted at a time (about 40 bytes each)
_SCAN_BLOCK = 1 << 22


def build_dataset_from_rows(rows: dict[str, np.ndarray | None], user_uniques: np.ndarray,
                            item_uniques: np.ndarray, prep: Preprocessing = Preprocessing(),
                            name: str = "dataset", source: str = "input") -> SequenceDataset:
    """:func:`build_dataset_from_arrays` that takes its arrays out of ``rows`` (emptying it).

    When ``rows`` holds the only references, each array is freed as soon as its filtered or
    sorted successor exists, so the peak stays near twice the compact result: the rows are
    k-core filtered before they are sorted (when no step between depends on the order), and the
    sort goes by ranges of users, one bounded chunk of rows at a time, into the output arrays.
    """
    users = np.asarray(rows.pop("users"))
    items = np.asarray(rows.pop("items"))
    ts = rows.pop("ts", None)
    ratings = rows.pop("ratings", None)
    rows.clear()
    if len(users) == 0:
        raise DataError(f"{source}: no interactions found (is the file empty?)")
    if prep.rating_threshold is not None:
        if ratings is None:
            raise DataError(f"{source}: a rating threshold was set but the data has no rating "
                            "column; map one with --rating-col or drop the threshold")
        passed = np.asarray(ratings, dtype=np.float64) >= prep.rating_threshold
        del ratings
        users, items = users[passed], items[passed]
        ts = ts[passed] if ts is not None else None
        del passed
    ratings = None
    # Users are sorted by code, so codes must follow first appearance among the rows kept.
    users, user_uniques = _first_appearance(users, np.asarray(user_uniques))
    if ts is not None:
        ts = np.asarray(ts, dtype=np.float64)
        nan = np.isnan(ts)
        if nan.any():
            bad = int(np.flatnonzero(nan)[0])
            raise DataError(f"{source}: missing or unparsable timestamp in data row {bad + 1}; "
                            "fix the row or read without --time-col")
        del nan
    if len(users) == 0:
        raise _nothing_left(source, prep)
    n_users = int(users.max()) + 1
    if not prep.dedupe_consecutive:  # k-core counts do not depend on the order: filter first
        users, items, ts = _kcore_filter(users, items, ts, prep)
    items, ts, counts = _sort_by_user_then_time(users, items, ts, n_users)
    del users
    if prep.dedupe_consecutive:
        items, ts, counts = _dedupe_consecutive(items, ts, counts)
        users = np.repeat(np.arange(n_users, dtype=np.int32 if n_users < 2**31 else np.int64),
                          counts)
        users, items, ts = _kcore_filter(users, items, ts, prep)
        counts = np.bincount(users, minlength=n_users)
        del users
    if len(items) == 0:
        raise _nothing_left(source, prep)
    # Dense ids in order of first appearance of the sorted survivors: users are grouped in code
    # order, so they keep it; items by first appearance along the sorted rows.
    kept_users = np.flatnonzero(counts)
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(counts[kept_users], out=offsets[1:])
    i_first_order = np.asarray(pd.unique(items))
    i_map = np.zeros(len(item_uniques), dtype=np.int64)
    i_map[i_first_order] = np.arange(1, len(i_first_order) + 1)
    items = i_map[items]
    vocab = Vocabulary(users=[str(x) for x in np.asarray(user_uniques)[kept_users]],
                       items=[str(x) for x in np.asarray(item_uniques)[i_first_order]])
    return SequenceDataset(items=items, offsets=offsets, vocab=vocab, timestamps=ts, name=name)


def _nothing_left(source: str, prep: Preprocessing) -> DataError:
    return DataError(
        f"{source}: no interactions left after filtering (k-core users>="
        f"{prep.min_user_interactions}, items>={prep.min_item_interactions}"
        + (f", rating>={prep.rating_threshold}" if prep.rating_threshold is not None else "")
        + "); lower the thresholds, e.g. --set data.min_user_interactions=0")


def _kcore_filter(users: np.ndarray, items: np.ndarray, ts: np.ndarray | None,
                  prep: Preprocessing) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    keep = kcore_mask(users, items, prep.min_user_interactions, prep.min_item_interactions)
    if keep.all():
        return users, items, ts
    users = users[keep]
    items = items[keep]
    if ts is not None:
        ts = ts[keep]
    return users, items, ts


def _sort_by_user_then_time(users: np.ndarray, items: np.ndarray, ts: np.ndarray | None,
                            n_users: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Rows grouped by user code, by time within a user, equal times in row order.

    Returns the sorted items and timestamps and the rows per user code. Users are cut into
    ranges of about ``max(SORT_CHUNK_ROWS, rows / 64)`` rows; each range's rows are found by a
    blockwise scan, sorted alone (a stable lexsort) and written to their final place, so the
    temporaries are a chunk's, not the log's.
    """
    counts = np.bincount(users, minlength=n_users)
    starts = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    n = len(users)
    out_items = np.empty(n, dtype=items.dtype)
    out_ts = np.empty(n, dtype=np.float64) if ts is not None else None
    chunk = max(SORT_CHUNK_ROWS, n // 64)
    lo = 0
    while lo < n_users:
        hi = max(int(np.searchsorted(starts, starts[lo] + chunk, side="right")) - 1, lo + 1)
        hi = min(hi, n_users)
        if lo == 0 and hi == n_users:
            idx = np.arange(n)
        else:
            idx = _rows_of_users(users, lo, hi)
        sub_users = users[idx]
        dest = slice(int(starts[lo]), int(starts[hi]))
        if ts is not None and out_ts is not None:
            sub_ts = ts[idx]
            order = np.lexsort((sub_ts, sub_users))  # stable: equal keys keep row order
            out_ts[dest] = sub_ts[order]
            del sub_ts
        else:
            order = np.argsort(sub_users, kind="stable")
        del sub_users
        out_items[dest] = items[idx[order]]
        del idx, order
        lo = hi
    return out_items, out_ts, counts


def _rows_of_users(users: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Indices (ascending) of the rows whose user code is in [lo, hi), scanned in blocks."""
    parts = []
    for start in range(0, len(users), _SCAN_BLOCK):
        block = users[start:start + _SCAN_BLOCK]
        parts.append(np.flatnonzero((block >= lo) & (block < hi)) + start)
    return np.concatenate(parts)


def _dedupe_consecutive(items: np.ndarray, ts: np.ndarray | None, counts: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Drop a row equal to the previous row of the same user (rows grouped by user)."""
    if len(items) < 2:
        return items, ts, counts
    dup = np.zeros(len(items), dtype=bool)
    dup[1:] = items[1:] == items[:-1]
    first_rows = np.cumsum(counts)[:-1]
    dup[first_rows[first_rows < len(items)]] = False  # a user's first row is never a repeat
    if not dup.any():
        return items, ts, counts
    user_of_dup = np.searchsorted(np.cumsum(counts), np.flatnonzero(dup), side="right")
    counts = counts - np.bincount(user_of_dup, minlength=len(counts))
    return items[~dup], (ts[~dup] if ts is not None else None), counts
