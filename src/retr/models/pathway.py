"""Pathway attention (RETR): a learned binary route decides which tokens may ask questions.

Traceable to docs/METHOD.md, "The pathway router" steps 1-5 and "Pathway multi-head
attention". In block l, with the incoming states Z = Z^{l-1} [B, N, d] and route R^{l-1} [B, N]:

    c    = Σ_i R_i Z_i / Σ_i R_i              step 1 (pool over on-route tokens, see "pooling")
    g    = MLP_g(c)                           step 1
    Z_e  = Z + Z ⊙ g                          step 2 (residual fusion)
    π    = Softmax(MLP_π(Z_e)) = [1-α, α]     step 3 (keep/drop probabilities)
    ω    = ReLU(MLP_ω(Z_e))                   step 4 (adaptive Gumbel-Softmax weight)
    R̂    = binary keep decision               step 4 (sample in training, see below)
    R^l  = R̂ ⊙ R^{l-1}                        step 5 (hierarchical update)
    Q = (R^l ⊙ Z) W_Q,  K = Z W_K,  V = Z W_V  pathway MSA: only queries are routed

Decisions where the paper is silent (spec, "Decisions the paper leaves open"):

- pooling="causal" (default): step t pools the on-route tokens i <= t (prefix sums), so a
  causal model never sees the future through its router. pooling="global" is the paper's
  literal pool over all tokens; in a causal model it leaks later items into the route of
  earlier steps (use it for the ablation, or in bidirectional models where it is natural).
- Training: a hard straight-through sample: the forward pass uses the binary R̂, gradients
  flow through the relaxed v. Inference: no noise, keep t iff ω_t log α_t >= ω_t log(1-α_t)
  (with ω_t > 0 that is α_t >= 1/2); inference_route="sample" keeps sampling, for analysis.
- ω = 0 (the ReLU is inactive): the spec's formula then reads y_j = G_j, i.e. the training
  decision is a fair coin whatever α is, and no gradient reaches MLP_π or MLP_ω through that
  token; at inference 0 >= 0 keeps the token. We keep this math as the paper states it. To
  start away from that dead region, the output bias of MLP_ω is initialised to 1, so at
  initialisation ω ≈ 1 and the router behaves like the standard Gumbel-Softmax with τ = 1.
- Padding is never on the route (R^0 = 0 there, and every R̂ is masked), never pooled, and
  never attended to (keys are masked by the attention module).
- router="random" (the paper's "without router" ablation): R̂ ~ Bernoulli(random_keep_prob),
  independent of the input, in training and at inference alike (seed torch for repeatable
  evaluation). There are no router parameters then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from retr.errors import ConfigError
from retr.models.layers import MultiHeadAttention


@dataclass(frozen=True)
class RouterOptions:
    """The router switches shared by every model that can use pathway attention.

    Model configs hold one as their ``pathway`` field; in TOML and config.json its keys sit
    flat in the ``[model]`` table (``model.router = "random"``), as they always have.
    """

    router: str = "learned"  # "learned" (the paper) | "random" (ablation: no learned router)
    random_keep_prob: float = 0.5  # keep probability of the random router
    hierarchical: bool = True  # R^l = R̂^l ⊙ R^{l-1}; False: R^l = R̂^l (dropped tokens may return)
    gumbel: str = "adaptive"  # "adaptive" (learned ω) | "fixed" (standard Gumbel-Softmax, τ)
    tau: float = 1.0  # temperature of the fixed Gumbel-Softmax (unused when adaptive)
    pooling: str = "causal"  # "causal" prefix pool | "global" (the paper's literal pool)
    inference_route: str = "deterministic"  # "deterministic" | "sample" (noise at inference)
    router_hidden: int = 64  # hidden width of the three router MLPs (g, π, ω)

    def __post_init__(self) -> None:
        choices = {"router": ("learned", "random"), "gumbel": ("adaptive", "fixed"),
                   "pooling": ("causal", "global"),
                   "inference_route": ("deterministic", "sample")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"model.{name} must be one of {', '.join(valid)}; "
                                  f"got {getattr(self, name)!r}")
        if not 0.0 <= self.random_keep_prob <= 1.0:
            raise ConfigError(f"model.random_keep_prob must be in [0, 1], got {self.random_keep_prob}")
        if self.tau <= 0:
            raise ConfigError(f"model.tau must be > 0, got {self.tau}")
        if self.router_hidden < 1:
            raise ConfigError(f"model.router_hidden must be >= 1, got {self.router_hidden}")


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """The router's small two-layer MLP (the paper does not say more than "MLP")."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def pool_on_route(z: torch.Tensor, route: torch.Tensor, pooling: str) -> torch.Tensor:
    """Step 1: mean of the on-route states; [B, N, d] per step (causal) or [B, 1, d] (global).

    A step with no on-route token at or before it gets the zero vector.
    """
    w = route.unsqueeze(-1)  # [B, N, 1]
    if pooling == "causal":
        num = torch.cumsum(w * z, dim=1)  # [B, N, d] Σ_{i<=t} R_i Z_i
        den = torch.cumsum(w, dim=1)  # [B, N, 1] Σ_{i<=t} R_i
    else:
        num = (w * z).sum(dim=1, keepdim=True)  # [B, 1, d] Σ_i R_i Z_i
        den = w.sum(dim=1, keepdim=True)  # [B, 1, 1] Σ_i R_i
    return num / den.clamp_min(1.0)  # the route is binary, so den counts tokens


