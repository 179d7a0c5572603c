"""The public API: the estimator end to end, old run directories, how a run ended, quiet logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import retr
from retr.config import RunConfig, flat_dict
from retr.data.load import dataset_from_frame
from retr.errors import ConfigError, DataError, RetrError

ROOT = Path(__file__).resolve().parent.parent
OLD_RUN = Path(__file__).resolve().parent / "data" / "run_v0_1_0"
SMALL = {"hidden_size": 16, "num_heads": 2, "max_len": 20, "router_hidden": 8,
         "progress": False}


def _interactions(n_users: int = 120) -> pd.DataFrame:
    return retr.synthetic_interactions(n_users=n_users, n_items=200, n_themes=10, min_len=10,
                                       max_len=16, seed=2)


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python section, executed as printed."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "README.md", "exec"), {})
    assert (tmp_path / "runs" / "retr-api" / "results.json").is_file()


def test_estimator_fit_evaluate_recommend_save_load(tmp_path: Path) -> None:
    frame = _interactions()
    model = retr.SASRecModel(epochs=2, loss="ce", **SMALL)
    assert "not fitted" in repr(model)
    with pytest.raises(RetrError, match="not fitted"):
        model.recommend(users=["1"])
    model.fit(frame, run_dir=tmp_path / "run")
    assert model.results is not None
    assert model.results["training"] == {
        "epochs_run": 2, "best_epoch": model.results["training"]["best_epoch"],
        "best_valid": model.results["training"]["best_valid"], "stopped_by": "epoch cap"}
    metrics = model.evaluate()
    test_full = next(r for r in model.results["results"]
                     if r["split"] == "test" and r["protocol"] == "full")
    assert metrics["full"] == test_full["metrics"]  # the same numbers as results.json
    assert set(metrics) == {"full", "sampled"}

    top = model.recommend(users=["1", "2"], k=5)
    assert list(top.columns) == ["user_id", "item_id", "score", "rank"]
    assert top.groupby("user_id")["rank"].apply(list).tolist() == [[1, 2, 3, 4, 5]] * 2
    seen = set(frame.loc[frame["user_id"] == "1", "item_id"])
    assert not seen & set(top.loc[top["user_id"] == "1", "item_id"])  # history excluded
    scores = top.loc[top["user_id"] == "1", "score"].to_numpy()
    assert (np.diff(scores) <= 0).all()
    history = frame.loc[frame["user_id"] == "1", "item_id"].tolist()
    by_history = model.recommend(histories=[history], k=5)
    assert by_history["item_id"].tolist() == top.loc[top["user_id"] == "1", "item_id"].tolist()
    with pytest.raises(DataError, match="unknown user"):
        model.recommend(users=["no-such-user"])

    saved = model.save(tmp_path / "saved")
    again = retr.load(saved)
    assert isinstance(again, retr.SASRecModel)
    assert again.recommend(users=["1", "2"], k=5).equals(top)
    assert again.evaluate() == metrics  # the DataFrame's interactions came along
    with pytest.raises(ConfigError, match="already exists"):
        model.save(saved)
    with pytest.raises(ConfigError, match="holds a sasrec run"):
        retr.RETRModel.load(saved)


def test_estimator_options_are_checked_and_routed() -> None:
    est = retr.RETRModel(router="random", random_keep_prob=0.25, epochs=7, lr=0.01,
                         split={"kind": "temporal"}, eval={"ks": [5]}, seed=3)
    cfg = est.config
    assert cfg.model.pathway.router == "random" and cfg.model.pathway.random_keep_prob == 0.25
    assert (cfg.train.epochs, cfg.train.lr, cfg.split.kind, cfg.eval.ks, cfg.seed) == (
        7, 0.01, "temporal", [5], 3)
    with pytest.raises(ConfigError, match="unknown option 'hidden'.*hidden_size"):
        retr.RETRModel(hidden=8)
    with pytest.raises(ConfigError, match="train.loss"):
        retr.SASRecModel(loss="nope")
    with pytest.raises(ConfigError, match="model.router"):
        retr.RETRModel(router="off")
    generic = retr.SequentialModel("gru4rec", epochs=1)
    assert generic.config.model_name == "gru4rec"
    recipe = retr.RETRModel(config=ROOT / "configs" / "retr-ml-1m-fast.toml", epochs=1)
    assert recipe.config.data.source == "ml-1m" and recipe.config.train.epochs == 1


def test_router_options_keep_flat_keys() -> None:
    """RouterOptions is one object inside each model config; TOML and config.json stay flat."""
    cfg = RunConfig.from_dict({"model": {"name": "bert4rec", "attention": "pathway",
                                         "router": "random"}})
    assert cfg.model.pathway.router == "random"
    assert cfg.model.pathway.pooling == "global"  # BERT4Rec's own default survives a partial table
    table = cfg.to_dict()["model"]
    assert table["router"] == "random" and "pathway" not in table
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="unknown key.*valid keys: .*router_hidden"):
        RunConfig.from_dict({"model": {"name": "retr", "pathway": {"router": "random"}}})


def test_old_run_directory_still_loads() -> None:
    """A run directory written by release 0.1.0 loads, evaluates and serves as it did."""
    old = json.loads((OLD_RUN / "config.json").read_text())
    cfg = retr.load_config(OLD_RUN)
    new = cfg.to_dict()
    # router options added since read with the behaviour the old code had
    assert new["model"]["route_sample"] == "weighted"
    assert new["model"]["query_bias"] == "always"
    for key, default in {"omega_floor": 0.0, "keep_target": 0.0, "keep_weight": 0.0,
                         "inference_rule": "mode", "router_target": "task",
                         "distill_weight": 1.0, "distill_source": "later"}.items():
        assert new["model"][key] == default
    for section, values in old.items():  # every old value kept; keys added since take defaults
        if isinstance(values, dict):
            assert {k: new[section][k] for k in values} == values, section
        else:
            assert new[section] == values
    run = retr.load_run(OLD_RUN)
    recorded = json.loads((OLD_RUN / "results.json").read_text())
    for row in recorded["results"]:
        res = retr.evaluate(run.model, run.data.dataset, run.data.split.examples(row["split"]),
                            row["protocol"], run.config.eval, run.data.negatives[row["split"]])
        assert res["metrics"] == pytest.approx(row["metrics"], abs=1e-12)
    est = retr.load(OLD_RUN)
    assert isinstance(est, retr.RETRModel)
    assert len(est.recommend(users=[run.data.dataset.vocab.users[0]], k=3)) == 3
    assert retr.Recommender.load(OLD_RUN).info()["model_config"]["router_hidden"] == 4


def test_dataset_from_frame_reads_columns_and_datetimes() -> None:
    frame = pd.DataFrame({"uid": ["a", "a", "a", "b", "b"], "item_id": [3, 1, 2, 1, 3],
                          "datetime": pd.to_datetime(["2024-01-03", "2024-01-01", "2024-01-02",
                                                      "2024-01-01", "2024-01-02"])})
    cfg = RunConfig.from_dict({"data": {"min_user_interactions": 0, "min_item_interactions": 0,
                                        "user_col": "uid"}}).data
    ds = dataset_from_frame(frame, cfg)
    items = np.asarray(ds.vocab.items)
    assert items[ds.sequence(0) - 1].tolist() == ["1", "2", "3"]  # sorted by the datetimes
    with pytest.raises(DataError, match="several user columns"):
        dataset_from_frame(frame.assign(user_id=frame["uid"], user=frame["uid"]),
                           RunConfig().data)
    with pytest.raises(DataError, match="no item column"):
        dataset_from_frame(frame.drop(columns="item_id"), cfg)
    with pytest.raises(DataError, match="is not a number"):
        dataset_from_frame(frame.assign(datetime=["x"] * 5), cfg)


def test_a_non_terminal_log_has_one_line_per_epoch(tmp_path: Path) -> None:
    """Progress bars only on a terminal: a log file gets one line per epoch, no redraws."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "retr", "train", "--data",
         "synthetic:n_users=80,n_items=80,n_themes=10,min_len=10,max_len=14,seed=1",
         "--model", "sasrec", "--out", str(out), "--set", "model.hidden_size=8",
         "--set", "model.max_len=10", "--set", "train.epochs=3", "--set", "eval.negatives=20"],
        capture_output=True, text=True, env=env, check=True)
    assert "\r" not in proc.stderr
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch")]
    assert [int(line.split()[1]) for line in epochs] == [1, 2, 3]
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["stopped_by"] == "epoch cap"
    assert results["training"]["epochs_run"] == 3


