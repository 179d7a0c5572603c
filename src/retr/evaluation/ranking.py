"""Full and sampled ranking of evaluation examples, in user batches x item chunks.

Memory is bounded by ``batch_size x item_chunk`` scores whatever the catalogue size: for the
metrics we only need, per example, how many candidates score above the target and how many tie
with it (see :mod:`retr.evaluation.metrics`), which chunks accumulate exactly. Top-k lists for
recommendations use a running top-k over the same chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from retr.data.dataset import SequenceDataset
from retr.data.splits import EvalExamples
from retr.errors import RetrError
from retr.models.base import SequentialRecommender, length_groups


@dataclass
class RankCounts:
    """Per example: candidates scored above the target, tied with it, and whether it was rankable."""

    greater: np.ndarray
    ties: np.ndarray
    valid: np.ndarray
    n_candidates: np.ndarray


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def history_pairs(dataset: SequenceDataset, users: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of every item in each example's full prefix (not only the model window)."""
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(users)), lengths)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = dataset.items[np.repeat(dataset.offsets[users], lengths) + within]
    return rows, items


def history_by_item(dataset: SequenceDataset, users: np.ndarray, lengths: np.ndarray,
                    targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (row, item) pairs of the examples' histories ordered by item, whether each
    row's target is among them, and each row's count of distinct items.

    One sort of item-major keys does it all (``np.unique`` plus a second sort by item took about
    20 times as long on ml-1m's validation batches; on a GPU that host work was the larger part
    of a validation).
    """
    b = np.int64(len(users))
    rows, items = history_pairs(dataset, users, lengths)
    key = np.sort(items * b + rows)
    key = key[np.concatenate(([True], key[1:] != key[:-1]))] if len(key) else key
    rows, items = key % b, key // b
    want = targets.astype(np.int64) * b + np.arange(b)
    at = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
    seen = key[at] == want if len(key) else np.zeros(len(users), dtype=bool)
    return rows, items, seen, np.bincount(rows, minlength=len(users))


NOT_FINITE = ("the model produced NaN or infinite scores; the checkpoint is broken or training "
              "diverged (try a lower learning rate)")


def _check_finite(scores: torch.Tensor) -> None:
    if not torch.isfinite(scores).all():
        raise RetrError(NOT_FINITE)


@torch.no_grad()
def states_of(model: SequentialRecommender, seqs: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """[B, d] next-item states of left-padded windows ``seqs`` [B, max_len].

    The rows run in ``groups`` groups of similar length, each cut to its longest history plus
    one column (BERT4Rec appends its [mask] there): the same states as one padded batch, for
    less work when histories are shorter than the window.
    """
    n = seqs.shape[1]
    parts = length_groups(seqs, groups)
    states = [model.user_representation(seqs[rows, n - min(width + 1, n):])
              for rows, width in parts]  # [b, d] per group
    order = torch.cat([rows for rows, _ in parts])  # [B] the batch rows, group by group
    return torch.cat(states)[torch.argsort(order)]  # [B, d] back in the batch's order


def user_states(model: SequentialRecommender, dataset: SequenceDataset, users: np.ndarray,
                lengths: np.ndarray, groups: int = 4) -> torch.Tensor:
    """[B, d] next-item states for each (user, prefix length), using the last max_len items."""
    device = next(iter(model.buffers()), next(iter(model.parameters()), torch.empty(0))).device
    seqs = torch.from_numpy(dataset.padded_prefixes(users, lengths, model.max_len)).to(device)
    return states_of(model, seqs, groups)


@torch.no_grad()
def full_rank_counts(model: SequentialRecommender, dataset: SequenceDataset, examples: EvalExamples,
                     exclude_history: bool = True, batch_size: int = 256, item_chunk: int = 4096,
                     progress: bool = False) -> RankCounts:
    """Rank each target against every item (padding excluded; history excluded by default).

    The item-chunk loop never waits on the device: the history's (row, item) pairs are sorted
    by item on the host (:func:`history_by_item`), so each chunk's pairs are a slice known in
    advance (no boolean selection), the target is masked by a scatter (no ``nonzero``), and the
    finiteness check is one flag per batch. On a GPU each of those was a host synchronisation
    per chunk.
    """
    model.eval()
    m, n_items = len(examples), dataset.n_items
    greater = np.zeros(m, dtype=np.int64)
    ties = np.zeros(m, dtype=np.int64)
    valid = np.ones(m, dtype=bool)
    n_cand = np.zeros(m, dtype=np.int64)
    it = _batches(m, batch_size)
    bar = tqdm(it, total=(m + batch_size - 1) // batch_size, desc="full ranking", unit="batch",
               disable=not progress, leave=False)
    for sl in bar:
        users, lengths, targets = examples.users[sl], examples.lengths[sl], examples.targets[sl]
        b = len(users)
        h = user_states(model, dataset, users, lengths)
        device = h.device
        tgt = torch.from_numpy(targets).to(device)
        t_score = model.score_candidates(h, tgt[:, None])  # [B, 1]
        finite = torch.isfinite(t_score).all()  # [] stays on the device until the batch ends
        g = torch.zeros(b, dtype=torch.int64, device=device)
        e = torch.zeros(b, dtype=torch.int64, device=device)
        excluded = np.zeros(b, dtype=np.int64)
        bounds = np.zeros(0, dtype=np.int64)
        if exclude_history:
            rows, items, seen_target, excluded = history_by_item(dataset, users, lengths, targets)
            valid[sl] = ~seen_target
            starts = np.arange(1, n_items + 1, item_chunk)
            bounds = np.searchsorted(items, np.append(starts, n_items + 1))  # per chunk
            rows_t, items_t = torch.from_numpy(rows).to(device), torch.from_numpy(items).to(device)
        for i, c0 in enumerate(range(1, n_items + 1, item_chunk)):
            c1 = min(c0 + item_chunk, n_items + 1)
            ids = torch.arange(c0, c1, device=device)
            s = model.score_items(h, ids)  # [B, C]
            finite = finite & torch.isfinite(s).all()
            # The target itself never counts against itself (NaN compares False).
            own = ((tgt >= c0) & (tgt < c1))[:, None]  # [B, 1]
            col = (tgt - c0).clamp(0, c1 - c0 - 1)[:, None]  # [B, 1]
            s.scatter_(1, col, torch.where(own, torch.nan, s.gather(1, col)))
            if exclude_history and bounds[i + 1] > bounds[i]:
                part = slice(int(bounds[i]), int(bounds[i + 1]))
                s[rows_t[part], items_t[part] - c0] = torch.nan  # the history: not counted
            g += (s > t_score).sum(1, dtype=torch.int64)
            e += (s == t_score).sum(1, dtype=torch.int64)
        if not bool(finite):
            raise RetrError(NOT_FINITE)
        greater[sl] = g.cpu().numpy()
        ties[sl] = e.cpu().numpy()
        # Candidates: all items minus the excluded history (the target among them when valid).
        n_cand[sl] = n_items - excluded
    return RankCounts(greater, ties, valid, n_cand)


@torch.no_grad()
def sampled_rank_counts(model: SequentialRecommender, dataset: SequenceDataset, examples: EvalExamples,
                        negatives: np.ndarray, batch_size: int = 1024,
                        progress: bool = False) -> RankCounts:
    """Rank each target against its stored sampled negatives (the paper's protocol)."""
    model.eval()
    m = len(examples)
    if negatives.shape[0] != m:
        raise RetrError(f"stored negatives cover {negatives.shape[0]} examples, the split has {m}; "
                        "the split or negatives file does not belong to this run")
    greater = np.zeros(m, dtype=np.int64)
    ties = np.zeros(m, dtype=np.int64)
    bar = tqdm(_batches(m, batch_size), total=(m + batch_size - 1) // batch_size,
               desc="sampled ranking", unit="batch", disable=not progress, leave=False)
    for sl in bar:
        h = user_states(model, dataset, examples.users[sl], examples.lengths[sl])
        cand = np.concatenate([examples.targets[sl, None], negatives[sl]], axis=1)
        s = model.score_candidates(h, torch.from_numpy(cand).to(h.device))  # [B, 1 + n]
        _check_finite(s)
        greater[sl] = (s[:, 1:] > s[:, :1]).sum(1).cpu().numpy()
        ties[sl] = (s[:, 1:] == s[:, :1]).sum(1).cpu().numpy()
    n_cand = np.full(m, negatives.shape[1] + 1, dtype=np.int64)
    return RankCounts(greater, ties, np.ones(m, dtype=bool), n_cand)


@torch.no_grad()
def topk_items(model: SequentialRecommender, h: torch.Tensor, k: int, n_items: int,
               exclude_rows: np.ndarray | None = None, exclude_items: np.ndarray | None = None,
               candidates: torch.Tensor | None = None,
               item_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k over item chunks: ([B, k] internal ids, [B, k] scores), best first.

    Excluded (row, item) pairs and padding score -inf and are never returned unless fewer than
    k items remain (then the list is padded with id 0 and score -inf). Ties order by lower id.
    ``candidates`` [C] restricts ranking to those items.
    """
    b = h.shape[0]
    device = h.device
    best_s = torch.full((b, 0), -torch.inf, device=device)
    best_i = torch.zeros((b, 0), dtype=torch.int64, device=device)
    pool = candidates if candidates is not None else torch.arange(1, n_items + 1, device=device)
    ex_r = ex_pos = None
    if exclude_rows is not None and exclude_items is not None:
        # position of every item in the pool (-1 if absent), so each chunk finds its columns
        pos_of_item = torch.full((n_items + 1,), -1, dtype=torch.int64, device=device)
        pos_of_item[pool] = torch.arange(len(pool), device=device)
        ex_pos = pos_of_item[torch.from_numpy(exclude_items).to(device)]
        keep = ex_pos >= 0
        ex_r, ex_pos = torch.from_numpy(exclude_rows).to(device)[keep], ex_pos[keep]
    for c0 in range(0, len(pool), item_chunk):
        ids = pool[c0:c0 + item_chunk]
        s = model.score_items(h, ids)
        _check_finite(s)
        if ex_r is not None and ex_pos is not None:
            sel = (ex_pos >= c0) & (ex_pos < c0 + len(ids))
            s[ex_r[sel], ex_pos[sel] - c0] = -torch.inf
        all_s = torch.cat([best_s, s], dim=1)
        all_i = torch.cat([best_i, ids.expand(b, -1)], dim=1)
        order = _stable_top(all_s, k)
        best_s = all_s.gather(1, order)
        best_i = all_i.gather(1, order)
    best_i = torch.where(torch.isinf(best_s), torch.zeros_like(best_i), best_i)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = torch.cat([best_s, torch.full((b, pad), -torch.inf, device=device)], 1)
        best_i = torch.cat([best_i, torch.zeros((b, pad), dtype=torch.int64, device=device)], 1)
    return best_i, best_s


def top_k(model: SequentialRecommender, dataset: SequenceDataset, users: np.ndarray,
          lengths: np.ndarray, k: int = 10, exclude_history: bool = True, batch_size: int = 256,
          item_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each (user, prefix length)'s ``k`` best items over the whole catalogue, best first.

    Returns ([U, k] internal item ids, [U, k] scores). The evaluation path: user batches of
    ``batch_size`` x item chunks of ``item_chunk`` (memory bounded whatever the catalogue), the
    states of :func:`user_states`, every item of the prefix excluded unless
    ``exclude_history`` is False. Ties order by lower id; rows with fewer than ``k`` rankable
    items end in id 0 with score -inf. ``dataset.vocab.items[i - 1]`` is item ``i``'s
    external id.
    """
    model.eval()
    ids, scores = [], []
    for sl in _batches(len(users), batch_size):
        h = user_states(model, dataset, users[sl], lengths[sl])
        rows, items = history_pairs(dataset, users[sl], lengths[sl]) if exclude_history \
            else (None, None)
        i, s = topk_items(model, h, k, dataset.n_items, rows, items, item_chunk=item_chunk)
        ids.append(i.cpu())
        scores.append(s.cpu())
    if not ids:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return torch.cat(ids).numpy(), torch.cat(scores).numpy()


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of each row's k best scores, best first, ties by lower column: what a stable
    descending sort's first k columns are, without sorting whole rows.

    ``topk`` picks the k; only they are ordered. A row whose k-th score ties with a score
    left out (the cut falls inside a tie, as for a popularity scorer) is fully sorted, since
    ``topk`` does not say which of the tied columns it kept.
    """
    k = min(k, scores.shape[1])
    vals, cols = torch.topk(scores, k, dim=1)
    kth = vals[:, -1:]
    straddle = (scores == kth).sum(1) != (vals == kth).sum(1)
    cols = cols.gather(1, torch.sort(cols, dim=1).indices)  # by column, then stably by score
    cols = cols.gather(1, torch.sort(scores.gather(1, cols), dim=1, descending=True,
                                     stable=True).indices)
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        cols[rows] = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :k]
    return cols
