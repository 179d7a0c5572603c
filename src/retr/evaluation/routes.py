"""What the pathway route does on a run's test histories, measured (every router model).

:func:`route_statistics` runs the model on the evaluation windows in batches and reports per
layer: the keep rate of the inference route and of the training-style draw (the same
weights, routes drawn as in training, no dropout), the share of tokens whose adaptive weight
ω is 0 (the dead zone where the gradient through the relaxed sample vanishes, and where the
"weighted" draw is a fair coin), and the mean route length per history. When the data is a
planted-pathway log (``synthetic`` sources), the planted positions of each user's last item
are regenerated from the spec and the route is scored as a retriever of them: precision,
recall, and the AUC of α (the keep probability) as a score; the last query's attention
(heads averaged) is scored the same way (its mass on the planted tokens, its AUC, and the
precision of its top-3 tokens, 3 being the number of planted tokens). Everything is pooled
over (history, token) pairs of the real tokens; the base rate is the share of planted tokens.

The planted positions belong to the last item of each user only, so only evaluation
examples whose target is that last item carry ground truth (with the leave-one-out split:
every test example).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from retr.data import synthetic
from retr.data.dataset import SequenceDataset
from retr.data.splits import EvalExamples
from retr.errors import DataError
from retr.models.base import SequentialRecommender
from retr.models.pathway import PathwayRouter, training_routes

ATTENTION_TOP = 3  # the planted pathway has 3 tokens: precision of the last query's top 3


def routers_of(model: SequentialRecommender) -> list[PathwayRouter]:
    """The model's pathway routers, one per routed layer (none: no route to measure)."""
    return [m for m in model.modules() if isinstance(m, PathwayRouter)]


