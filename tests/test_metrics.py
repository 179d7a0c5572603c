import math

import numpy as np
import pytest

from retr.evaluation.metrics import metrics_from_counts


def test_hand_computed_no_ties():
    # ranks 1, 3, 12
    m = metrics_from_counts(np.array([0, 2, 11]), np.zeros(3, int), np.ones(3, bool), (1, 10))
    assert m["HR@1"].tolist() == [1, 0, 0]
    assert m["HR@10"].tolist() == [1, 1, 0]
    assert m["NDCG@10"] == pytest.approx([1.0, 1 / math.log2(4), 0.0])
    assert m["MRR"] == pytest.approx([1.0, 1 / 3, 1 / 12])
    assert m["MRR@10"] == pytest.approx([1.0, 1 / 3, 0.0])
    assert m["Recall@10"].tolist() == m["HR@10"].tolist()


def test_ties_are_expected_random_tie_break():
    # target tied with 3 others, 1 strictly above: rank uniform over 2..5
    m = metrics_from_counts(np.array([1]), np.array([3]), np.array([True]), (3,))
    assert m["HR@3"][0] == pytest.approx(2 / 4)
    assert m["NDCG@3"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 4)
    assert m["MRR"][0] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)


def test_constant_scorer_is_exactly_chance():
    n = 101  # target + 100 negatives all tied
    m = metrics_from_counts(np.array([0]), np.array([n - 1]), np.array([True]), (10,))
    assert m["HR@10"][0] == pytest.approx(10 / n)
    assert m["MRR"][0] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)


def test_invalid_target_scores_zero():
    m = metrics_from_counts(np.array([0]), np.array([0]), np.array([False]), (10,))
    assert all(v[0] == 0 for v in m.values())
