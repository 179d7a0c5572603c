"""The text of each item, for text-based item representations and for readable labels.

What each dataset offers, keyed by the external item ids our readers put in the vocabulary:

==================== ===================================================================
ml-1m                ``movies.dat``: "Title (Year). Genres: A, B."
ml-100k              ``u.item``: the same, genres from the 19 flags (names from ``u.genre``)
office               ``Office.text`` through ``Office.item2index``: title, category and brand
                     in one string (``item_meta.csv`` holds only numeric category / brand ids,
                     which carry no words, so it adds nothing here)
magazine             the 2018 metadata JSON: title (when it is not an HTML fragment, which it
                     mostly is), brand, categories and the description, HTML stripped
musical-instruments  no titles exist: the item's reviews, oldest first (summaries, then
                     review texts), cut to ``MAX_CHARS``. The reviews belong to interactions,
                     some of which are held out for validation and test; the text of an item
                     is the same for every user, but it may quote a held-out review
synthetic            a word naming the item's hidden theme plus its number ("jazz item 17"),
                     so that text similarity follows behaviour (theme successors)
==================== ===================================================================

Other sources have no text (``retr.errors.DataError`` says so) unless a file is given
(``item_repr.text_file``: CSV, TSV or JSONL with ``item_id`` and ``text`` columns).

Missing text policy (``item_repr.missing_text``): "error" (default) refuses a dataset in
which any item has no text and names some of them; "empty" gives such items the empty string,
which every encoder maps to one shared vector (so in a text-only model they become
indistinguishable). An item whose text is blank counts as missing.
"""

from __future__ import annotations

import csv
import gzip
import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

from retr.config import DataConfig
from retr.data import registry
from retr.data.multidomain import domain_labels, split_external
from retr.data.readers import iter_json_objects
from retr.data.synthetic import parse_synthetic_spec, theme_structure
from retr.errors import ConfigError, DataError

MAX_CHARS = 2000
MAX_REVIEWS = 20
TEXT_DATASETS = ("ml-1m", "ml-100k", "office", "magazine", "musical-instruments", "synthetic")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
THEME_WORDS = ("jazz", "football", "cooking", "astronomy", "gardening", "poetry", "chess",
               "surfing", "pottery", "opera", "cycling", "baking", "photography", "knitting",
               "hiking", "sailing", "painting", "fishing", "yoga", "robotics", "camping",
               "ballet", "woodworking", "birdwatching")

_TAG = re.compile(r"<[^>]*>|<[^>]*$")


