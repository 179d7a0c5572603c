"""retr tune: the search space, resumable studies, validation-only objective, the pruning hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import retr
from retr.cli import main
from retr.config import RunConfig
from retr.errors import ConfigError
from retr.tune import read_space, tune

pytest.importorskip("optuna")

TINY = "synthetic:n_users=80,n_items=80,n_themes=10,min_len=10,max_len=14,seed=1"
BASE = {"data": {"source": TINY}, "model": {"name": "sasrec", "hidden_size": 8, "max_len": 10},
        "train": {"epochs": 2, "loss": "ce", "progress": False}, "eval": {"negatives": 20}}


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_space_is_read_and_checked(tmp_path: Path) -> None:
    dims = read_space(_space(tmp_path, '[space]\n"train.lr" = { low = 1e-4, high = 1e-2, '
                                       'log = true }\n"model.num_layers" = { low = 1, high = 3 }\n'
                                       '"train.loss" = { choices = ["ce", "bpr"] }\n'))
    assert [(d.key, d.integer, d.log) for d in dims] == [
        ("train.lr", False, True), ("model.num_layers", True, False), ("train.loss", False, False)]
    for bad, match in [('"train.lr" = { low = 1, high = 0 }', "low < high"),
                       ('"train.lr" = { low = 0, high = 1, log = true }', "low > 0"),
                       ('"lr" = { low = 0, high = 1 }', "section.key"),
                       ('"train.loss" = { choices = [] }', "non-empty"),
                       ('"train.lr" = { lo = 0, high = 1 }', "unknown field")]:
        with pytest.raises(ConfigError, match=match):
            read_space(_space(tmp_path, f"[space]\n{bad}\n"))
    with pytest.raises(ConfigError, match="unknown key"):  # before any trial runs
        tune(BASE, retr.load_dataset(RunConfig.from_dict(BASE).data),
             read_space(_space(tmp_path, '[space]\n"model.nope" = { low = 1, high = 2 }\n')),
             tmp_path / "study", trials=1)


def test_study_scores_on_validation_and_resumes(tmp_path: Path) -> None:
    space = read_space(_space(tmp_path, '[space]\n"train.lr" = { low = 1e-3, high = 1e-2, '
                                        'log = true }\n"model.dropout" = { low = 0.0, high = 0.5 }\n'))
    data = retr.load_dataset(RunConfig.from_dict(BASE).data)
    out = tmp_path / "study"
    first = tune(BASE, data, space, out, trials=2, prune=False)
    assert [t["state"] for t in first["trials"]] == ["complete", "complete"]
    for row in first["trials"]:
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert row["valid"] == results["training"]["best_valid"]  # validation, never test
        cfg = json.loads((Path(row["run_dir"]) / "config.json").read_text())
        assert cfg["train"]["lr"] == row["params"]["train.lr"]
        assert cfg["model"]["dropout"] == row["params"]["model.dropout"]
    again = tune(BASE, data, space, out, trials=3, prune=False)  # one more: the study resumed
    assert len(again["trials"]) == 3 and again["trials"][:2] == first["trials"]
    assert again["best"]["valid"] == max(t["valid"] for t in again["trials"])
    recorded = json.loads((out / "tune.json").read_text())
    assert recorded["trials_asked"] == 3 and recorded["space"]["train.lr"]["log"] is True


def test_cli_tune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(tmp_path, '[space]\n"model.num_layers" = { low = 1, high = 2 }\n')
    argv = ["tune", "--data", TINY, "--model", "sasrec", "--space", str(space), "--trials", "1",
            "--out", str(tmp_path / "t"), "--set", "model.hidden_size=8", "--set",
            "model.max_len=10", "--set", "train.epochs=1", "--set", "eval.negatives=20"]
    assert main(argv) == 0
    assert "best: trial 0" in capsys.readouterr().out


def test_on_validation_sees_every_validation_and_can_stop_training(tmp_path: Path) -> None:
    cfg = RunConfig.from_dict({**BASE, "train": {**BASE["train"], "epochs": 3}})
    data = retr.load_dataset(cfg.data)
    seen: list[tuple[int, float]] = []
    results = retr.train(cfg, data, tmp_path / "a", log=lambda _: None,
                         on_validation=lambda e, v: seen.append((e, v)))
    history = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert seen == [(h["epoch"], h["valid"]["NDCG@10"]) for h in history]
    assert results["training"]["best_valid"] == max(v for _, v in seen)

    class Stop(Exception):
        pass

    def stop(epoch: int, value: float) -> None:
        raise Stop

    with pytest.raises(Stop):
        retr.train(cfg, data, tmp_path / "b", log=lambda _: None, on_validation=stop)
    assert (tmp_path / "b" / "trainer_state.pt").is_file()  # epoch 1's checkpoints are there
    assert not (tmp_path / "b" / "results.json").exists()


def test_no_trial_is_pruned_before_the_warm_up_epoch(tmp_path: Path) -> None:
    """A learning rate that barely trains is pruned at its first validation once three trials
    are done, unless --prune-after-epochs holds pruning back past the budget; the record says
    which pruner ran."""
    space = read_space(_space(tmp_path, '[space]\n"train.lr" = { choices = [0.01, 1e-7] }\n'))
    base = {**BASE, "train": {**BASE["train"], "epochs": 3}}
    data = retr.load_dataset(RunConfig.from_dict(base).data)
    pruned = tune(base, data, space, tmp_path / "s", trials=8)
    assert any(t["state"] == "pruned" and t["epochs"] == 1 for t in pruned["trials"])
    assert pruned["pruner"] == "median (3 startup trials)"
    held = tune(base, data, space, tmp_path / "t", trials=8, prune_after_epochs=4)
    assert [t["state"] for t in held["trials"]] == ["complete"] * 8
    assert held["pruner"] == "median (3 startup trials, none before epoch 4)"
    with pytest.raises(ConfigError, match="prune-after-epochs"):
        tune(base, data, space, tmp_path / "u", trials=1, prune_after_epochs=-1)
