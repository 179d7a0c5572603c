"""Several datasets as one: every domain's sequences side by side, with disjoint ids.

Multi-domain pre-training (``retr pretrain --data A --data B``) trains one model on all the
domains at once. Each domain is read and preprocessed on its own with the same ``[data]``
settings (k-core filtering never mixes domains), then its users and items are numbered after
those of the domains before it. External ids become ``LABEL/ID`` (``office/17``), where the
label is the registry name, the synthetic spec or the file name, so an item of one domain can
never be taken for an item of another, and ``vocab.json`` says which domain each one is from.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from retr.config import DataConfig
from retr.data import registry
from retr.data.dataset import SequenceDataset, Vocabulary
from retr.errors import DataError

SEPARATOR = "/"


def domain_label(source: str) -> str:
    """Short unique name of a source: registry name, file name, or the synthetic spec without
    punctuation (``synthetic:n_users=500,seed=1`` -> ``synthetic-n_users500-seed1``), so that
    ids stay free of the commas that separate ids in histories."""
    text = source.strip()
    if text.lower() == "synthetic" or text.lower().startswith("synthetic:"):
        return re.sub(r"[:,]+", "-", text.replace("=", "").replace(" ", "")).strip("-")
    if registry.is_registered(text):
        return registry.get_entry(text).name
    return Path(text).name


def domain_config(cfg: DataConfig, source: str) -> DataConfig:
    """The single-domain ``[data]`` settings of one of ``cfg.domains``."""
    return dataclasses.replace(cfg, source=source, domains=[])


def domain_labels(cfg: DataConfig) -> list[str]:
    """Labels of ``cfg.domains``, checked to be distinct (a domain listed twice is a mistake)."""
    labels = [domain_label(s) for s in cfg.domains]
    seen: set[str] = set()
    for source, label in zip(cfg.domains, labels, strict=True):
        if SEPARATOR in label:
            raise DataError(f"domain {source!r}: its label {label!r} contains {SEPARATOR!r}")
        if label in seen:
            raise DataError(f"domain {label!r} is listed twice in data.domains")
        seen.add(label)
    return labels


def split_external(item: str) -> tuple[str, str]:
    """``"office/17"`` -> ``("office", "17")``."""
    label, sep, original = item.partition(SEPARATOR)
    if not sep:
        raise DataError(f"{item!r} is not a multi-domain id (LABEL{SEPARATOR}ID)")
    return label, original


def side_by_side(labels: list[str], parts: list[SequenceDataset]) -> SequenceDataset:
    """The domains ``parts`` (each read and preprocessed alone) as one dataset, disjoint ids."""
    items, offsets, stamps = [], [np.zeros(1, dtype=np.int64)], []
    users: list[str] = []
    vocab_items: list[str] = []
    n_items = n_flat = 0
    for label, ds in zip(labels, parts, strict=True):
        items.append(ds.items.astype(np.int64) + n_items)
        offsets.append(ds.offsets[1:].astype(np.int64) + n_flat)
        stamps.append(ds.timestamps)
        users += [f"{label}{SEPARATOR}{u}" for u in ds.vocab.users]
        vocab_items += [f"{label}{SEPARATOR}{i}" for i in ds.vocab.items]
        n_items += ds.n_items
        n_flat += ds.n_interactions
    timestamps = None
    if all(t is not None for t in stamps):
        timestamps = np.concatenate([np.asarray(t, dtype=np.float64) for t in stamps])
    return SequenceDataset(items=np.concatenate(items), offsets=np.concatenate(offsets),
                           vocab=Vocabulary(users=users, items=vocab_items),
                           timestamps=timestamps, name="+".join(labels))
