"""Evaluation protocols: full ranking and sampled ranking, with labelled, reproducible results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retr.data.dataset import SequenceDataset
from retr.data.splits import EvalExamples
from retr.errors import ConfigError
from retr.evaluation.metrics import metrics_from_counts
from retr.evaluation.ranking import RankCounts, full_rank_counts, sampled_rank_counts
from retr.models.base import SequentialRecommender

PROTOCOLS = ("full", "sampled")


@dataclass
class EvalConfig:
    """How models are evaluated.

    ks: cut-offs for HR/NDCG/MRR/Recall@k. exclude_history: in full ranking, remove the items
    of the input prefix from the candidates (turn off for datasets with repeat visits, e.g.
    Yelp). negatives: sampled-protocol negatives per example (paper: 100). negative_sampling:
    "uniform" (paper) or "popularity". batch_size, item_chunk: memory bounds of full ranking.
    protocols: which protocols the end-of-training report runs.
    """

    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    exclude_history: bool = True
    negatives: int = 100
    negative_sampling: str = "uniform"
    batch_size: int = 256
    item_chunk: int = 4096
    protocols: list[str] = field(default_factory=lambda: ["full", "sampled"])

    def __post_init__(self) -> None:
        if not self.ks or any((not isinstance(k, int)) or k < 1 for k in self.ks):
            raise ConfigError(f"eval.ks must be a non-empty list of integers >= 1, got {self.ks}")
        if self.negatives < 1:
            raise ConfigError(f"eval.negatives must be >= 1, got {self.negatives}")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ConfigError("eval.negative_sampling must be 'uniform' or 'popularity', got "
                              f"{self.negative_sampling!r}")
        if self.batch_size < 1 or self.item_chunk < 1:
            raise ConfigError("eval.batch_size and eval.item_chunk must be >= 1")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"eval.protocols must be a non-empty subset of {list(PROTOCOLS)}, got {self.protocols}")


def summarize(counts: RankCounts, ks: list[int]) -> dict[str, float]:
    """Mean of every metric over examples."""
    per = metrics_from_counts(counts.greater, counts.ties, counts.valid, tuple(ks))
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in per.items()}


def evaluate(model: SequentialRecommender, dataset: SequenceDataset, examples: EvalExamples,
             protocol: str, config: EvalConfig, negatives: np.ndarray | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Metrics of ``model`` on ``examples`` under ``protocol``, labelled with how they were made."""
    if protocol == "full":
        counts = full_rank_counts(model, dataset, examples, config.exclude_history,
                                  config.batch_size, config.item_chunk, progress)
        label: dict[str, Any] = {"protocol": "full", "exclude_history": config.exclude_history}
    elif protocol == "sampled":
        if negatives is None:
            raise ConfigError("the sampled protocol needs the stored negatives of the split")
        counts = sampled_rank_counts(model, dataset, examples, negatives, progress=progress)
        label = {"protocol": "sampled", "negatives": int(negatives.shape[1]),
                 "negative_sampling": config.negative_sampling}
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return {**label, "n_examples": len(examples), "ks": list(config.ks),
            "unrankable_targets": int((~counts.valid).sum()),
            "metrics": summarize(counts, config.ks)}
