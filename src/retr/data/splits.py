"""Train / validation / test splits that refer into the compact dataset without copying it.

A split is three sets of (user, prefix length) pairs:

* ``train``: training sequences; the model learns next-item prediction at every position of
  ``items[offsets[u] : offsets[u] + length]``.
* ``valid`` / ``test``: evaluation examples; the input is the prefix of ``length`` items and
  the target is the item right after it.

Invariant (tested): no test target, nor anything after it, is inside a training input, and a
validation target is inside a training input only where the protocol says so (never).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from retr.data.dataset import SequenceDataset
from retr.errors import DataError, RunDirError
from retr.utils import atomic_write

SplitName = Literal["loo", "temporal", "rolling"]
SPLITS: tuple[str, ...] = ("loo", "temporal", "rolling")


@dataclass
class EvalExamples:
    """Evaluation examples: predict ``dataset.items[offsets[u] + length]`` from the prefix."""

    users: np.ndarray  # int64 [M]
    lengths: np.ndarray  # int64 [M] (prefix length, >= 1)
    targets: np.ndarray  # int64 [M] internal item ids

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Split:
    """Training sequences and validation/test examples of one dataset."""

    kind: str
    train_users: np.ndarray  # int64 [T]
    train_lengths: np.ndarray  # int64 [T]
    valid: EvalExamples
    test: EvalExamples

    def examples(self, which: str) -> EvalExamples:
        if which not in ("valid", "test"):
            raise DataError(f"unknown split part {which!r}; use 'valid' or 'test'")
        return self.valid if which == "valid" else self.test

    def train_item_counts(self, dataset: SequenceDataset) -> np.ndarray:
        """Interactions per item inside training inputs only (what `pop` may see)."""
        pos = _prefix_positions(dataset, self.train_users, self.train_lengths)
        return np.bincount(dataset.items[pos], minlength=dataset.n_items + 1).astype(np.int64)

    def save(self, path: str | Path) -> None:
        arrays = {
            "train_users": self.train_users, "train_lengths": self.train_lengths,
            "valid_users": self.valid.users, "valid_lengths": self.valid.lengths,
            "valid_targets": self.valid.targets, "test_users": self.test.users,
            "test_lengths": self.test.lengths, "test_targets": self.test.targets,
            "kind": np.array(self.kind),
        }
        atomic_write(path, lambda p: _savez(p, arrays))

    @classmethod
    def load(cls, path: str | Path) -> Split:
        try:
            with open(path, "rb") as fh:
                z = np.load(fh, allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("a single array, not an .npz archive")
                with z:
                    a = {k: z[k] for k in z.files}
        except Exception as exc:  # a damaged archive fails in many ways
            raise RunDirError(f"{path}: cannot read split file "
                              f"({' '.join(str(exc).split()) or type(exc).__name__})") from None
        missing = sorted(set(_SPLIT_ARRAYS) - set(a))
        if missing:
            raise RunDirError(f"{path}: corrupted split file (no {', '.join(missing)})")
        return cls(kind=str(a["kind"]), train_users=a["train_users"],
                   train_lengths=a["train_lengths"],
                   valid=EvalExamples(a["valid_users"], a["valid_lengths"], a["valid_targets"]),
                   test=EvalExamples(a["test_users"], a["test_lengths"], a["test_targets"]))


_SPLIT_ARRAYS = ("kind", "train_users", "train_lengths", "valid_users", "valid_lengths",
                 "valid_targets", "test_users", "test_lengths", "test_targets")


@dataclass
class RunData:
    """What a run needs besides the model: the data, its split and the stored sampled
    negatives of validation and test (``{"valid": [U, n], "test": [U, n]}``)."""

    dataset: SequenceDataset
    split: Split
    negatives: dict[str, np.ndarray]


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def _prefix_positions(dataset: SequenceDataset, users: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions of every (user, prefix length) item, vectorised."""
    starts = dataset.offsets[users]
    total = int(lengths.sum())
    row_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - row_start)


def _examples(dataset: SequenceDataset, users: np.ndarray, lengths: np.ndarray) -> EvalExamples:
    users = users.astype(np.int64)
    lengths = lengths.astype(np.int64)
    targets = dataset.items[dataset.offsets[users] + lengths]
    return EvalExamples(users=users, lengths=lengths, targets=targets)


