"""Parquet and csv / tsv interaction logs -> integer-coded columns, streamed in bounded memory.

:func:`read_parquet_codes` reads the file record batch by record batch and keeps only numpy
arrays: user and item ids become int32/int64 codes against vocabularies grown batch by batch (in
order of first appearance), timestamps and ratings become float64. Column names, id rendering,
value conversion and error messages are those of :func:`retr.data.readers.read_interactions`
for parquet, so :func:`build_dataset_from_codes` gives exactly the dataset that
``build_dataset(read_interactions(path), ...)`` gives, without a DataFrame of strings.
:func:`read_delimited_codes` does the same for csv / tsv files with Arrow's CSV reader, for the
files on which it is certain to agree with the DataFrame reader (it returns None for the rest).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retr.data.dataset import SequenceDataset
from retr.data.preprocess import Preprocessing, build_dataset_from_rows
from retr.data.readers import (
    _GZIP_MAGIC,
    ColumnMap,
    _bad_value,
    _empty,
    _epoch_seconds,
    _existing_file,
    _looks_like_header,
    _one_line,
    _parquet_ids,
    _read_bytes,
    _resolve,
    _Source,
    _to_float,
    arrow_ids,
    check_inflation,
)
from retr.errors import DataError
from retr.limits import check_rows

BATCH_ROWS = 1 << 20


@dataclass
class Codes:
    """A log as arrays in file order: ``users[r]`` indexes ``user_ids``, likewise for items."""

    users: np.ndarray
    items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray | None = None
    ratings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)


def read_parquet_codes(path: str | Path, columns: ColumnMap | None = None,
                       batch_size: int = BATCH_ROWS) -> Codes:
    """Stream a parquet log into :class:`Codes` (same columns and checks as the parquet reader)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = _existing_file(path)
    src = _Source(p, b"", False)
    with p.open("rb") as fh:
        gz = fh.read(2) == _GZIP_MAGIC
    try:
        pf = pq.ParquetFile(pa.BufferReader(_read_bytes(p)[0]) if gz else str(p),
                            pre_buffer=False)  # pre-buffering would cache the whole file
        names = list(pf.schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _unreadable(src, e) from None
    roles = _resolve(src, names, columns or ColumnMap(), header=True, positional=True)
    n = pf.metadata.num_rows
    if n == 0:
        raise _empty(src, "it has no rows")
    check_rows(n, str(src))
    try:
        return _stream(pf, src, names, roles, n, batch_size)
    except (pa.ArrowException, OSError) as e:  # a damaged page or row group further in
        raise _unreadable(src, e) from None
    finally:  # Arrow's allocator keeps freed batches (130 MB after 20M rows); return them now
        del pf
        pa.default_memory_pool().release_unused()


def _stream(pf: Any, src: _Source, names: list[str], roles: dict[str, int], n: int,
            batch_size: int) -> Codes:
    code_dtype = np.int32 if n < 2**31 else np.int64
    ids = {role: _Ids(src, role, names[roles[role]], n, code_dtype,
                      _whole_floats(pf, names[roles[role]], batch_size))
           for role in ("user", "item")}
    floats = {role: _Floats(src, role, names[roles[role]], n)
              for role in ("timestamp", "rating") if role in roles}
    wanted = [names[i] for i in sorted(roles.values())]
    start = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=wanted, use_threads=False):
        if batch.num_rows == 0:
            continue
        for col in ids.values():
            col.add(batch.column(col.name), start)
        for fcol in floats.values():
            fcol.add(batch.column(fcol.name).to_pandas(), start)
        start += batch.num_rows
    for col in ids.values():  # errors in the order the whole-file reader checks them
        if col.error is not None:
            raise col.error
    ts = floats["timestamp"].finish() if "timestamp" in floats else None
    ratings = floats["rating"].finish() if "rating" in floats else None
    return Codes(users=ids["user"].codes, items=ids["item"].codes,
                 user_ids=ids["user"].uniques(), item_ids=ids["item"].uniques(),
                 timestamps=ts, ratings=ratings)