def strip_html(text: str) -> str:
    """Plain text of an HTML fragment: tags (also a cut-off last one) removed, entities decoded."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def _clip(text: str, limit: int = MAX_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _lines(path: Path, encoding: str) -> list[str]:
    return path.read_text(encoding=encoding, errors="replace").splitlines()


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _locate(root: Path, rel: str) -> Path | None:
    """``root/rel`` or its gzip / uncompressed twin, whichever exists."""
    twin = rel[:-3] if rel.endswith(".gz") else rel + ".gz"
    for candidate in (rel, twin):
        if (root / candidate).is_file():
            return root / candidate
    return None


def _movie_text(title: str, genres: list[str]) -> str:
    return f"{title}. Genres: {', '.join(genres)}." if genres else title


def _movielens_1m(root: Path) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for line in _lines(root / "ml-1m" / "movies.dat", "latin-1"):
        parts = line.split("::")
        if len(parts) >= 2:
            genres = [g for g in parts[2].strip().split("|") if g] if len(parts) > 2 else []
            out[parts[0].strip()] = (parts[1].strip(), genres)
    return out


def _movielens_100k(root: Path) -> dict[str, tuple[str, list[str]]]:
    names = list(ML100K_GENRES)
    genre_file = root / "ml-100k" / "u.genre"
    if genre_file.is_file():
        pairs = [line.split("|") for line in _lines(genre_file, "latin-1") if "|" in line]
        by_index = {int(i): n for n, i in pairs if i.strip().isdigit()}
        names = [by_index.get(i, names[i] if i < len(names) else str(i))
                 for i in range(max(len(names), len(by_index)))]
    out = {}
    for line in _lines(root / "ml-100k" / "u.item", "latin-1"):
        parts = line.split("|")
        if len(parts) < 2:
            continue
        flags = parts[5:]
        genres = [names[i] for i, f in enumerate(flags)
                  if f.strip() == "1" and i < len(names) and names[i] != "unknown"]
        out[parts[0].strip()] = (parts[1].strip(), genres)
    return out


def _office(root: Path) -> dict[str, str]:
    folder = root / "Office"
    asin_of: dict[str, str] = {}
    for line in _lines(folder / "Office.item2index", "utf-8"):
        parts = line.split("\t")
        if len(parts) == 2:
            asin_of[parts[1].strip()] = parts[0].strip()
    text: dict[str, str] = {}
    with open(folder / "Office.text", encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 2 and row[0] != "id":
                text[row[0]] = row[1]
    return {item: text[asin] for item, asin in asin_of.items() if asin in text}


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _magazine(root: Path) -> dict[str, str]:
    path = _locate(root, "Magazine_Subscriptions/meta_Magazine_Subscriptions.json.gz")
    if path is None:
        return {}
    out = {}
    for obj in iter_json_objects(path, errors="replace"):
        asin = obj.get("asin")
        if not isinstance(asin, str):
            continue
        raw_title = " ".join(_strings(obj.get("title")))
        title = "" if "<" in raw_title else strip_html(raw_title)
        brand = strip_html(" ".join(_strings(obj.get("brand"))))
        categories = [c for c in _strings(obj.get("category")) if c != "Magazine Subscriptions"]
        description = strip_html(" ".join(_strings(obj.get("description"))))
        parts = [title, brand, ", ".join(strip_html(c) for c in categories), description]
        out[asin] = _clip(". ".join(p for p in parts if p))
    return out


def _musical_instruments(root: Path) -> dict[str, str]:
    path = _locate(root, "Musical_Instruments/Musical_Instruments_5.json.gz")
    if path is None:
        return {}
    reviews: dict[str, list[tuple[float, int, str, str]]] = {}
    for row, obj in enumerate(iter_json_objects(path, errors="replace")):
        asin = obj.get("asin")
        if not isinstance(asin, str):
            continue
        when = obj.get("unixReviewTime")
        stamp = float(when) if isinstance(when, (int, float)) else 0.0
        reviews.setdefault(asin, []).append(
            (stamp, row, " ".join(_strings(obj.get("summary"))),
             " ".join(_strings(obj.get("reviewText")))))
    out = {}
    for asin, rows in reviews.items():
        rows = sorted(rows)[:MAX_REVIEWS]
        summaries = "; ".join(s.strip() for _, _, s, _ in rows if s.strip())
        texts = " ".join(t.strip() for _, _, _, t in rows if t.strip())
        out[asin] = _clip(". ".join(p for p in (summaries, texts) if p))
    return out


def synthetic_texts(spec: str) -> dict[str, str]:
    """Texts of a synthetic spec's items: the theme's word and the item number."""
    config = parse_synthetic_spec(spec)
    st = theme_structure(config)
    out = {}
    for index, theme in enumerate(st.theme_of.tolist()):
        word = THEME_WORDS[theme % len(THEME_WORDS)]
        if theme >= len(THEME_WORDS):
            word = f"{word} {theme // len(THEME_WORDS) + 1}"
        out[st.item_id(index)] = f"{word} item {index + 1}"
    return out


_Reader = Callable[[Path], dict[str, str]]


def _titles_of(read: Callable[[Path], dict[str, tuple[str, list[str]]]]) -> _Reader:
    return lambda root: {k: t for k, (t, _) in read(root).items()}


def _texts_of(read: Callable[[Path], dict[str, tuple[str, list[str]]]]) -> _Reader:
    return lambda root: {k: _movie_text(t, g) for k, (t, g) in read(root).items()}


# registry name -> (titles reader or None, texts reader, file whose presence says text is there)
_SOURCES: dict[str, tuple[_Reader | None, _Reader, str]] = {
    "ml-1m": (_titles_of(_movielens_1m), _texts_of(_movielens_1m), "ml-1m/movies.dat"),
    "ml-100k": (_titles_of(_movielens_100k), _texts_of(_movielens_100k), "ml-100k/u.item"),
    "office": (_office, _office, "Office/Office.text"),
    "magazine": (None, _magazine, "Magazine_Subscriptions/meta_Magazine_Subscriptions.json.gz"),
    "musical-instruments": (None, _musical_instruments,
                            "Musical_Instruments/Musical_Instruments_5.json.gz"),
}


def _is_synthetic(source: str) -> bool:
    head = source.strip().lower()
    return head == "synthetic" or head.startswith("synthetic:")


def item_titles(source: str | None, data_dir: str | Path | None = None) -> dict[str, str]:
    """External item id -> title for a registry dataset, or {} when it has none available.

    Titles label items in explanations; datasets without titles (or whose files are missing)
    give {}, and labels fall back to ids.
    """
    if not source or _is_synthetic(source):
        return {}
    if not registry.is_registered(source):
        return {}
    try:
        entry = registry.get_entry(source)
    except DataError:
        return {}
    known = _SOURCES.get(entry.name)
    read = known[0] if known is not None else None
    if known is None or read is None:
        return {}
    root = Path(data_dir) if data_dir is not None else registry.data_dir()
    if _locate(root, known[2]) is None:
        return {}
    try:
        return read(root)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}


def source_texts(source: str, data_dir: str | Path | None = None) -> dict[str, str]:
    """External item id -> text of every item a source describes; a clear error when it has none."""
    if _is_synthetic(source):
        return synthetic_texts(source)
    hint = ("datasets with item text: " + ", ".join(TEXT_DATASETS) + "; for other data give "
            "item_repr.text_file (CSV/TSV/JSONL with item_id and text columns)")
    if not registry.is_registered(source):
        raise DataError(f"{source}: no item text is known for this source; {hint}")
    entry = registry.get_entry(source)
    known = _SOURCES.get(entry.name)
    if known is None:
        raise DataError(f"{entry.name}: this dataset has no item text; {hint}")
    root = Path(data_dir) if data_dir is not None else registry.data_dir()
    _, read, probe = known
    if _locate(root, probe) is None:
        raise DataError(f"{entry.name}: item text file {root / probe} not found; run `retr data "
                        f"download {entry.name}` or copy it there (RETR_DATA_DIR sets the folder)")
    try:
        return read(root)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{entry.name}: cannot read its item text under {root} ({exc})") from None


def read_text_file(path: str | Path) -> dict[str, str]:
    """Item id -> text from a CSV, TSV or JSONL file with ``item_id`` (or ``item``) and ``text``."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: item text file not found")
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith((".jsonl", ".json")):
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            sep = "\t" if name.endswith((".tsv", ".txt")) else ","
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read item texts ({exc})") from None
    id_col = next((c for c in ("item_id", "item", "id") if c in frame.columns), None)
    if id_col is None or "text" not in frame.columns:
        raise DataError(f"{path}: needs an item_id (or item) column and a text column; found "
                        f"{', '.join(map(str, frame.columns))}")
    return {str(i): "" if t is None else str(t) for i, t in zip(frame[id_col], frame["text"],
                                                                 strict=True)}


