import numpy as np
import pytest
import torch

from retr.config import EvalConfig
from retr.data.splits import make_split
from retr.evaluation.metrics import metrics_from_counts
from retr.evaluation.protocol import evaluate
from retr.evaluation.ranking import (
    full_rank_counts,
    history_by_item,
    history_pairs,
    sampled_rank_counts,
    topk_items,
)
from retr.models.base import ModelOutput, SequentialRecommender
from tests.test_splits import _random_dataset


class BagModel(SequentialRecommender):
    """Scores items by dot product with the sum of the input's embeddings (integer-valued)."""

    def __init__(self, n_items, d=4, seed=0, constant=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_items, self.max_len = n_items, 8
        emb = torch.randint(-3, 4, (n_items + 1, d), generator=g).float()
        emb[0] = 0
        self.emb = torch.nn.Parameter(torch.ones_like(emb) if constant else emb)

    def forward(self, seqs, output_attentions=False):
        return ModelOutput(hidden=self.emb[seqs].cumsum(1))

    def item_representation(self, items):
        return self.emb[items]


def naive_counts(model, ds, ex, exclude_history):
    h = torch.stack([model.user_representation(torch.from_numpy(
        ds.padded_prefixes(np.array([u]), np.array([n]), model.max_len)))[0]
        for u, n in zip(ex.users, ex.lengths, strict=True)])
    scores = (h @ model.emb.T).detach().numpy()
    g, t, v = [], [], []
    for r, (u, n, tgt) in enumerate(zip(ex.users, ex.lengths, ex.targets, strict=True)):
        cand = set(range(1, ds.n_items + 1))
        if exclude_history:
            cand -= set(ds.sequence(u)[:n].tolist())
        v.append(tgt in cand)
        others = [c for c in cand if c != tgt]
        g.append(sum(scores[r, c] > scores[r, tgt] for c in others))
        t.append(sum(scores[r, c] == scores[r, tgt] for c in others))
    return np.array(g), np.array(t), np.array(v)


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_chunked_full_ranking_equals_naive(exclude, chunk):
    ds = _random_dataset()
    split = make_split(ds, "loo")
    model = BagModel(ds.n_items)
    rc = full_rank_counts(model, ds, split.test, exclude, batch_size=5, item_chunk=chunk)
    g, t, v = naive_counts(model, ds, split.test, exclude)
    assert (rc.greater[v] == g[v]).all() and (rc.ties[v] == t[v]).all()
    assert (rc.valid == v).all()
    assert t.sum() > 0  # the case exercises ties


def test_history_by_item_dedupes_orders_and_finds_the_target():
    """Distinct (row, item) pairs ordered by item then row, with each row's target lookup and
    distinct-item count, equal to the set arithmetic they stand for; empty histories too."""
    ds = _random_dataset()
    split = make_split(ds, "loo")
    ex = split.test
    lengths = ex.lengths.copy()
    lengths[0] = 0  # an empty history: nothing excluded, its target not seen
    rows, items, seen, counts = history_by_item(ds, ex.users, lengths, ex.targets)
    pairs = sorted({(int(i), r) for r, (u, n) in enumerate(zip(ex.users, lengths, strict=True))
                    for i in ds.sequence(u)[:n]})
    assert list(zip(items.tolist(), rows.tolist(), strict=True)) == pairs
    for r, (u, n, t) in enumerate(zip(ex.users, lengths, ex.targets, strict=True)):
        hist = set(ds.sequence(u)[:n].tolist())
        assert seen[r] == (t in hist) and counts[r] == len(hist)
    assert seen.any() and not seen[0] and counts[0] == 0
    nothing = history_by_item(ds, ex.users[:2], np.zeros(2, dtype=np.int64), ex.targets[:2])
    assert len(nothing[0]) == 0 and not nothing[2].any() and (nothing[3] == 0).all()


def test_constant_scorer_gets_chance_level():
    ds = _random_dataset()
    split = make_split(ds, "loo")
    model = BagModel(ds.n_items, constant=True)
    cfg = EvalConfig(ks=[10], negatives=20)
    full = evaluate(model, ds, split.test, "full", EvalConfig(ks=[10], exclude_history=False))
    assert full["metrics"]["HR@10"] == pytest.approx(10 / ds.n_items)
    negs = np.stack([np.random.default_rng(0).choice(np.setdiff1d(np.arange(1, ds.n_items + 1),
                     ds.sequence(u)), 20, replace=False) for u in split.test.users])
    sampled = evaluate(model, ds, split.test, "sampled", cfg, negs)
    assert sampled["metrics"]["HR@10"] == pytest.approx(10 / 21)


def test_sampled_counts_hand_case():
    ds = _random_dataset()
    split = make_split(ds, "loo")
    model = BagModel(ds.n_items)
    negs = np.tile(np.arange(1, 6), (len(split.test), 1))
    rc = sampled_rank_counts(model, ds, split.test, negs, batch_size=4)
    h = model.user_representation(torch.from_numpy(
        ds.padded_prefixes(split.test.users, split.test.lengths, model.max_len)))
    s = (h @ model.emb.T).detach().numpy()
    tgt = s[np.arange(len(s)), split.test.targets]
    assert (rc.greater == (s[:, 1:6] > tgt[:, None]).sum(1)).all()
    m = metrics_from_counts(rc.greater, rc.ties, rc.valid, (10,))
    assert (m["HR@10"] == 1).all()  # 6 candidates < 10


def test_running_topk_equals_full_sort():
    ds = _random_dataset()
    model = BagModel(ds.n_items)
    users, lengths = np.arange(6), np.full(6, 3)
    h = model.user_representation(torch.from_numpy(ds.padded_prefixes(users, lengths, 8)))
    rows, items = history_pairs(ds, users, lengths)
    ids, scores = topk_items(model, h, 5, ds.n_items, rows, items, item_chunk=4)
    full = (h @ model.emb.T).detach()
    full[:, 0] = -torch.inf
    full[torch.from_numpy(rows), torch.from_numpy(items)] = -torch.inf
    for r in range(6):
        order = sorted(range(ds.n_items + 1), key=lambda i: (-full[r, i].item(), i))[:5]
        assert ids[r].tolist() == order
        assert not set(ids[r].tolist()) & set(items[rows == r].tolist())


@pytest.mark.parametrize("seed", range(20))
def test_stable_top_matches_a_stable_sort(seed: int) -> None:
    """Top-k by selection equals the first k columns of a stable descending sort, ties included."""
    from retr.evaluation.ranking import _stable_top

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (9, 30), generator=g).float()  # many ties, some at the cut
    scores[0] = 1.0  # a constant row
    scores[1, :25] = -torch.inf  # fewer finite scores than k
    scores[2] = torch.randn(30, generator=g)  # no ties
    for k in (1, 7, 30, 40):
        want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(_stable_top(scores, k), want)


