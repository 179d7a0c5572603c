"""BERT4Rec (Sun et al., 2019): a bidirectional transformer trained with the cloze task.

    h^0 = Dropout(LN(E[s] + P))                       embedding (as the official BERT-based code)
    h^l = Trm(h^{l-1})   post-LN, GELU FFN of width 4d, W_O on the heads
    P(v) = Softmax(GELU(h^L W^P + b^P) E^T + b^O)     output layer, E shared with the input

The output layer fits the shared scoring contract (score = hidden · item_representation) by
folding the per-item bias in: ``hidden`` is [GELU(h W^P + b^P), 1] of width d+1 and
``item_representation(k)`` is [e_k, b^O_k].

Training ("cloze"): :meth:`BERT4Rec.cloze_batch` replaces a random mask_prob share of the
real items with [mask] (id n_items+1) and asks for the originals. Prediction: append [mask]
after the most recent item (dropping the oldest if the window is full) and read its state.
attention="pathway" swaps self-attention for RETR's pathway attention; the model is
bidirectional, so the router's global pool (the paper's literal one) is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from retr.errors import ConfigError
from retr.models.base import ModelOutput, SequentialRecommender
from retr.models.layers import (
    Dropout,
    ItemEmbedding,
    PositionalEmbedding,
    TransformerBlock,
    collect_output,
    init_weights,
)
from retr.models.pathway import RouterOptions, attention_module


@dataclass
class BERT4RecConfig:
    """BERT4Rec hyper-parameters; defaults are the paper's (MovieLens-1M where they differ)."""

    hidden_size: int = 64  # d (paper: 64)
    num_heads: int = 2  # heads (paper: 2)
    num_layers: int = 2  # layers (paper: 2)
    max_len: int = 200  # N (paper: 200 on MovieLens, 50 on Beauty/Steam)
    ffn_size: int = 256  # FFN inner width (paper: 4d)
    dropout: float = 0.1  # (paper: 0.1)
    init_std: float = 0.02  # truncated-normal initialisation in [-2σ, 2σ] (paper: σ = 0.02)
    mask_prob: float = 0.2  # cloze masking proportion ρ (paper: 0.2 on MovieLens-1M)
    last_item_mask_prob: float = 0.0  # share of training rows that mask only the last item
    attention: str = "self"  # "self" (BERT4Rec) | "pathway" (BERT4Rec + pathway attention)
    # pathway only: the router switches (pathway.py), flat keys of [model] as in RETR; the
    # model is bidirectional, so the global pool leaks nothing and is the default here
    pathway: RouterOptions = field(default_factory=lambda: RouterOptions(pooling="global"))

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_layers", "max_len", "ffn_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ConfigError(f"model.mask_prob must be in (0, 1], got {self.mask_prob}")
        if not 0.0 <= self.last_item_mask_prob <= 1.0:
            raise ConfigError(f"model.last_item_mask_prob must be in [0, 1], "
                              f"got {self.last_item_mask_prob}")
        if self.attention not in ("self", "pathway"):
            raise ConfigError(f"model.attention must be 'self' or 'pathway', got {self.attention!r}")


