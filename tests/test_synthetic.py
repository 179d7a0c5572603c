"""The synthetic generator plants the pathways it claims, reproducibly and learnably."""

from __future__ import annotations

import collections
import time

import numpy as np
import pandas as pd
import pytest

from retr.data.preprocess import Preprocessing, build_dataset
from retr.data.synthetic import (
    SHAPES,
    SyntheticConfig,
    SyntheticLog,
    generate,
    parse_synthetic_spec,
    planted_rule,
    theme_structure,
)
from retr.errors import DataError


@pytest.fixture(scope="module")
def default_log() -> SyntheticLog:
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def sequences(default_log: SyntheticLog) -> dict[str, list[str]]:
    return default_log.log.groupby("user", sort=False)["item"].agg(list).to_dict()


def test_same_seed_same_log_and_different_seed_differs() -> None:
    cfg = SyntheticConfig(n_users=300, seed=7)
    a, b = generate(cfg), generate(cfg)
    pd.testing.assert_frame_equal(a.log, b.log)
    assert a.pathways == b.pathways
    c = generate(SyntheticConfig(n_users=300, seed=8))
    assert not a.log["item"].equals(c.log["item"])
    assert a.pathways != c.pathways


def test_log_columns_lengths_and_timestamps(default_log: SyntheticLog) -> None:
    log, cfg = default_log.log, default_log.config
    assert list(log.columns) == ["user", "item", "timestamp"]
    assert log["user"].map(type).eq(str).all() and log["item"].map(type).eq(str).all()
    assert log["timestamp"].dtype == np.float64
    lengths = log.groupby("user", sort=False).size()
    assert len(lengths) == cfg.n_users
    assert lengths.min() >= cfg.min_len and lengths.max() <= cfg.max_len
    same_user = log["user"].to_numpy()[1:] == log["user"].to_numpy()[:-1]
    assert (np.diff(log["timestamp"].to_numpy())[same_user] > 0).all()


def test_every_item_frequent_enough_for_5_core(default_log: SyntheticLog) -> None:
    log = default_log.log
    counts = log["item"].value_counts()
    assert len(counts) == default_log.config.n_items and counts.min() >= 5
    ds = build_dataset(log, Preprocessing(5, 5))
    assert ds.n_interactions == len(log) and ds.n_users == default_log.config.n_users


def test_pathway_positions_are_before_the_last_item(default_log: SyntheticLog,
                                                     sequences: dict[str, list[str]]) -> None:
    assert set(default_log.pathways) == set(sequences)
    for user, info in default_log.pathways.items():
        seq, pos = sequences[user], info["positions"]
        assert info["shape"] in SHAPES
        assert info["target"] == seq[-1]
        assert len(pos) == 3 and pos == sorted(set(pos))
        assert 0 <= pos[0] and pos[-1] < len(seq) - 1
    assert {p["shape"] for p in default_log.pathways.values()} == set(SHAPES)


def test_shapes_look_as_documented(default_log: SyntheticLog,
                                   sequences: dict[str, list[str]]) -> None:
    st = theme_structure(default_log.config)
    for user, info in default_log.pathways.items():
        seq, pos = sequences[user], info["positions"]
        items = [seq[p] for p in pos]
        if info["shape"] == "correlated":
            # Recent and contiguous except for at most one intruding noise behavior.
            assert pos[-1] - pos[0] <= 3 and len(seq) - 1 - pos[-1] <= 2
            assert items[1] == st.next_in_theme(items[0])
            assert items[2] == st.next_in_theme(items[1])
        elif info["shape"] == "casual":
            assert len(set(items)) == 1
            assert all(b - a >= 2 for a, b in zip(pos[:-1], pos[1:], strict=False))
            assert len(seq) - 1 - pos[-1] >= 2
        else:
            old = info["old_positions"]
            assert len(old) == 3 and old[-1] < pos[0] and not set(old) & set(pos)
            old_theme = {st.theme(seq[p]) for p in old}
            new_theme = {st.theme(seq[p]) for p in pos}
            assert len(old_theme) == 1 and len(new_theme) == 1 and old_theme != new_theme
            assert st.theme(info["target"]) in new_theme
    assert all("old_positions" not in p for p in default_log.pathways.values()
               if p["shape"] != "drifted")


