"""Sampled-evaluation negatives: drawn once per (split part, seed), stored beside the split.

For each evaluation example we draw ``n`` distinct items the user never interacted with (in
the whole sequence, not only the prefix, as in SASRec's protocol), uniformly or in proportion
to training popularity. The draw is vectorised rejection sampling in rounds (no loop over
users): membership is checked against sorted (user, item) keys.
"""

from __future__ import annotations

import numpy as np

from retr.data.dataset import SequenceDataset
from retr.data.splits import EvalExamples
from retr.errors import DataError


def _interaction_keys(dataset: SequenceDataset) -> np.ndarray:
    width = np.int64(dataset.n_items + 1)
    return np.unique(dataset.user_of_position() * width + dataset.items)


def sample_negatives(dataset: SequenceDataset, examples: EvalExamples, n: int = 100, seed: int = 0,
                     popularity: np.ndarray | None = None) -> np.ndarray:
    """int64 [M, n]: per example, ``n`` distinct items the user never interacted with.

    ``popularity`` (counts [n_items + 1]) switches from uniform to popularity-weighted draws.
    """
    if n < 1:
        raise DataError(f"number of sampled negatives must be >= 1, got {n}")
    m = len(examples)
    out = np.zeros((m, n), dtype=np.int64)
    if m == 0:
        return out
    n_items = dataset.n_items
    keys = _interaction_keys(dataset)
    width = np.int64(n_items + 1)
    seen = np.bincount(keys // width, minlength=dataset.n_users)
    free = n_items - seen[examples.users]
    if (free < n).any():
        bad = int(np.flatnonzero(free < n)[0])
        fits = int(free.min())  # the most negatives every example can have
        lower = (f"lower eval.negatives to at most {fits} (--set eval.negatives={fits}) or "
                 if fits >= 1 else "")
        raise DataError(
            f"user {dataset.vocab.users[examples.users[bad]]} has only {free[bad]} items they never "
            f"interacted with, fewer than the {n} negatives asked for; {lower}run full ranking "
            "only (eval.protocols = ['full'])")
    rng = np.random.default_rng(seed)
    if popularity is not None:
        p = np.asarray(popularity[1:], dtype=np.float64) + 1e-12
        p /= p.sum()
    filled = np.zeros(m, dtype=np.int64)
    rows = np.arange(m)
    rounds = 0
    while rows.size:
        draw = 2 * n + 8
        rounds += 1
        if popularity is None or rounds > 50:  # weighted draws stuck on a few users: go uniform
            cand = rng.integers(1, n_items + 1, size=(rows.size, draw), dtype=np.int64)
        else:
            cand = rng.choice(np.arange(1, n_items + 1), size=(rows.size, draw), p=p)
        k = examples.users[rows][:, None] * width + cand
        hit = keys[np.minimum(np.searchsorted(keys, k), len(keys) - 1)] == k
        cand = np.where(hit, 0, cand)
        # Already chosen items come first, then this round's draws; keep first occurrences.
        merged = np.concatenate([out[rows], cand], axis=1)
        order = np.argsort(merged, axis=1, kind="stable")
        sorted_vals = np.take_along_axis(merged, order, axis=1)
        dup_sorted = np.zeros_like(sorted_vals, dtype=bool)
        dup_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        valid = (merged > 0) & ~dup
        rank = np.cumsum(valid, axis=1) - 1
        take = valid & (rank < n)
        r_idx, c_idx = np.nonzero(take)
        new = np.zeros((rows.size, n), dtype=np.int64)
        new[r_idx, rank[r_idx, c_idx]] = merged[r_idx, c_idx]
        out[rows] = new
        filled[rows] = take.sum(axis=1)
        rows = rows[filled[rows] < n]
    return out