def cloze_batch(seqs: torch.Tensor, mask_id: int, mask_prob: float,
                generator: torch.Generator | None = None,
                last_item_mask_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cloze inputs for left-padded ``seqs`` [B, N] -> (masked_seqs [B, N], labels [B, N]).

    Each real item is replaced by ``mask_id`` with probability ``mask_prob`` (always by [mask],
    never by a random item, as BERT4Rec); a non-empty row with nothing masked gets one random
    real item masked so that every row teaches something. With probability
    ``last_item_mask_prob`` a row instead masks only its most recent item (the paper's extra
    samples that mimic prediction; it gives no share, so it is off by default). Labels hold
    the original item at masked positions and 0 elsewhere. ``generator`` must live on
    ``seqs.device``; the same generator state gives the same batch.
    """
    b, n = seqs.shape
    real = seqs != 0  # [B, N]
    draw = torch.rand(3, b, n, generator=generator, device=seqs.device)  # one draw, fixed shape
    masked = (draw[0] < mask_prob) & real  # [B, N] Bernoulli(ρ) on real items
    # rows with real items but nothing masked: mask the real item with the highest draw[1]
    pick = F.one_hot(draw[1].masked_fill(~real, -1.0).argmax(dim=1), n).bool() & real  # [B, N]
    masked = masked | (pick & ~masked.any(dim=1, keepdim=True))  # [B, N]
    # some rows mask only their most recent item (position N-1 under left padding)
    last = torch.zeros_like(real)
    last[:, -1] = real[:, -1]  # [B, N]
    masked = torch.where(draw[2, :, :1] < last_item_mask_prob, last, masked)  # [B, N]
    masked_seqs = seqs.masked_fill(masked, mask_id)  # [B, N]
    labels = seqs * masked  # [B, N] original item where masked, 0 elsewhere
    return masked_seqs, labels


class BERT4Rec(SequentialRecommender):
    """Bidirectional transformer recommender with a cloze objective."""

    name: ClassVar[str] = "bert4rec"
    objective: ClassVar[str] = "cloze"
    causal: ClassVar[bool] = False

    def __init__(self, n_items: int, config: BERT4RecConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or BERT4RecConfig()
        self.n_items = n_items
        self.max_len = cfg.max_len
        d = cfg.hidden_size
        self.item_embedding = ItemEmbedding(n_items, d, n_special=1, std=cfg.init_std)  # E + [mask]
        self.mask_id = self.item_embedding.special_id(0)  # n_items + 1
        self.position = PositionalEmbedding(cfg.max_len, d)  # P
        self.embed_norm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = Dropout(cfg.dropout)
        pathway = cfg.pathway if cfg.attention == "pathway" else None
        self.blocks = nn.ModuleList(
            TransformerBlock(attention_module(d, cfg.num_heads, cfg.dropout, causal=False,
                                              out_proj=True, pathway=pathway),
                             d, cfg.ffn_size, cfg.dropout, norm="post", activation="gelu",
                             eps=1e-12)
            for _ in range(cfg.num_layers))
        self.head = nn.Linear(d, d)  # W^P, b^P
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1))  # b^O (index 0 unused)
        init_weights(self, "normal", cfg.init_std)

    def cloze_batch(self, seqs: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and labels for ``seqs`` [B, N] with this model's mask settings."""
        return cloze_batch(seqs, self.mask_id, self.config.mask_prob, generator,
                           self.config.last_item_mask_prob)

    def forward(self, seqs: torch.Tensor, output_attentions: bool = False,
                last_only: bool = False) -> ModelOutput:
        """``last_only``: hidden [B, 1, d+1] of the last position alone (the last block computes
        no other query; with pathway attention its router still reads every token)."""
        real = seqs != 0  # [B, N] items and [mask] are real; padding is not
        x = self.item_embedding(seqs) + self.position(seqs.shape[1])  # [B, N, d] h^0
        x = self.dropout(self.embed_norm(x))  # [B, N, d]
        route = real.to(x.dtype) if self.config.attention == "pathway" else None  # R^0
        outs = []
        last = last_only and not output_attentions
        for i, block in enumerate(self.blocks):
            out = block(x, real, route, output_attentions,
                        last_only=last and i == len(self.blocks) - 1)
            x, route = out.x, out.route  # [B, N, d] h^l
            outs.append(out)
        h = F.gelu(self.head(x))  # [B, N, d] GELU(h^L W^P + b^P)
        hidden = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)  # [B, N, d+1] [h, 1]
        q_real = real[:, -hidden.shape[1]:]  # [B, N] (or [B, 1] for the last position alone)
        hidden = hidden * q_real.unsqueeze(-1).to(hidden.dtype)  # padding rows zeroed
        return collect_output(hidden, outs, output_attentions)

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        e = self.item_embedding(items)  # [..., d] e_k, shared with the input
        return torch.cat([e, self.output_bias[items].unsqueeze(-1)], dim=-1)  # [..., d+1]

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, d+1]: append [mask] after the most recent item (the window slides by one)."""
        mask_col = torch.full_like(seqs[:, :1], self.mask_id)  # [B, 1]
        return self.forward(torch.cat([seqs[:, 1:], mask_col], dim=1), last_only=True).hidden[:, -1]