def align_texts(available: dict[str, str], items: list[str], missing: str, where: str) -> list[str]:
    """Texts of ``items`` in order, applying the missing-text policy ("error" or "empty")."""
    texts = [" ".join(available.get(i, "").split()) for i in items]
    absent = [i for i, t in zip(items, texts, strict=True) if not t]
    if absent and missing == "error":
        raise DataError(f"{where}: {len(absent)} of {len(items)} items have no text (e.g. "
                        f"{', '.join(absent[:3])}); set item_repr.missing_text = 'empty' to give "
                        "them the empty string, or supply item_repr.text_file")
    return texts


def item_texts_by_domain(data: DataConfig, items: list[str], missing: str = "error",
                         text_file: str | None = None, data_dir: str | Path | None = None
                         ) -> list[tuple[list[int], list[str]]]:
    """Texts of ``items`` grouped by domain: (positions in ``items``, texts) per domain.

    A single dataset is one group; with ``data.domains`` each domain is one, its multi-domain
    ids (``LABEL/ID``) looked up in that domain's own texts. Encoding per group lets a cache
    entry serve every combination of domains.
    """
    if not data.domains:
        available = read_text_file(text_file) if text_file else source_texts(data.source, data_dir)
        return [(list(range(len(items))),
                 align_texts(available, items, missing, text_file or data.source))]
    if text_file:
        raise ConfigError("item_repr.text_file gives the texts of one dataset; it cannot be used "
                          "with data.domains (each domain brings its own text)")
    sources = dict(zip(domain_labels(data), data.domains, strict=True))
    by_label: dict[str, list[tuple[int, str]]] = {}
    for position, item in enumerate(items):
        label, original = split_external(item)
        if label not in sources:
            raise DataError(f"item {item!r} belongs to no domain of data.domains")
        by_label.setdefault(label, []).append((position, original))
    return [([p for p, _ in rows],
             align_texts(source_texts(sources[label], data_dir), [o for _, o in rows], missing,
                         label))
            for label, rows in by_label.items()]


def item_texts(data: DataConfig, items: list[str], missing: str = "error",
               text_file: str | None = None, data_dir: str | Path | None = None) -> list[str]:
    """The text of every item in ``items`` (external ids of a dataset built from ``data``)."""
    out = [""] * len(items)
    for positions, texts in item_texts_by_domain(data, items, missing, text_file, data_dir):
        for position, text in zip(positions, texts, strict=True):
            out[position] = text
    return out
