"""Run directories: safe, atomic, versioned checkpoints.

Layout of a run directory::

    config.json          resolved RunConfig
    vocab.json           external <-> internal ids
    split.npz            the split (numpy, no pickle)
    negatives_valid.npy, negatives_test.npy   sampled-protocol negatives, drawn once
    model.safetensors    best weights on validation
    last.safetensors     weights after the last finished epoch
    trainer_state.pt     resume state: model, optimizer, RNG, epoch, early stopping
                         (tensors and primitives only: loads with weights_only=True)
    metrics.jsonl        one line per epoch
    results.json         final metrics with protocol, split, seed, data fingerprint
    env.json             library versions
    manifest.json        size and SHA-256 of every file, written last (:mod:`retr.manifest`)

Every file is written to a temporary sibling and renamed, so a kill at any moment leaves the
previous good version in place.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from retr.errors import RunDirError
from retr.manifest import check_format_version
from retr.utils import atomic_write

RUN_FORMAT_VERSION = "1"


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Weights as safetensors (shared tensors stored once, contiguous copies)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format_version": RUN_FORMAT_VERSION, **(metadata or {})}
    atomic_write(path, lambda p: save_file(_dedupe_shared(state), str(p), metadata=meta))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for k, v in state.items():
        key = (int(v.untyped_storage().data_ptr()), int(v.storage_offset()))
        if key in seen and v.numel():
            out[k] = v.clone()
        else:
            seen[key] = k
            out[k] = v
    return out


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``, with clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: weights file missing; was training finished or killed before "
                          "the first epoch ended?")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path}: corrupted or truncated weights file ({exc})") from None
    check_format_version(meta, path, (RUN_FORMAT_VERSION,))
    expected = model.state_dict()
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise RunDirError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the model "
                              f"in config.json needs {tuple(want.shape)}; the weights belong to "
                              "another configuration or vocabulary")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunDirError(f"{path}: weights do not match the model in config.json "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Load resume state without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: no trainer state to resume from (the run never finished an epoch)")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as exc:
        found = re.search(r"Unsupported (global: GLOBAL|operand) [^\s,]+", str(exc))
        raise RunDirError(f"{path}: refused to load: the file holds objects other than tensors and "
                          f"plain values, which could run code if unpickled"
                          f"{f' ({found.group(0).strip()})' if found else ''}; it is damaged or "
                          "was not written by retr, so do not load it by other means unless you "
                          "trust its origin") from None
    except Exception as exc:  # a damaged archive or pickle stream fails in many ways
        raise RunDirError(f"{path}: corrupted or truncated trainer state "
                          f"({_one_line(exc)[:300]})") from None
    if not isinstance(state, dict) or state.get("format_version") != RUN_FORMAT_VERSION:
        raise RunDirError(f"{path}: not a retr trainer state of format {RUN_FORMAT_VERSION}")
    return state


def save_array(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda p: _np_save(p, array))


def _np_save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def load_array(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: file missing from the run directory")
    try:
        with open(path, "rb") as fh:
            array = np.load(fh, allow_pickle=False)
    except Exception as exc:  # a damaged header fails in many ways (it is a Python literal)
        raise RunDirError(f"{path}: corrupted array file ({_one_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise RunDirError(f"{path}: corrupted array file (an archive, not one .npy array)")
    return array


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