def test_target_is_predictable_from_pathway_but_not_from_popularity(
        default_log: SyntheticLog, sequences: dict[str, list[str]]) -> None:
    targets = {u: s[-1] for u, s in sequences.items()}
    rule = planted_rule(default_log)
    hit_rule = np.mean([rule[u] == targets[u] for u in targets])
    counts = collections.Counter(i for s in sequences.values() for i in s[:-1])
    ranked = [i for i, _ in counts.most_common()]
    hr10_pop = np.mean([targets[u] in ranked[:10] for u in targets])
    top1 = np.mean([targets[u] == ranked[0] for u in targets])
    assert hit_rule > 0.95
    assert hr10_pop < 0.1 and top1 < 0.05
    # A rule that ignores the pathway (successor of the previous item) fails on casual users.
    st = theme_structure(default_log.config)
    casual = [u for u, p in default_log.pathways.items() if p["shape"] == "casual"]
    naive = np.mean([st.next_in_theme(sequences[u][-2]) == targets[u] for u in casual])
    assert naive < 0.2


def test_pathways_repeat_along_the_sequence(default_log: SyntheticLog,
                                            sequences: dict[str, list[str]]) -> None:
    """Earlier steps also follow the theme/partner structure, not only the last one."""
    st = theme_structure(default_log.config)
    hits = total = 0
    for seq in sequences.values():
        body = seq[:-1]
        for t in range(3, len(body)):
            window = body[max(0, t - 12):t]
            candidates = {st.next_in_theme(i) for i in window[-3:]}
            recurring = [i for i, c in collections.Counter(window).items() if c >= 3]
            candidates |= {st.partner_of(i) for i in recurring}
            hits += body[t] in candidates
            total += 1
    assert hits / total > 0.3


def test_noise_and_shapes_options() -> None:
    quiet = generate(SyntheticConfig(n_users=200, noise=0.0, shapes=("correlated",)))
    seqs = quiet.log.groupby("user", sort=False)["item"].agg(list).to_dict()
    for user, info in quiet.pathways.items():
        n = len(seqs[user])
        assert info["shape"] == "correlated" and info["positions"] == [n - 4, n - 3, n - 2]
    noisy = generate(SyntheticConfig(n_users=200, noise=0.8, shapes=("casual",)))
    assert {p["shape"] for p in noisy.pathways.values()} == {"casual"}


def test_save_load_round_trip(tmp_path) -> None:
    small = generate(SyntheticConfig(n_users=50, seed=4))
    small.save(tmp_path / "syn")
    names = sorted(p.name for p in (tmp_path / "syn").iterdir())
    assert names == ["interactions.csv", "pathways.json", "synthetic_config.json"]
    back = SyntheticLog.load(tmp_path / "syn")
    pd.testing.assert_frame_equal(back.log, small.log)
    assert back.pathways == small.pathways and back.config == small.config
    (tmp_path / "syn" / "pathways.json").unlink()
    with pytest.raises(DataError, match="pathways.json"):
        SyntheticLog.load(tmp_path / "syn")


def test_parse_spec() -> None:
    assert parse_synthetic_spec("synthetic") == SyntheticConfig()
    assert parse_synthetic_spec("synthetic:") == SyntheticConfig()
    cfg = parse_synthetic_spec("synthetic:n_users=500, seed=3,noise=0.25,shapes=casual+drifted")
    assert cfg == SyntheticConfig(n_users=500, seed=3, noise=0.25, shapes=("casual", "drifted"))
    with pytest.raises(DataError, match=r"'n_user'.*valid keys: n_users"):
        parse_synthetic_spec("synthetic:n_user=5")
    with pytest.raises(DataError, match=r"seed='x'.*valid keys"):
        parse_synthetic_spec("synthetic:seed=x")
    with pytest.raises(DataError, match="noise"):
        parse_synthetic_spec("synthetic:noise=1.5")
    with pytest.raises(DataError, match="shapes"):
        parse_synthetic_spec("synthetic:shapes=casual+loop")
    with pytest.raises(DataError, match="min_len"):
        parse_synthetic_spec("synthetic:min_len=3")
    with pytest.raises(DataError, match="needs a value"):
        parse_synthetic_spec("synthetic:seed")
    with pytest.raises(DataError, match="not a synthetic spec"):
        parse_synthetic_spec("beauty")


def test_twenty_thousand_users_fast() -> None:
    start = time.perf_counter()
    big = generate(SyntheticConfig(n_users=20_000))
    assert time.perf_counter() - start < 5.0
    assert len(big.pathways) == 20_000
