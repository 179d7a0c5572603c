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


# --- the chunked sort against the plain one ---------------------------------------------------


def _reference(users, items, user_uniques, item_uniques, ts, ratings, prep):
    """The previous whole-log implementation (one lexsort, k-core after the sort): the oracle."""

    from retr.data.preprocess import _first_appearance

    if prep.rating_threshold is not None:
        passed = ratings >= prep.rating_threshold
        users, items = users[passed], items[passed]
        ts = ts[passed] if ts is not None else None
    users, user_uniques = _first_appearance(users, user_uniques)
    order = np.lexsort((ts, users)) if ts is not None else np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    ts = ts[order] if ts is not None else None
    if prep.dedupe_consecutive and len(users) > 1:
        dup = np.zeros(len(users), dtype=bool)
        dup[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
        users, items = users[~dup], items[~dup]
        ts = ts[~dup] if ts is not None else None
    keep = kcore_mask(users, items, prep.min_user_interactions, prep.min_item_interactions)
    users, items = users[keep], items[keep]
    ts = ts[keep] if ts is not None else None
    u_first = np.asarray(pd.unique(users))
    u_map = np.full(len(user_uniques), -1, dtype=np.int64)
    u_map[u_first] = np.arange(len(u_first))
    i_first = np.asarray(pd.unique(items))
    i_map = np.zeros(len(item_uniques), dtype=np.int64)
    i_map[i_first] = np.arange(1, len(i_first) + 1)
    users, items = u_map[users], i_map[items]
    offsets = np.zeros(len(u_first) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=len(u_first)), out=offsets[1:])
    return (items, offsets, ts, [str(x) for x in user_uniques[u_first]],
            [str(x) for x in item_uniques[i_first]])


@pytest.mark.parametrize("seed", range(12))
def test_chunked_sort_equals_the_whole_log_sort(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import retr.data.preprocess as pre

    monkeypatch.setattr(pre, "SORT_CHUNK_ROWS", 7)  # many chunks even on a small log
    monkeypatch.setattr(pre, "_SCAN_BLOCK", 5)
    rng = np.random.default_rng(seed)
    n, n_users, n_items = int(rng.integers(50, 400)), int(rng.integers(2, 40)), 30
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    if seed % 3 == 0:  # runs of one item: repeats for dedupe
        items = np.repeat(items[: n // 3 + 1], 3)[:n]
    ts = rng.integers(0, 20, n).astype(np.float64) if seed % 4 else None  # many ties
    ratings = rng.integers(1, 6, n).astype(np.float64)
    user_uniques = np.array([f"u{i}" for i in range(n_users)], dtype=object)
    item_uniques = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    for prep in (Preprocessing(0, 0), Preprocessing(3, 2), Preprocessing(2, 2, 3.0),
                 Preprocessing(2, 3, None, True), Preprocessing(0, 0, 2.0, True)):
        want = _reference(users, items, user_uniques, item_uniques, ts, ratings, prep)
        got = pre.build_dataset_from_arrays(users.astype(np.int32), items.astype(np.int32),
                                            user_uniques, item_uniques, ts, ratings, prep)
        np.testing.assert_array_equal(got.items, want[0])
        np.testing.assert_array_equal(got.offsets, want[1])
        if ts is None:
            assert got.timestamps is None
        else:
            np.testing.assert_array_equal(got.timestamps, want[2])
        assert got.vocab.users == want[3] and got.vocab.items == want[4]
        assert got.items.dtype == np.int64 and got.offsets.dtype == np.int64
