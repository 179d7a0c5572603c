"""Recommendations for any history of external item ids, without a user id or a dataloader.

A :class:`Recommender` is loaded from a run directory alone (``config.json``, ``vocab.json``,
``model.safetensors``, optionally ``results.json`` and ``item_counts.npy``): the training data is
never read again. Histories go through exactly the evaluation path: left-padded to the model's
``max_len`` like :meth:`SequenceDataset.padded_prefixes`, turned into a state by
``model.user_representation`` and ranked by :func:`retr.evaluation.ranking.topk_items` with the
full history excluded, so a history ranks items identically here and in evaluation.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retr.config import RunConfig, flat_dict
from retr.data.dataset import Vocabulary
from retr.errors import RetrError, RunDirError
from retr.evaluation.ranking import states_of, topk_items
from retr.manifest import verify_manifest
from retr.models import build_run_model
from retr.models.base import SequentialRecommender
from retr.models.pop import Pop
from retr.runs import ITEM_COUNTS_FILE, load_config, load_item_counts
from retr.training.checkpoint import load_weights
from retr.utils import is_unicode_text, read_json

UNKNOWN_POLICIES = ("skip", "error")
EMPTY_POLICIES = ("error", "popularity")


class RequestError(RetrError):
    """A request the recommender cannot answer as given (bad k, malformed history)."""


class UnknownItemError(RequestError):
    """An item id that is not in the run's vocabulary, under the ``unknown="error"`` policy."""


class EmptyHistoryError(RequestError):
    """No known item is left in a history, under the ``empty="error"`` policy."""


@dataclass
class EncodedHistory:
    """A history mapped to internal ids: every known item (oldest first) and what was skipped."""

    ids: np.ndarray
    skipped: list[str]
    window: int

    @property
    def used(self) -> np.ndarray:
        """The internal ids the model reads: the most recent ``window`` known items."""
        return self.ids[max(len(self.ids) - self.window, 0):]

    @property
    def truncated(self) -> bool:
        return len(self.ids) > self.window


