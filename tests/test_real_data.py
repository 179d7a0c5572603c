"""Statistics of the real benchmark sets equal ../shared/data/README.md (skipped without RETR_DATA_DIR)."""

import pytest

from retr.config import DataConfig
from retr.data.load import load_dataset


@pytest.mark.parametrize("name, users, items, interactions, max_len", [
    ("ml-1m", 6040, 3706, 1_000_209, 2314),
    ("beauty", 22363, 12101, 198_502, 204),
    ("yelp", 30431, 20033, 316_354, 350),
])
def test_describe_without_preprocessing_matches_readme(data_dir, monkeypatch, name, users, items,
                                                       interactions, max_len):
    monkeypatch.setenv("RETR_DATA_DIR", str(data_dir))
    s = load_dataset(DataConfig(source=name, min_user_interactions=0, min_item_interactions=0)).describe()
    assert (s["users"], s["items"], s["interactions"], s["max_length"]) == (users, items, interactions, max_len)


def test_ml1m_five_core_matches_sasrec_counts(data_dir, monkeypatch):
    monkeypatch.setenv("RETR_DATA_DIR", str(data_dir))
    s = load_dataset(DataConfig(source="ml-1m")).describe()
    assert (s["users"], s["items"], s["interactions"]) == (6040, 3416, 999_611)
