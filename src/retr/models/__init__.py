"""Model registry: name -> (config class, model class), and one way to build any model."""

from __future__ import annotations

import dataclasses
from typing import Any

from retr.errors import ConfigError
from retr.limits import check_model_size
from retr.models.base import ModelOutput, SequentialRecommender
from retr.models.bert4rec import BERT4Rec, BERT4RecConfig
from retr.models.gru4rec import GRU4Rec, GRU4RecConfig
from retr.models.pop import Pop, PopConfig
from retr.models.retr import RETR, RETRConfig
from retr.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type]] = {
    "pop": (PopConfig, Pop),
    "retr": (RETRConfig, RETR),
    "sasrec": (SASRecConfig, SASRec),
    "bert4rec": (BERT4RecConfig, BERT4Rec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
}


def model_names() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODELS)


def _entry(name: str) -> tuple[type, type]:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    return MODELS[name]


def config_class(name: str) -> type:
    """The config dataclass of model ``name``."""
    return _entry(name)[0]


def build_model(name: str, n_items: int, config: object = None) -> SequentialRecommender:
    """Model ``name`` for ``n_items`` items from its config object, a dict of fields, or defaults."""
    config_cls, model_cls = _entry(name)
    if config is None:
        config = config_cls()
    elif isinstance(config, dict):
        valid = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ConfigError(f"model {name!r}: unknown key(s) {', '.join(unknown)}; "
                              f"valid keys: {', '.join(sorted(valid))}")
        config = config_cls(**config)
    elif not isinstance(config, config_cls):
        raise ConfigError(f"model {name!r} needs a {config_cls.__name__}, "
                          f"got {type(config).__name__}")
    check_model_size(name, n_items, vars(config))  # before any tensor exists
    model: Any = model_cls(n_items, config)
    return model


__all__ = [
    "BERT4Rec", "BERT4RecConfig", "GRU4Rec", "GRU4RecConfig", "MODELS", "ModelOutput", "Pop",
    "PopConfig", "RETR", "RETRConfig", "SASRec", "SASRecConfig", "SequentialRecommender",
    "build_model", "config_class", "model_names",
]