def test_training_records_patience_and_time_cap(tmp_path: Path) -> None:
    data = retr.load_dataset(RunConfig.from_dict(
        {"data": {"source": "synthetic:n_users=80,n_items=80,n_themes=10,min_len=10,max_len=14"}}
    ).data)
    base = {"model": {"name": "sasrec", "hidden_size": 8, "max_len": 10},
            "eval": {"negatives": 20}}
    patient = RunConfig.from_dict({**base, "train": {"epochs": 40, "patience": 1, "lr": 1e-6,
                                                     "progress": False}})
    res = retr.train(patient, data, tmp_path / "p", log=lambda _: None)
    assert res["training"]["stopped_by"] == "patience"
    assert res["training"]["epochs_run"] < 40
    capped = RunConfig.from_dict({**base, "train": {"epochs": 40, "max_minutes": 1e-6,
                                                    "progress": False}})
    res = retr.train(capped, data, tmp_path / "t", log=lambda _: None)
    assert res["training"] == {"epochs_run": 1, "best_epoch": 1,
                               "best_valid": res["training"]["best_valid"],
                               "stopped_by": "time cap"}
    pop = RunConfig.from_dict({"model": {"name": "pop"}, "eval": {"negatives": 20}})
    assert retr.train(pop, data, tmp_path / "pop", log=lambda _: None)["training"][
        "stopped_by"] == "not trained"


