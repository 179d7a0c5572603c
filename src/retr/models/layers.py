"""Small blocks shared by the sequential recommenders, kept here so each model file reads alone.

Every block takes left-padded inputs together with ``real`` [B, N] (True at real tokens,
False at padding id 0). Padding never serves as a key and its query outputs are zeroed, so a
padding position can never change a real one, and an all-padding row stays finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from retr.config import check_choices
from retr.errors import ConfigError
from retr.models.base import ModelOutput
from retr.models.kernels import (
    ATTENTION_CHUNK,
    CHUNK_BYTES,
    autocast_dtype,
    causal_linear_attention,
    chunk_rows,
    chunked_attention,
    dropout,
    dropout_attention,
    query_mask,
)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, e.g. to check that the router is light."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _init_weight(tensor: torch.Tensor, scheme: str, std: float) -> None:
    if scheme == "xavier":
        nn.init.xavier_uniform_(tensor)  # Glorot uniform, TensorFlow's default (official SASRec)
    else:
        nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)  # BERT's truncated normal


def init_weights(root: nn.Module, scheme: str = "normal", std: float = 0.02,
                 embedding_std: float | None = None) -> None:
    """Initialise Linear / Embedding / LayerNorm under ``root`` (biases 0, LayerNorm 1 and 0).

    A module that defines ``init_with_host()`` owns its initialisation: that method runs in
    place of the scheme and its subtree is not visited. The item encoder keeps what it has (it
    may be a pretrained text encoder); pathway routers re-draw their own (see
    ``PathwayRouter.reset_parameters``). ``embedding_std`` overrides the scheme for the other
    embeddings (positions).
    """

    def visit(module: nn.Module) -> None:
        own = getattr(module, "init_with_host", None)
        if callable(own):
            own()
            return
        for child in module.children():
            visit(child)
        if isinstance(module, nn.Linear):
            _init_weight(module.weight, scheme, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if embedding_std is None:
                _init_weight(module.weight, scheme, std)
            else:
                _init_weight(module.weight, "normal", embedding_std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    visit(root)


class ItemEmbedding(nn.Module):
    """The item representation module: the only way models see items.

    Row 0 is padding (the zero vector, never updated); rows 1..n_items are the items; rows
    n_items+1.. are extra special tokens (BERT4Rec's [mask]). Models call ``forward(ids)`` and
    ``all_items()`` only, so another encoder (e.g. from item text) can replace this one without
    touching any model file.
    """

    def __init__(self, n_items: int, dim: int, n_special: int = 0, init: str = "normal",
                 std: float = 0.02) -> None:
        super().__init__()
        self.n_items = n_items
        self.n_special = n_special
        self.dim = dim
        self.init = init
        self.std = std
        self.table = nn.Embedding(n_items + 1 + n_special, dim, padding_idx=0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_weight(self.table.weight, self.init, self.std)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def init_with_host(self) -> None:
        """The host model's ``init_weights`` leaves the item vectors as they are."""

    def special_id(self, k: int = 0) -> int:
        """Id of the k-th special token (after the items)."""
        if not 0 <= k < self.n_special:
            raise IndexError(f"special token {k} of {self.n_special}")
        return self.n_items + 1 + k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., d] vectors of ``ids`` (padding -> 0)."""
        return self.table(ids)

    def all_items(self) -> torch.Tensor:
        """[n_items + 1, d]: row i is item i (row 0 = padding); special tokens excluded."""
        return self.table.weight[: self.n_items + 1]


class PositionalEmbedding(nn.Module):
    """Learnable positions P ∈ R^{max_len×d}, aligned to the right end of the window.

    The most recent item always gets row max_len-1, the one before it max_len-2, ..., so a
    history is encoded the same way whatever the window length or amount of left padding (with
    N = max_len this is exactly the usual absolute position of the padded window).
    """

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.table = nn.Embedding(max_len, dim)

    def forward(self, n: int) -> torch.Tensor:
        """[n, d] positions of a window of length n."""
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}; "
                             "cut histories to the most recent max_len items")
        return self.table.weight[self.max_len - n:]


class Dropout(nn.Module):
    """``dropout`` as a module (the drop-in for ``nn.Dropout`` in every model)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Position-wise FFN(x) = Dropout(W2 Dropout(act(W1 x + b1)) + b2)."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act: nn.Module = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))  # [B, N, d]