@pytest.mark.parametrize("key", ["sasrec", "sasrec_pathway", "retr", "bert4rec", "gru4rec"])
def test_user_states_in_length_groups_equal_one_padded_batch(key: str) -> None:
    """Histories shorter than, equal to and longer than the window (max_len 16) all get the
    state of one batch padded to max_len, BERT4Rec's full windows included."""
    from retr.evaluation.ranking import user_states
    from retr.models import build_model
    from tests.test_models import TINY

    name, fields = TINY[key]
    ds = _random_dataset(n_users=40, n_items=28, seed=3)
    torch.manual_seed(0)
    model = build_model(name, ds.n_items, {**fields, "max_len": 8}).eval()
    users = np.arange(ds.n_users)
    lengths = ds.lengths[users].copy()
    lengths[[0, 5]] = 0  # empty histories (serving's cold users) sit among the others
    assert (lengths < 8).any() and (lengths == 8).any() and (lengths > 8).any()
    one = user_states(model, ds, users, lengths, groups=1)
    with torch.no_grad():
        padded = model.user_representation(
            torch.from_numpy(ds.padded_prefixes(users, lengths, model.max_len)))
    torch.testing.assert_close(one, padded, rtol=0, atol=1e-5)
    for groups in (3, 20, 40):  # 20: the first group holds only the two empty histories
        torch.testing.assert_close(user_states(model, ds, users, lengths, groups=groups),
                                   padded, rtol=0, atol=1e-5)
