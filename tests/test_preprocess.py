import numpy as np
import pandas as pd
import pytest

from retr.data.preprocess import NO_PREPROCESSING, Preprocessing, build_dataset, kcore_mask
from retr.errors import DataError


def test_stable_chronological_order_and_vocab():
    log = pd.DataFrame({"user": ["a", "b", "a", "a", "b"], "item": ["x", "y", "z", "w", "x"],
                        "timestamp": [5.0, 1.0, 1.0, 5.0, 2.0]})
    ds = build_dataset(log, NO_PREPROCESSING)
    ext = np.array(["<pad>", *ds.vocab.items])
    assert ds.vocab.users == ["b", "a"] or ds.vocab.users == ["a", "b"]
    seqs = {ds.vocab.users[u]: ext[ds.sequence(u)].tolist() for u in range(ds.n_users)}
    # equal timestamps keep the original row order (x before w)
    assert seqs["a"] == ["z", "x", "w"]
    assert seqs["b"] == ["y", "x"]
    assert ds.offsets.tolist()[0] == 0 and ds.offsets[-1] == 5


def test_kcore_reaches_fixed_point():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 200, 3000)
    items = (rng.zipf(1.6, 3000) % 400).astype(np.int64)
    keep = kcore_mask(users, items, 5, 5)
    u, i = users[keep], items[keep]
    assert np.bincount(u)[np.unique(u)].min() >= 5
    assert np.bincount(i)[np.unique(i)].min() >= 5
    # applying it again removes nothing
    assert kcore_mask(u, i, 5, 5).all()


def test_rating_threshold_and_empty_error():
    log = pd.DataFrame({"user": ["a"] * 3, "item": ["x", "y", "z"], "rating": [1.0, 4.0, 5.0]})
    ds = build_dataset(log, Preprocessing(0, 0, rating_threshold=4.0))
    assert ds.n_interactions == 2
    with pytest.raises(DataError, match="no interactions left"):
        build_dataset(log, Preprocessing(5, 5))
    with pytest.raises(DataError, match="no rating column"):
        build_dataset(log.drop(columns="rating"), Preprocessing(0, 0, rating_threshold=3.0))


def test_padded_prefixes_are_left_padded_views(tiny_dataset):
    ds = tiny_dataset
    out = ds.padded_prefixes(np.array([0, 1]), np.array([2, 5]), 4)
    assert out[0].tolist() == [0, 0, *ds.sequence(0)[:2].tolist()]
    assert out[1].tolist() == ds.sequence(1)[1:5].tolist()