@dataclass
class Recommendation:
    """Top-k items for one history, best first, with what the model actually used.

    used_history: the known items the model read (the most recent ones when ``truncated``).
    skipped: history ids unknown to the model (``unknown="skip"``); skipped_candidates likewise.
    fallback: "popularity" when the history had no known item and the popularity fallback
    answered instead of the model; None otherwise.
    """

    items: list[str]
    scores: list[float]
    used_history: list[str]
    truncated: bool
    skipped: list[str] = field(default_factory=list)
    skipped_candidates: list[str] = field(default_factory=list)
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_policy(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise RequestError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return value


def _as_external(item: object, where: str) -> str:
    """External ids are strings in the vocabulary; integers are accepted and converted."""
    if isinstance(item, str):
        if not is_unicode_text(item):
            raise RequestError(f"{where}: item id {ascii(item)} is not valid Unicode text (it "
                               "holds a lone surrogate such as a JSON \\ud800 escape); send ids "
                               "as UTF-8 text")
        return item
    if isinstance(item, numbers.Integral) and not isinstance(item, bool):
        return str(int(item))
    raise RequestError(f"{where}: item ids must be strings or integers, got {item!r}")


def _as_id_list(values: object, where: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise RequestError(f"{where} must be a list of item ids, got {type(values).__name__}")
    return [_as_external(v, f"{where}[{i}]") for i, v in enumerate(values)]


class Recommender:
    """A trained model behind external item ids: ``recommend(history)`` -> top-k items.

    unknown: "skip" (drop ids the run never saw and report them) or "error".
    empty: what a history without any known item gets: "error" or "popularity" (training-input
    popularity; needs the pop model's counts or the run's ``item_counts.npy``).
    """

    def __init__(self, model: SequentialRecommender, vocab: Vocabulary, model_name: str,
                 config: RunConfig | None = None, results: dict[str, Any] | None = None,
                 item_counts: np.ndarray | None = None, run_dir: Path | None = None,
                 unknown: str = "skip", empty: str = "error", batch_size: int = 256,
                 item_chunk: int = 4096) -> None:
        if vocab.n_items != model.n_items:
            raise RunDirError(f"the vocabulary has {vocab.n_items} items, the model "
                              f"{model.n_items}; they do not belong to the same run")
        self.model = model.eval()
        self.vocab = vocab
        self.model_name = model_name
        self.config = config
        self.results = results
        self.run_dir = run_dir
        self.unknown = _check_policy("unknown", unknown, UNKNOWN_POLICIES)
        self.empty = _check_policy("empty", empty, EMPTY_POLICIES)
        self.batch_size = batch_size
        self.item_chunk = item_chunk
        self._index = vocab.item_index()
        self._pop: Pop | None = None
        if item_counts is not None:
            self._pop = Pop(model.n_items).to(self.device)
            self._pop.fit_counts(np.asarray(item_counts, dtype=np.float32))
        if self.empty == "popularity" and self._pop is None:
            raise RunDirError("empty='popularity' needs item popularity, and this run has none: "
                              f"no {ITEM_COUNTS_FILE} (train it with a retr version that writes "
                              "one, or use empty='error')")

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", unknown: str = "skip",
             empty: str = "error", weights: str = "model.safetensors") -> Recommender:
        """Load a run directory's selected weights; the training data is not needed."""
        run_dir = Path(run_dir)
        if run_dir.is_dir():
            verify_manifest(run_dir, ["config.json", "vocab.json", weights, "results.json",
                                      ITEM_COUNTS_FILE])
        cfg = load_config(run_dir)
        vocab = Vocabulary.load(run_dir / "vocab.json")
        model = build_run_model(cfg, vocab.n_items)
        load_weights(model, run_dir / weights)
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise RetrError(f"device {device!r} is not usable here ({exc})") from None
        results_path = run_dir / "results.json"
        results = read_json(results_path) if results_path.is_file() else None
        if results is not None and results.get("n_items", vocab.n_items) != vocab.n_items:
            raise RunDirError(f"{results_path}: reports {results['n_items']} items, vocab.json "
                              f"{vocab.n_items}")
        counts = load_item_counts(run_dir, vocab.n_items)
        if counts is None and isinstance(model, Pop):
            counts = torch.as_tensor(model.counts).detach().cpu().numpy()
        return cls(model, vocab, cfg.model_name, config=cfg, results=results, item_counts=counts,
                   run_dir=run_dir, unknown=unknown, empty=empty,
                   batch_size=cfg.eval.batch_size, item_chunk=cfg.eval.item_chunk)

    @property
    def n_items(self) -> int:
        return self.model.n_items

    @property
    def max_len(self) -> int:
        return self.model.max_len

    @property
    def window(self) -> int:
        """How many history items the model reads: a cloze model spends one slot on [mask]."""
        return self.model.max_len - (1 if self.model.objective == "cloze" else 0)

    @property
    def device(self) -> torch.device:
        first = next(iter(self.model.parameters()), next(iter(self.model.buffers()), None))
        return first.device if first is not None else torch.device("cpu")

    @property
    def has_popularity(self) -> bool:
        return self._pop is not None

    @property
    def dataset_name(self) -> str | None:
        if self.results is not None and self.results.get("dataset"):
            return str(self.results["dataset"])
        return self.config.data.source if self.config is not None else None

    def external(self, ids: Iterable[int]) -> list[str]:
        """External ids of internal ids (1-based)."""
        items = self.vocab.items
        return [items[int(i) - 1] for i in ids]

    def encode(self, history: object, unknown: str | None = None,
               where: str = "history") -> EncodedHistory:
        """Map external ids to internal ids under the unknown-item policy."""
        policy = _check_policy("unknown", unknown or self.unknown, UNKNOWN_POLICIES)
        ext = _as_id_list(history, where)
        ids, skipped = [], []
        for item in ext:
            internal = self._index.get(item)
            if internal is None:
                skipped.append(item)
            else:
                ids.append(internal)
        if skipped and policy == "error":
            shown = ", ".join(repr(s) for s in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            raise UnknownItemError(f"{where}: unknown item id(s) {shown}{more}; the model knows "
                                   f"{self.n_items} items (use unknown='skip', or --unknown skip, to drop them)")
        return EncodedHistory(np.asarray(ids, dtype=np.int64), skipped, self.window)

    def padded(self, encoded: Sequence[EncodedHistory]) -> torch.Tensor:
        """[B, max_len] left-padded most recent items, as ``SequenceDataset.padded_prefixes``."""
        n = self.max_len
        out = np.zeros((len(encoded), n), dtype=np.int64)
        for row, enc in enumerate(encoded):
            tail = enc.ids[-n:]
            if len(tail):
                out[row, n - len(tail):] = tail
        return torch.from_numpy(out).to(self.device)

    def _candidates(self, candidates: object, unknown: str | None) -> tuple[torch.Tensor | None, list[str]]:
        if candidates is None:
            return None, []
        enc = self.encode(candidates, unknown, where="candidates")
        if not len(enc.ids):
            raise UnknownItemError("candidates: none of the candidate ids is known to the model")
        # ascending ids so that ties order by lower id, as in full ranking
        pool = torch.from_numpy(np.unique(enc.ids)).to(self.device)
        return pool, enc.skipped

    def recommend(self, history: object, k: int = 10, exclude_seen: bool = True,
                  candidates: object = None, unknown: str | None = None,
                  empty: str | None = None) -> Recommendation:
        """Top-``k`` items after ``history`` (external ids, oldest first)."""
        if isinstance(history, (str, bytes)):
            raise RequestError("history must be a list of item ids, not a single string")
        return self.recommend_batch([history], k, exclude_seen, candidates, unknown, empty)[0]

    def recommend_batch(self, histories: object, k: int = 10, exclude_seen: bool = True,
                        candidates: object = None, unknown: str | None = None,
                        empty: str | None = None) -> list[Recommendation]:
        """Top-``k`` items for every history; identical to calling :meth:`recommend` on each."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise RequestError(f"k must be an integer >= 1, got {k!r}")
        if not isinstance(exclude_seen, bool):
            raise RequestError(f"exclude_seen must be true or false, got {exclude_seen!r}")
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Iterable):
            raise RequestError("histories must be a list of histories")
        empty_policy = _check_policy("empty", empty or self.empty, EMPTY_POLICIES)
        if empty_policy == "popularity" and self._pop is None:
            raise RequestError("empty='popularity' is not available: this run stores no item "
                               "popularity")
        histories = list(histories)
        encoded = [self.encode(h, unknown, where=f"history {i}" if len(histories) > 1 else "history")
                   for i, h in enumerate(histories)]
        pool, skipped_cand = self._candidates(candidates, unknown)
        k = min(int(k), self.n_items if pool is None else len(pool))  # a huge k is "all items"
        model_rows = [i for i, e in enumerate(encoded) if len(e.ids)]
        empty_rows = [i for i, e in enumerate(encoded) if not len(e.ids)]
        if empty_rows and empty_policy == "error":
            which = "history" if len(histories) == 1 else f"history {empty_rows[0]}"
            why = " (every id was unknown)" if encoded[empty_rows[0]].skipped else ""
            raise EmptyHistoryError(f"{which} has no known item{why}; nothing to recommend from "
                                    "(use empty='popularity', or --empty popularity, for a popularity fallback)")
        ranked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for start in range(0, len(model_rows), self.batch_size):
            rows = model_rows[start:start + self.batch_size]
            ranked.update(zip(rows, self._rank(self.model, [encoded[r] for r in rows], k,
                                               exclude_seen, pool), strict=True))
        if empty_rows:
            assert self._pop is not None
            ranked.update(zip(empty_rows, self._rank(self._pop, [encoded[r] for r in empty_rows],
                                                     k, False, pool), strict=True))
        out = []
        for i, enc in enumerate(encoded):
            ids, scores = ranked[i]
            out.append(Recommendation(
                items=self.external(ids), scores=[float(s) for s in scores],
                used_history=self.external(enc.used), truncated=enc.truncated,
                skipped=enc.skipped, skipped_candidates=list(skipped_cand),
                fallback="popularity" if i in empty_rows else None))
        return out

    @torch.no_grad()
    def _rank(self, model: SequentialRecommender, encoded: list[EncodedHistory], k: int,
              exclude_seen: bool, pool: torch.Tensor | None) -> list[tuple[np.ndarray, np.ndarray]]:
        h = states_of(model, self.padded(encoded))  # [B, d]
        ex_rows = ex_items = None
        if exclude_seen:
            lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
            ex_rows = np.repeat(np.arange(len(encoded), dtype=np.int64), lengths)
            ex_items = np.concatenate([e.ids for e in encoded]).astype(np.int64)
        ids, scores = topk_items(model, h, k, self.n_items, ex_rows, ex_items, candidates=pool,
                                 item_chunk=self.item_chunk)
        ids_np, scores_np = ids.cpu().numpy(), scores.cpu().numpy()
        # fewer than k rankable items: topk_items pads with id 0; drop the padding
        return [(i[i > 0], s[i > 0]) for i, s in zip(ids_np, scores_np, strict=True)]

    def info(self) -> dict[str, Any]:
        """What the served model is: name, data, catalogue, window and its recorded metrics."""
        info: dict[str, Any] = {
            "model": self.model_name,
            "dataset": self.dataset_name,
            "n_items": self.n_items,
            "max_len": self.max_len,
            "window": self.window,
            "objective": self.model.objective,
            "unknown_policy": self.unknown,
            "empty_policy": self.empty,
            "popularity_fallback": self.has_popularity,
        }
        if self.config is not None:
            info["seed"] = self.config.seed
            info["split"] = self.config.split.kind
            info["model_config"] = flat_dict(self.config.model)
        if self.results is not None:
            info["results"] = self.results.get("results", [])
            info["data_fingerprint"] = self.results.get("data_fingerprint")
        return info
