"""RETR, the Recommender Transformer with behavior pathways (see docs/METHOD.md).

    X = E[s] + P,  Z^0 = X,  R^0 = 1 on real tokens                  "Inputs"
    Ẑ^l, R^l = PathMSA(Z^{l-1}, R^{l-1})                               "Block l", pathway.py
    Ẑ^l = LN(Ẑ^l + Z^{l-1});  Z^l = LN(FFN(Ẑ^l) + Ẑ^l)                "Block l" (post-LN)
    score(k, t) = e_k · Z^L_t  (E shared between input and output)     "Prediction and loss"

The loss (BPR with one sampled negative per step in the paper; CE also works) lives in
``retr.training.losses``. Every ablation of the paper is a config switch (see RETRConfig).

Choices the paper leaves open (besides the router's, documented in pathway.py): no output
projection after the heads (the spec concatenates them), ReLU FFN of width ``ffn_size``,
dropout on X, attention weights, attention output and FFN, LayerNorm eps 1e-8 (as SASRec).
Initialisation: truncated N(0, init_std²) for every embedding and Linear layer (BERT-style),
except the router, which initialises itself (pathway.py). On the synthetic pathway data this
learns much faster than Glorot layers or unit-norm item vectors.
"""

from __future__ import annotations

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
class RETRConfig:
    """RETR hyper-parameters; defaults follow the paper's recipe where it gives one."""

    hidden_size: int = 256  # d (paper: 256)
    num_heads: int = 4  # h (paper: 4; ablation 1, 2, 4, 8)
    num_layers: int = 2  # L (paper: 2; ablation 1-4)
    max_len: int = 200  # N (paper: 200 on MovieLens-1M, 100 elsewhere)
    ffn_size: int = 256  # FFN inner width (paper silent; = d as in SASRec)
    dropout: float = 0.2  # embedding, attention-weight and residual dropout (paper silent)
    # the router switches (pathway.py), flat keys of [model]: router, random_keep_prob,
    # hierarchical, gumbel, tau, pooling ("causal" is ours; "global" is the paper's and leaks
    # the future), inference_route, router_hidden, route_sample, query_bias; beyond the paper
    # (ours, off by default): omega_floor, keep_target, keep_weight, inference_rule,
    # router_target, distill_weight, distill_source
    pathway: RouterOptions = field(default_factory=RouterOptions)
    init_std: float = 0.02  # std of the truncated-normal initialisation (paper silent)
    # block switches beyond the paper (layers.BlockOptions), flat keys of [model]: layout
    # ("paper" post-LN | "prenorm"), norm_type, ffn_type ("paper" | "swiglu"), residual
    block: BlockOptions = field(default_factory=BlockOptions)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_layers", "max_len", "ffn_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.block.block_args("post", "relu")  # a gated residual needs a pre-norm layout


class RETR(SequentialRecommender):
    """Causal next-item transformer whose blocks use pathway attention (post-LN)."""

    name: ClassVar[str] = "retr"
    objective: ClassVar[str] = "next"
    causal: ClassVar[bool] = True

    def __init__(self, n_items: int, config: RETRConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or RETRConfig()
        self.n_items = n_items
        self.max_len = cfg.max_len
        d = cfg.hidden_size
        self.item_embedding = ItemEmbedding(n_items, d, std=cfg.init_std)  # E
        self.position = PositionalEmbedding(cfg.max_len, d)  # P
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(attention_module(d, cfg.num_heads, cfg.dropout, causal=True,
                                              out_proj=False, pathway=cfg.pathway),
                             d, cfg.ffn_size, cfg.dropout, eps=1e-8,
                             **cfg.block.block_args("post", "relu"))
            for _ in range(cfg.num_layers))
        self.final_norm: nn.Module | None = None  # pre-norm blocks end with one (ours)
        if cfg.block.layout == "prenorm":
            self.final_norm = make_norm(cfg.block.norm_type, d, 1e-8)
        init_weights(self, "normal", cfg.init_std)

    def forward(self, seqs: torch.Tensor, output_attentions: bool = False,
                last_only: bool = False) -> ModelOutput:
        """``last_only``: hidden [B, 1, d] of the last position alone (the last block's router
        reads every token; its attention and FFN compute the last position only)."""
        real = seqs != 0  # [B, N] padding never routed, pooled or attended
        # Inputs: X = E[s] + P, Z^0 = X (padding rows zeroed), R^0 = 1 on real tokens
        z = self.item_embedding(seqs) + self.position(seqs.shape[1])  # [B, N, d]
        mask = real.unsqueeze(-1).to(z.dtype)  # [B, N, 1]
        z = self.dropout(z) * mask  # [B, N, d]
        route = real.to(z.dtype)  # [B, N] R^0
        # Blocks l = 1..L: Ẑ, R^l = PathMSA(Z, R^{l-1}); post-LN residuals and FFN
        outs = []
        last = last_only and not output_attentions
        for i, block in enumerate(self.blocks):
            final = last and i == len(self.blocks) - 1
            if final:
                mask = mask[:, -1:]  # [B, 1, 1] from here on only the last position
            out = block(z, real, route, output_attentions, last_only=final)
            z, route = out.x, out.route  # [B, N, d], [B, N]
            outs.append(out)
        if self.final_norm is not None:
            z = self.final_norm(z)
        hidden = z * mask  # [B, N, d] Z^L; score(k, t) = e_k · Z^L_t
        return collect_output(hidden, outs, output_attentions)

    def user_representation(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.forward(seqs, last_only=True).hidden[:, -1]  # [B, d]

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(items)  # [..., d] e_k, the input table itself
