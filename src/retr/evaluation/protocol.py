"""Evaluation protocols: full ranking and sampled ranking, with labelled, reproducible results."""

from __future__ import annotations

from typing import Any

import numpy as np

from retr.config import PROTOCOLS, EvalConfig
from retr.data.dataset import SequenceDataset
from retr.data.splits import EvalExamples
from retr.errors import ConfigError
from retr.evaluation.metrics import metrics_from_counts
from retr.evaluation.ranking import RankCounts, full_rank_counts, sampled_rank_counts
from retr.models.base import SequentialRecommender


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