def leave_one_out(dataset: SequenceDataset) -> Split:
    """The paper's protocol: last item -> test, second last -> validation, the rest -> training.

    Users with fewer than 3 interactions cannot give all three parts; they keep their items in
    training only when they have 2 (input 1, no evaluation) and are skipped for evaluation.
    """
    lens = dataset.lengths
    users = np.arange(dataset.n_users, dtype=np.int64)
    ok = lens >= 3
    train_len = np.where(ok, lens - 2, lens)
    has_train = train_len >= 2  # a training sequence needs an input and a target
    return Split(
        kind="loo",
        train_users=users[has_train], train_lengths=train_len[has_train],
        valid=_examples(dataset, users[ok], lens[ok] - 2),
        test=_examples(dataset, users[ok], lens[ok] - 1),
    )


def temporal_split(dataset: SequenceDataset, valid_cutoff: float, test_cutoff: float) -> Split:
    """Global temporal cut-off: train on everything before ``valid_cutoff``.

    Validation predicts each user's first interaction in [valid_cutoff, test_cutoff) from all
    earlier ones; test predicts the first interaction at or after ``test_cutoff`` from all
    earlier ones (validation-period items included as input, never as training targets).
    Cut-offs in (0, 1) are quantiles of all timestamps; larger values are timestamps.
    """
    if dataset.timestamps is None:
        raise DataError("the temporal split needs timestamps, and this dataset has order only; "
                        "use --set split.kind=loo or read the data with --time-col")
    ts = dataset.timestamps
    vc = float(np.quantile(ts, valid_cutoff)) if 0 < valid_cutoff < 1 else valid_cutoff
    tc = float(np.quantile(ts, test_cutoff)) if 0 < test_cutoff < 1 else test_cutoff
    if not vc <= tc:
        raise DataError(f"temporal split: valid_cutoff ({vc}) must not be after test_cutoff ({tc})")
    users = np.arange(dataset.n_users, dtype=np.int64)
    starts, ends = dataset.offsets[:-1], dataset.offsets[1:]
    # Per user, number of items strictly before each cut-off (timestamps sorted within a user).
    n_before_v = _count_before(ts, dataset.offsets, vc)
    n_before_t = _count_before(ts, dataset.offsets, tc)
    lens = ends - starts
    has_train = n_before_v >= 2
    v_ok = (n_before_v >= 1) & (n_before_v < n_before_t)
    t_ok = (n_before_t >= 1) & (n_before_t < lens)
    return Split(
        kind="temporal",
        train_users=users[has_train], train_lengths=n_before_v[has_train],
        valid=_examples(dataset, users[v_ok], n_before_v[v_ok]),
        test=_examples(dataset, users[t_ok], n_before_t[t_ok]),
    )


def _count_before(ts: np.ndarray, offsets: np.ndarray, cutoff: float) -> np.ndarray:
    before = (ts < cutoff).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(before)])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def rolling_split(dataset: SequenceDataset, seed: int = 0, steps: int = 5,
                  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Split:
    """Rolling prediction on held-out users (the paper's appendix protocol).

    Users are shuffled (seeded) and split 8:1:1. Training users train on their whole sequence
    (the last record is the final target). Validation and test users are never seen in
    training; for each, the last ``steps`` records are predicted one after another, each from
    all records before it. Metrics average over all those steps.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise DataError(f"rolling split fractions must be >= 0 and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(dataset.n_users).astype(np.int64)
    n_tr = int(round(fractions[0] * len(perm)))
    n_va = int(round(fractions[1] * len(perm)))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    tr = np.sort(tr)
    lens = dataset.lengths

    def roll(us: np.ndarray) -> EvalExamples:
        us = np.sort(us)
        k = np.minimum(steps, lens[us] - 1)  # each predicted step needs >= 1 input item
        rows = np.repeat(us, k)
        step = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        lengths = lens[rows] - np.repeat(k, k) + step
        return _examples(dataset, rows, lengths)

    has_train = lens[tr] >= 2
    return Split(kind="rolling", train_users=tr[has_train], train_lengths=lens[tr][has_train],
                 valid=roll(va), test=roll(te))


def make_split(dataset: SequenceDataset, kind: str, seed: int = 0, valid_cutoff: float = 0.8,
               test_cutoff: float = 0.9, rolling_steps: int = 5) -> Split:
    """Dispatch on the split name used in configs and on the command line."""
    if kind == "loo":
        split = leave_one_out(dataset)
    elif kind == "temporal":
        split = temporal_split(dataset, valid_cutoff, test_cutoff)
    elif kind == "rolling":
        split = rolling_split(dataset, seed=seed, steps=rolling_steps)
    else:
        raise DataError(f"unknown split {kind!r}; choose one of {', '.join(SPLITS)}")
    if len(split.train_users) == 0:
        raise DataError(f"split {kind!r} left no training sequences; the dataset is too small")
    if len(split.test) == 0:
        raise DataError(f"split {kind!r} left no test examples; the dataset is too small")
    return split
