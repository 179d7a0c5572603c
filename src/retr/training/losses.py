"""Next-item losses, written out where you can see them.

Every loss takes the hidden states ``h`` [P, d] of the P positions that have a target, the
targets [P] (internal ids 1..n_items), the model (for item representations) and a
``torch.Generator`` for negatives, and returns the mean loss over positions.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from retr.config import LOSSES
from retr.models.base import SequentialRecommender
from retr.models.kernels import autocast_dtype


def uniform_negatives(targets: torch.Tensor, n: int, n_items: int, gen: torch.Generator) -> torch.Tensor:
    """[P, n] items drawn uniformly from 1..n_items excluding each row's own target."""
    neg = torch.randint(1, n_items, (targets.shape[0], n), generator=gen, device=gen.device)
    neg = neg.to(targets.device)  # drawn on the generator's device (CPU): same stream anywhere
    return neg + (neg >= targets[:, None]).long()  # shift past the target: uniform over the rest


def bpr_loss(model: SequentialRecommender, h: torch.Tensor, targets: torch.Tensor,
             gen: torch.Generator, negatives: int = 1) -> torch.Tensor:
    """The paper's pairwise loss: -log σ(s(i_{t+1}) - s(i^-)), one uniform negative per step."""
    neg = uniform_negatives(targets, negatives, model.n_items, gen)  # [P, n]
    pos_s = model.score_candidates(h, targets[:, None])  # [P, 1]
    neg_s = model.score_candidates(h, neg)  # [P, n]
    return -F.logsigmoid(pos_s - neg_s).mean()


def bce_loss(model: SequentialRecommender, h: torch.Tensor, targets: torch.Tensor,
             gen: torch.Generator, negatives: int = 1) -> torch.Tensor:
    """SASRec's loss: -log σ(s+) - Σ_j log(1 - σ(s-_j)) with uniform negatives."""
    neg = uniform_negatives(targets, negatives, model.n_items, gen)
    pos_s = model.score_candidates(h, targets[:, None]).squeeze(1)  # [P]
    neg_s = model.score_candidates(h, neg)  # [P, n]
    return -(F.logsigmoid(pos_s) + F.logsigmoid(-neg_s).sum(1)).mean()


