"""Ranking metrics with an explicit, honest tie policy.

Every metric here is computed from two counts per example: ``greater`` (candidates scored
strictly above the target) and ``ties`` (other candidates scored exactly equal to it). Ties are
broken uniformly at random *in expectation*: the target's rank is uniform over
``greater + 1 .. greater + ties + 1`` and we report the exact expected metric over that range.
So a constant scorer gets exactly chance level (HR@k = k / #candidates), and ties never flatter
a model, unlike "count only strictly greater" which would rank it first.

A target that is excluded from the candidates (e.g. a repeat item with history exclusion on)
counts as a miss: every metric is 0 for it.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("HR", "NDCG", "MRR", "Recall")


def _prefix_tables(n_max: int, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Cumulative sums over ranks 1..n_max of each metric's per-rank gain (index r = sum to r)."""
    r = np.arange(1, n_max + 1, dtype=np.float64)
    tables: dict[str, np.ndarray] = {}
    zero = np.zeros(1)
    tables["MRR"] = np.concatenate([zero, np.cumsum(1.0 / r)])
    for k in ks:
        inside = r <= k
        tables[f"HR@{k}"] = np.concatenate([zero, np.cumsum(inside.astype(np.float64))])
        tables[f"NDCG@{k}"] = np.concatenate([zero, np.cumsum(inside / np.log2(r + 1))])
        tables[f"MRR@{k}"] = np.concatenate([zero, np.cumsum(inside / r)])
    return tables


def metrics_from_counts(greater: np.ndarray, ties: np.ndarray, valid: np.ndarray,
                        ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-example metric values from rank counts.

    greater, ties: int64 [M]; valid: bool [M] (False = target not among the candidates).
    Returns name -> float64 [M] for MRR and, for each k, HR@k, NDCG@k, MRR@k, Recall@k
    (one target per example, so Recall@k equals HR@k; reported under both names so tables
    line up with multi-target libraries).
    """
    greater = np.asarray(greater, dtype=np.int64)
    ties = np.asarray(ties, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    n_max = int((greater + ties).max()) + 1 if len(greater) else 1
    tables = _prefix_tables(n_max, ks)
    lo, hi = greater, greater + ties + 1  # ranks lo+1 .. hi, i.e. table[hi] - table[lo]
    width = (ties + 1).astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for name, table in tables.items():
        out[name] = np.where(valid, (table[hi] - table[lo]) / width, 0.0)
    for k in ks:
        out[f"Recall@{k}"] = out[f"HR@{k}"]
    return out


def metric_order(ks: tuple[int, ...]) -> list[str]:
    """Stable column order for tables: HR@k, NDCG@k, Recall@k, MRR@k per k, then MRR."""
    names = []
    for k in ks:
        names += [f"HR@{k}", f"NDCG@{k}", f"Recall@{k}", f"MRR@{k}"]
    return names + ["MRR"]