@dataclass(frozen=True)
class BlockOptions:
    """Transformer-block switches beyond the papers (ours to offer; each default is the paper's
    block). Model configs hold one as their ``block`` field; its keys sit flat in ``[model]``.

    layout: "paper" (the model's own: RETR post-LN, SASRec's official pre-LN) or "prenorm"
    (the usual pre-norm layer with a final norm). norm_type: "layernorm" or "rmsnorm".
    ffn_type: "paper" (the model's ReLU FFN) or "swiglu". residual: "plain" or "gated"
    (LiGR's gated residuals, Gu et al. 2025, as eSASRec uses them; pre-norm layouts only).
    """

    layout: str = "paper"
    norm_type: str = "layernorm"
    ffn_type: str = "paper"
    residual: str = "plain"

    def __post_init__(self) -> None:
        check_choices(self, "model", {"layout": ("paper", "prenorm"),
                                      "norm_type": ("layernorm", "rmsnorm"),
                                      "ffn_type": ("paper", "swiglu"),
                                      "residual": ("plain", "gated")})

    def block_args(self, paper_norm: str, paper_activation: str) -> dict[str, Any]:
        """TransformerBlock keyword arguments for a model whose paper block is
        (``paper_norm``, ``paper_activation``)."""
        norm = paper_norm if self.layout == "paper" else "prenorm"
        if self.residual == "gated" and norm == "post":
            raise ConfigError("model.residual = 'gated' needs a pre-norm block: set "
                              "model.layout = 'prenorm'")
        return {"norm": norm, "norm_type": self.norm_type, "gated": self.residual == "gated",
                "activation": "swiglu" if self.ffn_type == "swiglu" else paper_activation}


