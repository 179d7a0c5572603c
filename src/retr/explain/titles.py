"""Human-readable item labels for the datasets that ship them, keyed by the run's external ids.

Only files whose ids are the ids our readers put in the vocabulary are used: MovieLens-1M
``movies.dat`` and MovieLens-100K ``u.item`` (MovieID -> title), and Office ``Office.text``
through ``Office.item2index`` (item id -> ASIN -> title, category and brand). Anything else
(synthetic data, a missing file, another dataset) gives no titles, and labels fall back to ids.
"""

from __future__ import annotations

import csv
from pathlib import Path

from retr.errors import DataError


def _read_lines(path: Path, encoding: str) -> list[str]:
    return path.read_text(encoding=encoding, errors="replace").splitlines()


def _movielens_1m(root: Path) -> dict[str, str]:
    path = root / "ml-1m" / "movies.dat"
    out = {}
    for line in _read_lines(path, "latin-1"):
        parts = line.split("::")
        if len(parts) >= 2:
            out[parts[0].strip()] = parts[1].strip()
    return out


def _movielens_100k(root: Path) -> dict[str, str]:
    path = root / "ml-100k" / "u.item"
    out = {}
    for line in _read_lines(path, "latin-1"):
        parts = line.split("|")
        if len(parts) >= 2:
            out[parts[0].strip()] = parts[1].strip()
    return out


def _office(root: Path) -> dict[str, str]:
    folder = root / "Office"
    asin_of: dict[str, str] = {}
    for line in _read_lines(folder / "Office.item2index", "utf-8"):
        parts = line.split("\t")
        if len(parts) == 2:
            asin_of[parts[1].strip()] = parts[0].strip()
    text: dict[str, str] = {}
    with open(folder / "Office.text", encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 2 and row[0] != "id":
                text[row[0]] = row[1]
    return {item: text[asin] for item, asin in asin_of.items() if asin in text}


_LOADERS = {"ml-1m": (_movielens_1m, "ml-1m/movies.dat"),
            "ml-100k": (_movielens_100k, "ml-100k/u.item"),
            "office": (_office, "Office/Office.text")}


def item_titles(source: str | None, data_dir: str | Path | None = None) -> dict[str, str]:
    """External item id -> title for a registry dataset, or {} when it has none available."""
    if not source:
        return {}
    from retr.data import registry

    if not registry.is_registered(source) or source.strip().lower().startswith("synthetic"):
        return {}
    try:
        entry = registry.get_entry(source)
    except DataError:
        return {}
    loader = _LOADERS.get(entry.name)
    if loader is None:
        return {}
    root = Path(data_dir) if data_dir is not None else registry.data_dir()
    read, probe = loader
    if not (root / probe).is_file():
        return {}
    try:
        return read(root)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}


def shorten(text: str, width: int = 40) -> str:
    """One-line label of at most ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
