"""The contract every sequential model follows, so training, evaluation and serving share one path.

Inputs are left-padded item-id sequences ``seqs`` of shape [B, N] (0 = padding, real items
1..n_items, the most recent item at position N-1). A model turns them into per-position hidden
states [B, N, d]; the score of item k for a hidden state h is ``h · e_k`` where ``e_k`` is the
model's output item representation (shared with the input, as in SASRec and RETR).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

WIDTH_MULTIPLE = 8  # length groups run at widths that are multiples of this (or the window)


@dataclass
class ModelOutput:
    """What ``forward`` returns.

    hidden: [B, N, d] final hidden states.
    attentions: per layer [B, h, N, N] attention weights, only when asked.
    routes: per layer [B, N] binary route R^l (RETR and pathway attention), only when asked.
    keep_probs: per layer [B, N] keep probability alpha_t, only when asked.
    sample_probs: per layer [B, N] probability that the training decision keeps the token
        (the paper's sampling: alpha_t; the weighted sampling: sigmoid(omega_t logit_t)), when asked.
    omegas: per layer [B, N] the adaptive Gumbel-Softmax weight omega_t, when asked.
    extras: model-specific tensors; ``"aux_loss"`` [B] is an auxiliary loss per row that the
        trainer adds (its mean) to the task loss.
    """

    hidden: torch.Tensor
    attentions: list[torch.Tensor] | None = None
    routes: list[torch.Tensor] | None = None
    keep_probs: list[torch.Tensor] | None = None
    sample_probs: list[torch.Tensor] | None = None
    omegas: list[torch.Tensor] | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class SequentialRecommender(nn.Module, ABC):
    """Base class. Subclasses set ``name``, ``objective`` and implement ``forward``.

    objective: "next" (causal next-item prediction on the shifted sequence: SASRec, RETR,
    GRU4Rec) or "cloze" (masked-item prediction: BERT4Rec).
    """

    name: ClassVar[str] = "base"
    objective: ClassVar[str] = "next"
    causal: ClassVar[bool] = True

    n_items: int
    max_len: int

    @abstractmethod
    def forward(self, seqs: torch.Tensor, output_attentions: bool = False) -> ModelOutput:
        """Hidden states for left-padded ``seqs`` [B, N]; attentions/routes only when asked."""

    @abstractmethod
    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        """[..., d] output representations of item ids ``items`` (any shape)."""

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, d] the state that scores the next item after each sequence (last position)."""
        return self.forward(seqs).hidden[:, -1]

    def score_items(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of the same candidate ids ``items`` [C] for every row of ``h`` [B, d]."""
        return h @ self.item_representation(items).T

    def score_candidates(self, h: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of per-row candidates ``candidates`` [B, C] for ``h`` [B, d]."""
        return (self.item_representation(candidates) * h.unsqueeze(1)).sum(-1)


def length_groups(inputs: torch.Tensor, groups: int,
                  multiple: int = WIDTH_MULTIPLE) -> list[tuple[torch.Tensor, int]]:
    """(rows, width) per group of a left-padded batch ``inputs`` [B, N]: the rows sorted by
    history length, cut into ``groups`` equal parts, each with the width of its longest history
    rounded up to a multiple of ``multiple`` (at most N; every row is in one group; a group of
    empty histories has width 0).

    Padding never changes a real position and positions are right-aligned, so running each
    group on its last ``width`` columns gives every real position the state it has in the
    full batch, for less work (training and evaluation both batch this way). The rounding
    keeps the tensor shapes few, so the C allocator reuses freed blocks instead of fragmenting
    its heap over an epoch (on ml-1m, RETR's training peak RSS -10 % for about 1 % more time).
    """
    n = inputs.shape[1]
    lengths = (inputs > 0).sum(dim=1)  # [B] real tokens per row (left-padded)
    order = torch.argsort(lengths, stable=True)  # [B] shortest first
    parts = [(rows, int(lengths[rows].max()))  # width 0: a group of empty histories
             for rows in torch.tensor_split(order, min(groups, len(order))) if len(rows)]
    return [(rows, min(n, -(-width // multiple) * multiple)) for rows, width in parts]
