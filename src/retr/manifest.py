"""A run directory's manifest: the size and SHA-256 of every file, checked when the run is loaded.

Training writes ``manifest.json`` last, atomically, once every other file of the run is final, and
removes it first when it starts writing into a directory again (a resume), so a manifest always
describes a finished run. Loading verifies the files it is about to read against it: a file
changed after training (a flipped byte inside a tensor loads silently otherwise) is reported by
name. A run directory without a manifest (written by an older retr, or interrupted) loads
unverified, as before.

Format versions: :func:`check_format_version` refuses files written by a format this release
does not read, naming the versions it does read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retr.errors import RunDirError
from retr.utils import atomic_write_json, read_json, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


def write_manifest(run_dir: str | Path) -> dict[str, Any]:
    """Record every regular file of ``run_dir`` (not temporaries, not sub-directories)."""
    run_dir = Path(run_dir)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(run_dir.iterdir()):
        if path.name == MANIFEST or path.name.startswith(".") or not path.is_file():
            continue
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "files": files}
    atomic_write_json(run_dir / MANIFEST, manifest)
    return manifest


def remove_manifest(run_dir: str | Path) -> None:
    """Before a run directory is written again: its manifest would no longer describe it."""
    path = Path(run_dir) / MANIFEST
    if path.is_file():
        path.unlink()
        _fsync_dir(path.parent)


def verify_manifest(run_dir: str | Path, names: Iterable[str] | None = None) -> bool:
    """Check ``names`` (default: every listed file) against the manifest.

    Returns False when the run has no manifest (nothing to verify), True when every checked file
    matches; raises RunDirError naming the first file that is missing, resized or changed.
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        return False
    manifest = read_json(path)
    check_format_version(manifest, path, (MANIFEST_FORMAT_VERSION,))
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str) for v in files.values()):
        raise RunDirError(f"{path}: corrupted manifest (expected 'files' mapping each name to its "
                          "bytes and sha256)")
    wanted = list(files) if names is None else [n for n in names if n in files]
    for name in wanted:
        entry, target = files[name], run_dir / name
        if not target.is_file():
            raise RunDirError(f"{target}: listed in {MANIFEST} but missing; the run directory "
                              "is incomplete (copy it again, or retrain)")
        size = target.stat().st_size
        if size != entry["bytes"]:
            raise RunDirError(f"{target}: {size:,} bytes, but {MANIFEST} records "
                              f"{entry['bytes']:,}; the file was truncated or replaced after "
                              "training (copy it again, or retrain)")
        if sha256_file(target) != entry["sha256"]:
            raise RunDirError(f"{target}: checksum differs from the one in {MANIFEST}; the file "
                              "was damaged or changed after training (copy it again, or "
                              "retrain)")
    return True


def check_format_version(obj: dict[str, Any], path: str | Path,
                         supported: tuple[int | str, ...]) -> None:
    """Refuse a file whose ``format_version`` this release does not read (absent = the first)."""
    version = obj.get("format_version", supported[0])
    if str(version) not in {str(v) for v in supported}:
        reads = ", ".join(str(v) for v in supported)
        raise RunDirError(f"{path}: format_version {version!r} is not one this release of retr "
                          f"reads ({reads}); it was written by another version of retr: load it "
                          "with that version, or retrain")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