def build_dataset_from_codes(codes: Codes, prep: Preprocessing,
                             name: str = "dataset", source: str = "input") -> SequenceDataset:
    """Filter, sort and index coded rows exactly like :func:`~retr.data.preprocess.build_dataset`.

    The row arrays are taken out of ``codes`` (left empty), so each is freed as soon as its
    filtered or sorted successor exists.
    """
    rows: dict[str, np.ndarray | None] = {"users": codes.users, "items": codes.items,
                                          "ts": codes.timestamps, "ratings": codes.ratings}
    codes.users = codes.items = np.empty(0, dtype=np.int32)
    codes.timestamps = codes.ratings = None
    return build_dataset_from_rows(rows, codes.user_ids, codes.item_ids, prep, name=name,
                                   source=source)


def _unreadable(src: _Source, error: BaseException) -> DataError:
    return DataError(f"{src}: not a readable parquet file ({_one_line(error)}); check the file "
                     "or pass another --format")


def _rows(src: _Source, start: int) -> Callable[[int], str]:
    return lambda i: f"{src}: row {start + i + 1}"


def _whole_floats(pf: Any, name: str, batch_size: int) -> bool:
    """Whether a float id column holds only whole numbers (and nulls), over the whole file."""
    import pyarrow as pa

    if not pa.types.is_floating(pf.schema_arrow.field(name).type):
        return False
    for batch in pf.iter_batches(batch_size=batch_size, columns=[name], use_threads=False):
        values = batch.column(0).to_numpy(zero_copy_only=False)
        values = values[~np.isnan(values)]
        if not np.all((values == np.trunc(values)) & (np.abs(values) < 2.0**63)):
            return False
    return True


def _canonical_ints(array: Any) -> np.ndarray | None:
    """The ids as int64 when every one is an integer written canonically ("17", not "017" or
    "+17"), so that ``str()`` of the number is the id; else None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if array.null_count:
        return None
    try:
        ints = pc.cast(array, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if not pc.all(pc.equal(pc.cast(ints, array.type), array)).as_py():
        return None
    return np.asarray(ints.to_numpy(zero_copy_only=False))


class _Ids:
    """One id column: global codes in first-appearance order, or the first missing id."""

    def __init__(self, src: _Source, role: str, name: str, n: int, dtype: type,
                 whole: bool) -> None:
        self.src, self.role, self.name, self.whole = src, role, name, whole
        self.codes: np.ndarray = np.empty(n, dtype=dtype)
        self.index: pd.Index | None = None
        self.error: DataError | None = None
        self.numbers = True  # text ids so far were all canonical integers, indexed as numbers

    def add(self, array: Any, start: int) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.error is not None:
            return
        array = arrow_ids(self.src, self.name, array, start)
        kind = array.type
        if pa.types.is_integer(kind) and array.null_count == 0:
            codes, uniques = pd.factorize(array.to_numpy(), sort=False)  # str() of each is its id
        elif (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and \
                self.numbers and (ints := _canonical_ints(array)) is not None:
            codes, uniques = pd.factorize(ints, sort=False)  # "17" kept as 17: str() gives it back
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if self.numbers and self.index is not None:  # earlier blocks held only numbers
                self.index = pd.Index([str(x) for x in self.index], dtype=object)
            self.numbers = False
            encoded = pc.dictionary_encode(array)
            words = encoded.dictionary.to_numpy(zero_copy_only=False)
            if array.null_count or not np.all(words != ""):
                missing = pc.or_kleene(pc.is_null(array), pc.equal(array, ""))
                self._missing(int(np.flatnonzero(missing.to_numpy(zero_copy_only=False))[0]),
                              start)
                return
            codes, uniques = encoded.indices.to_numpy(), words
        else:
            series = array.to_pandas()
            if pd.api.types.is_float_dtype(series.dtype) and not self.whole:
                text = series.astype(str).where(series.notna(), None)
            else:
                text = _parquet_ids(series)
            missing_rows = (text.isna() | (text == "")).to_numpy(dtype=bool)
            if missing_rows.any():
                self._missing(int(np.flatnonzero(missing_rows)[0]), start)
                return
            codes, uniques = pd.factorize(text.astype(str), sort=False)
        self.codes[start:start + len(codes)] = self._global(np.asarray(uniques))[codes]

    def _global(self, uniques: np.ndarray) -> np.ndarray:
        """Global codes of a batch's distinct ids, appending the unseen ones to the index."""
        if self.index is None:
            self.index = pd.Index(uniques)
            return np.arange(len(uniques))
        where = self.index.get_indexer(uniques)
        new = where < 0
        if new.any():
            where[new] = np.arange(len(self.index), len(self.index) + int(new.sum()))
            self.index = self.index.append(pd.Index(uniques[new]))
        return where

    def _missing(self, i: int, start: int) -> None:
        self.error = DataError(f"{_rows(self.src, start)(i)}: column {self.name!r} is empty or "
                               f"null (no {self.role} id, or too few fields on the line); fix or "
                               "remove that row")

    def uniques(self) -> np.ndarray:
        return np.asarray(self.index) if self.index is not None else np.empty(0, dtype=object)


