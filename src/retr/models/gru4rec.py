"""GRU4Rec (Hidasi et al., 2016): a recurrent next-item model.

    x_t = Dropout(E[s_t]);  h_t = GRU(x_t, h_{t-1}), h_0 = 0;  o_t = W h_t + b
    score(k, t) = e_k · o_t   (E shared between input and output)

The GRU reads each history from its first real item: left padding would otherwise advance the
state (GRU biases move it even on a zero input), making the output depend on how much padding
there is. Each row is rotated so its items come first (padding at the end, where it cannot
reach earlier steps), the GRU runs over the batch, and the outputs are rotated back. The model
is causal by construction. ``o_t`` maps the GRU state to the embedding width so that input and
output item vectors can be shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from retr.errors import ConfigError
from retr.models.base import ModelOutput, SequentialRecommender
from retr.models.layers import Dropout, ItemEmbedding, init_weights


@dataclass
class GRU4RecConfig:
    """GRU4Rec hyper-parameters (the paper tunes them per dataset; these are common choices)."""

    embedding_size: int = 64  # item embedding width (the paper also allows one-hot input)
    hidden_size: int = 100  # GRU units (paper: 100)
    num_layers: int = 1  # GRU layers (paper: 1)
    max_len: int = 50  # window of most recent items read per prediction
    dropout: float = 0.25  # on the input embeddings and between GRU layers (paper: 0-0.5)
    init_std: float = 0.1  # item embedding std: N(0, 1) starts with logits so large that BPR
    # and CE stay at chance on Beauty and LastFM for the first epochs; 0.1 learns from epoch 1

    def __post_init__(self) -> None:
        for name in ("embedding_size", "hidden_size", "num_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


class GRU4Rec(SequentialRecommender):
    """Session-style recurrent recommender over left-padded windows."""

    name: ClassVar[str] = "gru4rec"
    objective: ClassVar[str] = "next"
    causal: ClassVar[bool] = True

    def __init__(self, n_items: int, config: GRU4RecConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or GRU4RecConfig()
        self.n_items = n_items
        self.max_len = cfg.max_len
        self.item_embedding = ItemEmbedding(n_items, cfg.embedding_size, std=cfg.init_std)
        self.dropout = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embedding_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.output = nn.Linear(cfg.hidden_size, cfg.embedding_size)  # W, b
        init_weights(self.output, "xavier")

    def forward(self, seqs: torch.Tensor, output_attentions: bool = False) -> ModelOutput:
        b, n = seqs.shape
        real = seqs != 0  # [B, N]
        pad = n - real.sum(dim=1, keepdim=True)  # [B, 1] left padding per row
        steps = torch.arange(n, device=seqs.device).unsqueeze(0)  # [1, N]
        # rotate each row left by its padding: items first, padding at the end
        first = seqs.gather(1, (steps + pad) % n)  # [B, N]
        x = self.dropout(self.item_embedding(first))  # [B, N, e]
        h, _ = self.gru(x)  # [B, N, H] h_t, from h_0 = 0 at the first real item
        # rotate back: position t reads step t - pad; padding positions are zeroed
        back = ((steps - pad) % n).unsqueeze(-1).expand(b, n, h.shape[-1])  # [B, N, H]
        h = h.gather(1, back)  # [B, N, H]
        hidden = self.output(h) * real.unsqueeze(-1).to(h.dtype)  # [B, N, e] o_t
        return ModelOutput(hidden=hidden)

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(items)  # [..., e] shared with the input