class SwiGLU(nn.Module):
    """Gated FFN(x) = Dropout(W2 Dropout(SiLU(W1 x) ⊙ W3 x)) (Shazeer 2020, "GLU Variants
    Improve Transformer"); three matrices of width ``hidden``, so 1.5x the parameters of
    :class:`FeedForward` at the same width."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = F.silu(self.fc1(x)) * self.gate(x)  # [B, N, hidden]
        return self.dropout(self.fc2(self.dropout(inner)))  # [B, N, d]


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """LayerNorm (the papers) or RMSNorm (Zhang & Sennrich 2019: no centring, no bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm type must be 'layernorm' or 'rmsnorm', got {kind!r}")


def attention_mask(real: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, N, N] bool, True where query q may read key k.

    Keys must be real tokens (and k <= q when causal). A padding query may read only itself:
    it would otherwise have no key at all (a NaN softmax); its output is zeroed afterwards.
    """
    n = real.shape[1]
    allowed = real[:, None, None, :]  # [B, 1, 1, N] real keys
    if causal:
        future = torch.ones(n, n, dtype=torch.bool, device=real.device).tril()  # [N, N] k <= q
        allowed = allowed & future  # [B, 1, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=real.device)  # [N, N]
    q_real = real[:, None, :, None]  # [B, 1, N, 1]
    return (q_real & allowed) | (~q_real & eye)  # [B, 1, N, N] (boolean ops: exportable)


def exporting() -> bool:
    """Whether the model is being traced or compiled (ONNX export): one static graph then."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, queries and keys/values from separate inputs.

    head_m = Softmax(Q_m K_m^T / sqrt(d/h)) V_m, heads concatenated to d, then W_O when
    ``out_proj`` (BERT4Rec, the original Transformer); SASRec's official code and the RETR
    spec concatenate without W_O. The fast path is ``dropout_attention``; on the CPU a window
    longer than ``ATTENTION_CHUNK`` takes ``chunked_attention`` (memory linear in the window,
    never an [N, N] mask or score matrix; chunks of at most ``ATTENTION_CHUNK`` queries and
    ``CHUNK_BYTES`` of scores). Explicit weights are computed only when asked for.
    """

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool,
                 out_proj: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out: nn.Module = nn.Linear(dim, dim) if out_proj else nn.Identity()

    def forward_active(self, query_in: torch.Tensor, kv_in: torch.Tensor, real: torch.Tensor,
                       route: torch.Tensor) -> torch.Tensor:
        """Output [B, N, d] of pathway attention for a binary ``route`` [B, N] (Q = (R ⊙ Z) W_Q
        with the bias routed too), computed without the off-route queries' query-key products.

        An off-route query is zero, so it scores every key alike: its output is the plain mean
        of the values it may read (its causal prefix, or all real keys), a running sum. The
        on-route queries are gathered into [B, M] slots (M: the most in a row) and attend as
        usual, in chunks (``chunk_rows``) on a window longer than ``ATTENTION_CHUNK`` (the
        [M, N] weights are never kept for the backward pass, as on the dense path). The
        off-route queries' uniform weights get no attention dropout (their outputs are the
        exact mean).

        When the route carries a straight-through gradient, an off-route token's ∂y/∂R (at
        R = 0: Σ_j p_j (k_j · q̃) (v_j - ȳ) / sqrt(d_h), q̃ the query it would form) comes
        from a causal linear-attention sum, O(N d²) instead of O(N² d): the gradients equal
        the dense path's (``tests/test_models.py``).
        """
        b, n, d = query_in.shape
        h, dh = self.heads, d // self.heads
        k = self.key(kv_in).view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h]
        v_flat = self.value(kv_in)  # [B, N, d]
        v = v_flat.view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h]
        w = real.unsqueeze(-1).to(v_flat.dtype)  # [B, N, 1] real keys
        active = (route > 0.5) & real  # [B, N]
        y = self._value_mean(v_flat, w)  # [B, N, d] the zero queries' outputs
        if route.requires_grad:  # the straight-through slope of the off-route tokens
            off = (~active & real).to(route.dtype)  # [B, N]
            y = y + _OffRouteSlope.apply((route - route.detach()) * off, query_in, k, v, w, self)
        m = int(active.sum(dim=1).max()) if active.any() else 0
        if m:
            positions = torch.arange(n, device=real.device).expand(b, n)
            # each row's active positions in its last slots, in order (right-aligned, as the
            # histories are: a chunk of early slots then holds only long rows' early queries
            # and reads only the keys before them); the slots before a row's count are unused
            # and sit at position 0, so they never widen a chunk's keys
            order = torch.argsort(active.to(torch.int8), dim=1, stable=True)[:, n - m:]  # [B, M]
            slot_on = torch.gather(active, 1, order)  # [B, M] slots holding an active query
            rows = torch.gather(positions, 1, order) * slot_on  # [B, M] their positions
            q_in = torch.gather(query_in, 1, order.unsqueeze(-1).expand(b, m, d))  # [B, M, d]
            r = torch.gather(route, 1, order).unsqueeze(-1)  # [B, M, 1] 1 (carries ∂/∂R)
            q = (r * self.query(q_in)).view(b, m, h, dh).transpose(1, 2)  # [B, h, M, d/h]
            p = self.dropout if self.training else 0.0
            if n > ATTENTION_CHUNK and q.device.type == "cpu" and \
                    autocast_dtype("cpu") is None:  # as the dense path: never [M, N] kept
                seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
                rows_per = chunk_rows(b * h, n, ATTENTION_CHUNK)
                y_on = chunked_attention(q, k, v, real, self.causal, p, seed, rows_per,
                                         rows=rows)  # [B, h, M, d/h]
            else:
                keys = torch.arange(n, device=real.device)
                allowed = real[:, None, :] & (keys[None, None, :] <= rows[:, :, None]
                                              if self.causal else True)  # [B, M, N]
                allowed = allowed | (keys[None, None, :] == rows[:, :, None])  # never empty
                y_on = dropout_attention(q, k, v, allowed[:, None], p)  # [B, h, M, d/h]
            y_on = y_on.transpose(1, 2).reshape(b * m, d)[slot_on.reshape(-1)]  # [K, d] used
            at = (rows + n * torch.arange(b, device=real.device)[:, None])[slot_on]  # [K] b*N+t
            # the kept outputs replace the means at their positions (index_copy keeps only
            # the index for its backward pass, no [B, N, d] mask)
            y = y.reshape(b * n, d).index_copy(0, at, y_on.to(y.dtype)).view(b, n, d)
        return self.out(y * real.unsqueeze(-1))

    def _value_mean(self, v_flat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[B, N, d] the mean of the real values each position may read: what a zero query's
        uniform weights give (its causal prefix, or every real key)."""
        b, n, d = v_flat.shape
        if self.causal:
            return torch.cumsum(v_flat * w, dim=1) / torch.cumsum(w, dim=1).clamp_min(1.0)
        return ((v_flat * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
                ).expand(b, n, d)

    @torch.no_grad()
    def zero_query_slope(self, query_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         w: torch.Tensor) -> torch.Tensor:
        """[B, N, d] ∂y_i/∂R_i at R_i = 0 for every token i (heads concatenated), a slice of
        users at a time (the linear-attention sum's transients stay under ``CHUNK_BYTES``).

        With a zero query the weights are uniform, p_j = 1/n_i over the n_i keys i may read, so
        ∂y_i/∂R_i = (Σ_j (q̃_i · k_j) v_j - ȳ_i Σ_j q̃_i · k_j) / (n_i sqrt(d_h)). No gradient
        flows into q̃, K or V through it: at R_i = 0 their exact contributions vanish.
        """
        b, h, n, dh = k.shape
        per = max(1, CHUNK_BYTES // (4 * h * n * 64))  # users per slice
        return torch.cat([self._slope_of(query_in[s:s + per], k[s:s + per], v[s:s + per],
                                         w[s:s + per]) for s in range(0, b, per)])

    def _slope_of(self, query_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
        b, n, d = query_in.shape
        h, dh = self.heads, d // self.heads
        q = self.query(query_in).view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h] q̃
        km = k * w.view(b, 1, n, 1)  # [B, h, N, d/h] padding keys left out
        count = w.squeeze(-1)  # [B, N]
        if self.causal:
            num = causal_linear_attention(q, km, v)  # [B, h, N, d/h] Σ_{j<=i} (q̃_i·k_j) v_j
            ksum = torch.cumsum(km, dim=2)  # [B, h, N, d/h]
            count = torch.cumsum(count, dim=1)
        else:
            num = q @ (km.transpose(-2, -1) @ v)  # [B, h, N, d/h]
            ksum = km.sum(dim=2, keepdim=True)
            count = count.sum(dim=1, keepdim=True).expand(b, n)
        total = (q * ksum).sum(-1, keepdim=True)  # [B, h, N, 1] Σ_j q̃_i · k_j
        mean = self._value_mean(v.transpose(1, 2).reshape(b, n, d), w)  # [B, N, d] ȳ
        ybar = mean.view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h]
        slope = (num - ybar * total) / (count.clamp_min(1.0)[:, None, :, None] * math.sqrt(dh))
        return slope.transpose(1, 2).reshape(b, n, d)

    def attention_weights(self, query_in: torch.Tensor, kv_in: torch.Tensor,
                          real: torch.Tensor) -> torch.Tensor:
        """[B, h, Nq, N] the attention weights alone (no dropout, no values), for the Nq
        queries at the last Nq of the N key positions: what a teacher reads."""
        b, nq, d = query_in.shape
        n = kv_in.shape[1]
        h, dh = self.heads, d // self.heads
        q = self.query(query_in).view(b, nq, h, dh).transpose(1, 2)  # [B, h, Nq, d/h]
        k = self.key(kv_in).view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h]
        allowed = query_mask(real, self.causal, torch.arange(n - nq, n, device=real.device))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)  # [B, h, Nq, N]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, 1, Nq, N] mask
        return probs * real[:, None, n - nq:, None]  # padding queries have no distribution

    def forward(self, query_in: torch.Tensor, kv_in: torch.Tensor, real: torch.Tensor,
                output_attentions: bool = False, query_gate: torch.Tensor | None = None,
                key_gate: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (output [B, Nq, d], weights [B, h, Nq, N] or None); padding query rows are 0.

        The Nq queries are the last Nq of the N key positions (Nq = N in training; Nq = 1 when
        only the next-item state is needed), ``real`` [B, N] marks the real keys.
        ``query_gate`` [B, Nq] multiplies the query projection's bias: Q = X W_Q + gate ⊙ b_Q
        (pathway attention passes its route, so an off-route query is exactly zero).
        ``key_gate`` [B, N] (0/1, may carry a straight-through gradient) gates the keys instead
        (key-gated pathway attention, ours): query i reads the gated-on keys it may read and
        itself, w_ij = G_ij p_ij / Σ_k G_ik p_ik with G_ij = gate_j (1 for j = i).
        """
        b, nq, d = query_in.shape
        n = kv_in.shape[1]
        h, dh = self.heads, d // self.heads
        if query_gate is None:
            q_flat = self.query(query_in)  # [B, Nq, d] X W_Q + b_Q
        else:
            q_flat = (F.linear(query_in, self.query.weight)
                      + query_gate.unsqueeze(-1) * self.query.bias)  # [B, Nq, d]
        q = q_flat.view(b, nq, h, dh).transpose(1, 2)  # [B, h, Nq, d/h]
        k = self.key(kv_in).view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h]
        v = self.value(kv_in).view(b, n, h, dh).transpose(1, 2)  # [B, h, N, d/h]
        q_real = real[:, n - nq:]  # [B, Nq]
        p = self.dropout if self.training else 0.0
        weights: torch.Tensor | None = None
        if key_gate is not None and (key_gate.requires_grad or output_attentions):
            return self._key_gated(q, k, v, real, key_gate, p, output_attentions)
        keys_on = None if key_gate is None else real & (key_gate > 0.5)  # [B, N] hard gate
        if not output_attentions and n > ATTENTION_CHUNK and q.device.type == "cpu" and \
                autocast_dtype("cpu") is None and not exporting():
            seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0  # global RNG
            y = chunked_attention(q, k, v, real, self.causal, p, seed,
                                  chunk_rows(b * h, n, ATTENTION_CHUNK), keys_on=keys_on)
            y = y.transpose(1, 2).reshape(b, nq, d) * q_real.unsqueeze(-1)
            return self.out(y), None
        if keys_on is None:
            allowed = attention_mask(real, self.causal)[:, :, n - nq:]  # [B, 1, Nq, N]
        else:
            allowed = query_mask(real, self.causal, torch.arange(n - nq, n, device=real.device),
                                 keys_on)  # [B, 1, Nq, N]
        if output_attentions:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)  # [B, h, Nq, N]
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, h, Nq, N]
            y = dropout(probs, p, self.training) @ v  # [B, h, Nq, d/h]
            weights = probs * q_real[:, None, :, None]  # padding queries have no distribution
        else:
            y = dropout_attention(q, k, v, allowed, p)
        y = y.transpose(1, 2).reshape(b, nq, d) * q_real.unsqueeze(-1)  # [B, Nq, d] concat heads
        return self.out(y), weights


    def _key_gated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor,
                   gate: torch.Tensor, p: float, output_attentions: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The explicit key-gated attention, differentiable in ``gate`` [B, N]: the host's
        weights p_ij renormalised over the gated-on keys and the query itself."""
        b, h, nq, dh = q.shape
        n = k.shape[2]
        allowed = attention_mask(real, self.causal)[:, :, n - nq:]  # [B, 1, Nq, N]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)  # [B, h, Nq, N]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, h, Nq, N]
        rows = torch.arange(n - nq, n, device=q.device)  # [Nq] absolute positions
        eye = torch.arange(n, device=q.device)[None, :] == rows[:, None]  # [Nq, N]
        g = torch.where(eye, torch.ones_like(gate)[:, None, :], gate[:, None, :])  # [B, Nq, N]
        gated = probs * g[:, None]  # [B, h, Nq, N]
        w = gated / gated.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gated.dtype).tiny)
        q_real = real[:, n - nq:]  # [B, Nq]
        y = dropout(w, p, self.training) @ v  # [B, h, Nq, d/h]
        y = y.transpose(1, 2).reshape(b, nq, h * dh) * q_real.unsqueeze(-1)
        weights = w * q_real[:, None, :, None] if output_attentions else None
        return self.out(y), weights