class _Floats:
    """A timestamp or rating column as float64, converted batch by batch like ``_to_float``.

    A timestamp column whose values are all non-numeric (but not all null) is read as ISO dates;
    that is decided over the whole file, so batches that are all non-numeric are parsed as dates
    provisionally until a batch with a number shows the column is numeric.
    """

    def __init__(self, src: _Source, role: str, name: str, n: int) -> None:
        self.src, self.role, self.name = src, role, name
        self.values = np.empty(n, dtype=np.float64)
        self.error: DataError | None = None
        self.numeric = role != "timestamp"
        self.first: pd.Series | None = None  # row 1, for the error if the column is numeric
        self.any_value = False
        self.date_error: DataError | None = None

    def add(self, series: pd.Series, start: int) -> None:
        if self.error is not None:
            return
        where = _rows(self.src, start)
        if self.first is None:
            self.first = series.iloc[:1].reset_index(drop=True)
        end = start + len(series)
        dated = isinstance(series.dtype, pd.DatetimeTZDtype) or \
            pd.api.types.is_datetime64_dtype(series)
        if self.role != "timestamp" or dated:
            self.numeric = True  # no whole-file decision to make
            try:
                self.values[start:end] = _to_float(series, self.role, self.name, where)
            except DataError as e:
                self.error = e
            return
        numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64,
                                                                  na_value=np.nan)
        bad = ~np.isfinite(numbers)
        if self.numeric or not bad.all():
            if not self.numeric and start > 0:  # earlier rows were all non-numeric
                self.error = _bad_value(self.first, 0, self.role, self.name, _rows(self.src, 0))
                return
            self.numeric = True
            if bad.any():
                self.error = _bad_value(series, int(np.flatnonzero(bad)[0]), self.role,
                                        self.name, where)
                return
            self.values[start:end] = numbers
            return
        self.any_value = self.any_value or bool(series.notna().any())
        if self.date_error is not None:
            return
        dates = pd.to_datetime(series, format="ISO8601", utc=True, errors="coerce")
        try:
            self.values[start:end] = _epoch_seconds(dates, self.role, self.name, series, where)
        except DataError as e:
            self.date_error = e

    def finish(self) -> np.ndarray:
        """The float64 column; raises the conversion error the whole-file reader would raise."""
        if self.error is None and not self.numeric:
            if not self.any_value and self.first is not None:
                self.error = _bad_value(self.first, 0, self.role, self.name, _rows(self.src, 0))
            else:
                self.error = self.date_error
        if self.error is not None:
            raise self.error
        return self.values


# --- delimited text (csv, tsv, rechorus) --------------------------------------------------------

# format -> (separator, header: True / False / None = decide from the first row, quoted fields)
DELIMITED: dict[str, tuple[str, bool | None, bool]] = {
    "csv": (",", None, True), "csv-noheader": (",", False, True),
    "tsv": ("\t", None, False), "rechorus": ("\t", True, False),
}
_SCAN_BYTES = 1 << 22


