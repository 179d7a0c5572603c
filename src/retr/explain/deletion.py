"""The deletion test of an explanation: does removing what it ranks highest hurt the target?

For every evaluation example, an explanation scores the behaviors of the window; the test
removes the k behaviors it ranks highest (and, separately, the k it ranks lowest) from the
history, runs the model again on the shortened history, and records the rank of the true next
item among all items. A faithful explanation makes the top-k deletion hurt much more than the
bottom-k one. Explanations compared:

- ``route``: the keep probability α of the last routed layer (router models only);
- ``attention``: the last query's attention at the last layer, heads averaged;
- ``gradient``: gradient x input, the derivative of the target's score with respect to each
  input item vector times that vector, summed over the hidden dimensions;
- ``gradient_abs``: its magnitude (a behavior that pushes the target down also matters);
- ``recency``: newest first (a control: an explanation that only finds the latest behaviors
  says nothing a timestamp does not);
- ``random``: a random order (the floor every explanation should beat).

Histories shorter than 2k + 1 behaviors are skipped (both deletions must leave something).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch

from retr.data.dataset import SequenceDataset
from retr.data.splits import EvalExamples
from retr.models.base import SequentialRecommender

METHODS = ("route", "attention", "gradient", "gradient_abs", "recency", "random")


def delete_tokens(seqs: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """[B, N] left-padded histories without the ``drop`` [B, N] positions, re-padded."""
    keep = (seqs != 0) & ~drop  # [B, N]
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped first, kept after
    out = torch.gather(seqs, 1, order)  # [B, N] kept tokens right-aligned, in order
    n_keep = keep.sum(dim=1, keepdim=True)  # [B, 1]
    cols = torch.arange(seqs.shape[1], device=seqs.device)[None, :]  # [1, N]
    return torch.where(cols >= seqs.shape[1] - n_keep, out, torch.zeros_like(out))


def _ranks(model: SequentialRecommender, seqs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] 1-based rank of each target among all items (ties count against it)."""
    with torch.no_grad():
        h = model.user_representation(seqs)  # [B, d]
        scores = model.score_items(h, torch.arange(1, model.n_items + 1, device=seqs.device))
    own = scores.gather(1, (targets - 1)[:, None])  # [B, 1]
    return (scores >= own).sum(dim=1)  # [B]


def gradient_x_input(model: SequentialRecommender, seqs: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """[B, N] Σ_d ∂score(target)/∂x_{t,d} · x_{t,d} at the item-vector input of the model
    (the gradient is taken for that input alone: no parameter gradient is left behind)."""
    captured: list[torch.Tensor] = []
    module = cast(Any, model).item_embedding

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output)

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            h = model(seqs).hidden[:, -1]  # [B, d]
            score = (h * model.item_representation(targets)).sum()
            (grad,) = torch.autograd.grad(score, captured[0])  # [B, N, d]
    finally:
        handle.remove()
    return (grad * captured[0]).sum(dim=-1).detach()  # [B, N]


def explanation_scores(model: SequentialRecommender, seqs: torch.Tensor, targets: torch.Tensor,
                       gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per method, [B, N] scores of the window's behaviors (higher = more important)."""
    with torch.no_grad():
        out = model(seqs, output_attentions=True)
    scores: dict[str, torch.Tensor] = {}
    if out.keep_probs:
        scores["route"] = out.keep_probs[-1]
    if out.attentions:
        scores["attention"] = out.attentions[-1][:, :, -1].mean(dim=1)  # [B, N]
    scores["gradient"] = gradient_x_input(model, seqs, targets)
    scores["gradient_abs"] = scores["gradient"].abs()
    scores["recency"] = torch.arange(seqs.shape[1], device=seqs.device,
                                     dtype=torch.float32).expand(seqs.shape)  # left-padded
    scores["random"] = torch.rand(seqs.shape, generator=gen).to(seqs.device)
    return scores


def deletion_test(model: SequentialRecommender, dataset: SequenceDataset,
                  examples: EvalExamples, k: int = 3, batch_size: int = 256,
                  seed: int = 0) -> dict[str, Any]:
    """Per method: HR@10 and mean log2 rank of the target after deleting its top-k and its
    bottom-k behaviors, next to the intact history's (the examples with > 2k behaviors)."""
    if model.objective != "next":
        raise ValueError("the deletion test runs on next-item models (the window is the history)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = model.max_len
    rows = np.flatnonzero(np.minimum(examples.lengths, n) > 2 * k)
    results: dict[str, dict[str, list[np.ndarray]]] = {}
    intact: list[np.ndarray] = []
    for lo in range(0, len(rows), batch_size):
        part = rows[lo: lo + batch_size]
        seqs = torch.from_numpy(dataset.padded_prefixes(examples.users[part],
                                                        examples.lengths[part], n)).to(device)
        targets = torch.from_numpy(examples.targets[part]).to(device)
        real = seqs != 0
        intact.append(_ranks(model, seqs, targets).cpu().numpy())
        for method, score in explanation_scores(model, seqs, targets, gen).items():
            high = score.float().masked_fill(~real, float("-inf"))
            low = (-score.float()).masked_fill(~real, float("-inf"))
            entry = results.setdefault(method, {"top": [], "bottom": []})
            for name, key in (("top", high), ("bottom", low)):
                picked = torch.topk(key, k, dim=1).indices  # [B, k]
                drop = torch.zeros_like(real).scatter_(1, picked, True)
                ranks = _ranks(model, delete_tokens(seqs, drop), targets)
                entry[name].append(ranks.cpu().numpy())
    model.train(was_training)
    base = np.concatenate(intact) if intact else np.zeros(0)

    def summary(ranks: np.ndarray) -> dict[str, float]:
        return {"HR@10": float((ranks <= 10).mean()), "mean_log2_rank": float(np.log2(ranks).mean())}

    return {"k": k, "examples": int(len(rows)), "intact": summary(base),
            "methods": {m: {part: summary(np.concatenate(v)) for part, v in e.items()}
                        for m, e in results.items()}}
