"""Verified downloads: stream to a temporary file, check its checksum, then rename.

A file appears at its destination only complete and verified, so an interrupted or tampered
download never leaves something that looks like data. Checksums are strings
``"<algorithm>:<hex>"`` with algorithm ``sha256``, ``md5`` (what GroupLens publishes) or
``gitblob`` (the git blob id, i.e. SHA-1 of ``b"blob <size>\\0" + content``, which is what a
GitHub tree lists for every file).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from retr.errors import DataError
from retr.utils import atomic_write

CHECKSUM_ALGORITHMS: dict[str, int] = {"sha256": 64, "md5": 32, "gitblob": 40}
_CHUNK = 1 << 16


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"sha256:ab12..."`` into (algorithm, lower-case hex); reject malformed strings."""
    algo, sep, digest = checksum.strip().partition(":")
    algo, digest = algo.lower(), digest.lower()
    if not sep or algo not in CHECKSUM_ALGORITHMS:
        raise DataError(f"checksum {checksum!r}: write '<algorithm>:<hex>' with algorithm one of "
                        f"{', '.join(CHECKSUM_ALGORITHMS)}")
    if len(digest) != CHECKSUM_ALGORITHMS[algo] or any(c not in "0123456789abcdef" for c in digest):
        raise DataError(f"checksum {checksum!r}: a {algo} digest has "
                        f"{CHECKSUM_ALGORITHMS[algo]} hex digits")
    return algo, digest


def file_checksum(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file under ``algorithm`` (one of :data:`CHECKSUM_ALGORITHMS`)."""
    path = Path(path)
    if algorithm == "gitblob":
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    elif algorithm == "md5":
        h = hashlib.md5(usedforsecurity=False)
    elif algorithm == "sha256":
        h = hashlib.sha256()
    else:
        raise DataError(f"unknown checksum algorithm {algorithm!r}; use one of "
                        f"{', '.join(CHECKSUM_ALGORITHMS)}")
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str | Path, checksum: str) -> bool:
    """True when the file at ``path`` matches ``checksum``."""
    algo, digest = parse_checksum(checksum)
    return file_checksum(path, algo) == digest


def download(url: str, dest: str | Path, checksum: str | None, allow_unverified: bool = False,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``: streamed, checksum-verified, renamed into place atomically.

    With ``checksum=None`` the download is refused unless ``allow_unverified`` is set, because
    nothing would tell a corrupted or substituted file from the real one. On any failure the
    temporary file is removed and a :class:`DataError` says what happened.
    """
    dest = Path(dest)
    if checksum is None and not allow_unverified:
        raise DataError(f"no checksum is known for {url}, so its content cannot be verified; "
                        f"refusing to download it to {dest}. Pass allow_unverified=True "
                        "(retr data download --allow-unverified) if you trust the source, or "
                        "place the file there yourself")
    parsed = parse_checksum(checksum) if checksum is not None else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out:
            size, expected_size = _stream(url, out, dest.name, progress, timeout)
            out.flush()
            os.fsync(out.fileno())
        if expected_size is not None and size != expected_size:
            raise DataError(f"download of {url} was cut short: got {size} of {expected_size} "
                            "bytes; try again")
        if parsed is not None:
            algo, expected = parsed
            actual = file_checksum(tmp_path, algo)
            if actual != expected:
                raise DataError(f"checksum mismatch for {url}: expected {algo}:{expected}, got "
                                f"{algo}:{actual}; the download was discarded (the source "
                                "changed or the transfer was corrupted)")
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return dest


def _stream(url: str, out: IO[bytes], label: str, progress: bool,
            timeout: float) -> tuple[int, int | None]:
    """Copy the body of ``url`` into ``out``; return (bytes written, Content-Length or None)."""
    request = urllib.request.Request(url, headers={"User-Agent": "retr-data-download"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not reach {url}: {reason}; check the network or proxy "
                        "settings") from None
    size = 0
    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not progress, leave=False) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise DataError(f"download of {url} broke off after {size} bytes: {exc}; "
                                "try again") from None
    return size, expected


def extract_zip(archive: str | Path, dest_dir: str | Path,
                members: Sequence[tuple[str, str]] | None = None) -> list[Path]:
    """Extract ``(member, relative destination)`` pairs (or every file) under ``dest_dir``.

    Each file is written atomically; destinations that would escape ``dest_dir`` (absolute or
    with ``..``) are refused, whatever the archive says.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            pairs = list(members) if members is not None else [(n, n) for n in names]
            missing = [m for m, _ in pairs if m not in names]
            if missing:
                raise DataError(f"{archive}: member(s) {missing} not in the archive; it holds "
                                f"{names[:20]}")
            written = []
            for member, rel in pairs:
                target = dest_dir / _safe_relative(rel, archive)

                def copy(tmp: Path, member: str = member) -> None:
                    with zf.open(member) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)

                atomic_write(target, copy)
                written.append(target)
            return written
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc}); delete it and download "
                        "again") from None


def _safe_relative(rel: str, archive: Path) -> Path:
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or rel.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise DataError(f"{archive}: refusing to extract {rel!r} outside the data directory")
    return Path(*parts)
