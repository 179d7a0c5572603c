"""Model registry (name -> config class, model class) and the one way to build a run's model.

:func:`build_run_model` is what training, loading a run and serving call: it builds
``cfg.model_name`` with :func:`build_model` and, when ``item_repr.kind`` is not "id", replaces
the model's item module by the one registered for that kind (``retr.text`` registers "text"),
so no model file knows how items are represented.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from retr.config import RunConfig, build_dataclass, flat_dict, register_model_config
from retr.data.dataset import SequenceDataset
from retr.errors import ConfigError
from retr.limits import check_model_size
from retr.models.base import ModelOutput, SequentialRecommender
from retr.models.bert4rec import BERT4Rec, BERT4RecConfig
from retr.models.gru4rec import GRU4Rec, GRU4RecConfig
from retr.models.pathway import RouterOptions
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
for _name, (_config_cls, _) in MODELS.items():
    register_model_config(_name, _config_cls)

ITEM_MODULE = "item_embedding"  # the attribute every model keeps its item module under

# item_repr.kind -> factory(current item module, run config, dataset or None) -> new module
ItemModuleFactory = Callable[[nn.Module, RunConfig, SequenceDataset | None], nn.Module]
_ITEM_MODULES: dict[str, ItemModuleFactory] = {}


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
    """Model ``name`` for ``n_items`` items from its config object, a dict of its (flat TOML)
    keys, or defaults."""
    config_cls, model_cls = _entry(name)
    if config is None:
        config = config_cls()
    elif isinstance(config, dict):
        config = build_dataclass(config_cls, config, f"model {name!r}")
    elif not isinstance(config, config_cls):
        raise ConfigError(f"model {name!r} needs a {config_cls.__name__}, "
                          f"got {type(config).__name__}")
    check_model_size(name, n_items, flat_dict(config))  # before any tensor exists
    model: Any = model_cls(n_items, config)
    return model


def register_item_module(kind: str, factory: ItemModuleFactory) -> None:
    """Make ``item_repr.kind = KIND`` build its item module with ``factory``."""
    _ITEM_MODULES[kind] = factory


def _build(cfg: RunConfig, n_items: int,
           dataset: SequenceDataset | None) -> SequentialRecommender:
    model = build_model(cfg.model_name, n_items, cfg.model)
    kind = cfg.item_repr.kind
    if kind != "id":
        old = getattr(model, ITEM_MODULE, None)
        if old is None:
            raise ConfigError(f"model {cfg.model_name!r} has no item representation to replace; "
                              f"item_repr.kind = {kind!r} needs retr, sasrec, bert4rec or gru4rec")
        if kind not in _ITEM_MODULES:
            raise ConfigError(f"item_repr.kind = {kind!r}: no item module is registered for it; "
                              "import retr (which registers 'text') before building the model")
        setattr(model, ITEM_MODULE, _ITEM_MODULES[kind](old, cfg, dataset))
    return model


def build_run_model(cfg: RunConfig, n_items: int,
                    dataset: SequenceDataset | None = None) -> SequentialRecommender:
    """The model of a run: ``cfg.model_name`` with the item module ``cfg.item_repr`` asks for.

    With ``dataset`` (training) an item module may read the dataset (text vectors are encoded
    from its item texts); without it (loading a run) such state comes back with the weights.
    """
    if dataset is not None and dataset.n_items != n_items:
        raise ValueError(f"dataset has {dataset.n_items} items, n_items is {n_items}")
    model = _build(cfg, n_items, dataset)
    if cfg.item_repr.freeze_backbone:
        freeze_backbone(model, cfg)
    return model


def item_specific_keys(cfg: RunConfig) -> set[str]:
    """State-dict keys whose shape depends on the number of items (never transferred).

    Found by building the model for two catalogue sizes and comparing shapes, so a new model
    needs no list.
    """
    with torch.random.fork_rng(devices=[]):  # the probes must not move the global RNG
        small, large = (_build(cfg, n, None).state_dict() for n in (2, 3))
    keys = set(small) | set(large)
    return {k for k in keys if k not in small or k not in large or small[k].shape != large[k].shape}


def backbone_parameters(model: SequentialRecommender, cfg: RunConfig) -> list[str]:
    """Names of the parameters frozen by ``freeze_backbone``: shared ones outside the item module."""
    specific = item_specific_keys(cfg)
    return [name for name, _ in model.named_parameters()
            if name not in specific and not name.startswith(ITEM_MODULE + ".")]


def freeze_backbone(model: SequentialRecommender, cfg: RunConfig) -> list[str]:
    """Set ``requires_grad = False`` on the backbone; returns the frozen names."""
    names = set(backbone_parameters(model, cfg))
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sorted(names)


__all__ = [
    "BERT4Rec", "BERT4RecConfig", "GRU4Rec", "GRU4RecConfig", "ITEM_MODULE", "MODELS",
    "ModelOutput", "Pop", "PopConfig", "RETR", "RETRConfig", "RouterOptions", "SASRec",
    "SASRecConfig", "SequentialRecommender", "backbone_parameters", "build_model",
    "build_run_model", "config_class", "freeze_backbone", "item_specific_keys", "model_names",
    "register_item_module",
]
