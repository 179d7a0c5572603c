"""Compact storage of user sequences and the external <-> internal id vocabulary.

All sequences live in one flat ``items`` array; user ``u`` owns
``items[offsets[u]:offsets[u + 1]]`` in chronological order. Nothing ever copies a prefix:
splits and batches refer to (user, length) pairs and slice this array on demand.
Internal item ids run 1..n_items; 0 is padding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retr.errors import DataError, RunDirError
from retr.manifest import check_format_version
from retr.utils import atomic_write_json, read_json

VOCAB_FORMAT_VERSION = 1


@dataclass
class Vocabulary:
    """External ids (strings) of users and items; item ``items[i]`` has internal id ``i + 1``."""

    users: list[str]
    items: list[str]
    _item_index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def item_index(self) -> dict[str, int]:
        """Map external item id -> internal id (1-based)."""
        if self._item_index is None:
            self._item_index = {ext: i + 1 for i, ext in enumerate(self.items)}
        return self._item_index

    def to_json(self) -> dict[str, Any]:
        return {"format_version": VOCAB_FORMAT_VERSION, "padding_id": 0, "users": self.users,
                "items": self.items}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Vocabulary:
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list)
                                                for k in ("users", "items")):
            raise RunDirError("vocabulary JSON must hold 'users' and 'items' lists")
        return cls(users=[str(u) for u in obj["users"]], items=[str(i) for i in obj["items"]])

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        obj = read_json(path)
        check_format_version(obj, path, (VOCAB_FORMAT_VERSION,))
        try:
            return cls.from_json(obj)
        except RunDirError as exc:
            raise RunDirError(f"{path}: corrupted vocabulary ({exc})") from None


@dataclass
class SequenceDataset:
    """Chronological item sequences of every user, stored flat.

    Attributes:
        items: int64 [n_interactions], internal item ids (1..n_items).
        offsets: int64 [n_users + 1]; user u's items are ``items[offsets[u]:offsets[u+1]]``.
        timestamps: float64 [n_interactions] or None when the source has order only.
        vocab: external ids.
        name: a label for reports.
    """

    items: np.ndarray
    offsets: np.ndarray
    vocab: Vocabulary
    timestamps: np.ndarray | None = None
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.items):
            raise DataError("offsets must start at 0 and end at len(items)")
        if len(self.vocab.users) != self.n_users:
            raise DataError("vocabulary users do not match offsets")

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        """A view (not a copy) of user ``user``'s items."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def user_of_position(self) -> np.ndarray:
        """int64 [n_interactions]: the user owning each flat position."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths)

    def item_counts(self) -> np.ndarray:
        """int64 [n_items + 1]: interactions per item (index 0 = padding = 0)."""
        return np.bincount(self.items, minlength=self.n_items + 1).astype(np.int64)

    def fingerprint(self) -> str:
        """A short hash of the sequences and vocabulary: identical data gives identical hash."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.items, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
        h.update("\x00".join(self.vocab.items).encode())
        h.update("\x00".join(self.vocab.users).encode())
        return h.hexdigest()[:16]

    def padded_prefixes(self, users: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
        """int64 [B, max_len]: the last ``max_len`` items of each (user, prefix length), left-padded.

        Vectorised gather: no Python loop over users.
        """
        users = np.asarray(users, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = self.offsets[users] + lengths  # exclusive
        cols = np.arange(max_len, dtype=np.int64) - max_len  # -max_len .. -1
        pos = ends[:, None] + cols[None, :]
        valid = cols[None, :] >= -lengths[:, None]
        out = np.zeros((len(users), max_len), dtype=np.int64)
        out[valid] = self.items[pos[valid]]
        return out

    def describe(self) -> dict[str, Any]:
        """Headline statistics, as ``retr data describe`` prints them."""
        lens = self.lengths
        pct = np.percentile(lens, [5, 25, 50, 75, 95, 99]) if len(lens) else np.zeros(6)
        n_u, n_i = self.n_users, self.n_items
        return {
            "name": self.name,
            "users": n_u,
            "items": n_i,
            "interactions": self.n_interactions,
            "density": self.n_interactions / (n_u * n_i) if n_u and n_i else 0.0,
            "avg_length": float(lens.mean()) if len(lens) else 0.0,
            "min_length": int(lens.min()) if len(lens) else 0,
            "max_length": int(lens.max()) if len(lens) else 0,
            "length_percentiles": {
                f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95, 99), pct, strict=True)
            },
            "has_timestamps": self.timestamps is not None,
            "fingerprint": self.fingerprint(),
        }
