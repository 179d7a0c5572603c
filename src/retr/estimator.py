"""The Python API: an estimator per model, built with keyword arguments, ``fit`` on a DataFrame.

    import retr
    model = retr.RETRModel(hidden_size=64, epochs=20, loss="ce")
    model.fit(interactions)                      # DataFrame: user_id, item_id, timestamp
    model.evaluate()                             # test metrics, full ranking and sampled
    model.recommend(users=["42"], k=10)          # DataFrame: user_id, item_id, score, rank
    model.save("runs/retr"); model = retr.load("runs/retr")

Everything goes through the same functions as ``retr train`` (:func:`retr.runs.train`): a fit
is a run, with a run directory (a temporary one unless ``run_dir`` is given) holding the config,
the split, the checkpoints and ``results.json``; ``save`` keeps it, ``load`` reads any run
directory, also one written by the CLI.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from retr.config import (
    RunConfig,
    TrainConfig,
    flat_dict,
    load_toml,
    merge_dicts,
    model_config_class,
)
from retr.data.dataset import SequenceDataset
from retr.data.load import IN_MEMORY, dataset_from_frame, load_dataset
from retr.errors import ConfigError, DataError, RetrError
from retr.evaluation.protocol import evaluate
from retr.explain.pathway import explain_history
from retr.models import build_run_model
from retr.models.base import SequentialRecommender
from retr.runs import (
    load_config,
    load_item_counts,
    load_run,
    load_run_data,
    run_dataset,
    train,
)
from retr.serving.recommender import Recommender
from retr.utils import log, read_json


def _keys(cls: type) -> set[str]:
    return set(flat_dict(cls()))


class SequentialModel:
    """A sequential recommender as an estimator: configure, ``fit``, ``evaluate``, ``recommend``.

    ``model`` names the model (``retr``, ``sasrec``, ``bert4rec``, ``gru4rec``, ``pop``); the
    subclasses fix it. Keyword arguments are the model's ``[model]`` keys (``hidden_size``,
    ``router``, ...) or the ``[train]`` keys (``epochs``, ``loss``, ``lr``, ``patience``, ...);
    other sections come as dicts (``split={"kind": "temporal"}``, ``eval={"ks": [10]}``,
    ``data={"min_user_interactions": 0}``), and ``config`` starts from a TOML file, a dict or
    a :class:`RunConfig`. Every value is checked as in a config file: a typo is an error.
    """

    model_name: ClassVar[str | None] = None

    def __init__(self, model: str | None = None, *, seed: int = 0,
                 config: RunConfig | dict[str, Any] | str | Path | None = None,
                 data: dict[str, Any] | None = None, split: dict[str, Any] | None = None,
                 eval: dict[str, Any] | None = None, item_repr: dict[str, Any] | None = None,
                 **options: Any) -> None:
        if isinstance(config, RunConfig):
            raw = config.to_dict()
        elif isinstance(config, (str, Path)):
            raw = load_toml(config)
        else:
            raw = dict(config or {})
        name = model or self.model_name or raw.get("model", {}).get("name") or "retr"
        if self.model_name is not None and model not in (None, self.model_name):
            raise ConfigError(f"{type(self).__name__} is model {self.model_name!r}; use "
                              f"SequentialModel({model!r}) for another one")
        model_keys = _keys(model_config_class(name))
        train_keys = _keys(TrainConfig)
        sections: dict[str, Any] = {"model": {"name": name}, "seed": seed}
        for key, value in options.items():
            if key in model_keys:
                sections["model"][key] = value
            elif key in train_keys:
                sections.setdefault("train", {})[key] = value
            else:
                raise ConfigError(
                    f"{type(self).__name__}: unknown option {key!r}; options are the model's "
                    f"keys ({', '.join(sorted(model_keys))}) and the training keys "
                    f"({', '.join(sorted(train_keys))}); other sections go in as dicts: "
                    "data=, split=, eval=, item_repr=")
        for section, given in (("data", data), ("split", split), ("eval", eval),
                               ("item_repr", item_repr)):
            if given is not None:
                sections[section] = given
        if raw.get("model", {}).get("name", name) != name:
            raw = {k: v for k, v in raw.items() if k != "model"}  # another model's settings
        self.config = RunConfig.from_dict(merge_dicts(raw, sections), type(self).__name__)
        self.run_dir: Path | None = None
        self.results: dict[str, Any] | None = None
        self._model: SequentialRecommender | None = None
        self._dataset: SequenceDataset | None = None
        self._recommender: Recommender | None = None

    def __repr__(self) -> str:
        state = f"fitted, run_dir={str(self.run_dir)!r}" if self.run_dir else "not fitted"
        return f"{type(self).__name__}({self.config.model_name!r}, {state})"

    # -- training -------------------------------------------------------------------------

    def fit(self, interactions: pd.DataFrame | SequenceDataset | str | Path, *,
            user_col: str | None = None, item_col: str | None = None,
            time_col: str | None = None, rating_col: str | None = None,
            run_dir: str | Path | None = None, progress: bool | None = None) -> SequentialModel:
        """Split, train to early stopping and evaluate, as ``retr train`` does; returns self.

        ``interactions``: a DataFrame (one row per interaction; the ``*_col`` arguments name
        its columns when they are not user_id/item_id/timestamp or user/item/...), a
        :class:`SequenceDataset`, or a source as ``retr train --data`` takes it (registry
        name, ``synthetic[:...]``, file path). The run goes to ``run_dir`` (new), or to a
        temporary directory that :meth:`save` copies. ``progress=False`` draws no bars.
        """
        cfg = self.config
        columns: dict[str, Any] = {"user_col": user_col, "item_col": item_col,
                                   "time_col": time_col, "rating_col": rating_col}
        cfg.data = dataclasses.replace(cfg.data, **{k: v for k, v in columns.items()
                                                    if v is not None})
        if progress is not None:
            cfg.train.progress = progress
        if isinstance(interactions, pd.DataFrame):
            cfg.data.source = IN_MEMORY
            dataset = dataset_from_frame(interactions, cfg.data, name=IN_MEMORY)
        elif isinstance(interactions, SequenceDataset):
            cfg.data.source = IN_MEMORY
            dataset = interactions
        elif isinstance(interactions, (str, Path)):
            cfg.data.source = str(interactions)
            dataset = load_dataset(cfg.data)
        else:
            raise DataError("fit() takes a pandas DataFrame of interactions, a SequenceDataset "
                            f"or a data source name/path, not {type(interactions).__name__}")
        if run_dir is None:
            out = Path(tempfile.mkdtemp(prefix=f"retr-{cfg.model_name}-"))
        else:
            out = Path(run_dir)
            if (out / "config.json").exists():
                raise ConfigError(f"{out}: already holds a run; pick a new run_dir, or load "
                                  "it with retr.load")
        model = build_run_model(cfg, dataset.n_items, dataset)
        self.results = train(cfg, dataset, out, model=model, log=log)
        self.run_dir, self._model, self._dataset = out, model.eval(), dataset
        self._recommender = None
        return self

    # -- after fitting ----------------------------------------------------------------------

    def _fitted(self) -> SequentialRecommender:
        if self._model is None:
            raise RetrError(f"{type(self).__name__} is not fitted: call fit() or retr.load()")
        return self._model

    @property
    def model(self) -> SequentialRecommender:
        """The trained torch module (selected weights, eval mode)."""
        return self._fitted()

    @property
    def dataset(self) -> SequenceDataset:
        """The preprocessed interactions the model was fitted on (all of them, test included)."""
        if self._dataset is None:
            assert self.run_dir is not None
            self._dataset = run_dataset(self.config, self.run_dir)
        return self._dataset

    @property
    def recommender(self) -> Recommender:
        """The serving view of the model: recommendations for any history of external ids."""
        if self._recommender is None:  # the model in memory: no second read of the weights
            model, cfg = self._fitted(), self.config
            assert self.run_dir is not None
            self._recommender = Recommender(
                model, self.dataset.vocab, cfg.model_name, config=cfg, results=self.results,
                item_counts=load_item_counts(self.run_dir, model.n_items), run_dir=self.run_dir,
                batch_size=cfg.eval.batch_size, item_chunk=cfg.eval.item_chunk)
        return self._recommender

    def evaluate(self, split: str = "test", protocols: list[str] | None = None,
                 exclude_history: bool | None = None) -> dict[str, dict[str, float]]:
        """Metrics on the run's ``split`` ("valid" or "test") per protocol ("full", "sampled"):
        ``{"full": {"NDCG@10": ...}, "sampled": {...}}``, computed as ``retr evaluate``."""
        if split not in ("valid", "test"):
            raise ConfigError(f"split must be 'valid' or 'test', got {split!r}")
        model = self.model
        assert self.run_dir is not None
        data = load_run_data(self.config, self.dataset, self.run_dir)
        eval_cfg = self.config.eval
        if exclude_history is not None:
            eval_cfg = dataclasses.replace(eval_cfg, exclude_history=exclude_history)
        out = {}
        for protocol in protocols or eval_cfg.protocols:
            res = evaluate(model, data.dataset, data.split.examples(split), protocol, eval_cfg,
                           data.negatives[split])
            out[protocol] = res["metrics"]
        return out

    def recommend(self, users: list[Any] | None = None, *, histories: list[list[Any]] | None = None,
                  k: int = 10, exclude_seen: bool = True,
                  candidates: list[Any] | None = None) -> pd.DataFrame:
        """Top-``k`` items per user (their whole history in the fitted data) or per history
        (external item ids, oldest first): a DataFrame with ``user_id`` (or ``history``, the
        history's position), ``item_id``, ``score`` and ``rank`` (1 = best)."""
        if (users is None) == (histories is None):
            raise ConfigError("recommend() takes users=[...] or histories=[[...], ...], one of them")
        rec = self.recommender
        if users is not None:
            ids = [str(u) for u in users]
            index = {u: i for i, u in enumerate(self.dataset.vocab.users)}
            unknown = [u for u in ids if u not in index]
            if unknown:
                raise DataError(f"unknown user id(s) {', '.join(map(repr, unknown[:5]))}"
                                f"{' and more' if len(unknown) > 5 else ''}; the fitted data "
                                f"has {len(index)} users (use histories= for new users)")
            items = np.asarray(self.dataset.vocab.items)
            histories = [items[self.dataset.sequence(index[u]) - 1].tolist() for u in ids]
            key, labels = "user_id", list[Any](ids)
        else:
            assert histories is not None
            key, labels = "history", list(range(len(histories)))
        recs = rec.recommend_batch(histories, k=k, exclude_seen=exclude_seen,
                                   candidates=candidates)
        rows = [(label, item, score, rank + 1) for label, r in zip(labels, recs, strict=True)
                for rank, (item, score) in enumerate(zip(r.items, r.scores, strict=True))]
        return pd.DataFrame(rows, columns=[key, "item_id", "score", "rank"])

    def explain(self, history: list[Any], k: int = 10, by: str = "auto") -> dict[str, Any]:
        """Which past items the next-item prediction after ``history`` used: routes, keep
        probabilities and attention per layer, the top-``k`` items, and the behaviors ranked by
        what the top item relied on (``by``: see ``retr explain --by``)."""
        return explain_history(self.recommender, [str(h) for h in history], k=k, by=by)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Copy the run directory to ``path`` (new); ``retr.load(path)`` reads it back."""
        self._fitted()
        assert self.run_dir is not None
        path = Path(path)
        if path.resolve() == self.run_dir.resolve():
            return path
        if path.exists():
            raise ConfigError(f"{path}: already exists; save into a new directory")
        shutil.copytree(self.run_dir, path)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> SequentialModel:
        """The estimator of a run directory (from :meth:`save`, ``fit`` or ``retr train``)."""
        cfg = load_config(run_dir)
        if cls.model_name not in (None, cfg.model_name):
            raise ConfigError(f"{run_dir}: holds a {cfg.model_name} run, not {cls.model_name}; "
                              "use retr.load()")
        est = ESTIMATORS.get(cfg.model_name, SequentialModel)(config=cfg,
                                                              model=cfg.model_name)
        run = load_run(run_dir)
        est.run_dir, est._model, est._dataset = Path(run_dir), run.model, run.data.dataset
        results = Path(run_dir) / "results.json"
        est.results = read_json(results) if results.is_file() else None
        return est


class RETRModel(SequentialModel):
    """RETR, the Recommender Transformer with behavior pathways (the paper's defaults)."""

    model_name = "retr"


class SASRecModel(SequentialModel):
    """SASRec as its paper and official code define it (``attention="pathway"``: + pathways)."""

    model_name = "sasrec"


class BERT4RecModel(SequentialModel):
    """BERT4Rec with the cloze objective (``attention="pathway"``: + pathways)."""

    model_name = "bert4rec"


class GRU4RecModel(SequentialModel):
    """GRU4Rec, the recurrent baseline."""

    model_name = "gru4rec"


class PopModel(SequentialModel):
    """Most popular items of the training input: the floor every model must clear."""

    model_name = "pop"


ESTIMATORS: dict[str, type[SequentialModel]] = {
    "retr": RETRModel, "sasrec": SASRecModel, "bert4rec": BERT4RecModel,
    "gru4rec": GRU4RecModel, "pop": PopModel}


def load(run_dir: str | Path) -> SequentialModel:
    """The estimator of any run directory, whichever model it trained."""
    return SequentialModel.load(run_dir)


__all__ = ["BERT4RecModel", "ESTIMATORS", "GRU4RecModel", "PopModel", "RETRModel",
           "SASRecModel", "SequentialModel", "load"]