def read_delimited_codes(path: str | Path, fmt: str, columns: ColumnMap | None = None,
                         block_bytes: int = 1 << 20) -> Codes | None:
    """Stream a csv / tsv log into :class:`Codes` with Arrow's CSV reader, or None.

    None means "read it with :func:`retr.data.readers.read_interactions`": the streamed reader
    takes only the files on which it gives exactly what that reader gives (header on the first
    line, no quote characters, no stray carriage returns, no field starting with a space in a
    csv, every row complete), and leaves every error to it, so messages (with line numbers) stay
    the same. Memory: the row count is taken first (one pass counting newlines), so the codes
    are allocated once; Arrow holds one block of text at a time.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    sep, header_rule, quoted = DELIMITED[fmt]
    columns = columns or ColumnMap()
    try:
        p = _existing_file(path)
        head, gz = _read_bytes(p, limit=1 << 16)
        first = _first_line(head)
        if first is None:
            return None
        fields = first.split(sep)
        header = header_rule if header_rule is not None else _looks_like_header(fields, columns)
        names = [f.strip() for f in fields] if header else [str(i) for i in range(len(fields))]
        src = _Source(p, b"", gz)
        roles = _resolve(src, names, columns, header=header, positional=True)
        lines = _count_plain_lines(p, gz)
    except (DataError, OSError, EOFError, zlib.error):  # the DataFrame reader names them
        return None
    if lines is None:
        return None
    n = max(lines - (1 if header else 0), 0)
    if n == 0:
        return None
    check_rows(n, str(p))
    used = sorted(set(roles.values()))
    read = pcsv.ReadOptions(column_names=[str(i) for i in range(len(names))],
                            skip_rows=1 if header else 0, block_size=block_bytes,
                            use_threads=False)
    parse = pcsv.ParseOptions(delimiter=sep, quote_char=False, newlines_in_values=False,
                              ignore_empty_lines=True)
    convert = pcsv.ConvertOptions(column_types={str(i): pa.string() for i in used},
                                  include_columns=[str(i) for i in used], null_values=[],
                                  strings_can_be_null=False, quoted_strings_can_be_null=False)
    code_dtype = np.int32 if n < 2**31 else np.int64
    ids = {role: _Ids(src, role, names[roles[role]], n, code_dtype, False)
           for role in ("user", "item")}
    floats = {role: _Floats(src, role, names[roles[role]], n)
              for role in ("timestamp", "rating") if role in roles}
    start = 0
    stream = pa.CompressedInputStream(pa.OSFile(str(p)), "gzip") if gz else pa.OSFile(str(p))
    reader = batch = None
    try:
        reader = pcsv.open_csv(stream, read_options=read, parse_options=parse,
                               convert_options=convert)
        for batch in reader:
            if batch.num_rows == 0:
                continue
            if start + batch.num_rows > n:
                return None
            for index in roles.values():
                column = batch.column(str(index))
                if sep == "," and pc.any(pc.starts_with(column, " ")).as_py():
                    return None  # the csv reader skips spaces after a comma
            for col in ids.values():
                col.add(batch.column(str(roles[col.role])), start)
                if col.error is not None:
                    return None
            for fcol in floats.values():
                fcol.add(_numbers_or_text(batch.column(str(roles[fcol.role]))), start)
                if fcol.error is not None:
                    return None
            start += batch.num_rows
        ts = floats["timestamp"].finish()[:start] if "timestamp" in floats else None
        ratings = floats["rating"].finish()[:start] if "rating" in floats else None
    except (pa.ArrowException, OSError, DataError, EOFError):
        return None
    finally:  # drop Arrow's buffers, then hand its retained memory back
        reader = batch = None
        stream.close()
        pa.default_memory_pool().release_unused()
    if start == 0:
        return None
    return Codes(users=ids["user"].codes[:start], items=ids["item"].codes[:start],
                 user_ids=ids["user"].uniques(), item_ids=ids["item"].uniques(),
                 timestamps=ts, ratings=ratings)


def _numbers_or_text(column: Any) -> pd.Series:
    """A text column as float64 when Arrow parses every value as a finite number (the common
    case, without a Python string per value), else as the text for ``_Floats`` to judge."""
    import pyarrow as pa

    try:
        numbers = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return column.to_pandas()
    if not np.isfinite(numbers).all():
        return column.to_pandas()
    return pd.Series(numbers)


def _first_line(head: bytes) -> str | None:
    """The first line when it is a plain one: at the file's start, complete, UTF-8, no BOM."""
    end = head.find(b"\n")
    if end < 0 or head.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        line = head[:end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return line if line.strip() else None


def _count_plain_lines(path: Path, gz: bool) -> int | None:
    """Lines of the (decompressed) file, or None when it holds a quote or a lone carriage return
    (cases left to the DataFrame reader)."""
    import gzip

    lines = inflated = 0
    last = b""
    with path.open("rb") as raw:
        fh = gzip.GzipFile(fileobj=raw) if gz else raw
        while block := fh.read(_SCAN_BYTES):
            if gz:
                check_inflation(path, raw.tell(), inflated := inflated + len(block))
            if b'"' in block or block.count(b"\r") != block.count(b"\r\n") + block.endswith(b"\r"):
                return None
            if last.endswith(b"\r") and not block.startswith(b"\n"):
                return None
            lines += block.count(b"\n")
            last = block
    if last and not last.endswith(b"\n"):
        lines += 1
    return lines
