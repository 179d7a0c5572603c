"""Route statistics: in results.json for router models, printed by `retr evaluate`, correct."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retr.cli import main
from retr.config import resolve_config
from retr.data import synthetic
from retr.data.load import load_dataset
from retr.data.splits import leave_one_out
from retr.evaluation.routes import auc, planted_window, route_statistics
from retr.runs import load_run, train

SOURCE = "synthetic:n_users=160,n_items=80,n_themes=10,min_len=20,max_len=30,seed=1"
MODEL = ["model.hidden_size=16", "model.num_heads=2", "model.ffn_size=16", "model.max_len=32",
         "model.router_hidden=8"]


def tiny_run(tmp_path: Path, name: str, model: str = "retr", *sets: str) -> dict[str, Any]:
    cfg = resolve_config(None, [f"data.source={json.dumps(SOURCE)}", "train.epochs=1",
                                "train.threads=1", "eval.negatives=20",
                                *(MODEL if model == "retr" else [MODEL[0], MODEL[1], MODEL[3]]), *sets],
                         base={"model": {"name": model}})
    return train(cfg, load_dataset(cfg.data), tmp_path / name, log=lambda msg: None)


def test_auc_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.random(300) < 0.3
    pairs = (scores[labels][:, None] > scores[~labels][None, :]).mean() \
        + 0.5 * (scores[labels][:, None] == scores[~labels][None, :]).mean()
    assert auc(scores, labels) == pytest.approx(pairs)
    assert auc(scores, np.zeros(300, dtype=bool)) is None


def test_planted_window_marks_the_tokens_that_explain_the_last_item() -> None:
    cfg = resolve_config(None, [f"data.source={json.dumps(SOURCE)}"], base={"model": {"name": "retr"}})
    dataset = load_dataset(cfg.data)
    test = leave_one_out(dataset).test
    planted = planted_window(dataset, SOURCE, test, 32)
    assert planted is not None and planted.shape == (len(test), 32)
    assert (planted.sum(axis=1) == 3).all()  # every history fits the window here
    generated = synthetic.generate(synthetic.parse_synthetic_spec(SOURCE))
    st = synthetic.theme_structure(generated.config)
    items = np.asarray(dataset.vocab.items)
    windows = dataset.padded_prefixes(test.users, test.lengths, 32)
    for row in range(0, len(test), 17):
        user = dataset.vocab.users[test.users[row]]
        shape = generated.pathways[user]["shape"]
        last = items[windows[row, np.flatnonzero(planted[row])[-1]] - 1]
        expect = st.partner_of(last) if shape == "casual" else st.next_in_theme(last)
        assert items[test.targets[row] - 1] == expect
    assert planted_window(dataset, "ml-1m", test, 32) is None
    assert planted_window(dataset, f"{SOURCE}+{SOURCE}", test, 32) is None  # two domains


def test_random_router_keeps_p_and_its_route_is_no_retriever(tmp_path: Path) -> None:
    res = tiny_run(tmp_path, "random", "retr", 'model.router="random"',
                   "model.random_keep_prob=0.3")
    stats = res["routes"]
    assert stats["router"] == "random" and stats["ground_truth"]
    assert stats["ground_truth_examples"] == stats["examples"] == 160
    assert 0.05 < stats["base_rate"] < 0.2
    first, second = stats["layers"]
    assert first["keep_rate"] == pytest.approx(0.3, abs=0.03)
    assert first["keep_rate_sampled"] == pytest.approx(0.3, abs=0.03)
    assert second["keep_rate"] == pytest.approx(0.09, abs=0.02)  # hierarchical: p²
    assert first["auc"] == pytest.approx(0.5, abs=1e-9)  # α = p everywhere: all ties
    assert first["recall"] == pytest.approx(0.3, abs=0.08)
    assert first["precision"] == pytest.approx(stats["base_rate"], abs=0.05)
    assert first["omega_zero_share"] is None  # no ω without a learned router


def test_learned_router_statistics_are_in_range_and_recorded(tmp_path: Path, capsys) -> None:
    res = tiny_run(tmp_path, "learned")
    stats = res["routes"]
    assert stats["route_sample"] == "paper" and stats["inference_rule"] == "mode"
    for layer in stats["layers"]:
        for key in ("keep_rate", "keep_rate_sampled", "omega_zero_share", "recall", "auc",
                    "attention_mass", "attention_auc", "attention_precision_top3"):
            assert 0.0 <= layer[key] <= 1.0, key
        assert 0.0 <= layer["route_length"] <= 32
    on_disk = json.loads((tmp_path / "learned" / "results.json").read_text())
    assert on_disk["routes"] == stats
    run = load_run(tmp_path / "learned")
    again = route_statistics(run.model, run.data.dataset, run.data.split.examples("test"),
                             run.config.data.source, seed=run.config.seed)
    assert again == stats  # seeded: the same numbers every time
    assert main(["evaluate", str(tmp_path / "learned"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["routes"] == stats
    assert main(["evaluate", str(tmp_path / "learned")]) == 0
    table = capsys.readouterr().out
    assert "route_sample=paper" in table and "AUC(α)" in table and "planted base rate" in table


def test_models_without_a_router_get_no_route_statistics(tmp_path: Path) -> None:
    assert "routes" not in tiny_run(tmp_path, "sasrec", "sasrec")
