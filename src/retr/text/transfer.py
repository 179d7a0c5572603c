"""Item text as the item representation, and cross-domain transfer.

Importing this module registers the "text" item module with :mod:`retr.models`, so
:func:`retr.models.build_run_model` can replace a model's item module by a
:class:`~retr.models.item_text.TextItemEmbedding` when ``item_repr.kind = "text"`` (no model
file knows about it).

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
from torch import nn

from retr.config import RunConfig, load_toml, merge_dicts, resolve_config
from retr.data.dataset import SequenceDataset
from retr.errors import ConfigError, RunDirError
from retr.models import item_specific_keys, register_item_module
from retr.models.base import SequentialRecommender
from retr.models.item_text import text_item_module
from retr.runs import load_config
from retr.text.encoder import encode_cached, encoder_dim, make_encoder
from retr.text.item_text import item_texts_by_domain


def text_vectors(cfg: RunConfig, dataset: SequenceDataset) -> torch.Tensor:
    """[n_items + 1, D] text vectors of the dataset's items (row 0 = padding), cached on disk."""
    ir = cfg.item_repr
    encoder = make_encoder(ir.encoder, ir.hash_dim)
    out = np.zeros((dataset.n_items + 1, encoder.dim), dtype=np.float32)
    for positions, texts in item_texts_by_domain(cfg.data, dataset.vocab.items, ir.missing_text,
                                                 ir.text_file):
        out[np.asarray(positions, dtype=np.int64) + 1] = encode_cached(encoder, texts, ir.cache_dir)
    return torch.from_numpy(out)


def text_item_embedding(old: nn.Module, cfg: RunConfig,
                        dataset: SequenceDataset | None) -> nn.Module:
    """The "text" item module: fixed text vectors of the items through a learned adaptor.

    Given the dataset, the vectors are encoded (or read from the cache); without it they start
    at zero and come back with the run's weights (they are a buffer).
    """
    ir = cfg.item_repr
    vectors = text_vectors(cfg, dataset) if dataset is not None else None
    return text_item_module(old, vectors, encoder_dim(ir.encoder, ir.hash_dim), ir.experts,
                            ir.adaptor_dropout, ir.gate_noise, ir.id_embedding)


register_item_module("text", text_item_embedding)


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


def finetune_config(pretrained: Path, target: str, *, keep_text: bool = True,
                    use_id: bool = True, freeze: bool = False, zero_shot: bool = False,
                    config_file: str | None = None, overrides: list[str] | None = None,
                    seed: int | None = None) -> RunConfig:
    """The fine-tuning run's config: the pre-training one, moved to ``target``.

    Model, train and eval settings carry over (the architecture must, for the weights to fit);
    the data section keeps its preprocessing with ``target`` as the only source; then the
    config file and ``--set`` overrides apply.
    """
    raw = load_config(pretrained).to_dict()
    raw.pop("format_version", None)
    raw["data"] = {**raw["data"], "source": target, "domains": []}
    if zero_shot and not keep_text:
        raise ConfigError("--zero-shot evaluates the text-only pre-trained model; it cannot be "
                          "combined with --no-text")
    use_id = use_id and not zero_shot  # untrained ID vectors would only add noise
    raw["item_repr"] = {**raw["item_repr"], "kind": "text" if keep_text else "id",
                        "id_embedding": bool(keep_text and use_id), "freeze_backbone": freeze,
                        "pretrained_from": str(pretrained), "zero_shot": zero_shot}
    if seed is not None:
        raw["seed"] = seed
    if config_file:
        raw = merge_dicts(raw, load_toml(config_file))
    cfg = resolve_config(None, overrides or [], base=raw)
    pre_name = raw["model"]["name"]
    if cfg.model_name != pre_name:
        raise ConfigError(f"fine-tuning keeps the pre-trained model ({pre_name}); got "
                          f"{cfg.model_name}")
    return cfg
