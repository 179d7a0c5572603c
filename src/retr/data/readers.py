"""Interaction log files -> one canonical DataFrame.

Every reader returns the rows in file order with columns ``user`` and ``item`` (external ids,
always strings), plus ``timestamp`` (float64 seconds) when the source has times and ``rating``
(float64) when it has ratings. Without timestamps, file order within a user is the time order;
:mod:`retr.data.preprocess` sorts stably by (user, timestamp, original row), so keeping the
file order here is what makes that work.

Formats (``fmt`` names, all of which may be gzip-compressed; gzip is recognised by its magic
bytes, not the file name):

* ``csv`` / ``tsv``: a header row names the columns; the usual names are found
  case-insensitively (see ``DEFAULT_NAMES``) and :class:`ColumnMap` overrides them. A first row
  is taken as data instead of a header when none of its fields is a known column name and at
  least one field is a number or a date: then columns are addressed by 0-based position
  (``ColumnMap(user="1", item="0", ...)``), which is how the headerless Amazon 2018 ratings CSV
  (``item,user,rating,timestamp``) is read with ``--format csv``. Fields beyond the header's
  count are ignored.
* ``csv-noheader``: comma-separated with no header row, whatever the first row looks like;
  columns by position only.
* ``parquet``; ``jsonl`` (one JSON object per line, keys found like csv column names).
* ``user-lines``: ``user item1 item2 ...`` per line, items in time order (S3-Rec ``Beauty.txt``).
* ``pairs``: ``user item`` per line, in time order (SASRec pair files).
* ``movielens``: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``) or ``ratings.dat``
  (``user::item::rating::timestamp``), told apart by the ``::`` in the first line.
* ``amazon-json``: Amazon review JSON lines (``reviewerID``, ``asin``, ``overall``,
  ``unixReviewTime``).
* ``rechorus``: ReChorus TSV with header ``user_id<TAB>item_id<TAB>time``; other columns such as
  ``neg_items`` are ignored.

Detection (``fmt=None``), first rule that applies, from the name without ``.gz`` and the first
non-blank lines: ``.parquet``/``.pq`` or parquet magic bytes -> parquet; named ``u.data`` or
``ratings.dat`` -> movielens; a first line starting with ``{`` or a ``.json``/``.jsonl``/
``.ndjson`` name -> amazon-json if the first object has ``reviewerID`` and ``asin``, else jsonl;
``::`` in the first line -> movielens; a tab in the first line -> rechorus when the header starts
``user_id, item_id, time``, another header -> tsv, four numeric fields -> movielens, two fields ->
the whitespace rules below, otherwise tsv (columns by position); a comma -> csv, or csv-noheader
when the first row looks like data; otherwise whitespace-separated tokens: some line with more
than two tokens, all integers -> user-lines; every line exactly two tokens -> pairs when some user
repeats across lines, and an error otherwise (it could be user-lines with one item per user).
Anything else is an error asking for ``--format``.

Every problem raises :class:`~retr.errors.DataError` with a one-line message naming the file and,
where it applies, the line and column. Line numbers count physical lines, so they assume no
quoted field spans several lines.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from retr.errors import DataError
from retr.limits import (
    INPUT_LIMIT_ENV,
    MAX_COMPRESSION_RATIO,
    RATIO_CHECK_AFTER,
    READ_MEMORY_FACTOR,
    json_loads,
    max_input_bytes,
)

FORMATS: tuple[str, ...] = (
    "csv",
    "csv-noheader",
    "tsv",
    "parquet",
    "jsonl",
    "user-lines",
    "pairs",
    "movielens",
    "amazon-json",
    "rechorus",
)

ROLES: tuple[str, ...] = ("user", "item", "timestamp", "rating")

DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userId", "userID", "UserID", "reviewerID", "user_id:token"),
    "item": ("item", "item_id", "itemId", "movieId", "MovieID", "asin", "business_id",
             "item_id:token"),
    "timestamp": ("timestamp", "time", "ts", "unixReviewTime", "timestamp:float"),
    "rating": ("rating", "overall", "rating:float"),
}

_FLAGS = {"user": "--user-col", "item": "--item-col", "timestamp": "--time-col",
          "rating": "--rating-col"}
_REQUIRED = ("user", "item")
_KNOWN_NAMES = frozenset(name.lower() for names in DEFAULT_NAMES.values() for name in names)
_HEAD_BYTES = 1 << 16
_SAMPLE_LINES = 1000
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_INTEGER = re.compile(r"[+-]?\d+")
_DATA_FIELD = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|\d{4}-\d{2}-\d{2}.*")
_PANDAS_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


@dataclass(frozen=True)
class ColumnMap:
    """Which source column holds each role; ``None`` falls back to the usual names.

    A value is a column name, or a 0-based position written in digits ("0", "1", ...), which is
    the only way to address a file without a header row.
    """

    user: str | None = None
    item: str | None = None
    timestamp: str | None = None
    rating: str | None = None


def detect_format(path: str | Path) -> str:
    """Guess the format from the file name and first lines (rules in the module docstring).

    Raises DataError when the guess would be a coin toss, so a wrong reader never runs silently.
    """
    p = _existing_file(path)
    head, gz = _read_bytes(p, limit=_HEAD_BYTES)
    return _detect(p, head, gz, complete=len(head) < _HEAD_BYTES)


def read_interactions(path: str | Path, fmt: str | None = None,
                      columns: ColumnMap | None = None) -> pd.DataFrame:
    """Read an interaction log into the canonical frame (see the module docstring).

    ``fmt=None`` detects the format; ``columns`` overrides the column names of the tabular
    formats (csv, csv-noheader, tsv, parquet, jsonl, amazon-json, rechorus).
    """
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; pass --format one of: {', '.join(FORMATS)}")
    p = _existing_file(path)
    data, gz = _read_bytes(p)
    if fmt is None:
        fmt = _detect(p, data[:_HEAD_BYTES], gz, complete=len(data) <= _HEAD_BYTES)
    return _READERS[fmt](_Source(p, data, gz), columns or ColumnMap())


# --- file access -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A file's (decompressed) bytes plus what error messages need to point at it."""

    path: Path
    data: bytes
    gz: bool

    def __str__(self) -> str:
        return str(self.path)

    def text(self) -> str:
        """The content as text; non-UTF-8 bytes are reported with line and byte offset."""
        text = _decode(self.data, self.path, self.gz)
        if not text.strip():
            raise _empty(self)
        return text