def gbce_loss(model: SequentialRecommender, h: torch.Tensor, targets: torch.Tensor,
              gen: torch.Generator, negatives: int = 1, t: float = 0.75) -> torch.Tensor:
    """gSASRec's generalised BCE: the positive term raised to β to undo negative-sampling overconfidence.

    β = α (t (1 - 1/α) + 1/α) with α = negatives / (n_items - 1) the sampling rate.
    """
    alpha = negatives / max(model.n_items - 1, 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    neg = uniform_negatives(targets, negatives, model.n_items, gen)
    pos_s = model.score_candidates(h, targets[:, None]).squeeze(1)
    neg_s = model.score_candidates(h, neg)
    return -(beta * F.logsigmoid(pos_s) + F.logsigmoid(-neg_s).sum(1)).mean()


def _rows_per_block(x: torch.Tensor, elements: int = 1 << 20) -> int:
    """Rows of a [P, I] matrix in about ``elements`` values (4 MB in fp32): a block that stays
    in the CPU cache between passes, where ``logsumexp`` over the whole matrix would also
    allocate and stream [P, I] temporaries (on ml-1m, half its time and 180 MB per step).
    Elsewhere the whole matrix is one block: a GPU gains nothing and pays a launch per block."""
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, elements // max(x.shape[1], 1))


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """mean_p [logsumexp_k (h_p · w_k) - h_p · w_{t_p}], with the gradient written in one buffer.

    The same value and gradient as ``F.cross_entropy(h @ w.T, t)``, for less time and memory:
    the fp32 [P, n_items] logits are the only large tensor, and backward turns them into
    softmax - onehot in place (no log-softmax copy, no zero-filled gradient, no second pass);
    the row-wise passes run over cache-sized row blocks.
    ``dtype`` is the matmul precision (bfloat16 under autocast, as autocast would choose).
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor,
                dtype: torch.dtype, smoothing: float = 0.0) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            logits = (h.to(dtype) @ w.to(dtype).T).float()  # [P, I]
            lse = torch.cat([torch.logsumexp(part, dim=1)  # [P], row blocks
                             for part in logits.split(_rows_per_block(logits))])
            target = logits.gather(1, t[:, None]).squeeze(1)  # [P]
            if smoothing:  # the target's mass is (1 - ε) + ε/I, every other item's ε/I
                target = (1.0 - smoothing) * target + smoothing * logits.mean(dim=1)
            loss = (lse - target).mean()
        ctx.save_for_backward(h, w, t, logits, lse)
        ctx.dtype, ctx.smoothing = dtype, smoothing
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None,
                                                         None]:
        h, w, t, logits, lse = ctx.saved_tensors
        scale = grad / len(t)  # d loss / d logits = scale * (softmax - onehot)
        rows = torch.arange(len(t), device=t.device)
        eps = ctx.smoothing  # with label smoothing: scale * (softmax - (1-ε) onehot - ε/I)
        if logits.device.type == "cpu" and float(scale) > 0:
            # scale * exp(x - lse) = exp(x - (lse - log scale)): one pass less over [P, I],
            # and the exp reads each row block while the subtraction left it in the cache
            shift = (lse - scale.log())[:, None]  # [P, 1]
            block = _rows_per_block(logits)
            for part, part_shift in zip(logits.split(block), shift.split(block), strict=True):
                part.sub_(part_shift).exp_()
            g = logits  # [P, I] scale * softmax, in the logits' buffer
            g[rows, t] -= scale * (1.0 - eps)
            if eps:
                g.sub_(scale * eps / g.shape[1])
        else:  # (no host sync on a GPU)
            g = logits.sub_(lse[:, None]).exp_()  # [P, I] softmax, in the logits' buffer
            g[rows, t] -= 1.0 - eps  # softmax - onehot
            if eps:
                g.sub_(eps / g.shape[1])
            g.mul_(scale)
        g = g.to(ctx.dtype)
        return ((g @ w.to(ctx.dtype)).to(h.dtype), (g.T @ h.to(ctx.dtype)).to(w.dtype),
                None, None, None)


def ce_loss(model: SequentialRecommender, h: torch.Tensor, targets: torch.Tensor,
            gen: torch.Generator, negatives: int = 1, smoothing: float = 0.0) -> torch.Tensor:
    """Full softmax cross-entropy over every item (padding excluded); ``smoothing`` ε moves
    ε of the target's probability mass evenly onto all items (label smoothing)."""
    items = torch.arange(1, model.n_items + 1, device=h.device)
    if not len(targets):
        return F.cross_entropy(model.score_items(h, items), targets - 1)  # nan: nothing to learn
    dtype = autocast_dtype(h.device.type) or torch.float32
    return cast(torch.Tensor, _SoftmaxCrossEntropy.apply(h, model.item_representation(items),
                                                         targets - 1, dtype, smoothing))


def sampled_softmax_loss(model: SequentialRecommender, h: torch.Tensor, targets: torch.Tensor,
                         gen: torch.Generator, negatives: int = 256,
                         proposal: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the target and ``negatives`` items shared by the batch.

    Uniform proposals (``proposal=None``) make the logQ correction a constant, so none is
    applied. ``proposal`` [n_items + 1] (probabilities, index 0 = 0) draws the negatives from
    it instead, e.g. item popularity, and every logit s_j becomes s_j - log(n Q(j)), the
    sampled-softmax correction of Jean et al. (2015) and Yi et al. (2019, "logQ") that keeps
    the estimate of the full softmax unbiased. A negative equal to a row's target is masked
    out (no accidental hits).
    """
    if proposal is None:
        neg = torch.randint(1, model.n_items + 1, (negatives,), generator=gen,
                            device=gen.device).to(h.device)
    else:
        neg = torch.multinomial(proposal.to(gen.device), negatives, replacement=True,
                                generator=gen).to(h.device)
    pos_s = model.score_candidates(h, targets[:, None])  # [P, 1]
    neg_s = model.score_items(h, neg)  # [P, n]
    if proposal is not None:
        log_q = (proposal.to(h.device) * negatives).log()  # [n_items + 1] log expected count
        pos_s = pos_s - log_q[targets][:, None]
        neg_s = neg_s - log_q[neg][None, :]
    neg_s = neg_s.masked_fill(neg[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos_s, neg_s], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def popularity_proposal(counts: np.ndarray) -> torch.Tensor:
    """Q(i) ∝ count_i + 1 over items 1..n_items (index 0, padding, gets 0): the sampling
    distribution of ``train.negative_sampler = "popularity"``."""
    q = torch.as_tensor(np.asarray(counts, dtype=np.float64) + 1.0)
    q[0] = 0.0
    return (q / q.sum()).float()


def compute_loss(name: str, model: SequentialRecommender, h: torch.Tensor, targets: torch.Tensor,
                 gen: torch.Generator, negatives: int, gbce_t: float = 0.75,
                 label_smoothing: float = 0.0,
                 proposal: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss ``name`` (one of ``LOSSES``: "bpr", "bce", "ce", "sampled_softmax",
    "gbce") of next-item states ``h`` [P, d] against their targets [P] (internal ids), what
    ``train_epoch`` computes per batch: ``negatives`` per position for the sampled losses, drawn
    with ``gen``; ``gbce_t`` for "gbce"; ``label_smoothing`` for "ce"; ``proposal`` (the
    negatives' distribution, None = uniform) for "sampled_softmax". A scalar to call
    ``backward()`` on."""
    if name == "bpr":
        return bpr_loss(model, h, targets, gen, negatives)
    if name == "bce":
        return bce_loss(model, h, targets, gen, negatives)
    if name == "gbce":
        return gbce_loss(model, h, targets, gen, negatives, gbce_t)
    if name == "ce":
        return ce_loss(model, h, targets, gen, smoothing=label_smoothing)
    if name == "sampled_softmax":
        return sampled_softmax_loss(model, h, targets, gen, negatives, proposal)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
