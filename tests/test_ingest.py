"""Streaming parquet ingestion gives exactly the dataset and errors of the DataFrame path."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retr.config import DataConfig
from retr.data.dataset import SequenceDataset
from retr.data.ingest import build_dataset_from_codes, read_parquet_codes
from retr.data.load import load_dataset
from retr.data.preprocess import NO_PREPROCESSING, Preprocessing, build_dataset
from retr.data.readers import ColumnMap, read_interactions
from retr.errors import DataError


def random_log(rows: int, seed: int, *, string_ids: bool, time: bool, rating: bool,
               names: tuple[str, str, str, str] = ("user_id", "item_id", "timestamp", "rating"),
               ) -> pa.Table:
    """Zipf-ish items, repeated timestamps (ties exercise the stable sort)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(2, rows // 8), rows)
    items = (rng.zipf(1.5, rows) - 1) % max(2, rows // 5)
    cols: dict[str, object] = {}
    if string_ids:
        cols[names[0]] = [f"u{u}" for u in users]
        cols[names[1]] = [f"item-{i}" for i in items]
    else:
        cols[names[0]] = users.astype(np.int64)
        cols[names[1]] = items.astype(np.int32)
    if time:
        cols[names[2]] = rng.integers(0, 50, rows).astype(np.int64)
    if rating:
        cols[names[3]] = rng.integers(1, 6, rows).astype(np.float64)
    return pa.table(cols)


def write(table: pa.Table, path: Path, row_group: int = 37) -> Path:
    pq.write_table(table, path, row_group_size=row_group)
    return path


def assert_same(a: SequenceDataset, b: SequenceDataset) -> None:
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.vocab.users == b.vocab.users
    assert a.vocab.items == b.vocab.items
    if a.timestamps is None:
        assert b.timestamps is None
    else:
        assert b.timestamps is not None
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.items.dtype == b.items.dtype and a.offsets.dtype == b.offsets.dtype


def check(path: Path, prep: Preprocessing, columns: ColumnMap | None = None,
          batch_size: int = 50) -> SequenceDataset:
    expected = build_dataset(read_interactions(path, columns=columns), prep, name="x", source="s")
    codes = read_parquet_codes(path, columns, batch_size=batch_size)
    got = build_dataset_from_codes(codes, prep, name="x", source="s")
    assert_same(expected, got)
    return got


@pytest.mark.parametrize("string_ids", [True, False])
@pytest.mark.parametrize("time", [True, False])
@pytest.mark.parametrize("rating", [True, False])
def test_equal_to_dataframe_path(tmp_path: Path, string_ids: bool, time: bool,
                                 rating: bool) -> None:
    path = write(random_log(600, 1, string_ids=string_ids, time=time, rating=rating),
                 tmp_path / "log.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    check(path, NO_PREPROCESSING)
    check(path, Preprocessing(2, 2))
    if rating:
        check(path, Preprocessing(0, 0, rating_threshold=3.0))
        check(path, Preprocessing(2, 3, rating_threshold=4.0, dedupe_consecutive=True))


@pytest.mark.parametrize("seed", range(6))
def test_equal_under_random_batches_and_rating_reordering(tmp_path: Path, seed: int) -> None:
    """Dropping a user's first rows by rating changes the first-appearance order of users."""
    rng = np.random.default_rng(seed)
    path = write(random_log(int(rng.integers(20, 400)), seed, string_ids=bool(seed % 2),
                            time=True, rating=True), tmp_path / "log.parquet",
                 row_group=int(rng.integers(1, 60)))
    for batch_size in (1, 7, 1 << 20):
        check(path, Preprocessing(1, 1, rating_threshold=3.0), batch_size=batch_size)
        check(path, Preprocessing(3, 2), batch_size=batch_size)


def test_column_map_float_ids_datetimes_and_gzip(tmp_path: Path) -> None:
    table = pa.table({
        "who": [1.0, 2.0, 1.0, 3.0, 2.0, 1.0],  # whole floats -> "1", as the reader renders them
        "what": [10.0, 10.5, 11.0, 10.0, 11.0, 10.5],  # not all whole: "10.0", "10.5"
        "when": pd.to_datetime(["2020-01-02", "2020-01-01", "2020-01-03", "2020-01-01",
                                "2020-01-01", "2020-01-01"]),
    })
    path = write(table, tmp_path / "log.parquet", row_group=2)
    columns = ColumnMap(user="who", item="what", timestamp="when")
    ds = check(path, NO_PREPROCESSING, columns, batch_size=2)
    assert ds.vocab.users[0] == "1" and "10.0" in ds.vocab.items
    gz = tmp_path / "log.parquet.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    check(gz, NO_PREPROCESSING, columns, batch_size=2)


def test_iso_date_strings_decided_over_the_whole_file(tmp_path: Path) -> None:
    dates = ["2021-03-01", "2021-02-01", "2021-01-01", "2021-01-05"]
    path = write(pa.table({"user": ["a", "a", "b", "a"], "item": ["x", "y", "x", "z"],
                           "time": dates}), tmp_path / "d.parquet", row_group=1)
    check(path, NO_PREPROCESSING, batch_size=1)
    # A number after non-numeric rows makes the column numeric, so row 1 is the bad value.
    mixed = write(pa.table({"user": ["a", "b"], "item": ["x", "y"], "time": ["2021-01-01", "5"]}),
                  tmp_path / "m.parquet", row_group=1)
    with pytest.raises(DataError) as whole:
        read_interactions(mixed)
    with pytest.raises(DataError) as streamed:
        read_parquet_codes(mixed, batch_size=1)
    assert str(streamed.value) == str(whole.value) and "row 1" in str(whole.value)


@pytest.mark.parametrize(("column", "bad"), [
    ("timestamp", [1.0, 2.0, 3.0, float("nan"), 5.0]),
    ("rating", [1.0, 2.0, None, 4.0, 5.0]),
    ("user_id", ["a", "b", "c", "d", ""]),
    ("item_id", [1, 2, 3, None, 5]),
])
def test_same_error_as_reader(tmp_path: Path, column: str, bad: list[object]) -> None:
    data: dict[str, list[object]] = {"user_id": ["a", "b", "c", "d", "e"],
                                     "item_id": [1, 2, 3, 4, 5],
                                     "timestamp": [1.0, 2.0, 3.0, 4.0, 5.0],
                                     "rating": [1.0, 2.0, 3.0, 4.0, 5.0]}
    data[column] = bad
    path = write(pa.table(data), tmp_path / "bad.parquet", row_group=2)
    with pytest.raises(DataError) as whole:
        read_interactions(path)
    with pytest.raises(DataError) as streamed:
        read_parquet_codes(path, batch_size=2)
    assert str(streamed.value) == str(whole.value)
    assert "row" in str(whole.value) and column in str(whole.value)


def test_file_errors_match(tmp_path: Path) -> None:
    empty = write(pa.table({"user": pa.array([], pa.string()), "item": pa.array([], pa.string())}),
                  tmp_path / "e.parquet")
    nouser = write(pa.table({"x": ["a"], "item": ["b"]}), tmp_path / "n.parquet")
    junk = tmp_path / "j.parquet"
    junk.write_bytes(b"PAR1 not really")
    for path in (empty, nouser, junk):
        with pytest.raises(DataError) as whole:
            read_interactions(path)
        with pytest.raises(DataError) as streamed:
            read_parquet_codes(path)
        if path == junk:  # arrow words its own part differently for a file and a buffer
            assert str(streamed.value).startswith(f"{junk}: not a readable parquet file (")
            assert str(whole.value).startswith(f"{junk}: not a readable parquet file (")
        else:
            assert str(streamed.value) == str(whole.value)


def test_load_dataset_streams_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(random_log(500, 3, string_ids=False, time=True, rating=True),
                 tmp_path / "log.parquet")
    expected = build_dataset(read_interactions(path), Preprocessing(2, 2), name="log.parquet",
                             source=str(path))

    def no_frames(*args: object, **kwargs: object) -> None:
        raise AssertionError("parquet must not go through read_interactions")

    monkeypatch.setattr("retr.data.load.read_interactions", no_frames)
    got = load_dataset(DataConfig(source=str(path), min_user_interactions=2,
                                  min_item_interactions=2))
    assert_same(expected, got)
    assert got.name == expected.name


# --- delimited text streamed with Arrow's CSV reader -----------------------------------------

def _csv_text(rows: int, seed: int, *, sep: str = ",", header: bool = True, time: str = "int",
              rating: bool = False) -> str:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(2, rows // 8), rows)
    items = (rng.zipf(1.5, rows) - 1) % max(2, rows // 5)
    names = ["user_id", "item_id"] + (["timestamp"] if time else []) + (["rating"] if rating
                                                                          else [])
    lines = [sep.join(names)] if header else []
    for r in range(rows):
        cells = [f"u{users[r]}", str(items[r])]
        if time == "int":
            cells.append(str(int(rng.integers(0, 40))))
        elif time == "float":
            cells.append(f"{rng.integers(0, 40) / 4:g}")
        elif time == "iso":
            cells.append(f"2020-01-{1 + int(rng.integers(0, 9)):02d}T10:00:00")
        if rating:
            cells.append(f"{int(rng.integers(1, 6))}.0")
        lines.append(sep.join(cells))
    return "\n".join(lines) + "\n"


def _check_delimited(path: Path, fmt: str, prep: Preprocessing,
                     columns: ColumnMap | None = None) -> None:
    from retr.data.ingest import read_delimited_codes

    codes = read_delimited_codes(path, fmt, columns, block_bytes=1 << 10)  # many blocks
    assert codes is not None, "the streamed reader should take this file"
    expected = build_dataset(read_interactions(path, fmt=fmt, columns=columns), prep, name="x",
                             source="s")
    assert_same(expected, build_dataset_from_codes(codes, prep, name="x", source="s"))


@pytest.mark.parametrize("fmt, sep, header, time, rating", [
    ("csv", ",", True, "int", False), ("csv", ",", True, "float", True),
    ("csv", ",", True, "iso", False), ("csv", ",", True, "", True),
    ("tsv", "\t", True, "int", True), ("rechorus", "\t", True, "int", False),
])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_streamed_delimited_equals_dataframe_path(tmp_path: Path, fmt: str, sep: str,
                                                  header: bool, time: str, rating: bool,
                                                  gz: bool) -> None:
    text = _csv_text(700, 3, sep=sep, header=header, time=time, rating=rating)
    if fmt == "rechorus":
        text = text.replace("timestamp", "time", 1)
    path = tmp_path / ("log.txt.gz" if gz else "log.txt")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    for prep in (NO_PREPROCESSING, Preprocessing(2, 2)):
        _check_delimited(path, fmt, prep)


def test_streamed_delimited_positions_crlf_blank_lines(tmp_path: Path) -> None:
    body = _csv_text(300, 4, header=False).replace("\n", "\r\n")
    lines = body.split("\r\n")
    lines.insert(50, "")  # a blank line in the middle
    path = tmp_path / "log.csv"
    path.write_text("\r\n".join(lines).rstrip("\r\n"))  # and no newline at the end
    columns = ColumnMap(user="1", item="0", timestamp="2")
    _check_delimited(path, "csv-noheader", NO_PREPROCESSING, columns)
    _check_delimited(path, "csv-noheader", Preprocessing(2, 2), columns)


@pytest.mark.parametrize("name, text", [
    ("quoted", 'user_id,item_id\n"u1",a\nu2,b\n'),
    ("leading space", "user_id,item_id\nu1, a\nu2,b\n"),
    ("BOM", "\ufeffuser_id,item_id\nu1,a\nu2,b\n"),
    ("lone carriage return", "user_id,item_id\nu1,a\ru3,c\nu2,b\n"),
    ("blank first line", "\nuser_id,item_id\nu1,a\n"),
    ("a field beyond the header's", "user_id,item_id\nu1,a,9\nu2,b\n"),
    ("whitespace-only line", "user_id,item_id\nu1,a\n  \nu2,b\n"),
])
def test_streamed_delimited_leaves_the_unusual_to_the_dataframe_path(
        tmp_path: Path, name: str, text: str) -> None:
    from retr.data.ingest import read_delimited_codes

    path = tmp_path / "log.csv"
    path.write_text(text)
    assert read_delimited_codes(path, "csv") is None
    cfg = DataConfig(source=str(path), min_user_interactions=0, min_item_interactions=0)
    try:
        expected = build_dataset(read_interactions(path), NO_PREPROCESSING, name=path.name,
                                 source=str(path))
    except DataError as e:
        with pytest.raises(DataError) as got:
            load_dataset(cfg)
        assert str(got.value) == str(e)
    else:
        assert_same(expected, load_dataset(cfg))


@pytest.mark.parametrize("text, line", [
    ("user_id,item_id,timestamp\nu1,a,1\nu2,,2\nu3,c,3\n", "log.csv:3: column 'item_id' is empty"),
    ("user_id,item_id,timestamp\nu1,a,1\nu2,b\nu3,c,3\n", "log.csv:3: column 'timestamp'"),
    ("user_id,item_id,timestamp\nu1,a,1\nu2,b,soon\n", "log.csv:3: column 'timestamp': cannot "
                                                       "parse timestamp 'soon'"),
    ("user_id,item_id\nu1,a\n\xe9,b\n", "log.csv:3: bytes are not valid UTF-8"),
])
def test_streamed_delimited_errors_are_the_dataframe_path_errors(tmp_path: Path, text: str,
                                                                 line: str) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(text.encode("latin-1"))
    cfg = DataConfig(source=str(path), min_user_interactions=0, min_item_interactions=0)
    with pytest.raises(DataError) as got:
        load_dataset(cfg)
    assert line in str(got.value)
    with pytest.raises(DataError) as want:
        read_interactions(path)
    assert str(got.value) == str(want.value)


def test_number_like_ids_switching_to_text_keep_every_id_distinct(tmp_path: Path) -> None:
    """Blocks of canonical integers are coded as numbers until a block holds text ("007",
    "x", "+7"); the ids already seen are then turned into text, so "7" stays one id."""
    rows = ["user_id,item_id"]
    rows += [f"u{i % 7},{i % 13}" for i in range(400)]
    rows += ["u1,007", "u2,x", "u3,+7", "u4,7", "u5,-0", "u6,0"]
    rows += [f"u{i % 7},{i % 5}" for i in range(400)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    _check_delimited(path, "csv", NO_PREPROCESSING)
    table = pa.table({"user_id": [r.split(",")[0] for r in rows[1:]],
                      "item_id": [r.split(",")[1] for r in rows[1:]]})
    check(write(table, tmp_path / "log.parquet"), NO_PREPROCESSING)