def _decode(data: bytes, path: Path, gz: bool) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        inside = " of the decompressed data" if gz else ""
        raise DataError(f"{path}:{line}: bytes are not valid UTF-8 (byte offset {e.start}{inside}); "
                        "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _existing_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; pass the interaction file inside it")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (a device, pipe or socket); save the data to a "
                        "file and pass that")
    return p


_CHUNK = 1 << 22


def _read_bytes(path: Path, limit: int | None = None) -> tuple[bytes, bool]:
    """All bytes (or the first ``limit``), gunzipped when the file starts with the gzip magic.

    Reading everything is bounded by :func:`retr.limits.max_input_bytes`: a plain file over it
    is refused from its size, gzip data is inflated in chunks and refused once it passes it.
    """
    with _file_errors(path), path.open("rb") as fh:
        gz = fh.read(2) == _GZIP_MAGIC
        fh.seek(0)
        if limit is not None:
            if not gz:
                return fh.read(limit), False
            with gzip.GzipFile(fileobj=fh) as gfh:
                return gfh.read(limit), True
        cap = max_input_bytes()
        if not gz:
            size = os.fstat(fh.fileno()).st_size
            if size > cap:
                raise _too_big(path, f"is {size:,} bytes", cap)
            return fh.read(), False
        return b"".join(_inflate(path, fh, cap)), True


@contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """A damaged gzip stream or an unreadable file as one DataError naming the file."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: gzip data is truncated or corrupt ({_one_line(e)}); "
                        "re-download the file or compress it again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or _one_line(e)}); "
                        "check that it exists and is readable") from None


def _inflate(path: Path, fh: BinaryIO, cap: int) -> Iterator[bytes]:
    """Gzip data in chunks, stopped once past ``cap`` bytes or a bomb's inflation ratio."""
    total = 0
    with gzip.GzipFile(fileobj=fh) as gfh:
        while chunk := gfh.read(_CHUNK):
            total += len(chunk)
            if total > cap:
                raise _too_big(path, f"decompresses to more than {cap:,} bytes", cap)
            check_inflation(path, fh.tell(), total)
            yield chunk


