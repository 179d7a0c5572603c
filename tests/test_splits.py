import numpy as np
import pandas as pd
import pytest

from retr.data.negatives import sample_negatives
from retr.data.preprocess import NO_PREPROCESSING, build_dataset
from retr.data.splits import Split, make_split
from retr.errors import DataError


def _random_dataset(n_users=60, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    t = 0.0
    for u in range(n_users):
        for i in rng.integers(0, n_items, rng.integers(3, 15)):
            t += rng.random()
            rows.append((f"u{u}", f"i{i}", t + u))
    return build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), NO_PREPROCESSING)


@pytest.mark.parametrize("kind", ["loo", "temporal", "rolling"])
def test_no_test_target_in_training_input(kind):
    ds = _random_dataset()
    split = make_split(ds, kind, seed=3)
    train_end = {int(u): int(n) for u, n in zip(split.train_users, split.train_lengths, strict=True)}
    for part in (split.valid, split.test):
        for u, n in zip(part.users, part.lengths, strict=True):
            # the target sits at position n of the user's sequence; training stops before it
            assert train_end.get(int(u), 0) <= n
    # the test target is never a training target position either
    if kind == "loo":
        assert (split.train_lengths == ds.lengths[split.train_users] - 2).all()
    if kind == "rolling":
        assert not set(split.test.users) & set(split.train_users)
        assert not set(split.valid.users) & set(split.train_users)


def test_loo_targets_and_inputs(tiny_dataset):
    split = make_split(tiny_dataset, "loo")
    for u, n, t in zip(split.test.users, split.test.lengths, split.test.targets, strict=True):
        seq = tiny_dataset.sequence(u)
        assert n == len(seq) - 1 and t == seq[-1]
    for u, n, t in zip(split.valid.users, split.valid.lengths, split.valid.targets, strict=True):
        assert t == tiny_dataset.sequence(u)[-2] and n == len(tiny_dataset.sequence(u)) - 2


def test_rolling_last_five_steps():
    ds = _random_dataset()
    split = make_split(ds, "rolling", seed=0, rolling_steps=5)
    u = split.test.users[0]
    rows = split.test.lengths[split.test.users == u]
    n = ds.lengths[u]
    assert rows.tolist() == list(range(n - min(5, n - 1), n))


def test_split_deterministic_and_round_trip(tmp_path):
    ds = _random_dataset()
    a, b = make_split(ds, "rolling", seed=7), make_split(ds, "rolling", seed=7)
    assert (a.test.users == b.test.users).all()
    a.save(tmp_path / "s.npz")
    c = Split.load(tmp_path / "s.npz")
    assert c.kind == "rolling" and (c.test.targets == a.test.targets).all()


def test_temporal_needs_timestamps():
    ds = _random_dataset()
    ds.timestamps = None
    with pytest.raises(DataError, match="needs timestamps"):
        make_split(ds, "temporal")


def test_negatives_reproducible_distinct_and_unseen():
    ds = _random_dataset()
    split = make_split(ds, "loo")
    a = sample_negatives(ds, split.test, n=20, seed=1)
    b = sample_negatives(ds, split.test, n=20, seed=1)
    c = sample_negatives(ds, split.test, n=20, seed=2)
    assert (a == b).all() and not (a == c).all()
    for row, u in zip(a, split.test.users, strict=True):
        assert len(set(row.tolist())) == 20
        assert not set(row.tolist()) & set(ds.sequence(u).tolist())
        assert row.min() >= 1
    pop = sample_negatives(ds, split.test, n=5, seed=1, popularity=ds.item_counts())
    assert pop.shape == (len(split.test), 5)


def test_negatives_too_many_asked():
    ds = _random_dataset(n_items=12)
    split = make_split(ds, "loo")
    with pytest.raises(DataError, match="fewer than the"):
        sample_negatives(ds, split.test, n=12, seed=0)