class _OffRouteSlope(torch.autograd.Function):
    """R_off ⊙ slope for the off-route tokens of the sparse path, where R_off = (R - R.detach())
    at off-route tokens is zero in value: zero forward, and ∂L/∂R_i = ∂L/∂y_i · slope_i
    backward, the slope recomputed there (``MultiHeadAttention.zero_query_slope``) from
    tensors the pass keeps anyway, so no [B, N, d] slope is kept between the passes."""

    @staticmethod
    def forward(ctx: Any, r: torch.Tensor, query_in: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, w: torch.Tensor, attention: MultiHeadAttention) -> torch.Tensor:
        ctx.save_for_backward(query_in, k, v, w)
        ctx.attention, ctx.r_dtype = attention, r.dtype
        device = query_in.device.type  # the backward pass recomputes under the same autocast
        ctx.amp = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return query_in.new_zeros(query_in.shape)  # [B, N, d]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query_in, k, v, w = ctx.saved_tensors
        device, enabled, dtype = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            slope = ctx.attention.zero_query_slope(query_in, k, v, w)  # [B, N, d]
        return (dy * slope).sum(-1).to(ctx.r_dtype), None, None, None, None, None


class RouteInfo(NamedTuple):
    """What a routed attention module says about its route besides R^l itself."""

    keep_prob: torch.Tensor  # [B, N] α (the random router: its p)
    sample_prob: torch.Tensor  # [B, N] probability that the training decision keeps the token
    omega: torch.Tensor | None  # [B, N] ω of the adaptive Gumbel-Softmax (learned router)
    aux_loss: torch.Tensor | None  # [B] this layer's auxiliary loss per row (training only)


