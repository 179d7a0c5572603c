"""SASRec (Kang & McAuley, 2018) as its paper and official code define it.

    E = item_emb(s) * sqrt(d) + P;  Dropout;  padding rows zeroed
    per block (official layout): Q = LN(Z); Z = Q + MSA(Q, Z); H = LN(Z); Z = H + FFN(H);
                                 padding rows zeroed
    F = LN(Z);  score(k, t) = e_k · F_t   (item embedding shared with the input)

Causal self-attention over the shifted sequence, ReLU FFN of width d (``ffn_size``), dropout on the
embedding, attention weights and FFN, Glorot-uniform initialisation, LayerNorm eps 1e-8, heads
concatenated without an output projection (all as in the official code; ``out_proj`` and
``init = "normal"`` are ours, for comparison with re-implementations that differ there).

attention="pathway" swaps each block's self-attention for RETR's pathway attention (the
paper's model-agnostic claim); the router options are the same as RETR's, causal pooling
by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from retr.errors import ConfigError
from retr.models.base import ModelOutput, SequentialRecommender
from retr.models.layers import (
    BlockOptions,
    Dropout,
    ItemEmbedding,
    PositionalEmbedding,
    TransformerBlock,
    collect_output,
    init_weights,
    make_norm,
)
from retr.models.pathway import RouterOptions, attention_module


@dataclass
class SASRecConfig:
    """SASRec hyper-parameters; defaults are the paper's (MovieLens-1M where they differ)."""

    hidden_size: int = 50  # d (paper: 50)
    num_heads: int = 1  # heads (paper: 1)
    num_layers: int = 2  # blocks (paper: 2)
    max_len: int = 200  # N (paper: 200 on MovieLens-1M, 50 on sparse data)
    dropout: float = 0.2  # (paper: 0.2 on MovieLens-1M, 0.5 on sparse data)
    # FFN inner width; 0 = d, the paper's (ours: a wider FFN, e.g. eSASRec's 4d SwiGLU)
    ffn_size: int = 0
    attention: str = "self"  # "self" (SASRec) | "pathway" (SASRec + pathway attention)
    # ours, beyond the paper (what the RecSys'23 SASRec+ reference has): an output projection
    # after the heads (d x d with bias, as torch's MultiheadAttention), and "normal"
    # initialisation, truncated N(0, 0.02) for every weight (the paper: "xavier", Glorot-uniform)
    out_proj: bool = False
    init: str = "xavier"
    # pathway only: the router switches (pathway.py), flat keys of [model] as in RETR
    pathway: RouterOptions = field(default_factory=RouterOptions)
    # block switches beyond the paper (layers.BlockOptions), flat keys of [model]: layout
    # ("paper" = the official pre-LN | "prenorm"), norm_type, ffn_type, residual
    block: BlockOptions = field(default_factory=BlockOptions)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.ffn_size < 0:
            raise ConfigError(f"model.ffn_size must be >= 1 (or 0 for hidden_size, the "
                              f"paper's width), got {self.ffn_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("self", "pathway"):
            raise ConfigError(f"model.attention must be 'self' or 'pathway', got {self.attention!r}")
        if self.init not in ("xavier", "normal"):
            raise ConfigError(f"model.init must be 'xavier' (the paper's) or 'normal' "
                              f"(N(0, 0.02)), got {self.init!r}")


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (causal, pre-LN with normed queries)."""

    name: ClassVar[str] = "sasrec"
    objective: ClassVar[str] = "next"
    causal: ClassVar[bool] = True

    def __init__(self, n_items: int, config: SASRecConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SASRecConfig()
        self.n_items = n_items
        self.max_len = cfg.max_len
        d = cfg.hidden_size
        self.item_embedding = ItemEmbedding(n_items, d, init=cfg.init)
        self.position = PositionalEmbedding(cfg.max_len, d)
        self.dropout = Dropout(cfg.dropout)
        pathway = cfg.pathway if cfg.attention == "pathway" else None
        self.blocks = nn.ModuleList(
            TransformerBlock(attention_module(d, cfg.num_heads, cfg.dropout, causal=True,
                                              out_proj=cfg.out_proj, pathway=pathway),
                             d, cfg.ffn_size or d, cfg.dropout, eps=1e-8,
                             **cfg.block.block_args("pre", "relu"))
            for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg.block.norm_type, d, 1e-8)
        init_weights(self, cfg.init)

    def forward(self, seqs: torch.Tensor, output_attentions: bool = False,
                last_only: bool = False) -> ModelOutput:
        """``last_only``: hidden [B, 1, d] of the last position alone (the last block computes
        no other query; with pathway attention its router still reads every token)."""
        real = seqs != 0  # [B, N]
        # embedding layer: item embedding scaled by sqrt(d) plus learnable positions
        x = self.item_embedding(seqs) * math.sqrt(self.config.hidden_size)  # [B, N, d]
        x = x + self.position(seqs.shape[1])  # [B, N, d]
        mask = real.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = self.dropout(x) * mask  # [B, N, d] padding rows zeroed
        route = real.to(x.dtype) if self.config.attention == "pathway" else None  # R^0
        outs = []
        last = last_only and not output_attentions
        for i, block in enumerate(self.blocks):
            final = last and i == len(self.blocks) - 1
            if final:
                mask = mask[:, -1:]  # [B, 1, 1] from here on only the last position
            out = block(x, real, route, output_attentions, last_only=final)
            x, route = out.x * mask, out.route  # [B, N, d] padding rows zeroed after each block
            outs.append(out)
        hidden = self.final_norm(x) * mask  # [B, N, d] F; score(k, t) = e_k · F_t
        return collect_output(hidden, outs, output_attentions)

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.forward(seqs, last_only=True).hidden[:, -1]  # [B, d]

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(items)  # [..., d] shared with the input (unscaled)
