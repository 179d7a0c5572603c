"""One way to build a run's model, whatever its item representation, and cross-domain transfer.

:func:`build_run_model` is what training, ``load_run`` and ``Recommender.load`` call: it builds
``cfg.model_name`` with :func:`retr.models.build_model` and, for ``item_repr.kind = "text"``,
replaces its item module by a :class:`~retr.models.item_text.TextItemEmbedding` (no model file
knows about it). Given the dataset, the text vectors are encoded (or read from the cache);
without it they start at zero and come back with the weights (they are a buffer).

Transfer (``retr finetune``): every tensor of the target model whose shape does not depend on
the number of items (blocks, positions, routers, norms, the text adaptor, special tokens) is
taken from the pre-trained weights; item-specific tensors (ID vectors, text vectors, BERT4Rec's
output bias) start fresh. Which tensors are item-specific is found by building the model for
two catalogue sizes and comparing shapes, so a new model needs no list. With
``item_repr.freeze_backbone`` the "backbone", i.e. every such shared tensor outside the item
module, is frozen (``requires_grad = False``); the item module, adaptor included, still trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from retr.config import RunConfig
from retr.data.dataset import SequenceDataset
from retr.errors import ConfigError, RunDirError
from retr.models import build_model
from retr.models.base import SequentialRecommender
from retr.models.item_text import text_item_module
from retr.text.encoder import encode_cached, encoder_dim, make_encoder
from retr.text.item_text import item_texts_by_domain

ITEM_MODULE = "item_embedding"


def text_vectors(cfg: RunConfig, dataset: SequenceDataset) -> torch.Tensor:
    """[n_items + 1, D] text vectors of the dataset's items (row 0 = padding), cached on disk."""
    ir = cfg.item_repr
    encoder = make_encoder(ir.encoder, ir.hash_dim)
    out = np.zeros((dataset.n_items + 1, encoder.dim), dtype=np.float32)
    for positions, texts in item_texts_by_domain(cfg.data, dataset.vocab.items, ir.missing_text,
                                                 ir.text_file):
        out[np.asarray(positions, dtype=np.int64) + 1] = encode_cached(encoder, texts, ir.cache_dir)
    return torch.from_numpy(out)


def _build(cfg: RunConfig, n_items: int, vectors: torch.Tensor | None) -> SequentialRecommender:
    model = build_model(cfg.model_name, n_items, cfg.model)
    ir = cfg.item_repr
    if ir.kind == "text":
        old = getattr(model, ITEM_MODULE, None)
        if old is None:
            raise ConfigError(f"model {cfg.model_name!r} has no item representation to replace; "
                              "item_repr.kind = 'text' needs retr, sasrec, bert4rec or gru4rec")
        module = text_item_module(old, vectors, encoder_dim(ir.encoder, ir.hash_dim), ir.experts,
                                  ir.adaptor_dropout, ir.gate_noise, ir.id_embedding)
        setattr(model, ITEM_MODULE, module)
    return model


def item_specific_keys(cfg: RunConfig) -> set[str]:
    """State-dict keys whose shape depends on the number of items (never transferred)."""
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


def build_run_model(cfg: RunConfig, n_items: int,
                    dataset: SequenceDataset | None = None) -> SequentialRecommender:
    """The model of a run: ``cfg.model_name`` with the item module ``cfg.item_repr`` asks for.

    With ``dataset`` (training) text vectors are encoded from the dataset's item texts; without
    it (loading a run) they are zeros until the run's weights are loaded.
    """
    if dataset is not None and dataset.n_items != n_items:
        raise ValueError(f"dataset has {dataset.n_items} items, n_items is {n_items}")
    vectors = None
    if cfg.item_repr.kind == "text" and dataset is not None:
        vectors = text_vectors(cfg, dataset)
    model = _build(cfg, n_items, vectors)
    if cfg.item_repr.freeze_backbone:
        freeze_backbone(model, cfg)
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with clear errors for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: weights file missing; was the pre-training run finished?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path}: corrupted or truncated weights file ({exc})") from None


def load_pretrained(model: SequentialRecommender, cfg: RunConfig,
                    state: dict[str, torch.Tensor], where: str = "pre-trained run") -> dict[str, Any]:
    """Copy every shared tensor of ``state`` into ``model``; item-specific ones stay fresh.

    Every shared tensor of the target must be found with the same shape (otherwise the model
    settings differ from the pre-training ones and the weights cannot be reused).
    """
    specific = item_specific_keys(cfg)
    target = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for key, value in target.items():
        if key in specific:
            continue
        if key not in state:
            missing.append(key)
        elif tuple(state[key].shape) != tuple(value.shape):
            mismatched.append(f"{key} {list(state[key].shape)} vs {list(value.shape)}")
        else:
            loaded[key] = state[key]
    if missing or mismatched:
        detail = "; ".join([f"missing {', '.join(missing[:3])}" if missing else "",
                            f"shape {', '.join(mismatched[:3])}" if mismatched else ""]).strip("; ")
        raise ConfigError(f"{where}: its weights do not fit the fine-tuning model ({detail}); keep "
                          "the pre-training [model] settings, and use --keep-text only with a "
                          "text pre-trained run")
    model.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "fresh": sorted(k for k in target if k in specific),
            "unused": sorted(k for k in state if k not in target or k in specific)}