def test_train_epoch_is_the_loop_step(tmp_path: Path) -> None:
    """One public epoch: deterministic for a seed and epoch, and it lowers the loss."""
    import torch

    ds = dataset_from_frame(_interactions(), RunConfig().data)
    tc = RunConfig.from_dict({"train": {"loss": "ce", "batch_size": 64,
                                        "progress": False}}).train
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = retr.build_model("sasrec", ds.n_items, {"hidden_size": 16, "max_len": 20})
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        run = [retr.train_epoch(model, ds, np.arange(ds.n_users), ds.lengths, opt, tc, 0, e)
               for e in (1, 2, 3)]
        losses.append([s.loss for s in run])
        assert run[0].sequences == ds.n_users and run[0].steps == -(-ds.n_users // 64)
    assert losses[0] == losses[1]
    assert losses[0][2] < losses[0][0]


def test_flat_dict_matches_the_saved_model_table() -> None:
    cfg = RunConfig.from_dict({"model": {"name": "retr", "tau": 0.5}})
    assert flat_dict(cfg.model) == {k: v for k, v in cfg.to_dict()["model"].items()
                                    if k != "name"}
    assert shutil.which(sys.executable)


def test_public_split_negatives_states_and_top_k() -> None:
    """The pieces under ``retr.evaluate`` and ``retr.Recommender`` are public and agree."""
    import torch

    ds = retr.dataset_from_frame(_interactions(), RunConfig().data)
    torch.manual_seed(0)
    model = retr.build_model("sasrec", ds.n_items, {"hidden_size": 16, "max_len": 20}).eval()
    split = retr.make_split(ds, "loo")
    negatives = retr.sample_negatives(ds, split.test, 20, seed=0)
    assert negatives.shape == (len(split.test), 20)
    for row, user in zip(negatives, split.test.users, strict=True):  # never an item of the user
        assert not set(row.tolist()) & set(ds.sequence(user).tolist())
    res = retr.evaluate(model, ds, split.test, "sampled", RunConfig().eval, negatives)
    assert res["negatives"] == 20 and res["n_examples"] == len(split.test)
    users = np.arange(ds.n_users)
    ids, scores = retr.top_k(model, ds, users, ds.lengths, k=5, batch_size=7)
    assert ids.shape == scores.shape == (ds.n_users, 5)
    h = retr.user_states(model, ds, users, ds.lengths)
    with torch.no_grad():
        every = model.score_items(h, torch.arange(1, ds.n_items + 1)).numpy()  # [U, n_items]
    rec = retr.Recommender(model, ds.vocab, "sasrec")
    for u in (0, 3, ds.n_users - 1):
        seen = set(ds.sequence(u).tolist())
        assert not seen & set(ids[u].tolist())  # history excluded
        assert np.all(np.diff(scores[u]) <= 0)  # best first
        np.testing.assert_allclose(scores[u], every[u, ids[u] - 1], rtol=1e-5)
        history = [ds.vocab.items[i - 1] for i in ds.sequence(u)]
        assert rec.recommend(history, k=5).items == [ds.vocab.items[i - 1] for i in ids[u]]
    again, _ = retr.top_k(model, ds, users, ds.lengths, k=5, exclude_history=False)
    assert any(set(again[u].tolist()) & set(ds.sequence(u).tolist()) for u in users)


def test_create_app_is_public_and_fastapi_stays_optional() -> None:
    code = ("import sys, retr; assert callable(retr.create_app); "
            "assert not {'fastapi', 'uvicorn', 'pydantic'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ,
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                  os.environ.get("PYTHONPATH", "")])})
