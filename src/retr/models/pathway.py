"""Pathway attention (RETR): a learned binary route decides which tokens may ask questions.

Traceable to docs/METHOD.md, "The pathway router" steps 1-5 and "Pathway multi-head
attention". In block l, with the incoming states Z = Z^{l-1} [B, N, d] and route R^{l-1} [B, N]:

    c    = Σ_i R_i Z_i / Σ_i R_i              step 1 (pool over on-route tokens, see "pooling")
    g    = MLP_g(c)                           step 1
    Z_e  = Z + Z ⊙ g                          step 2 (residual fusion)
    π    = Softmax(MLP_π(Z_e)) = [1-α, α]     step 3 (keep/drop probabilities)
    ω    = ReLU(MLP_ω(Z_e))                   step 4 (adaptive Gumbel-Softmax weight)
    R̂    = argmax_j (log π_j + G_j)           step 4 (equation 3; sampled in training)
    v    = Softmax(ω log π + G)               step 4 (the relaxed sample: gradient only)
    R^l  = R̂ ⊙ R^{l-1}                        step 5 (hierarchical update)
    Q = (R^l ⊙ Z) W_Q,  K = Z W_K,  V = Z W_V  pathway MSA: only queries are routed

The paper's choices are the defaults; every other behaviour is a RouterOptions switch:

- route_sample="paper" (default): the hard decision is argmax(log π + G), i.e. keep with
  probability α, and ω enters only the relaxed v that carries the gradient (the same Gumbel
  noise G in both). route_sample="weighted" draws argmax(ω log π + G) instead, i.e. keep with
  probability σ(ω·logit α): what the code did before, reproduced bit for bit (runs written
  before the option existed load with it). With gumbel="fixed" both read argmax(log π + G).
- Inference (inference_rule="mode", default): no noise, keep t iff the decision it would be
  drawn with is more likely keep than drop: α_t >= 1/2 under the paper's sampling whatever
  ω is; under "weighted", ω_t log α_t >= ω_t log(1-α_t) (ties keep, so ω_t = 0 keeps).
  inference_route="sample" keeps sampling at inference, for analysis.
- query_bias="on_route" (default): Q = (R ⊙ Z) W_Q + R ⊙ b_Q, so an off-route query is the
  zero vector and its attention is uniform over its causal prefix, as Q = (R ⊙ Z) W_Q reads;
  on-route queries are exactly the host's. query_bias="always" adds b_Q to every query (an
  off-route token then asks a learned, key-dependent question b_Q): the earlier behaviour.
- pooling="causal" (default): step t pools the on-route tokens i <= t (prefix sums), so a
  causal model never sees the future through its router. pooling="global" is the paper's
  literal pool over all tokens; in a causal model it leaks later items into the route of
  earlier steps (use it for the ablation, or in bidirectional models where it is natural).
- ω = 0 (the ReLU is inactive): under the paper's sampling the decision is still drawn with
  α but no gradient reaches MLP_π or MLP_ω through that token (v = Softmax(G)); under
  "weighted" the decision is a fair coin. To start away from that region, the output bias of
  MLP_ω is initialised to 1 (ω ≈ 1: the standard Gumbel-Softmax with τ = 1 at first).
- Padding is never on the route (R^0 = 0 there, and every R̂ is masked), never pooled, and
  never attended to (keys are masked by the attention module).
- router="random" (the paper's "without router" ablation): R̂ ~ Bernoulli(random_keep_prob),
  independent of the input, in training and at inference alike (seed torch for repeatable
  evaluation). There are no router parameters then.

Beyond the paper (ours, all off by default; docs/METHOD.md, "A pathway budget"):

- omega_floor: ω = floor + ReLU(MLP_ω(Z_e)), closing the ω = 0 dead zone.
- keep_target ρ with keep_weight λ: a penalty λ (E[keep] - ρ)² per row and layer, with
  E[keep] = mean over real t of P(keep t) · R^{l-1}_t (the route so far carries the
  straight-through gradient, so the hierarchy is in the expectation), averaged over layers.
- inference_rule="topk": keep t iff it is among the round(ρ n_t) candidates (on the route so
  far) of its own prefix i <= t with the highest keep score (n_t real tokens <= t): a rate-ρ
  rule that never looks ahead, so causality holds at every position.
- inference_rule="threshold": keep t iff its keep score reaches θ, a running estimate (kept
  with the weights) of the score that a share ρ of the real tokens reach in training batches
  (per layer, among the candidates still on the route; updated after each batch's route, so
  a route never depends on other tokens' scores): a per-token rule, so causal, and robust to
  scores that trend along the window.
- router_target="attention": the router is distilled from the attention each token would
  receive from the later queries of its layer if every query were on the route (relative to
  uniform attention; cross-entropy between the window's softmax of the keep logits and that
  normalised received attention), and the route is the rate-ρ rule (topk or threshold) in
  training and at inference alike (the task loss no longer reaches the router).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from retr.errors import ConfigError
from retr.models.kernels import CHUNK_BYTES
from retr.models.layers import MultiHeadAttention, RouteInfo, exporting

# Values that RouterOptions keys added after release 0.1.0 had before they were options: a
# config.json without the key was written by code that behaved like this.
LEGACY_OPTIONS: dict[str, object] = {"route_sample": "weighted", "query_bias": "always"}


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
    route_sample: str = "paper"  # "paper": argmax(log π + G) | "weighted": argmax(ω log π + G)
    query_bias: str = "on_route"  # "on_route": off-route query = 0 | "always": b_Q for all
    # ours, beyond the paper (all off by default)
    omega_floor: float = 0.0  # ω = floor + ReLU(MLP_ω): > 0 closes the ω = 0 dead zone
    keep_target: float = 0.0  # ρ, the target keep rate of the budget (0 = no budget)
    keep_weight: float = 0.0  # λ of the penalty λ (E[keep] - ρ)² (needs keep_target)
    inference_rule: str = "mode"  # "mode" (α >= 1/2, the paper) | "topk" | "threshold" (ours)
    router_target: str = "task"  # "task" (the paper) | "attention" (distilled, rule-drawn route)
    distill_weight: float = 1.0  # weight of the distillation loss (router_target="attention")
    distill_source: str = "later"  # "later": attention from every later query | "last": the
    # window's last query (the one that predicts at test time), itself included
    sparse_below: float = 0.75  # compute only (ours): below this share of tokens on the route,
    # skip the off-route queries' work (same outputs; benchmarks/pathway_speed.py measured it)
    router_recompute: bool = False  # compute only (ours): recompute the router's MLPs in the
    # backward pass instead of keeping their activations (less memory, slower training)
    gate: str = "queries"  # "queries": the route gates queries (the paper) | "keys" (ours): it
    # gates the keys every query may read (itself always), so dropping a token changes the
    # predictions of the later positions

    def __post_init__(self) -> None:
        choices = {"router": ("learned", "random"), "gumbel": ("adaptive", "fixed"),
                   "pooling": ("causal", "global"),
                   "inference_route": ("deterministic", "sample"),
                   "route_sample": ("paper", "weighted"), "query_bias": ("on_route", "always"),
                   "inference_rule": ("mode", "topk", "threshold"),
                   "distill_source": ("later", "last"),
                   "router_target": ("task", "attention"), "gate": ("queries", "keys")}
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
        if not 0.0 <= self.sparse_below <= 1.0:
            raise ConfigError(f"model.sparse_below must be in [0, 1], got {self.sparse_below}")
        if self.omega_floor < 0:
            raise ConfigError(f"model.omega_floor must be >= 0, got {self.omega_floor}")
        if not 0.0 <= self.keep_target <= 1.0:
            raise ConfigError(f"model.keep_target must be in [0, 1] (0 = no budget), "
                              f"got {self.keep_target}")
        if self.keep_weight < 0 or self.distill_weight < 0:
            raise ConfigError("model.keep_weight and model.distill_weight must be >= 0")
        budgeted = self.keep_weight > 0 or self.inference_rule != "mode" \
            or self.router_target == "attention"
        if budgeted and self.keep_target == 0.0:
            raise ConfigError("model.keep_weight, model.inference_rule='topk'/'threshold' and "
                              "model.router_target='attention' need a model.keep_target in (0, 1]")
        if budgeted and self.router == "random":
            raise ConfigError("the random router has no keep budget: use "
                              "model.random_keep_prob to set its keep rate")
        if self.router_target == "attention" and self.inference_rule == "mode":
            raise ConfigError("model.router_target='attention' routes by a rate-ρ rule in "
                              "training and at inference: set model.inference_rule to 'topk' "
                              "or 'threshold'")

    @property
    def budget(self) -> bool:
        """Whether the training loss carries the keep-rate penalty."""
        return self.keep_weight > 0 and self.router_target == "task"


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


def straight_through_gumbel(scaled_log_pi: torch.Tensor, tau: float = 1.0,
                            log_pi: torch.Tensor | None = None) -> torch.Tensor:
    """Step 4: binary keep decision [B, N] from ``scaled_log_pi`` [B, N, 2] ([drop, keep]).

    y_j = (s_j + G_j) / τ with G_j = -log(-log U), U ~ Uniform(0, 1); v = Softmax(y).
    Adaptive: s = ω log π, τ = 1. Fixed: s = log π and the given τ.
    The forward value is R̂ = argmax_j (log π_j + G_j) when ``log_pi`` is given (the paper's
    equation 3: keep with probability α), otherwise argmax_j y_j (the "weighted" sampling);
    the gradient is that of v_keep either way, and both use the same noise G.
    """
    u = torch.rand_like(scaled_log_pi).clamp_min(torch.finfo(scaled_log_pi.dtype).tiny)
    gumbel = -torch.log(-torch.log(u))  # [B, N, 2] G
    y = (scaled_log_pi + gumbel) / tau  # [B, N, 2]
    v_keep = y.softmax(dim=-1)[..., 1]  # [B, N] relaxed sample v(keep)
    decide = y if log_pi is None else log_pi + gumbel  # [B, N, 2]
    hard = (decide[..., 1] >= decide[..., 0]).to(y.dtype)  # [B, N] R̂
    return hard + (v_keep - v_keep.detach())  # forward: hard; backward: ∂v_keep


def causal_topk(score: torch.Tensor, candidates: torch.Tensor, real: torch.Tensor,
                rate: float) -> torch.Tensor:
    """[B, N] 0/1: t is kept iff it is a candidate ranked among the round(rate · n_t) best
    candidates i <= t by ``score`` (ties: the earlier first), n_t = real tokens <= t.

    Every decision reads the prefix only, so a later token never changes an earlier one.
    Rounding (half up) rather than ⌈·⌉ keeps the rate near ``rate`` for scores in random
    order (⌈·⌉ keeps 0.29 of a 50-token window at rate 0.25, rounding 0.26); a score that
    rises or falls along the window moves the rate (every token beats its prefix, or none).
    score [B, N], candidates and real [B, N] bool.
    """
    n = score.shape[1]
    idx = torch.arange(n, device=score.device)
    upto = idx[None, :] <= idx[:, None]  # [N(t), N(i)] i <= t
    s_t, s_i = score[:, :, None], score[:, None, :]  # [B, N, 1], [B, 1, N]
    before = (s_i > s_t) | ((s_i == s_t) & (idx[None, :] < idx[:, None]))  # [B, N, N]
    rank = (before & upto & candidates[:, None, :]).sum(dim=-1)  # [B, N] better candidates
    n_t = torch.cumsum(real.to(torch.int64), dim=1)  # [B, N]
    quota = torch.floor(n_t.to(torch.float64) * rate + 0.5)  # [B, N] ρ n_t rounded half up
    return (candidates & (rank < quota)).to(score.dtype)  # [B, N]


def received_attention_loss(keep_logit: torch.Tensor, weights: torch.Tensor,
                            route: torch.Tensor, real: torch.Tensor,
                            source: str = "later") -> torch.Tensor:
    """[B] distillation loss of router_target="attention" (ours).

    Target: how much attention each real token i receives from the later on-route queries
    j > i of this layer (heads averaged), each query's weights scaled by its number of keys
    (so a uniform query gives every key 1, whatever its position) and averaged over those
    queries; normalised over the window. Prediction: the softmax of the keep logits over the
    window's real tokens; loss: their cross-entropy. A row with no later on-route query has
    no target and loss 0. weights [B, h, N, N] (query, key), the rest [B, N].
    ``source="last"``: the target is the attention of the window's last query alone (every
    token up to and including itself), the query that scores the next item at test time;
    weights may then hold that query's row alone, [B, h, 1, N].
    """
    n = weights.shape[-1]
    att = weights.detach().mean(dim=1)  # [B, N(j), N(i)]
    keys = (att > 0).sum(dim=-1, keepdim=True).clamp_min(1)  # [B, N, 1] keys each query read
    if source == "last":
        received = att[:, -1] * real  # [B, N] the last query's attention
    else:
        later = torch.ones(n, n, dtype=torch.bool, device=weights.device).tril(-1)  # j > i
        asking = route.detach().unsqueeze(-1) * later  # [B, N, N] later on-route queries
        lift = (asking * att * keys).sum(dim=1)  # [B, N] Σ_j R_j n_j A[j, i]
        count = asking.sum(dim=1)  # [B, N] how many later on-route queries
        received = lift / count.clamp_min(1.0) * real  # [B, N]
    total = received.sum(dim=1, keepdim=True)  # [B, 1]
    target = received / total.clamp_min(1e-12)  # [B, N]
    log_q = keep_logit.masked_fill(~real, float("-inf")).log_softmax(dim=1)  # [B, N]
    log_q = torch.where(real, log_q, torch.zeros_like(log_q))
    return -(target * log_q).sum(dim=1) * (total.squeeze(1) > 0)  # [B]


class PathwayRouter(nn.Module):
    """Decides the route R^l [B, N] of one block from its input states (steps 1-5)."""

    threshold: torch.Tensor | None
    threshold_updates: torch.Tensor

    def __init__(self, dim: int, options: RouterOptions) -> None:
        super().__init__()
        self.options = options
        self.sample_routes = False  # eval mode draws like training (see ``training_routes``)
        if options.inference_rule == "threshold":  # θ of the threshold rule, and its updates
            self.register_buffer("threshold", torch.zeros(()))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))
        else:
            self.threshold = None
        self.context_mlp: nn.Module | None = None
        self.keep_mlp: nn.Module | None = None
        self.omega_mlp: nn.Sequential | None = None
        if options.router == "learned":
            self.context_mlp = _mlp(dim, options.router_hidden, dim)  # step 1: g
            self.keep_mlp = _mlp(dim, options.router_hidden, 2)  # step 3: logits of π
            if options.gumbel == "adaptive" and options.router_target == "task":
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

    def last_route(self, z: torch.Tensor, route_prev: torch.Tensor,
                   real: torch.Tensor) -> torch.Tensor:
        """R^l [B, 1] of the last token alone, as :meth:`forward` decides it in evaluation.

        Its decision reads its own keep probability and the pool of the on-route tokens up to
        it (the whole window): O(N d) instead of the router's MLPs over every token. Rules that
        read other tokens' scores (the causal top-k), training-style draws and the random router
        take the full router and keep its last column.
        """
        opts = self.options
        sampling = self.training or self.sample_routes or opts.inference_route == "sample"
        if sampling or opts.inference_rule == "topk" or self.context_mlp is None \
                or self.keep_mlp is None:
            return self.forward(z, route_prev, real)[0][:, -1:]
        mask = real[:, -1:].to(z.dtype)  # [B, 1]
        base = route_prev[:, -1:] if opts.hierarchical else mask  # [B, 1]
        w = route_prev.unsqueeze(-1)  # [B, N, 1]
        if opts.pooling == "causal":  # the prefix pool at the last step: every on-route token
            context = (w * z).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
        else:
            context = pool_on_route(z, route_prev, opts.pooling)  # [B, 1, d]
        log_pi, omega = self._heads(z[:, -1:], context)  # [B, 1, 2], [B, 1, 1] or None
        weighted = opts.route_sample == "weighted" and omega is not None
        scaled = omega * log_pi if omega is not None and weighted else log_pi  # its log odds
        if self.threshold is not None:  # the calibrated threshold on the sampling score
            sample = (scaled[..., 1] - scaled[..., 0] >= self.threshold).to(z.dtype)
        else:  # α >= 1/2, or ω log α >= ω log(1-α) under the weighted sampling
            sample = (scaled[..., 1] >= scaled[..., 0]).to(z.dtype)
        return sample * base * mask  # [B, 1]

    def _scores(self, z: torch.Tensor, route_prev: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-4 before the draw: (log π [B, N, 2], ω [B, N, 1] or None for the fixed
        Gumbel-Softmax). A pure function of its inputs, so with ``router_recompute`` training
        recomputes it in the backward pass rather than keep its [B, N, hidden] activations
        (ours; the same values and gradients, the router's memory a few [B, N] tensors)."""
        # steps 1-2: global context of the on-route tokens, fused back into every token
        context = pool_on_route(z, route_prev, self.options.pooling)  # [B, N|1, d]
        return self._heads(z, context)

    def _recomputed_scores(self, z: torch.Tensor, route_prev: torch.Tensor,
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_scores`` recomputed in the backward pass, a slice of users at a time: each slice
        is its own checkpoint, so the backward pass rebuilds one slice's [b, N, hidden]
        activations (about eight tensors) at once, under ``CHUNK_BYTES``. Every row's route
        depends on that row alone, so the slices give the same values and gradients."""
        b, n, d = z.shape
        per = max(1, CHUNK_BYTES // (32 * n * max(d, self.options.router_hidden)))
        parts = [checkpoint(self._scores, z[s:s + per], route_prev[s:s + per],
                            use_reentrant=False, preserve_rng_state=False)
                 for s in range(0, b, per)]
        if len(parts) == 1:
            return parts[0]
        log_pi = torch.cat([part[0] for part in parts])  # [B, N, 2]
        ws = [part[1] for part in parts]
        return log_pi, None if ws[0] is None else torch.cat([w for w in ws if w is not None])

    def _heads(self, z: torch.Tensor, context: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 2-4 for the tokens ``z`` [B, n, d] given their context [B, n|1, d]."""
        assert self.context_mlp is not None and self.keep_mlp is not None
        z_emb = z + z * self.context_mlp(context)  # [B, n, d] Z_emb = Z + Z ⊙ g
        # step 3: π = Softmax(MLP(Z_emb)) = [1-α, α], kept in log space for stability
        log_pi = F.log_softmax(self.keep_mlp(z_emb), dim=-1)  # [B, n, 2]
        # step 4: adaptive weight ω = ReLU(MLP(Z_emb)) (+ floor), or the fixed-τ ablation
        if self.omega_mlp is None:
            return log_pi, None
        return log_pi, self.options.omega_floor + F.relu(self.omega_mlp(z_emb))  # ω [B, n, 1]

    def forward(self, z: torch.Tensor, route_prev: torch.Tensor,
                real: torch.Tensor) -> tuple[torch.Tensor, RouteInfo, torch.Tensor | None]:
        """z [B, N, d], route_prev R^{l-1} [B, N] (0/1), real [B, N] -> (R^l [B, N], RouteInfo
        without its aux loss, keep logit [B, N] or None for the random router)."""
        opts = self.options
        mask = real.to(z.dtype)  # [B, N] 1 at real tokens
        base = route_prev if opts.hierarchical else mask  # [B, N] what R̂ is multiplied by
        sampling = self.training or self.sample_routes or opts.inference_route == "sample"
        omega = keep_logit = None
        if self.context_mlp is None or self.keep_mlp is None:
            # ablation "random": R̂ ~ Bernoulli(p), no dependence on the input
            keep_prob = torch.full_like(mask, opts.random_keep_prob) * mask  # [B, N]
            sample_prob = keep_prob
            sample = (torch.rand_like(mask) < opts.random_keep_prob).to(z.dtype)  # [B, N]
        else:
            # steps 1-4 up to the draw: log π [B, N, 2] and ω [B, N, 1] (or None)
            if opts.router_recompute and torch.is_grad_enabled() and not exporting():
                log_pi, w = self._recomputed_scores(z, route_prev)
            else:
                log_pi, w = self._scores(z, route_prev)
            keep_prob = log_pi[..., 1].exp() * mask  # [B, N] α
            keep_logit = log_pi[..., 1] - log_pi[..., 0]  # [B, N] log α - log(1-α)
            if w is not None:
                omega = w.squeeze(-1) * mask  # [B, N]
                scaled, tau = w * log_pi, 1.0  # [B, N, 2] ω log π
            else:
                scaled, tau = log_pi, opts.tau  # [B, N, 2] log π, divided by τ below
            paper = opts.route_sample == "paper"
            # the probability the training decision keeps t: α, or σ(ω·logit) when weighted
            # (with the fixed Gumbel-Softmax both samplings keep with probability α)
            weighted = not paper and self.omega_mlp is not None
            sample_logit = scaled[..., 1] - scaled[..., 0] if weighted else keep_logit  # [B, N]
            sample_prob = torch.sigmoid(sample_logit) * mask  # [B, N]
            candidates = real & (base > 0.5)  # [B, N] still on the route
            if opts.router_target == "attention" or (opts.inference_rule != "mode"
                                                     and not sampling):
                # the rate-ρ rules (ours): causal top round(ρ n_t), or the calibrated θ
                score = sample_logit.detach()  # [B, N]
                if self.threshold is not None:
                    sample = ((score >= self.threshold) & candidates).to(z.dtype)
                else:
                    sample = causal_topk(score, candidates, real, opts.keep_target)
            elif sampling:
                sample = straight_through_gumbel(scaled, tau, log_pi if paper else None)
            elif paper:
                sample = (log_pi[..., 1] >= log_pi[..., 0]).to(z.dtype)  # α >= 1/2
            else:
                # weighted: ω log α >= ω log(1-α) (ties, e.g. ω = 0, keep)
                sample = (scaled[..., 1] >= scaled[..., 0]).to(z.dtype)  # [B, N]
            if self.threshold is not None and self.training:
                # after this batch's route: a route never depends on the other tokens' scores
                self._calibrate(sample_logit.detach(), candidates, real)
        # step 5: hierarchical update R^l = R̂^l ⊙ R^{l-1}; otherwise only padding is masked
        return sample * base, RouteInfo(keep_prob, sample_prob, omega, None), keep_logit

    @torch.no_grad()
    def _calibrate(self, score: torch.Tensor, candidates: torch.Tensor,
                   real: torch.Tensor) -> None:
        """θ <- 0.9 θ + 0.1 q (q on the first batch): q is the score reached by a share ρ of the
        batch's real tokens, among the candidates (all of them when they are fewer)."""
        assert self.threshold is not None
        values = score[candidates].float()  # [C]
        if not len(values):
            return
        share = min(1.0, self.options.keep_target * float(real.sum()) / len(values))
        q = torch.quantile(values, 1.0 - share)
        first = bool(self.threshold_updates == 0)
        self.threshold.copy_(q if first else 0.9 * self.threshold + 0.1 * q)
        self.threshold_updates += 1

    def budget_penalty(self, sample_prob: torch.Tensor, route_prev: torch.Tensor,
                       real: torch.Tensor) -> torch.Tensor:
        """[B] λ (E[keep] - ρ)² per row (ours): E[keep] = mean over real t of the keep
        probability times the route so far (which carries its straight-through gradient)."""
        opts = self.options
        mask = real.to(sample_prob.dtype)  # [B, N]
        base = route_prev if opts.hierarchical else mask  # [B, N]
        count = mask.sum(dim=1)  # [B]
        expected = (sample_prob * base).sum(dim=1) / count.clamp_min(1.0)  # [B]
        return opts.keep_weight * (expected - opts.keep_target) ** 2 * (count > 0)  # [B]


def inference_rule_text(options: RouterOptions) -> str:
    """In words, the rule that decides a token's route when the model runs in eval mode."""
    if options.router == "random":
        return f"random: kept with probability {options.random_keep_prob:g}, drawn at inference too"
    if options.inference_route == "sample":
        return "drawn as in training (inference_route = sample): the route changes between calls"
    if options.inference_rule == "topk":
        return (f"kept iff among the round({options.keep_target:g} x n_t) highest keep "
                "probabilities of its own prefix (top-k, ours)")
    if options.inference_rule == "threshold":
        return (f"kept iff its keep probability reaches the threshold a share "
                f"{options.keep_target:g} reached in training (ours)")
    if options.route_sample == "weighted" and options.gumbel == "adaptive":
        return "kept iff the drawn probability sigma(omega x logit alpha) >= 1/2 (omega = 0 keeps)"
    return "kept iff alpha >= 1/2 (the paper's sampling: the drawn probability is alpha)"


@contextmanager
def training_routes(model: nn.Module) -> Iterator[None]:
    """Inside, every router of ``model`` draws its route as in training (noise, or the top-k
    rule), while the rest of the model stays in its mode (no dropout in eval)."""
    routers = [m for m in model.modules() if isinstance(m, PathwayRouter)]
    for r in routers:
        r.sample_routes = True
    try:
        yield
    finally:
        for r in routers:
            r.sample_routes = False


class PathwayAttention(nn.Module):
    """Pathway MSA: Q = (R^l ⊙ Z) W_Q, K = Z W_K, V = Z W_V (spec "Pathway multi-head attention").

    ``attention`` is the host model's multi-head attention (causal or not, with or without an
    output projection), so pathway attention is a drop-in replacement of self-attention: the
    only change is that an off-route token's query is built from the zero vector (with
    query_bias="on_route" the bias is routed too, so that query is exactly zero).
    """

    routed: ClassVar[bool] = True  # TransformerBlock passes the route in and takes R^l back

    def __init__(self, attention: MultiHeadAttention, router: PathwayRouter) -> None:
        super().__init__()
        self.attention = attention
        self.router = router

    def _sparse(self, route: torch.Tensor, real: torch.Tensor, output_attentions: bool) -> bool:
        """Whether to skip the off-route queries' work (ours; the same outputs and gradients,
        see ``MultiHeadAttention.forward_active``): an off-route query must be exactly zero
        (query_bias="on_route") and the route binary, no weights asked for, no export, and few
        enough tokens on the route (``sparse_below``: above it the dense path is faster).
        A straight-through route qualifies: its gradient comes from a linear-attention sum."""
        opts = self.router.options
        if output_attentions or exporting() or opts.query_bias != "on_route" \
                or opts.gate == "keys":
            return False
        kept = float(route.detach().sum()) / max(float(real.sum()), 1.0)
        if kept >= self.router.options.sparse_below:
            return False
        return bool(((route == 0) | (route == 1)).all())

    def forward(self, query_in: torch.Tensor, kv_in: torch.Tensor, real: torch.Tensor,
                route_prev: torch.Tensor, output_attentions: bool = False,
                last_only: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, RouteInfo]:
        """-> (output [B, N, d], weights [B, h, N, N] | None, route R^l [B, N], RouteInfo).

        ``last_only``: the output [B, 1, d] and route [B, 1] of the last position alone (the
        router still reads every token), for a last block whose other outputs nobody reads.
        """
        opts = self.router.options
        if last_only and opts.gate == "keys":  # the last query reads every gated key
            route = self.router(query_in, route_prev, real)[0]  # [B, N]
            out, _ = self.attention(query_in[:, -1:], kv_in, real, key_gate=route)  # [B, 1, d]
            nothing = torch.zeros_like(route[:, -1:])
            return out, None, route[:, -1:], RouteInfo(nothing, nothing, None, None)
        if last_only:
            route = self.router.last_route(query_in, route_prev, real)  # [B, 1]
            gate = route if opts.query_bias == "on_route" else None
            out, _ = self.attention(route.unsqueeze(-1) * query_in[:, -1:], kv_in, real,
                                    query_gate=gate)  # [B, 1, d]
            nothing = torch.zeros_like(route)
            return out, None, route, RouteInfo(nothing, nothing, None, None)
        route, info, keep_logit = self.router(query_in, route_prev, real)  # [B, N]
        if opts.gate == "keys":  # every query; the route decides which keys they may read
            out, weights = self.attention(query_in, kv_in, real, output_attentions,
                                          key_gate=route)  # [B, N, d]
        elif self._sparse(route, real, output_attentions):
            out = self.attention.forward_active(query_in, kv_in, real, route)
            weights = None
        else:
            routed = route.unsqueeze(-1) * query_in  # [B, N, d] R^l ⊙ Z
            gate = route if opts.query_bias == "on_route" else None  # [B, N]: bias on route only
            out, weights = self.attention(routed, kv_in, real, output_attentions,
                                          query_gate=gate)  # [B, N, d]
        aux: torch.Tensor | None = None
        if self.training and opts.budget:
            aux = self.router.budget_penalty(info.sample_prob, route_prev, real)  # [B]
        if self.training and opts.router_target == "attention" and keep_logit is not None:
            with torch.no_grad():  # the teacher: every query on the route (the last one alone
                last = opts.distill_source == "last"  # is O(N) where all of them are O(N²))
                teacher = self.attention.attention_weights(
                    query_in[:, -1:] if last else query_in, kv_in, real)  # [B, h, 1|N, N]
            aux = opts.distill_weight * received_attention_loss(
                keep_logit, teacher, real.to(route.dtype), real, opts.distill_source)
        if not output_attentions:
            weights = None
        return out, weights, route, info._replace(aux_loss=aux)


def attention_module(dim: int, heads: int, dropout: float, causal: bool, out_proj: bool,
                     pathway: RouterOptions | None) -> nn.Module:
    """A block's attention: multi-head self-attention, or pathway attention around it when
    ``pathway`` options are given (the host model's other choices stay the same)."""
    attention = MultiHeadAttention(dim, heads, dropout, causal, out_proj)
    if pathway is None:
        return attention
    return PathwayAttention(attention, PathwayRouter(dim, pathway))
