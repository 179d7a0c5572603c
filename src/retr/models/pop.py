"""Most-popular baseline: every user gets the items ranked by training-split popularity.

The sanity floor: a neural model that does not beat it has learned nothing. It goes through
exactly the same scoring and evaluation path as every other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from retr.models.base import ModelOutput, SequentialRecommender


@dataclass
class PopConfig:
    """Pop has nothing to tune; ``max_len`` only bounds the input it ignores."""

    max_len: int = 50


class Pop(SequentialRecommender):
    name: ClassVar[str] = "pop"
    trainable: ClassVar[bool] = False
    counts: torch.Tensor

    def __init__(self, n_items: int, config: PopConfig | None = None) -> None:
        super().__init__()
        self.config = config or PopConfig()
        self.n_items = n_items
        self.max_len = self.config.max_len
        self.register_buffer("counts", torch.zeros(n_items + 1, dtype=torch.float32))

    def fit_counts(self, counts: np.ndarray) -> None:
        """Set popularity from interaction counts [n_items + 1] of the training inputs only."""
        if counts.shape != (self.n_items + 1,):
            raise ValueError(f"counts must have shape ({self.n_items + 1},), got {counts.shape}")
        self.counts.copy_(torch.as_tensor(counts, dtype=torch.float32))

    def forward(self, seqs: torch.Tensor, output_attentions: bool = False) -> ModelOutput:
        return ModelOutput(hidden=torch.ones(*seqs.shape, 1, device=seqs.device))

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        return self.counts[items].unsqueeze(-1)