def check_inflation(path: Path, compressed: int, inflated: int) -> None:
    """Refuse gzip data that inflates like a bomb (see :mod:`retr.limits`)."""
    if inflated > RATIO_CHECK_AFTER and inflated > MAX_COMPRESSION_RATIO * compressed:
        raise DataError(f"{path}: gzip data inflates more than {MAX_COMPRESSION_RATIO} times "
                        f"({compressed:,} bytes became {inflated:,} and counting), which no "
                        "interaction log does; it looks like a decompression bomb. "
                        "Decompress it yourself if it is genuine")


def check_input_size(path: str | Path) -> Path:
    """The checks of a whole-file read, for readers that hand the path to another library.

    A regular file within :func:`retr.limits.max_input_bytes`; gzip data is inflated once in
    chunks (nothing kept) to check its size and ratio. Returns the path.
    """
    p = _existing_file(path)
    cap = max_input_bytes()
    with _file_errors(p), p.open("rb") as fh:
        if fh.read(2) != _GZIP_MAGIC:
            size = os.fstat(fh.fileno()).st_size
            if size > cap:
                raise _too_big(p, f"is {size:,} bytes", cap)
            return p
        fh.seek(0)
        for _ in _inflate(p, fh, cap):
            pass
    return p


def _too_big(path: Path, what: str, cap: int) -> DataError:
    return DataError(f"{path}: {what}, over the {cap:,}-byte limit on input read whole (1/"
                     f"{READ_MEMORY_FACTOR} of the memory available, as reading needs about "
                     f"{READ_MEMORY_FACTOR}x the text size); convert it to Parquet, which is "
                     f"streamed, or set ${INPUT_LIMIT_ENV} to raise the limit")


# --- detection -------------------------------------------------------------------------------


def _detect(path: Path, head: bytes, gz: bool, complete: bool) -> str:
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".parquet", ".pq") or head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if name in ("u.data", "ratings.dat"):
        return "movielens"
    lines = _sample_lines(path, head, gz, complete)
    if not lines:
        raise _empty(path)
    first = lines[0]
    if first.lstrip().startswith("{") or suffix in (".json", ".jsonl", ".ndjson"):
        return "amazon-json" if _is_amazon_review(first) else "jsonl"
    if "::" in first:
        return "movielens"
    if "\t" in first:
        fields = first.split("\t")
        if _looks_like_header(fields, ColumnMap()):
            lowered = [f.strip().lower() for f in fields[:3]]
            return "rechorus" if lowered == ["user_id", "item_id", "time"] else "tsv"
        if len(fields) == 4 and all(_DATA_FIELD.fullmatch(f.strip()) for f in fields):
            return "movielens"
        if len(fields) != 2:
            return "tsv"
    elif "," in first:
        header = _looks_like_header(_csv_fields(first, path), ColumnMap())
        return "csv" if header else "csv-noheader"
    return _detect_whitespace(path, lines)


def _detect_whitespace(path: Path, lines: list[str]) -> str:
    rows = [line.split() for line in lines]
    counts = [len(r) for r in rows]
    if all(c == 2 for c in counts):
        users = [r[0] for r in rows]
        if len(set(users)) < len(users):
            return "pairs"
        raise _ambiguous(path, "every line has two tokens and no user repeats, so it may be "
                               "'pairs' or 'user-lines' with one item per user")
    if max(counts) > 2 and all(_INTEGER.fullmatch(t) for r in rows for t in r):
        return "user-lines"
    raise _ambiguous(path, "the first lines match no known layout")


def _sample_lines(path: Path, head: bytes, gz: bool, complete: bool) -> list[str]:
    """Non-blank lines of the head, without the part that the byte limit may have cut."""
    if not complete:
        cut = head.rfind(b"\n")
        head = head[:cut] if cut >= 0 else head[:-3]
    lines = _decode(head, path, gz).split("\n")
    return [line.rstrip("\r") for line in lines if line.strip()][:_SAMPLE_LINES]


def _is_amazon_review(line: str) -> bool:
    try:
        obj = json_loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "reviewerID" in obj and "asin" in obj


