"""Items seen through their text: fixed text vectors and a learned adaptor (UniSRec-style).

The adaptor is the one of UniSRec (Hou et al., KDD 2022, "Towards Universal Sequence
Representation Learning for Recommender Systems"): parametric whitening inside each expert of
a mixture of experts, mixed by a softmax gate with learned noise while training,

    e_k(x) = (x - b_k) W_k                                  expert k: whitening + projection
    g(x)   = Softmax(x W_g + ε ⊙ Softplus(x W_n)),  ε ~ N(0, 1) (training only)
    v(x)   = Σ_k g_k(x) e_k(x)

with x the item's frozen text vector (dropout on x while training), b_k ∈ R^D, W_k ∈ R^{D×d},
W_g, W_n ∈ R^{D×K} (both start at zero, so the experts start equally weighted). With one
expert it is parametric whitening and a single linear map, and there is no gate.

:class:`TextItemEmbedding` has the interface of :class:`retr.models.layers.ItemEmbedding`
(``forward(ids)``, ``all_items()``, ``special_id(k)``), so it replaces the item module of any
model after ``build_model`` (``model.item_embedding = TextItemEmbedding(...)``) without a
change to the model. Optionally a learned ID vector is added (``text + id``, the
"transductive" fine-tuning of UniSRec). Special tokens (BERT4Rec's [mask]) have no text and
get learned vectors; padding is always the zero vector.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TABLE_CHUNK = 16384  # ids per adaptor call when the whole table is built (bounds memory)


class MoEAdaptor(nn.Module):
    """Text vectors [U, D] -> item vectors [U, d]: whitening experts mixed by a noisy gate."""

    def __init__(self, text_dim: int, dim: int, experts: int = 8, dropout: float = 0.2,
                 gate_noise: bool = True, std: float = 0.02) -> None:
        super().__init__()
        if experts < 1:
            raise ValueError(f"experts must be >= 1, got {experts}")
        self.experts = experts
        self.gate_noise = gate_noise
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(experts, text_dim))  # b_k
        self.weight = nn.Parameter(torch.empty(experts, text_dim, dim))  # W_k
        nn.init.normal_(self.weight, std=std)
        self.gate: nn.Parameter | None = None
        self.noise: nn.Parameter | None = None
        if experts > 1:
            self.gate = nn.Parameter(torch.zeros(text_dim, experts))  # W_g
            self.noise = nn.Parameter(torch.zeros(text_dim, experts))  # W_n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)  # [U, D]
        # (x - b_k) W_k computed as x W_k - b_k W_k: never materialises [U, K, D]
        e = (torch.einsum("uD,kDd->ukd", x, self.weight)
             - torch.einsum("kD,kDd->kd", self.bias, self.weight))  # [U, K, d]
        if self.gate is None or self.noise is None:
            return e[:, 0]  # [U, d]
        logits = x @ self.gate  # [U, K]
        if self.training and self.gate_noise:
            logits = logits + torch.randn_like(logits) * F.softplus(x @ self.noise)
        g = logits.softmax(dim=-1)  # [U, K]
        return (g.unsqueeze(-1) * e).sum(dim=1)  # [U, d]


class TextItemEmbedding(nn.Module):
    """Item vectors from frozen text vectors through a :class:`MoEAdaptor` (+ optional ID vectors).

    ``text_vectors`` [n_items + 1, D] is a buffer (saved with the weights, so a run directory
    rebuilds the model without its texts; never trained); row 0 is padding. Without it the
    buffer starts at zero, to be filled by ``load_state_dict``.

    Training computes the adaptor once per distinct id of the batch. In eval mode the whole
    table is computed (``TABLE_CHUNK`` ids at a time, bounding memory) and, under ``torch.no_grad``, kept until a parameter or the
    buffer changes (tracked by tensor version counters), so evaluation over item chunks does
    not recompute it.
    """

    text_vectors: torch.Tensor

    def __init__(self, n_items: int, dim: int, text_dim: int,
                 text_vectors: torch.Tensor | None = None, n_special: int = 0, experts: int = 8,
                 dropout: float = 0.2, gate_noise: bool = True, id_embedding: bool = False,
                 std: float = 0.02) -> None:
        super().__init__()
        self.n_items = n_items
        self.n_special = n_special
        self.dim = dim
        self.text_dim = text_dim
        vectors = torch.zeros(n_items + 1, text_dim)
        if text_vectors is not None:
            if tuple(text_vectors.shape) != (n_items + 1, text_dim):
                raise ValueError(f"text_vectors must be [{n_items + 1}, {text_dim}] (row 0 = "
                                 f"padding), got {list(text_vectors.shape)}")
            vectors = text_vectors.detach().to(torch.float32).clone()
        vectors[0] = 0.0
        self.register_buffer("text_vectors", vectors)
        self.adaptor = MoEAdaptor(text_dim, dim, experts, dropout, gate_noise, std)
        self.id_table: nn.Embedding | None = None
        if id_embedding:
            self.id_table = nn.Embedding(n_items + 1, dim, padding_idx=0)
            nn.init.normal_(self.id_table.weight, std=std)
            with torch.no_grad():
                self.id_table.weight[0].zero_()
        self.special: nn.Parameter | None = None
        if n_special:
            self.special = nn.Parameter(torch.empty(n_special, dim))
            nn.init.normal_(self.special, std=std)
        self._cache: tuple[tuple[object, ...], torch.Tensor] | None = None

    def special_id(self, k: int = 0) -> int:
        """Id of the k-th special token (after the items)."""
        if not 0 <= k < self.n_special:
            raise IndexError(f"special token {k} of {self.n_special}")
        return self.n_items + 1 + k

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """[U, d] vectors of the 1-D ids ``ids`` (padding -> 0, special tokens learned)."""
        n = self.n_items
        items = ids.clamp(0, n)  # [U] special tokens read a dummy row, replaced below
        out = self.adaptor(self.text_vectors[items])  # [U, d]
        if self.id_table is not None:
            out = out + self.id_table(items)
        if self.special is not None:
            k = (ids - n - 1).clamp(0, self.n_special - 1)  # [U]
            out = torch.where((ids > n).unsqueeze(-1), self.special[k], out)
        return out * (ids != 0).unsqueeze(-1).to(out.dtype)

    def _state_key(self) -> tuple[object, ...]:
        tensors = [*self.parameters(), self.text_vectors]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def table(self) -> torch.Tensor:
        """[n_items + 1 + n_special, d]: every id's vector (cached under no_grad in eval mode)."""
        ids = torch.arange(self.n_items + 1 + self.n_special, device=self.text_vectors.device)
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.encode(ids)
        key = self._state_key()
        if self._cache is None or self._cache[0] != key:
            parts = [self.encode(chunk) for chunk in ids.split(TABLE_CHUNK)]
            self._cache = (key, torch.cat(parts))
        return self._cache[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., d] vectors of ``ids`` (padding -> 0)."""
        if not self.training:
            return self.table()[ids]
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        return self.encode(unique)[inverse].reshape(*ids.shape, self.dim)

    def all_items(self) -> torch.Tensor:
        """[n_items + 1, d]: row i is item i (row 0 = padding); special tokens excluded."""
        if not self.training:
            return self.table()[: self.n_items + 1]
        return self.encode(torch.arange(self.n_items + 1, device=self.text_vectors.device))


def text_item_module(old: Any, text_vectors: torch.Tensor | None, text_dim: int,
                     experts: int = 8, dropout: float = 0.2, gate_noise: bool = True,
                     id_embedding: bool = False) -> TextItemEmbedding:
    """A :class:`TextItemEmbedding` shaped like the item module ``old`` it replaces."""
    n_items, dim = int(old.n_items), int(old.dim)
    return TextItemEmbedding(n_items, dim, text_dim, text_vectors,
                             n_special=int(getattr(old, "n_special", 0)), experts=experts,
                             dropout=dropout, gate_noise=gate_noise, id_embedding=id_embedding)
