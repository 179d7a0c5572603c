"""Readers: round trips per format, gzip, detection, column maps, and one-line errors."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retr.data.readers import FORMATS, ColumnMap, detect_format, read_interactions
from retr.errors import DataError

# A small log in time order: (user, item, timestamp, rating); users interleave on purpose.
LOG = [
    ("u1", "i10", 100.0, 5.0),
    ("u2", "i11", 101.0, 3.0),
    ("u1", "i12", 102.0, 4.0),
    ("u3", "i10", 103.0, 1.0),
    ("u2", "i10", 104.0, 2.5),
    ("u1", "i11", 105.0, 4.0),
]
NUMERIC_LOG = [(u.lstrip("u"), i.lstrip("i"), t, r) for u, i, t, r in LOG]


def expected(log: list[tuple[str, str, float, float]], time: bool = True,
             rating: bool = True) -> pd.DataFrame:
    data: dict[str, list[object]] = {"user": [r[0] for r in log], "item": [r[1] for r in log]}
    if time:
        data["timestamp"] = [r[2] for r in log]
    if rating:
        data["rating"] = [r[3] for r in log]
    return pd.DataFrame(data)


def check(df: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(df.columns) == list(want.columns)
    assert df["user"].tolist() == want["user"].tolist()
    assert df["item"].tolist() == want["item"].tolist()
    assert all(isinstance(v, str) for v in df["user"]) and all(isinstance(v, str) for v in df["item"])
    for col in ("timestamp", "rating"):
        if col in want:
            assert df[col].dtype == np.float64
            np.testing.assert_array_equal(df[col].to_numpy(), want[col].to_numpy(dtype=np.float64))
    assert isinstance(df.index, pd.RangeIndex)


def write(path: Path, content: str | bytes, gz: bool = False) -> Path:
    data = content.encode() if isinstance(content, str) else content
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def as_user_lines(log: list[tuple[str, str, float, float]]) -> str:
    seqs: dict[str, list[str]] = {}
    for u, i, _, _ in log:
        seqs.setdefault(u, []).append(i)
    return "".join(f"{u} {' '.join(items)}\n" for u, items in seqs.items())


def user_lines_order(log: list[tuple[str, str, float, float]]) -> list[tuple[str, str, float, float]]:
    """user-lines groups a user's rows together, keeping each user's time order."""
    users = list(dict.fromkeys(r[0] for r in log))
    return [r for u in users for r in log if r[0] == u]


def csv_text(log: list[tuple[str, str, float, float]], header: str, sep: str = ",") -> str:
    rows = [sep.join([u, i, str(int(t)), str(r)]) for u, i, t, r in log]
    return "\n".join([header, *rows]) + "\n"


def error(path: Path, fmt: str | None = None, columns: ColumnMap | None = None,
          detect: bool = False) -> str:
    """The message of the DataError a read (or detection) raises; it must be one line."""
    with pytest.raises(DataError) as info:
        if detect:
            detect_format(path)
        else:
            read_interactions(path, fmt, columns)
    message = str(info.value)
    assert "\n" not in message
    chained = info.value.__cause__ or (None if info.value.__suppress_context__
                                       else info.value.__context__)
    assert chained is None, f"a library traceback would show: {chained!r}"
    return message


# --- round trips -----------------------------------------------------------------------------

# name -> (file name, writer, fmt, expected frame); each is also read gzipped and detected.
CASES = {
    "csv": ("log.csv", lambda: csv_text(LOG, "user_id,item_id,timestamp,rating"),
            expected(LOG)),
    "tsv": ("log.tsv", lambda: csv_text(LOG, "userId\tmovieId\ttime\toverall", "\t"),
            expected(LOG)),
    "csv-noheader": ("ratings.csv", lambda: "\n".join(
        f"{i},{u},{r},{int(t)}" for u, i, t, r in LOG) + "\n", expected(LOG)),
    "jsonl": ("log.jsonl", lambda: "".join(
        json.dumps({"user": u, "item": i, "ts": t, "rating": r}) + "\n" for u, i, t, r in LOG),
        expected(LOG)),
    "amazon-json": ("reviews.json", lambda: "".join(
        json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": int(t),
                    "reviewText": "fine, thanks"}) + "\n" for u, i, t, r in LOG),
        expected(LOG)),
    "user-lines": ("Beauty.txt", lambda: as_user_lines(NUMERIC_LOG),
                   expected(user_lines_order(NUMERIC_LOG), time=False, rating=False)),
    "pairs": ("seq.txt", lambda: "".join(f"{u} {i}\n" for u, i, _, _ in user_lines_order(
        NUMERIC_LOG)), expected(user_lines_order(NUMERIC_LOG), time=False, rating=False)),
    "movielens-tab": ("u.data", lambda: "".join(
        f"{u}\t{i}\t{int(r)}\t{int(t)}\n" for u, i, t, r in NUMERIC_LOG),
        expected([(u, i, t, float(int(r))) for u, i, t, r in NUMERIC_LOG])),
    "movielens-colons": ("ratings.dat", lambda: "".join(
        f"{u}::{i}::{int(r)}::{int(t)}\n" for u, i, t, r in NUMERIC_LOG),
        expected([(u, i, t, float(int(r))) for u, i, t, r in NUMERIC_LOG])),
    "rechorus": ("train.csv", lambda: "user_id\titem_id\ttime\tneg_items\n" + "".join(
        f"{u}\t{i}\t{int(t)}\t[1, 2, 3]\n" for u, i, t, _ in NUMERIC_LOG),
        expected(NUMERIC_LOG, rating=False)),
}
FORMAT_OF = {"movielens-tab": "movielens", "movielens-colons": "movielens"}
COLUMNS_OF = {"csv-noheader": ColumnMap(user="1", item="0", rating="2", timestamp="3")}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(tmp_path: Path, case: str, gz: bool) -> None:
    name, content, want = CASES[case]
    path = write(tmp_path / name, content(), gz=gz)
    fmt = FORMAT_OF.get(case, case)
    columns = COLUMNS_OF.get(case)
    check(read_interactions(path, fmt, columns), want)
    assert detect_format(path) == fmt
    check(read_interactions(path, columns=columns), want)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_parquet_round_trip(tmp_path: Path, gz: bool) -> None:
    table = pa.table({"user_id": [int(r[0]) for r in NUMERIC_LOG],
                      "item_id": [r[1] for r in NUMERIC_LOG],
                      "timestamp": pa.array([r[2] for r in NUMERIC_LOG]),
                      "rating": [r[3] for r in NUMERIC_LOG]})
    pq.write_table(table, tmp_path / "log.parquet")
    path = write(tmp_path / "log.parquet", (tmp_path / "log.parquet").read_bytes(), gz=gz)
    assert detect_format(path) == "parquet"
    check(read_interactions(path), expected(NUMERIC_LOG))


def test_parquet_float_ids_and_datetime_column(tmp_path: Path) -> None:
    times = pd.to_datetime(["1970-01-01T00:01:40Z", "1970-01-01T00:01:41Z"])
    pq.write_table(pa.table({"user": [1.0, 2.0], "item": [7, 8], "time": pa.array(times)}),
                   tmp_path / "x.parquet")
    df = read_interactions(tmp_path / "x.parquet")
    assert df["user"].tolist() == ["1", "2"] and df["item"].tolist() == ["7", "8"]
    assert df["timestamp"].tolist() == [100.0, 101.0]


def test_parquet_null_id_names_row_and_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"user": ["a", None], "item": ["x", "y"]}), tmp_path / "n.parquet")
    message = error(tmp_path / "n.parquet")
    assert "n.parquet: row 2" in message and "'user'" in message


def test_csv_without_time_or_rating_has_only_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item\n1,2\n1,3\n")
    check(read_interactions(path), pd.DataFrame({"user": ["1", "1"], "item": ["2", "3"]}))


def test_iso_timestamps_become_epoch_seconds(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item,time\n"
                 "a,x,1970-01-02\na,y,1970-01-02T00:00:10Z\na,z,1970-01-02 01:00:00+01:00\n")
    assert read_interactions(path)["timestamp"].tolist() == [86400.0, 86410.0, 86400.0]


def test_jsonl_integer_ids_and_iso_times(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"userID": 7, "itemId": 9, "time": "1970-01-01T00:00:05Z"}\n'
                 '\n{"userID": "7", "itemId": 10, "time": "1970-01-01T00:00:06Z"}\n')
    df = read_interactions(path)
    assert df["user"].tolist() == ["7", "7"] and df["item"].tolist() == ["9", "10"]
    assert df["timestamp"].tolist() == [5.0, 6.0]


def test_blank_lines_crlf_and_bom_are_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", b"\xef\xbb\xbfuser,item,rating\r\n1,2,3\r\n\r\n4,5,6\r\n")
    check(read_interactions(path), pd.DataFrame({"user": ["1", "4"], "item": ["2", "5"],
                                                 "rating": [3.0, 6.0]}))
    path = write(tmp_path / "b.txt", "1 2 3\n\n  \n4 5\r\n")
    assert read_interactions(path, "user-lines")["item"].tolist() == ["2", "3", "5"]


def test_ids_stay_strings_exactly(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item\n007,1.50\n7,1.5\n")
    df = read_interactions(path)
    assert df["user"].tolist() == ["007", "7"] and df["item"].tolist() == ["1.50", "1.5"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), min_size=1, max_size=40))
def test_user_lines_pairs_and_csv_agree(tmp_path_factory: pytest.TempPathFactory,
                                        rows: list[tuple[int, int]]) -> None:
    log = user_lines_order([(str(u), str(i), 0.0, 0.0) for u, i in rows])
    base = tmp_path_factory.mktemp("agree")
    want = expected(log, time=False, rating=False)
    check(read_interactions(write(base / "a.txt", as_user_lines(log)), "user-lines"), want)
    pairs = "".join(f"{u} {i}\n" for u, i, _, _ in log)
    check(read_interactions(write(base / "b.txt", pairs), "pairs"), want)
    table = "user,item\n" + "".join(f"{u},{i}\n" for u, i, _, _ in log)
    check(read_interactions(write(base / "c.csv", table), "csv"), want)


# --- column maps ------------------------------------------------------------------------------


def test_column_map_by_name_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,buyer,product,when,stars\nx,1,2,10,4\nx,1,3,11,5\n")
    df = read_interactions(path, columns=ColumnMap(user="buyer", item="product", timestamp="when",
                                                   rating="stars"))
    check(df, pd.DataFrame({"user": ["1", "1"], "item": ["2", "3"], "timestamp": [10.0, 11.0],
                            "rating": [4.0, 5.0]}))


def test_column_map_positions_with_and_without_header(tmp_path: Path) -> None:
    columns = ColumnMap(user="1", item="0", timestamp="3")
    headed = write(tmp_path / "h.csv", "item,user,rating,timestamp\nB1,A1,5.0,100\n")
    headless = write(tmp_path / "n.csv", "B1,A1,5.0,100\n")
    want = pd.DataFrame({"user": ["A1"], "item": ["B1"], "timestamp": [100.0]})
    check(read_interactions(headed, "csv", columns), want.assign(rating=[5.0]))
    check(read_interactions(headless, "csv", columns), want)
    check(read_interactions(headless, "csv-noheader", columns), want)
    check(read_interactions(write(tmp_path / "t.tsv", "B1\tA1\t5.0\t100\n"), "tsv", columns), want)


def test_column_map_default_names_are_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "USERID,ASIN,UnixReviewTime,Overall\nA,B,1,2\n")
    check(read_interactions(path), pd.DataFrame({"user": ["A"], "item": ["B"],
                                                 "timestamp": [1.0], "rating": [2.0]}))


def test_column_map_unknown_name(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item,time\n1,2,3\n")
    message = error(path, columns=ColumnMap(timestamp="ts"))
    assert "a.csv" in message and "'ts'" in message and "--time-col" in message
    assert "'user', 'item', 'time'" in message


def test_column_map_two_roles_one_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "user,item,time\n1,2,3\n")
    assert "'user'" in error(path, columns=ColumnMap(timestamp="0"))


def test_column_map_rejected_for_fixed_layouts(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "1 2 3\n")
    assert "--user-col" in error(path, "user-lines", ColumnMap(user="0"))


def test_headerless_csv_needs_positions(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "B1,A1,5.0,100\n")
    message = error(path)
    assert "m.csv" in message and "no header row" in message and "--user-col 0" in message


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "fmt"), [
    ("x.bin", b"PAR1....", "parquet"),
    ("u.data.gz", None, "movielens"),
    ("data.txt", "1::2::3::4\n", "movielens"),
    ("data.tsv", "1\t2\t3\t881250949\n", "movielens"),
    ("reviews.jsonl", '{"reviewerID": "A", "asin": "B"}\n', "amazon-json"),
    ("log.txt", '{"user": "A", "item": "B"}\n', "jsonl"),
    ("train.csv", "user_id\titem_id\ttime\n1\t2\t3\n", "rechorus"),
    ("a.csv", "user_id\titem_id\tlabel\n1\t2\t3\n", "tsv"),
    ("a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n", "tsv"),
    ("a.txt", "user,item\n1,2\n", "csv"),
    ("a.txt", "B01,A2,5.0,99\n", "csv-noheader"),
    ("a.txt", "1 2 3 4\n2 5\n", "user-lines"),
    ("a.txt", "1\t2\n1\t3\n", "pairs"),
])
def test_detection(tmp_path: Path, name: str, content: str | bytes | None, fmt: str) -> None:
    path = tmp_path / name
    if content is None:
        path.write_bytes(gzip.compress(b"1\t2\t3\t4\n"))
    else:
        write(path, content)
    assert detect_format(path) == fmt


def test_detection_of_a_line_longer_than_the_sampled_head(tmp_path: Path) -> None:
    items = " ".join(str(i) for i in range(20_000))
    path = write(tmp_path / "a.txt", f"1 {items}\n2 3 4\n")
    assert detect_format(path) == "user-lines"
    assert len(read_interactions(path)) == 20_002


def test_two_tokens_without_repeats_is_ambiguous(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "1 2\n2 3\n3 4\n")
    message = error(path)
    assert "a.txt" in message and "pass --format one of" in message and "pairs" in message
    assert error(path, detect=True) == message
    assert read_interactions(path, "pairs")["user"].tolist() == ["1", "2", "3"]
    assert read_interactions(path, "user-lines")["user"].tolist() == ["1", "2", "3"]


def test_unknown_layout_asks_for_format(tmp_path: Path) -> None:
    message = error(write(tmp_path / "a.txt", "hello world again\n"))
    assert "pass --format one of" in message and all(f in message for f in FORMATS)


# --- errors -----------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert str(missing) in error(missing) and "no such file" in error(missing)
    assert "no such file" in error(missing, detect=True)
    assert "directory" in error(tmp_path)


def test_unknown_format_lists_valid_ones(tmp_path: Path) -> None:
    message = error(write(tmp_path / "a.csv", "user,item\n1,2\n"), "excel")
    assert "'excel'" in message and all(f in message for f in FORMATS)


def test_missing_required_column(tmp_path: Path) -> None:
    message = error(write(tmp_path / "a.csv", "who,what\n1,2\n"))
    assert "a.csv" in message and "no user column" in message
    assert "'who', 'what'" in message and "--user-col/--item-col/--time-col" in message
    message = error(write(tmp_path / "b.jsonl", '{"user": 1}\n'))
    assert "no item column" in message and "'user'" in message


@pytest.mark.parametrize(("fmt", "content", "where"), [
    ("user-lines", "1 2 3\n4\n", ":2:"),
    ("pairs", "1 2\n1 2 3\n", ":2:"),
    ("pairs", "1 2\n\n1\n", ":3:"),
    ("csv", "user,item,rating\n1,2,3\n4\n", ":3:"),
    ("movielens", "1\t2\t3\t4\n1\t2\n", ":2:"),
])
def test_too_few_tokens_names_line(tmp_path: Path, fmt: str, content: str, where: str) -> None:
    assert f"a.txt{where}" in error(write(tmp_path / "a.txt", content), fmt)


def test_empty_id_field_names_line_and_column(tmp_path: Path) -> None:
    message = error(write(tmp_path / "a.tsv", "user\titem\n1\t2\n\t3\n"))
    assert "a.tsv:3" in message and "'user'" in message


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_non_utf8_names_line_and_offset(tmp_path: Path, gz: bool) -> None:
    path = write(tmp_path / "a.txt", b"1 2 3\n4 \xff 6\n", gz=gz)
    for detect in (False, True):
        message = error(path, detect=detect)
        assert f"{path.name}:2" in message and "byte offset 8" in message and "UTF-8" in message


@pytest.mark.parametrize(("content", "column", "what"), [
    ("user,item,time\n1,2,3\n1,3,soon\n", "'time'", "'soon'"),
    ("user,item,time\n1,2,3\n1,3,nan\n", "'time'", "missing or NaN"),
    ("user,item,time\n1,2,3\n1,3,\n", "'time'", "missing or NaN"),
    ("user,item,rating\n1,2,3\n1,3,five\n", "'rating'", "'five'"),
    ("user,item,rating\n1,2,3\n1,3,NaN\n", "'rating'", "missing or NaN"),
    ("user,item,time\n1,2,2020-01-01\n1,3,2020-13-45\n", "'time'", "'2020-13-45'"),
])
def test_bad_number_names_line_and_column(tmp_path: Path, content: str, column: str,
                                          what: str) -> None:
    message = error(write(tmp_path / "a.csv", content))
    assert "a.csv:3" in message and column in message and what in message


def test_bad_json_value_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"user": 1, "item": 2, "ts": 3}\n'
                 '{"user": 1, "item": 2, "ts": null}\n')
    message = error(path)
    assert "a.jsonl:2" in message and "'ts'" in message
    path = write(tmp_path / "b.jsonl", '{"user": 1, "item": 2}\n{"user": [1], "item": 2}\n')
    assert "b.jsonl:2" in error(path) and "'user'" in error(path)


@pytest.mark.parametrize("content", ["", "\n \n", "user,item\n", "user,item\n\n"])
def test_empty_files(tmp_path: Path, content: str) -> None:
    message = error(write(tmp_path / "a.csv", content))
    assert "a.csv" in message and "empty" in message


@pytest.mark.parametrize("fmt", ["user-lines", "pairs", "jsonl", "movielens", None])
def test_empty_gzip_file(tmp_path: Path, fmt: str | None) -> None:
    message = error(write(tmp_path / "a.txt", "", gz=True), fmt)
    assert "a.txt.gz" in message and "empty" in message


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"user": "a", "item": "b"}\n{"user": "a", "item"\n')
    message = error(path)
    assert "a.jsonl:2" in message and "invalid JSON" in message
    path = write(tmp_path / "b.jsonl", '{"user": "a", "item": "b"}\n[1, 2]\n')
    assert "b.jsonl:2" in error(path) and "JSON object" in error(path)
    path = write(tmp_path / "c.jsonl", '{"user": "a", "item": "b"}\n{"user": "a"}\n')
    assert "c.jsonl:2" in error(path) and "'item'" in error(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    rng = random.Random(0)
    text = "".join(" ".join(str(rng.randrange(10**6)) for _ in range(10)) + "\n"
                   for _ in range(500))
    data = gzip.compress(text.encode())
    path = tmp_path / "a.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    message = error(path, "user-lines")
    assert "a.txt.gz" in message and "truncated or corrupt" in message
    assert "truncated" in error(path)


def test_corrupt_parquet(tmp_path: Path) -> None:
    message = error(write(tmp_path / "a.parquet", b"not parquet at all"))
    assert "a.parquet" in message and "parquet" in message


def test_unterminated_quote(tmp_path: Path) -> None:
    message = error(write(tmp_path / "a.csv", 'user,item\n1,"2\n'))
    assert "a.csv" in message


# --- real data --------------------------------------------------------------------------------

REAL = [
    ("ml-1m/ml-1m.user_sequences.txt.gz", "user-lines", None, (6040, 3706, 1_000_209)),
    ("ml-100k/u.data", "movielens", None, (943, 1682, 100_000)),
    ("Beauty/Beauty.txt", "user-lines", None, (22_363, 12_101, 198_502)),
    ("Office/train.csv", "rechorus", None, None),
    ("Musical_Instruments/Musical_Instruments_5.json.gz", "amazon-json", None,
     (1429, 900, 10_261)),
    ("Magazine_Subscriptions/Magazine_Subscriptions.csv", "csv-noheader",
     ColumnMap(user="1", item="0", rating="2", timestamp="3"), (72_098, 2428, 89_689)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("rel", "fmt", "columns", "counts"), REAL, ids=[r[0] for r in REAL])
def test_real_datasets(rel: str, fmt: str, columns: ColumnMap | None,
                       counts: tuple[int, int, int] | None) -> None:
    root = os.environ.get("RETR_DATA_DIR")
    if not root or not (Path(root) / rel).is_file():
        pytest.skip("set RETR_DATA_DIR to the benchmark data folder to run this")
    path = Path(root) / rel
    assert detect_format(path) == fmt
    df = read_interactions(path, columns=columns)
    assert df["user"].notna().all() and df["item"].notna().all()
    if counts is not None:
        assert (df["user"].nunique(), df["item"].nunique(), len(df)) == counts
    if fmt == "rechorus":
        assert list(df.columns) == ["user", "item", "timestamp"]
        assert df["timestamp"].min() > 0


# --- values that cannot be ids, and columns that could be either of two ----------------------


def _both_parquet_paths(path: Path) -> list[object]:
    """The DataFrame reader and the streamed reader must refuse the same files the same way."""
    from retr.data.ingest import read_parquet_codes

    return [lambda: read_interactions(path), lambda: read_parquet_codes(path, batch_size=8)]


@pytest.mark.parametrize(("values", "kind", "message"), [
    ([b"ok"] * 10 + [b"\xff\xfe"] + [b"x"] * 9, pa.binary(),
     r"row 11: column 'item_id' holds bytes that are not UTF-8 text \(b'\\xff\\xfe', byte 0\)"),
    ([[168, 1]] * 20, pa.list_(pa.int64()),
     r"row 1: column 'item_id' holds list<element: int64> values, not single ids"),
    ([None] * 3 + [{"a": 1}] * 17, pa.struct([("a", pa.int64())]),
     r"row 4: column 'item_id' holds struct<a: int64> values, not single ids"),
    ([{"k": 1}] * 20, pa.map_(pa.string(), pa.int64()), "values, not single ids"),
])
def test_parquet_ids_that_are_not_ids_are_refused(tmp_path: Path, values: list[object],
                                                  kind: pa.DataType, message: str) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [f"u{i % 4}" for i in range(20)],
                             "item_id": pa.array(values, kind)}), path)
    for read in _both_parquet_paths(path):
        with pytest.raises(DataError, match=message):
            read()


def test_parquet_utf8_binary_ids_are_read_as_text(tmp_path: Path) -> None:
    from retr.data.ingest import read_parquet_codes

    path = tmp_path / "log.parquet"
    ids = [b"a", "é".encode(), b"a", b"c"]
    pq.write_table(pa.table({"user_id": ["u1", "u1", "u2", "u2"],
                             "item_id": pa.array(ids, pa.binary())}), path)
    assert list(read_interactions(path)["item"]) == ["a", "é", "a", "c"]
    codes = read_parquet_codes(path, batch_size=3)
    assert [str(codes.item_ids[c]) for c in codes.items] == ["a", "é", "a", "c"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_two_candidate_columns_are_an_error_listing_them(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"user": ["a", "b"], "user_id": ["b", "a"], "item_id": ["1", "2"]})
    path = tmp_path / f"log.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match=r"several columns could be the user column: 'user', "
                                        r"'user_id'; pick one with --user-col NAME"):
        read_interactions(path)
    picked = read_interactions(path, columns=ColumnMap(user="user_id"))
    assert list(picked["user"]) == ["b", "a"]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_deeply_nested_json_line_is_one_error(tmp_path: Path, gz: bool) -> None:
    text = ('{"user_id": "1", "item_id": "2"}\n'
            '{"user_id": "1", "item_id": ' + "[" * 150_000 + "]" * 150_000 + "}\n")
    path = tmp_path / ("deep.jsonl.gz" if gz else "deep.jsonl")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    with pytest.raises(DataError, match=r"deep.jsonl(.gz)?:2: invalid JSON \(nested deeper than "
                                        r"64 levels"):
        read_interactions(path)
    shallow = tmp_path / "ok.jsonl"
    shallow.write_text('{"user_id": "1", "item_id": "2", "extra": ' + "[" * 60 + "]" * 60 + "}\n")
    assert list(read_interactions(shallow)["item"]) == ["2"]