def planted_window(dataset: SequenceDataset, source: str, examples: EvalExamples,
                   width: int) -> np.ndarray | None:
    """bool [M, width]: the window columns of the planted pathway of each example's target,
    all False for examples without ground truth; None when ``source`` is not synthetic.

    The log is regenerated from the spec; a user counts only if its preprocessed sequence is
    the generated one item for item (5-core filtering could have cut it) and the example's
    target is the user's last item.
    """
    if not (source == "synthetic" or source.startswith("synthetic:")):
        return None
    try:
        spec = synthetic.parse_synthetic_spec(source)
    except DataError:  # e.g. several synthetic domains side by side: no one ground truth
        return None
    generated = synthetic.generate(spec)
    log = generated.log
    user_index = pd.Series(np.arange(dataset.n_users), index=dataset.vocab.users)
    item_index = pd.Series(np.arange(1, dataset.n_items + 1), index=dataset.vocab.items)
    u = log["user"].map(user_index).fillna(-1).to_numpy(np.int64)  # [T] dataset user or -1
    it = log["item"].map(item_index).fillna(0).to_numpy(np.int64)  # [T] internal id or 0
    order = np.lexsort((np.arange(len(log)), log["timestamp"].to_numpy(), u))
    u, it = u[order], it[order]
    keep = u >= 0
    u, it = u[keep], it[keep]
    raw_len = np.bincount(u, minlength=dataset.n_users)  # [U]
    start = np.cumsum(raw_len) - raw_len
    pos = np.arange(len(u)) - start[u]  # [T] position in the user's generated sequence
    same_len = raw_len == dataset.lengths  # [U]
    ok_tok = same_len[u] & (pos < dataset.lengths[u])
    agree = np.zeros(len(u), dtype=bool)
    agree[ok_tok] = dataset.items[dataset.offsets[u[ok_tok]] + pos[ok_tok]] == it[ok_tok]
    wrong = np.bincount(u[~agree], minlength=dataset.n_users)  # [U] differing tokens
    consistent = same_len & (wrong == 0) & (raw_len > 0)  # [U]
    users = examples.users.astype(np.int64)
    lengths = examples.lengths.astype(np.int64)
    has = consistent[users] & (lengths == dataset.lengths[users] - 1)  # [M] target = last item
    ids = np.array(dataset.vocab.users, dtype=object)[users]
    out = np.zeros((len(users), width), dtype=bool)
    rows = np.flatnonzero(has)
    if len(rows):
        planted = np.array([generated.pathways[str(i)]["positions"] for i in ids[rows]],
                           dtype=np.int64)  # [R, 3] positions in the sequence
        cols = width - lengths[rows][:, None] + planted  # [R, 3] window columns
        inside = cols >= 0
        out[np.repeat(rows, planted.shape[1])[inside.ravel()], cols[inside]] = True
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half)."""
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _model_windows(model: SequentialRecommender, seqs: torch.Tensor) -> torch.Tensor:
    """The input the model scores the next item from: a cloze model reads [mask] last."""
    if model.objective == "cloze" and hasattr(model, "mask_id"):
        mask_col = torch.full_like(seqs[:, :1], int(cast(Any, model).mask_id))
        return torch.cat([seqs[:, 1:], mask_col], dim=1)
    return seqs


@torch.no_grad()
def route_statistics(model: SequentialRecommender, dataset: SequenceDataset,
                     examples: EvalExamples, source: str | None = None,
                     batch_size: int = 256, seed: int = 0) -> dict[str, Any] | None:
    """Per-layer route statistics on ``examples`` (None for a model without a router).

    ``source`` is the data source of the run (``cfg.data.source``): a synthetic spec adds
    the planted-pathway scores. The training-style draw is seeded by ``seed`` and leaves the
    global random state as it was.
    """
    routers = routers_of(model)
    if not routers or not len(examples):
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = model.max_len
    cloze = model.objective == "cloze" and hasattr(model, "mask_id")
    planted = planted_window(dataset, source, examples, n) if source else None
    if planted is not None and cloze:  # the window slides by one to make room for [mask]
        planted = np.concatenate([planted[:, 1:], np.zeros((len(planted), 1), bool)], axis=1)
    parts: dict[str, list[list[np.ndarray]]] = {k: [] for k in (
        "route", "sampled", "alpha", "omega", "attention")}
    reals = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for lo in range(0, len(examples), batch_size):
            users = examples.users[lo: lo + batch_size]
            lengths = examples.lengths[lo: lo + batch_size]
            seqs = torch.from_numpy(dataset.padded_prefixes(users, lengths, n))
            seqs = _model_windows(model, seqs).to(device)  # [B, N]
            out = model(seqs, output_attentions=True)
            with training_routes(model):
                drawn = model(seqs, output_attentions=True)
            reals.append((seqs != 0).cpu().numpy())
            routes, keeps = out.routes or [], out.keep_probs or []
            omegas = out.omegas or []
            atts = out.attentions or []
            parts["route"].append([r.cpu().numpy() for r in routes])
            parts["sampled"].append([r.cpu().numpy() for r in drawn.routes or []])
            parts["alpha"].append([p.float().cpu().numpy() for p in keeps])
            parts["omega"].append([o.float().cpu().numpy() for o in omegas])
            parts["attention"].append([a[:, :, -1].float().mean(dim=1).cpu().numpy()
                                       for a in atts])  # [B, N] last query, heads averaged
    model.train(was_training)
    real = np.concatenate(reals)  # [M, N]
    stacked = {k: [np.concatenate([b[layer] for b in v]) for layer in range(len(v[0]))]
               for k, v in parts.items() if v and v[0]}
    options = routers[0].options
    has_gt = planted is not None and bool(planted.any())
    gt_rows = planted.any(axis=1) if has_gt and planted is not None else None
    layers = []
    for layer in range(len(stacked["route"])):
        route = stacked["route"][layer] > 0.5
        entry: dict[str, Any] = {
            "layer": layer + 1,
            "keep_rate": float(route[real].mean()),
            "keep_rate_sampled": float((stacked["sampled"][layer] > 0.5)[real].mean()),
            "omega_zero_share": (float((stacked["omega"][layer][real] == 0).mean())
                                 if "omega" in stacked else None),
            "route_length": float(route.sum(axis=1).mean()),
        }
        if has_gt and planted is not None and gt_rows is not None:
            entry.update(_retrieval(route[gt_rows], stacked["alpha"][layer][gt_rows],
                                    stacked["attention"][layer][gt_rows], planted[gt_rows],
                                    real[gt_rows]))
        layers.append(entry)
    result: dict[str, Any] = {
        "examples": int(len(examples)), "router": options.router,
        "route_sample": options.route_sample, "inference_rule": options.inference_rule,
        "router_target": options.router_target, "keep_target": options.keep_target,
        "ground_truth": has_gt, "layers": layers,
    }
    if has_gt and planted is not None and gt_rows is not None:
        result["ground_truth_examples"] = int(gt_rows.sum())
        result["base_rate"] = float(planted[gt_rows][real[gt_rows]].mean())
    return result


def _retrieval(route: np.ndarray, alpha: np.ndarray, attention: np.ndarray,
               planted: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """Route and last-query attention as retrievers of the planted tokens (real tokens only)."""
    hit = route & planted
    kept, relevant = int(route[real].sum()), int(planted[real].sum())
    last = np.zeros_like(real)
    last[:, -1] = True  # the most recent token, often planted itself
    early = real & ~last
    kept_early = int(route[early].sum())
    masked = np.where(real, attention, -np.inf)
    top = np.argsort(-masked, axis=1, kind="mergesort")[:, :ATTENTION_TOP]  # [R, 3]
    top_hit = np.take_along_axis(planted, top, axis=1) & np.take_along_axis(real, top, axis=1)
    return {
        "precision": float(hit[real].sum() / kept) if kept else None,
        "precision_before_last": float(hit[early].sum() / kept_early) if kept_early else None,
        "recall": float(hit[real].sum() / relevant),
        "auc": auc(alpha[real], planted[real]),
        "attention_mass": float((attention * planted).sum(axis=1).mean()),
        "attention_auc": auc(attention[real], planted[real]),
        "attention_precision_top3": float(top_hit.sum() / top_hit.size),
    }


def routes_table(stats: dict[str, Any]) -> str:
    """A compact fixed-width table of :func:`route_statistics`."""
    head = (f"routes ({stats['examples']} histories; router={stats['router']}, "
            f"route_sample={stats['route_sample']}, inference_rule={stats['inference_rule']}, "
            f"router_target={stats['router_target']}")
    head += f"; planted base rate {stats['base_rate']:.3f})" if stats["ground_truth"] else ")"
    cols = ["layer", "keep", "keep(sampled)", "ω=0", "length"]
    if stats["ground_truth"]:
        cols += ["precision", "recall", "AUC(α)", "att.mass", "att.AUC", "att.P@3"]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    body = []
    for e in stats["layers"]:
        row = [str(e["layer"]), f(e["keep_rate"]), f(e["keep_rate_sampled"]),
               f(e["omega_zero_share"]), f"{e['route_length']:.1f}"]
        if stats["ground_truth"]:
            row += [f(e["precision"]), f(e["recall"]), f(e["auc"]), f(e["attention_mass"]),
                    f(e["attention_auc"]), f(e["attention_precision_top3"])]
        body.append(row)
    widths = [max(len(x) for x in col) for col in zip(cols, *body, strict=True)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [cols, *body]]
    return "\n".join([head, lines[0], "-" * len(lines[0]), *lines[1:]])
