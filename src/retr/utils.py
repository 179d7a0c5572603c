"""Small helpers shared across the package: atomic writes, fingerprints, progress and logs."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retr.errors import RunDirError
from retr.limits import json_loads


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` via a temporary sibling then rename, so a crash never leaves half a file.

    ``write`` receives the temporary path and must create the file there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: no lone surrogate (JSON ``"\\ud800"``, or an
    undecodable byte that Python kept as ``\\udcXX``)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> dict[str, Any]:
    """A run file holding one JSON object (config, env, results), or a RunDirError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: file missing from the run directory")
    try:
        obj = json_loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: corrupted JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: corrupted: expected a JSON object, found {type(obj).__name__}")
    return obj


def progress_bars(wanted: bool = True) -> bool:
    """Whether to draw progress bars: asked for, and stderr is a terminal.

    A bar redraws itself with carriage returns; in a log file every redraw is a line, so
    output that is not a terminal gets the one-line-per-epoch log alone.
    """
    return wanted and sys.stderr.isatty()


def log(message: str) -> None:
    """A progress or status line for people, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)