class BlockOutput(NamedTuple):
    x: torch.Tensor  # [B, N, d] block output
    route: torch.Tensor | None  # [B, N] R^l (pathway attention) or the unchanged input route
    attention: torch.Tensor | None  # [B, h, N, N] when asked
    keep_prob: torch.Tensor | None  # [B, N] α (pathway attention) when asked
    info: RouteInfo | None = None  # the routed attention's RouteInfo (pathway attention)


class TransformerBlock(nn.Module):
    """One transformer layer around the attention module it is given.

    ``attention`` is a :class:`MultiHeadAttention` or a routed one (``routed = True``, e.g.
    :class:`retr.models.pathway.PathwayAttention`), which also takes and returns the route.

    norm="post" (original Transformer, BERT4Rec, RETR spec "Block l"):
        Ẑ = LN(Z + Dropout(Attn(Z)));  Z' = LN(Ẑ + FFN(Ẑ))
    norm="pre" (the official SASRec code, exactly): only the queries are layer-normed, keys
    and values read the raw input, the residual starts from the normed queries, and there is
    no dropout on the attention output (only on its weights):
        Q = LN(Z);  Ẑ = Q + Attn(Q, Z);  H = LN(Ẑ);  Z' = H + FFN(H)
    norm="prenorm" (the usual pre-norm layer; the host model adds a final norm):
        Ẑ = Z + Dropout(Attn(LN(Z)));  Z' = Ẑ + FFN(LN(Ẑ))
    A routed attention's router reads the query input (Z, or LN(Z) in "pre" and "prenorm").

    Modern options (ours to offer, off in every paper recipe): ``norm_type="rmsnorm"``,
    ``activation="swiglu"`` (:class:`SwiGLU`), and ``gated=True``, LiGR's gated residuals
    (Gu et al. 2025, as eSASRec uses them): each sub-block's output is scaled by
    σ(W_g LN(x)) before it joins the residual stream; pre-norm layouts only.
    """

    def __init__(self, attention: nn.Module, dim: int, ffn_size: int, dropout: float,
                 norm: str = "post", activation: str = "relu", eps: float = 1e-5,
                 norm_type: str = "layernorm", gated: bool = False) -> None:
        super().__init__()
        if norm not in ("post", "pre", "prenorm"):
            raise ValueError(f"norm must be 'post', 'pre' or 'prenorm', got {norm!r}")
        if gated and norm == "post":
            raise ValueError("gated residuals need a pre-norm layout ('pre' or 'prenorm')")
        self.norm = norm
        self.attn = attention
        self.routed = bool(getattr(attention, "routed", False))
        self.ln1 = make_norm(norm_type, dim, eps)
        self.ln2 = make_norm(norm_type, dim, eps)
        self.ffn: nn.Module = SwiGLU(dim, ffn_size, dropout) if activation == "swiglu" else \
            FeedForward(dim, ffn_size, dropout, activation)
        self.dropout = Dropout(dropout)
        self.gates: nn.ModuleList | None = nn.ModuleList(
            nn.Linear(dim, dim) for _ in range(2)) if gated else None

    def _gate(self, i: int, normed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """σ(W_g LN(x)) ⊙ f(LN(x)) with gates, f(LN(x)) without."""
        return out if self.gates is None else torch.sigmoid(self.gates[i](normed)) * out

    def _attend(self, q_in: torch.Tensor, kv_in: torch.Tensor, real: torch.Tensor,
                route: torch.Tensor | None, output_attentions: bool, last_only: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                           RouteInfo | None]:
        """Attention of the ``q_in`` queries; a routed attention with ``last_only`` takes every
        query (its router reads them all) and answers for the last one alone."""
        if self.routed:
            if route is None:
                route = real.to(q_in.dtype)  # R^0 = 1 on every real token
            out, weights, route, info = self.attn(q_in, kv_in, real, route, output_attentions,
                                                  last_only=last_only)
            return out, weights, route, info
        out, weights = self.attn(q_in, kv_in, real, output_attentions)
        return out, weights, route, None

    def forward(self, x: torch.Tensor, real: torch.Tensor, route: torch.Tensor | None = None,
                output_attentions: bool = False, last_only: bool = False) -> BlockOutput:
        """x [B, N, d], real [B, N], route R^{l-1} [B, N] (pathway) -> BlockOutput.

        ``last_only``: only the last position is computed (x [B, 1, d] out), for a last block
        whose other outputs nobody reads (with pathway attention its router still reads every
        token, and the route out is the last position's).
        """
        routed_last = last_only and self.routed  # the router reads every query input
        xq = x[:, -1:] if last_only else x  # the positions whose output is computed
        if self.norm == "post":
            a, weights, route, info = self._attend(x if routed_last else xq, x, real, route,
                                                   output_attentions, last_only)
            x = self.ln1(xq + self.dropout(a))  # [B, N, d] Ẑ = LN(Attn(Z) + Z)
            x = self.ln2(x + self.ffn(x))  # [B, N, d] Z' = LN(FFN(Ẑ) + Ẑ)
        elif self.norm == "pre":
            q = self.ln1(x if routed_last else xq)  # [B, N, d] layer-normed queries
            a, weights, route, info = self._attend(q, x, real, route, output_attentions,
                                                   last_only)
            q = q[:, -1:] if routed_last else q
            x = q + self._gate(0, q, a)  # [B, N, d]
            h = self.ln2(x)  # [B, N, d]
            x = h + self._gate(1, h, self.ffn(h))  # [B, N, d]
        else:
            normed = self.ln1(x)  # [B, N, d] queries, keys and values read LN(Z)
            q = normed[:, -1:] if last_only else normed
            a, weights, route, info = self._attend(normed if routed_last else q, normed, real,
                                                   route, output_attentions, last_only)
            x = xq + self.dropout(self._gate(0, q, a))  # [B, N, d]
            h = self.ln2(x)  # [B, N, d]
            x = x + self._gate(1, h, self.ffn(h))  # [B, N, d]
        keep = info.keep_prob if output_attentions and info is not None else None
        return BlockOutput(x, route, weights, keep, info)


def collect_output(hidden: torch.Tensor, blocks: list[BlockOutput],
                   output_attentions: bool) -> ModelOutput:
    """ModelOutput with per-layer attentions, routes and router outputs when asked.

    The routers' auxiliary losses (ours, off by default: the pathway budget and the
    attention-distilled router) are averaged over the layers into ``extras["aux_loss"]``
    [B], one value per row, whenever a layer made one (in training); the trainer adds its
    mean to the task loss.
    """
    aux = [b.info.aux_loss for b in blocks if b.info is not None and b.info.aux_loss is not None]
    extras = {"aux_loss": torch.stack(aux).mean(dim=0)} if aux else {}
    if not output_attentions:
        return ModelOutput(hidden=hidden, extras=extras)
    attentions = [b.attention for b in blocks if b.attention is not None]
    routes = [b.route for b in blocks if b.route is not None]
    infos = [b.info for b in blocks if b.info is not None]
    omegas = [i.omega for i in infos if i.omega is not None]
    return ModelOutput(hidden=hidden, attentions=attentions, routes=routes or None,
                       keep_probs=[i.keep_prob for i in infos] or None,
                       sample_probs=[i.sample_prob for i in infos] or None,
                       omegas=omegas or None, extras=extras)