def _looks_like_header(fields: Sequence[str], columns: ColumnMap) -> bool:
    """A row is a header if it names a known or mapped column, or has no number/date field."""
    named = {v.lower() for v in _given(columns).values() if not v.isdigit()}
    cleaned = [f.strip().strip('"').lower() for f in fields]
    if any(c in _KNOWN_NAMES or c in named for c in cleaned):
        return True
    return not any(_DATA_FIELD.fullmatch(c) for c in cleaned)


def _ambiguous(path: Path, why: str) -> DataError:
    return DataError(f"{path}: cannot tell the format ({why}); "
                     f"pass --format one of: {', '.join(FORMATS)}")


# --- readers ---------------------------------------------------------------------------------


def _read_user_lines(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    _reject_columns(src, columns, "user-lines")
    users: list[str] = []
    counts: list[int] = []
    items: list[str] = []
    for lineno, line in enumerate(src.text().split("\n"), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DataError(f"{src}:{lineno}: line has a user id but no items; user-lines needs "
                            "'user item1 item2 ...', so remove the line or add its items")
        users.append(tokens[0])
        counts.append(len(tokens) - 1)
        items.extend(tokens[1:])
    return _frame({"user": np.repeat(np.array(users, dtype=object), counts),
                   "item": np.array(items, dtype=object)})


def _read_pairs(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    _reject_columns(src, columns, "pairs")
    users: list[str] = []
    items: list[str] = []
    for lineno, line in enumerate(src.text().split("\n"), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2:
            hint = (" (a whole sequence per line is --format user-lines)" if len(tokens) > 2
                    else "")
            raise DataError(f"{src}:{lineno}: expected 'user item' (2 tokens), found "
                            f"{len(tokens)}{hint}; fix or remove the line")
        users.append(tokens[0])
        items.append(tokens[1])
    return _frame({"user": np.array(users, dtype=object), "item": np.array(items, dtype=object)})


def _read_csv(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    return _read_delimited(src, columns, sep=",", header=None, quoting=csv.QUOTE_MINIMAL)


def _read_csv_noheader(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    return _read_delimited(src, columns, sep=",", header=False, quoting=csv.QUOTE_MINIMAL)


def _read_tsv(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    return _read_delimited(src, columns, sep="\t", header=None, quoting=csv.QUOTE_NONE)


def _read_rechorus(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    return _read_delimited(src, columns, sep="\t", header=True, quoting=csv.QUOTE_NONE)


def _read_movielens(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    _reject_columns(src, columns, "movielens")
    text = src.text()
    if "::" in text.lstrip().split("\n", 1)[0]:
        text = text.replace("::", "\t")
    fixed = ColumnMap(user="0", item="1", rating="2", timestamp="3")
    return _read_delimited(src, fixed, sep="\t", header=False, quoting=csv.QUOTE_NONE,
                           text=text, expect_fields=4)


def _read_delimited(src: _Source, columns: ColumnMap, *, sep: str, header: bool | None,
                    quoting: int, text: str | None = None,
                    expect_fields: int | None = None) -> pd.DataFrame:
    """Delimited text through pandas' C parser; ``header=None`` decides from the first row."""
    text = src.text() if text is None else text
    lines = text.split("\n")
    first_index = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first_index is None:
        raise _empty(src, "it holds only separators and blank space")
    fields = (_csv_fields(lines[first_index], src.path) if quoting != csv.QUOTE_NONE
              else lines[first_index].rstrip("\r").split(sep))
    if expect_fields is not None and len(fields) < expect_fields:
        raise DataError(f"{src}:{first_index + 1}: expected {expect_fields} fields, found "
                        f"{len(fields)}; check the file or pass another --format")
    if header is None:
        header = _looks_like_header(fields, columns)
    names = [f.strip() for f in fields] if header else [str(i) for i in range(len(fields))]
    hint = "use --format csv-noheader with positions" if sep == "," else ""
    roles = _resolve(src, names, columns, header=header, positional=True, no_header_hint=hint)
    skip = first_index + 1 if header else first_index
    try:
        table = pd.read_csv(io.StringIO(text), sep=sep, header=None, names=list(range(len(names))),
                            usecols=sorted(set(roles.values())), skiprows=skip, dtype=str,
                            na_filter=False, skip_blank_lines=False, quoting=quoting,
                            skipinitialspace=sep == ",", engine="c")
    except pd.errors.EmptyDataError:
        raise _empty(src, "it has a header row but no interactions") from None
    except (pd.errors.ParserError, ValueError) as e:
        found = _PANDAS_FIELDS.search(str(e))
        if found:
            raise DataError(f"{src}:{found.group(2)}: expected {found.group(1)} fields, found "
                            f"{found.group(3)}; fix the line (quote fields that contain "
                            f"{sep!r})") from None
        raise DataError(f"{src}: cannot parse the file ({_one_line(e)}); check the separator "
                        "or pass another --format") from None
    line_numbers = np.arange(skip + 1, skip + 1 + len(table), dtype=np.int64)
    raw = {role: table[index] for role, index in roles.items()}
    raw, line_numbers = _drop_blank_lines(src, raw, lines, line_numbers)
    return _finish(src, raw, {r: names[i] for r, i in roles.items()}, line_numbers)


def _drop_blank_lines(src: _Source, raw: dict[str, pd.Series], lines: list[str],
                      line_numbers: np.ndarray) -> tuple[dict[str, pd.Series], np.ndarray]:
    """Remove rows that came from blank lines; rows that merely lack a field stay for _finish."""
    all_empty = np.logical_and.reduce([(s.isna() | (s == "")).to_numpy(dtype=bool)
                                       for s in raw.values()])
    if not all_empty.any():
        return raw, line_numbers
    blank = np.zeros(len(line_numbers), dtype=bool)
    for i in np.flatnonzero(all_empty):
        blank[i] = not lines[line_numbers[i] - 1].strip()
    keep = ~blank
    if not keep.any():
        raise _empty(src, "it has no interactions")
    return {r: s[keep].reset_index(drop=True) for r, s in raw.items()}, line_numbers[keep]


def _read_jsonl(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    keys: dict[str, str] = {}
    values: dict[str, list[object]] = {}
    line_numbers: list[int] = []
    for lineno, line in enumerate(src.text().split("\n"), 1):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            obj = json_loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{src}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each "
                            "line must hold one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{src}:{lineno}: expected a JSON object, found "
                            f"{type(obj).__name__}; each line must hold one JSON object")
        if not keys:
            names = list(obj)
            keys = {r: names[i] for r, i in _resolve(src, names, columns, header=True,
                                                      positional=False).items()}
            values = {r: [] for r in keys}
        for role, key in keys.items():
            if key not in obj:
                raise DataError(f"{src}:{lineno}: no key {key!r} (the {role} column); add it or "
                                f"drop the line")
            values[role].append(obj[key])
        line_numbers.append(lineno)
    raw = {role: pd.Series(_json_ids(src, v, keys[role], line_numbers) if role in _REQUIRED
                           else v, dtype=object)
           for role, v in values.items()}
    return _finish(src, raw, keys, np.asarray(line_numbers, dtype=np.int64))


def _json_ids(src: _Source, values: list[object], key: str, line_numbers: list[int]) -> list[str]:
    """JSON ids as strings: strings stay, integers are written in decimal, anything else fails."""
    out: list[str] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(str(v))
        else:
            raise DataError(f"{src}:{line_numbers[i]}: key {key!r} holds {_show(v)}, not a string "
                            "or integer id; fix the line")
    return out


def _read_parquet(src: _Source, columns: ColumnMap) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(src.data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{src}: not a readable parquet file ({_one_line(e)}); check the file "
                        "or pass another --format") from None
    names = list(table.column_names)
    roles = _resolve(src, names, columns, header=True, positional=True)
    if table.num_rows == 0:
        raise _empty(src, "it has no rows")
    raw: dict[str, pd.Series] = {}
    for role, index in roles.items():
        column = table.column(index)
        if role in _REQUIRED:
            raw[role] = _parquet_ids(arrow_ids(src, names[index], column).to_pandas())
        else:
            raw[role] = column.to_pandas()
    return _finish(src, raw, {r: names[i] for r, i in roles.items()}, None)


def arrow_ids(src: object, name: str, array: Any, start: int = 0) -> Any:
    """An Arrow id column checked for what cannot be an id, with binary decoded as UTF-8.

    Lists, structs and maps are refused (JSON-lines refuses the same values), and so are bytes
    that are not UTF-8 text; the error names the column and the first bad row (``start`` is the
    row number of the array's first value in the file, counted from 0).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_nested(kind):
        valid = pc.is_valid(array).to_numpy(zero_copy_only=False)
        row = int(np.flatnonzero(valid)[0]) if valid.any() else 0
        raise DataError(f"{src}: row {start + row + 1}: column {name!r} holds {kind} values, "
                        "not single ids; store one string or integer id per row")
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or \
            pa.types.is_fixed_size_binary(kind):
        try:
            return array.cast(pa.large_string() if pa.types.is_large_binary(kind)
                              else pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for row, value in enumerate(array.to_pylist()):
                if value is not None:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{src}: row {start + row + 1}: column {name!r} holds "
                                        f"bytes that are not UTF-8 text ({_show(value)}, byte "
                                        f"{e.start}); store the ids as UTF-8 strings") from None
            raise
    return array


def _parquet_ids(series: pd.Series) -> pd.Series:
    """Id columns as strings; whole floats lose the ".0" (1.0 -> "1"), nulls stay null."""
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        whole = (values == np.trunc(values)) & (np.abs(values) < 2.0**63)  # fits in Int64
        if np.all(np.isnan(values) | whole):
            series = series.astype("Int64")
    return series.astype(str).where(series.notna(), None)


_READERS: dict[str, Callable[[_Source, ColumnMap], pd.DataFrame]] = {
    "csv": _read_csv,
    "csv-noheader": _read_csv_noheader,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "jsonl": _read_jsonl,
    "user-lines": _read_user_lines,
    "pairs": _read_pairs,
    "movielens": _read_movielens,
    "amazon-json": _read_jsonl,
    "rechorus": _read_rechorus,
}


# --- columns and values ----------------------------------------------------------------------


def _given(columns: ColumnMap) -> dict[str, str]:
    return {role: v for role in ROLES if (v := getattr(columns, role)) is not None}


def _reject_columns(src: _Source, columns: ColumnMap, fmt: str) -> None:
    given = _given(columns)
    if given:
        flags = "/".join(_FLAGS[r] for r in given)
        raise DataError(f"{src}: {flags} cannot be used with --format {fmt}, whose columns are "
                        "fixed; drop them, or read the file as csv/tsv")


def _resolve(src: _Source, names: list[str], columns: ColumnMap, *, header: bool,
             positional: bool, no_header_hint: str = "") -> dict[str, int]:
    """Map each role to a column index: explicit name, explicit position, then usual names."""
    given = _given(columns)
    lowered = [n.lower() for n in names]
    found = f"columns found: {_listing(names)}" if header else f"{len(names)} fields per line"
    roles: dict[str, int] = {}
    for role in ROLES:
        want = given.get(role)
        if want is not None:
            if want in names:
                roles[role] = names.index(want)
            elif positional and want.isdigit() and int(want) < len(names):
                roles[role] = int(want)
            else:
                raise DataError(f"{src}: no column {want!r} (given by {_FLAGS[role]}); {found}; "
                                "pass a column name" + (" or 0-based position" if positional
                                                        else ""))
        elif header:
            usual = {c.lower() for c in DEFAULT_NAMES[role]}
            matches = [i for i, n in enumerate(lowered) if n in usual]
            if len(matches) > 1:
                raise DataError(f"{src}: several columns could be the {role} column: "
                                f"{', '.join(repr(names[i]) for i in matches)}; pick one with "
                                f"{_FLAGS[role]} NAME")
            index = matches[0] if matches else None
            if index is not None:
                roles[role] = index
            elif role in _REQUIRED:
                hint = f"; if the file has no header row, {no_header_hint}" if no_header_hint else ""
                raise DataError(f"{src}: no {role} column (looked for "
                                f"{', '.join(DEFAULT_NAMES[role])}); {found}; name the columns "
                                f"with --user-col/--item-col/--time-col{hint}")
        elif role in _REQUIRED:
            raise DataError(f"{src}: no header row, so columns must be given by 0-based position, "
                            f"e.g. --user-col 0 --item-col 1 (and --time-col/--rating-col if "
                            f"present); {found}")
    by_index: dict[int, str] = {}
    for role, index in roles.items():
        if index in by_index:
            raise DataError(f"{src}: {by_index[index]} and {role} would both be read from column "
                            f"{names[index]!r}; give each its own column with "
                            "--user-col/--item-col/--time-col/--rating-col")
        by_index[index] = role
    return roles


def _finish(src: _Source, raw: dict[str, pd.Series], names: dict[str, str],
            line_numbers: np.ndarray | None) -> pd.DataFrame:
    """Check ids, convert times and ratings to float64, and build the canonical frame."""

    def where(i: int) -> str:
        return f"{src}: row {i + 1}" if line_numbers is None else f"{src}:{line_numbers[i]}"

    if len(raw["user"]) == 0:
        raise _empty(src, "it has no interactions")
    out: dict[str, object] = {}
    for role in _REQUIRED:
        ids = raw[role]
        missing = (ids.isna() | (ids == "")).to_numpy(dtype=bool)
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise DataError(f"{where(i)}: column {names[role]!r} is empty or null (no {role} id, "
                            "or too few fields on the line); fix or remove that row")
        out[role] = ids
    for role in ("timestamp", "rating"):
        if role in raw:
            out[role] = _to_float(raw[role], role, names[role], where)
    return _frame(out)


def _to_float(values: pd.Series, role: str, name: str, where: Callable[[int], str]) -> np.ndarray:
    """Numbers as float64; timestamps may also be datetimes or ISO 8601 strings (-> epoch s)."""
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
        return _epoch_seconds(pd.to_datetime(values, utc=True), role, name, values, where)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if role == "timestamp" and bad.all() and values.notna().any():
        dates = pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
        return _epoch_seconds(dates, role, name, values, where)
    if bad.any():
        raise _bad_value(values, int(np.flatnonzero(bad)[0]), role, name, where)
    return numbers


def _epoch_seconds(dates: pd.Series, role: str, name: str, values: pd.Series,
                   where: Callable[[int], str]) -> np.ndarray:
    missing = dates.isna().to_numpy(dtype=bool)
    if missing.any():
        raise _bad_value(values, int(np.flatnonzero(missing)[0]), role, name, where)
    # second-resolution anchors: a nanosecond one would overflow dates past 2262 (parquet's us)
    delta = dates - pd.Timestamp(0, tz="UTC").as_unit("s")
    return (delta / pd.Timedelta(seconds=1).as_unit("s")).to_numpy(dtype=np.float64)


def _bad_value(values: pd.Series, i: int, role: str, name: str,
               where: Callable[[int], str]) -> DataError:
    value = values.iloc[i]
    expected = "a number or an ISO date like 2014-03-16T12:00:00" if role == "timestamp" \
        else "a number"
    if _is_missing(value):
        problem = f"{role} is missing or NaN"
    else:
        problem = f"cannot parse {role} {_show(value)} (expected {expected})"
    return DataError(f"{where(i)}: column {name!r}: {problem}; fix the value or drop the row")


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float):
        return bool(np.isnan(value))
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _frame(columns: dict[str, object]) -> pd.DataFrame:
    """The canonical column order on a fresh RangeIndex."""
    data: dict[str, pd.Series] = {}
    for role in ROLES:
        if role in columns:
            col = pd.Series(columns[role]).reset_index(drop=True)
            data[role] = col.astype(str) if role in _REQUIRED else col
    return pd.DataFrame(data)


# --- message helpers -------------------------------------------------------------------------


def _csv_fields(line: str, path: Path) -> list[str]:
    try:
        return next(csv.reader([line.rstrip("\r")], skipinitialspace=True), [])
    except csv.Error:
        raise DataError(f"{path}: a carriage return (\\r) inside the first row; save the "
                        "file with \\n or \\r\\n line ends") from None


def _empty(path: object, detail: str = "it holds no data") -> DataError:
    return DataError(f"{path}: the file is empty ({detail}); check that it is the right file "
                     "and was written completely")


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "(none)"


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def iter_json_objects(path: str | Path, errors: str = "strict") -> Iterator[dict[str, object]]:
    """The JSON objects of a JSON-lines file, one per non-blank line (``.gz`` read transparently).

    For side files (histories to score, item metadata); interaction logs go through
    :func:`read_interactions`. A bad line raises a DataError naming ``file:line``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors=errors) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json_loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object")
            yield obj