def straight_through_gumbel(scaled_log_pi: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Step 4: binary keep decision [B, N] from ``scaled_log_pi`` [B, N, 2] ([drop, keep]).

    y_j = (s_j + G_j) / τ with G_j = -log(-log U), U ~ Uniform(0, 1); v = Softmax(y).
    Adaptive: s = ω log π, τ = 1. Fixed: s = log π and the given τ.
    The forward value is exactly R̂ = argmax_j y_j; the gradient is that of v_keep.
    """
    u = torch.rand_like(scaled_log_pi).clamp_min(torch.finfo(scaled_log_pi.dtype).tiny)
    gumbel = -torch.log(-torch.log(u))  # [B, N, 2] G
    y = (scaled_log_pi + gumbel) / tau  # [B, N, 2]
    v_keep = y.softmax(dim=-1)[..., 1]  # [B, N] relaxed sample v(keep)
    hard = (y[..., 1] >= y[..., 0]).to(y.dtype)  # [B, N] R̂ = argmax_j y_j
    return hard + (v_keep - v_keep.detach())  # forward: hard; backward: ∂v_keep


class PathwayRouter(nn.Module):
    """Decides the route R^l [B, N] of one block from its input states (steps 1-5)."""

    def __init__(self, dim: int, options: RouterOptions) -> None:
        super().__init__()
        self.options = options
        self.context_mlp: nn.Module | None = None
        self.keep_mlp: nn.Module | None = None
        self.omega_mlp: nn.Sequential | None = None
        if options.router == "learned":
            self.context_mlp = _mlp(dim, options.router_hidden, dim)  # step 1: g
            self.keep_mlp = _mlp(dim, options.router_hidden, 2)  # step 3: logits of π
            if options.gumbel == "adaptive":
                self.omega_mlp = _mlp(dim, options.router_hidden, 1)  # step 4: ω before ReLU
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases whatever the host model uses, and ω ≈ 1.

        With BERT-style N(0, 0.02²) layers the router's first gradients are 10-1000x smaller
        than with Glorot ones (each small layer scales them down), often below Adam's epsilon.
        ω ≈ 1: see the module docstring.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.omega_mlp is not None:
            last = self.omega_mlp[-1]
            assert isinstance(last, nn.Linear)
            nn.init.constant_(last.bias, 1.0)

    def init_with_host(self) -> None:
        """The host model's ``init_weights`` re-draws the router's own initialisation."""
        self.reset_parameters()

    def forward(self, z: torch.Tensor, route_prev: torch.Tensor,
                real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, N, d], route_prev R^{l-1} [B, N] (0/1), real [B, N] -> (R^l, α) each [B, N]."""
        opts = self.options
        mask = real.to(z.dtype)  # [B, N] 1 at real tokens
        if self.context_mlp is None or self.keep_mlp is None:
            # ablation "random": R̂ ~ Bernoulli(p), no dependence on the input
            keep_prob = torch.full_like(mask, opts.random_keep_prob) * mask  # [B, N]
            sample = (torch.rand_like(mask) < opts.random_keep_prob).to(z.dtype)  # [B, N]
        else:
            # steps 1-2: global context of the on-route tokens, fused back into every token
            context = pool_on_route(z, route_prev, opts.pooling)  # [B, N|1, d]
            g = self.context_mlp(context)  # [B, N|1, d]
            z_emb = z + z * g  # [B, N, d] Z_emb = Z + Z ⊙ g
            # step 3: π = Softmax(MLP(Z_emb)) = [1-α, α], kept in log space for stability
            log_pi = F.log_softmax(self.keep_mlp(z_emb), dim=-1)  # [B, N, 2]
            keep_prob = log_pi[..., 1].exp() * mask  # [B, N] α
            # step 4: adaptive weight ω = ReLU(MLP(Z_emb)), or the fixed-τ ablation
            if self.omega_mlp is not None:
                omega = F.relu(self.omega_mlp(z_emb))  # [B, N, 1] ω
                scaled, tau = omega * log_pi, 1.0  # [B, N, 2] ω log π
            else:
                scaled, tau = log_pi, opts.tau  # [B, N, 2] log π, divided by τ below
            if self.training or opts.inference_route == "sample":
                sample = straight_through_gumbel(scaled, tau)  # [B, N] hard, ST gradient
            else:
                # inference: keep iff ω log α >= ω log(1-α) (fixed: log α >= log(1-α))
                sample = (scaled[..., 1] >= scaled[..., 0]).to(z.dtype)  # [B, N]
        # step 5: hierarchical update R^l = R̂^l ⊙ R^{l-1}; otherwise only padding is masked
        base = route_prev if opts.hierarchical else mask
        return sample * base, keep_prob  # [B, N], [B, N]


class PathwayAttention(nn.Module):
    """Pathway MSA: Q = (R^l ⊙ Z) W_Q, K = Z W_K, V = Z W_V (spec "Pathway multi-head attention").

    ``attention`` is the host model's multi-head attention (causal or not, with or without an
    output projection), so pathway attention is a drop-in replacement of self-attention: the
    only change is that an off-route token's query is built from the zero vector.
    """

    routed: ClassVar[bool] = True  # TransformerBlock passes the route in and takes R^l back

    def __init__(self, attention: MultiHeadAttention, router: PathwayRouter) -> None:
        super().__init__()
        self.attention = attention
        self.router = router

    def forward(self, query_in: torch.Tensor, kv_in: torch.Tensor, real: torch.Tensor,
                route_prev: torch.Tensor, output_attentions: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """-> (output [B, N, d], weights [B, h, N, N] | None, route R^l [B, N], α [B, N])."""
        route, keep_prob = self.router(query_in, route_prev, real)  # [B, N], [B, N]
        routed = route.unsqueeze(-1) * query_in  # [B, N, d] R^l ⊙ Z
        out, weights = self.attention(routed, kv_in, real, output_attentions)  # [B, N, d]
        return out, weights, route, keep_prob


def attention_module(dim: int, heads: int, dropout: float, causal: bool, out_proj: bool,
                     pathway: RouterOptions | None) -> nn.Module:
    """A block's attention: multi-head self-attention, or pathway attention around it when
    ``pathway`` options are given (the host model's other choices stay the same)."""
    attention = MultiHeadAttention(dim, heads, dropout, causal, out_proj)
    if pathway is None:
        return attention
    return PathwayAttention(attention, PathwayRouter(dim, pathway))
