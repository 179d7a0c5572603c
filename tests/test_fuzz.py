"""Property-based fuzzing: readers, preprocessing, run-file loaders and the HTTP API.

Each property says what must hold for *any* input: readers return the canonical frame or raise
DataError; preprocessing keeps its invariants (offsets, id ranges, k-core fixed point, time
order); damaged run files load or raise a RunDirError (ConfigError for config.json) naming
the file; the HTTP API answers 2xx or 4xx, never 500.
Examples are bounded so the whole file runs in seconds.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from retr.cli import main
from retr.data.dataset import SequenceDataset
from retr.data.load import load_dataset
from retr.data.preprocess import Preprocessing, build_dataset
from retr.data.readers import FORMATS, ROLES, read_interactions
from retr.errors import ConfigError, DataError, RunDirError
from retr.runs import load_config, load_run_data
from retr.serving.recommender import Recommender
from retr.training.checkpoint import load_trainer_state

# No example database: nothing is written into the tree; a failure prints its example.
FUZZ = settings(deadline=None, max_examples=60, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _check_canonical(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == [r for r in ROLES if r in frame.columns]
    assert {"user", "item"} <= set(frame.columns) and len(frame) > 0
    for role in ("user", "item"):
        assert all(isinstance(v, str) and v for v in frame[role])
    for role in ("timestamp", "rating"):
        if role in frame.columns:
            assert frame[role].dtype == np.float64 and np.isfinite(frame[role]).all()
    assert frame.index.equals(pd.RangeIndex(len(frame)))


def _read(path: Path, fmt: str | None) -> None:
    try:
        frame = read_interactions(path, fmt=fmt)
    except DataError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
        return
    _check_canonical(frame)


NAMES = ["log.csv", "log.tsv", "u.data", "ratings.dat", "log.jsonl", "log.json", "log.txt",
         "log.parquet", "log.csv.gz", "data"]
TOKENS = st.sampled_from(["u1", "u2", "i1", "i2", "42", "-7", "3.5", "1e3", "nan", "NaN", "inf",
                          "", " ", ",", "\t", "::", ";", '"', "'", "{", "}", "[", "]", ":",
                          "user_id", "item_id", "timestamp", "rating", "reviewerID", "asin",
                          "2014-03-16", "2014-03-16T12:00:00Z", "null", "true", "\\", "\r",
                          "é", "\x00", "\ufeff"])
LINES = st.lists(st.lists(TOKENS, max_size=8).map("".join), max_size=12).map("\n".join)


@FUZZ
@given(text=LINES, name=st.sampled_from(NAMES), fmt=st.sampled_from([None, *FORMATS]),
       gz=st.sampled_from(["no", "yes", "truncated"]))
def test_readers_on_random_lines(scratch: Path, text: str, name: str, fmt: str | None,
                                 gz: str) -> None:
    data = text.encode("utf-8")
    if gz != "no":
        data = gzip.compress(data, mtime=0)
        data = data[: len(data) // 2] if gz == "truncated" else data
    path = scratch / name
    path.write_bytes(data)
    _read(path, fmt)


@FUZZ
@given(data=st.binary(max_size=600), name=st.sampled_from(NAMES),
       fmt=st.sampled_from([None, *FORMATS]))
def test_readers_on_random_bytes(scratch: Path, data: bytes, name: str, fmt: str | None) -> None:
    path = scratch / name
    path.write_bytes(data)
    _read(path, fmt)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                         st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
KEYS = st.sampled_from(["user_id", "item_id", "timestamp", "rating", "reviewerID", "asin",
                        "overall", "unixReviewTime", "time", "user", "item", "x"])


@FUZZ
@given(records=st.lists(st.dictionaries(KEYS, JSON_VALUES, max_size=5), max_size=6),
       fmt=st.sampled_from([None, "jsonl", "amazon-json"]))
def test_json_readers_on_random_objects(scratch: Path, records: list[dict[str, Any]],
                                        fmt: str | None) -> None:
    path = scratch / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    _read(path, fmt)


PARQUET_COLUMNS = st.one_of(
    st.lists(st.one_of(st.none(), st.text(max_size=4)), min_size=3, max_size=3),
    st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=3, max_size=3),
    st.lists(st.one_of(st.none(), st.floats(allow_nan=True)), min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.lists(st.datetimes(), min_size=3, max_size=3),
)


@FUZZ
@given(columns=st.dictionaries(KEYS, PARQUET_COLUMNS, max_size=4), rows=st.integers(0, 3))
def test_parquet_reader_on_random_tables(scratch: Path, columns: dict[str, list[Any]],
                                         rows: int) -> None:
    table = pa.table({k: pa.array(v[:rows]) for k, v in columns.items()}) if columns else \
        pa.table({"x": pa.array([1, 2][:rows], type=pa.int64())})
    path = scratch / "log.parquet"
    pq.write_table(table, path)
    _read(path, None)


# --- preprocessing ---------------------------------------------------------------------------


def _reference_kcore(rows: list[tuple[str, str]], min_user: int, min_item: int
                     ) -> list[tuple[str, str]]:
    """The largest sub-log where every user and item has enough rows, by plain repetition."""
    while True:
        users = Counter(u for u, _ in rows)
        items = Counter(i for _, i in rows)
        kept = [(u, i) for u, i in rows if users[u] >= min_user and items[i] >= min_item]
        if len(kept) == len(rows):
            return kept
        rows = kept


LOGS = st.lists(st.tuples(st.sampled_from([f"u{k}" for k in range(8)]),
                          st.sampled_from([f"i{k}" for k in range(10)]),
                          st.integers(0, 6)), min_size=1, max_size=80)


@FUZZ
@given(log=LOGS, min_user=st.integers(0, 5), min_item=st.integers(0, 5),
       with_time=st.booleans(), dedupe=st.booleans())
def test_build_dataset_invariants(log: list[tuple[str, str, int]], min_user: int, min_item: int,
                                  with_time: bool, dedupe: bool) -> None:
    frame = pd.DataFrame(log, columns=["user", "item", "timestamp"]).astype(
        {"timestamp": np.float64})
    if not with_time:
        frame = frame.drop(columns="timestamp")
    prep = Preprocessing(min_user_interactions=min_user, min_item_interactions=min_item,
                         dedupe_consecutive=dedupe)
    try:
        ds = build_dataset(frame, prep, name="fuzz")
    except DataError as exc:
        assert "no interactions left" in str(exc)
        assert not dedupe or min_user or min_item
        if not dedupe:
            assert not _reference_kcore([(u, i) for u, i, _ in log], min_user, min_item)
        return
    off, items, lengths = ds.offsets, ds.items, ds.lengths
    assert off[0] == 0 and off[-1] == len(items) == ds.n_interactions
    assert (lengths >= 1).all() and len(ds.vocab.users) == ds.n_users
    assert items.min() >= 1 and items.max() == ds.n_items
    assert set(np.unique(items)) == set(range(1, ds.n_items + 1))  # every vocab item is used
    assert len(set(ds.vocab.items)) == ds.n_items and len(set(ds.vocab.users)) == ds.n_users
    counts = np.bincount(items, minlength=ds.n_items + 1)[1:]
    assert (lengths >= min_user).all() and (counts >= min_item).all()  # k-core holds
    pairs = Counter((ds.vocab.users[u], ds.vocab.items[i - 1])
                    for u in range(ds.n_users) for i in ds.sequence(u))
    assert not pairs - Counter((u, i) for u, i, _ in log)  # only rows that were in the log
    if not dedupe:  # the iterative filter reached the largest k-core, not just some k-core
        assert pairs == Counter(_reference_kcore([(u, i) for u, i, _ in log], min_user,
                                                 min_item))
    if with_time:
        assert ds.timestamps is not None
        for u in range(ds.n_users):
            assert (np.diff(ds.timestamps[off[u]:off[u + 1]]) >= 0).all()
    again = build_dataset(pd.DataFrame({"user": np.repeat(ds.vocab.users, lengths),
                                        "item": [ds.vocab.items[i - 1] for i in items]}),
                          Preprocessing(min_user, min_item), name="again")
    assert again.n_interactions == ds.n_interactions  # a fixed point: filtering again drops nothing


@FUZZ
@given(log=LOGS, bad=st.sampled_from([np.nan, np.inf, -np.inf]), where=st.integers(0, 79))
def test_build_dataset_on_non_finite_times(log: list[tuple[str, str, int]], bad: float,
                                           where: int) -> None:
    """NaN times are refused with the row named; infinite ones still sort (they are ordered)."""
    frame = pd.DataFrame(log, columns=["user", "item", "timestamp"]).astype(
        {"timestamp": np.float64})
    frame.loc[where % len(frame), "timestamp"] = bad
    try:
        ds = build_dataset(frame, Preprocessing(0, 0), name="fuzz")
    except DataError as exc:
        assert np.isnan(bad) and f"data row {where % len(frame) + 1}" in str(exc)
        return
    assert not np.isnan(bad) and ds.timestamps is not None
    for u in range(ds.n_users):
        assert (np.diff(ds.timestamps[ds.offsets[u]:ds.offsets[u + 1]]) >= 0).all()


# --- damaged run files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def retr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzzrun") / "run"
    sets = ["model.hidden_size=8", "model.num_heads=2", "model.ffn_size=8", "model.max_len=8",
            "model.router_hidden=4", "train.epochs=1", "train.progress=false",
            "train.threads=1", "eval.negatives=10"]
    assert main(["train", "--data", TINY, "--model", "retr", "--out", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    return out


RUN_FILES = ["model.safetensors", "trainer_state.pt", "config.json", "vocab.json", "split.npz",
             "negatives_test.npy", "item_counts.npy", "env.json", "results.json"]


class _Data:
    """The run's dataset, with a short repr for hypothesis' falsifying-example report."""

    def __init__(self, dataset: SequenceDataset) -> None:
        self.dataset = dataset

    def __repr__(self) -> str:
        return f"<dataset {self.dataset.name}>"


@pytest.fixture(scope="module")
def run_dataset(retr_run: Path) -> _Data:
    return _Data(load_dataset(load_config(retr_run).data))


def _load(run: Path, name: str, dataset: SequenceDataset) -> None:
    """Load ``name`` the way the commands do (the same loaders, minus re-reading the data)."""
    if name == "config.json":
        load_config(run)
    elif name == "trainer_state.pt":
        load_trainer_state(run / name)
    elif name in ("env.json", "split.npz", "negatives_test.npy"):
        load_run_data(load_config(run), dataset, run)
    else:  # model.safetensors, vocab.json, item_counts.npy, results.json
        Recommender.load(run)


@FUZZ
@given(name=st.sampled_from(RUN_FILES), cut=st.floats(0, 1), start=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=64), mode=st.sampled_from(["cut", "overwrite"]))
def test_damaged_run_files_load_or_raise_an_error_naming_them(
        retr_run: Path, run_dataset: _Data, scratch: Path, name: str, cut: float,
        start: float, junk: bytes, mode: str) -> None:
    run = scratch / "damaged"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(retr_run, run)
    raw = (run / name).read_bytes()
    if mode == "cut":
        raw = raw[: int(len(raw) * cut)]
    else:
        at = int(len(raw) * start)
        raw = raw[:at] + junk + raw[at + len(junk):]
    (run / name).write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _load(run, name, run_dataset.dataset)
        except (RunDirError, ConfigError) as exc:
            assert name in str(exc), str(exc)


# --- HTTP API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from retr.serving.http import create_app

    out = tmp_path_factory.mktemp("httppop") / "run"
    assert main(["train", "--data", TINY, "--model", "pop", "--out", str(out), "--set",
                 "train.progress=false"]) == 0
    app = create_app(Recommender.load(out), max_batch=4, max_body_bytes=4096, max_k=50,
                     max_history=64)
    return TestClient(app, raise_server_exceptions=False)


FIELD_VALUES = st.one_of(JSON_VALUES, st.lists(st.one_of(st.text(max_size=3),
                                                          st.integers(-3, 200)), max_size=8),
                         st.lists(st.lists(st.sampled_from(["1", "2", "3", 4, "x"]),
                                           max_size=4), max_size=6),
                         st.sampled_from(["skip", "error", "popularity", 0, 1, 50, 51, -1,
                                          10**30, True, 1.5]))
BODIES = st.one_of(
    JSON_VALUES,
    st.dictionaries(st.sampled_from(["history", "histories", "k", "exclude_seen", "candidates",
                                     "unknown", "empty", "extra"]), FIELD_VALUES, max_size=5),
)


def _assert_not_server_error(resp: Any) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        detail = resp.json()["detail"]
        assert isinstance(detail, str) and detail and "Traceback" not in resp.text


@FUZZ
@given(path=st.sampled_from(["/recommend", "/recommend/batch", "/explain"]), body=BODIES)
def test_http_random_json_is_never_a_server_error(client: Any, path: str, body: Any) -> None:
    try:
        content = json.dumps(body, allow_nan=True).encode()
    except (ValueError, OverflowError):
        assume(False)
    _assert_not_server_error(client.post(path, content=content,
                                         headers={"content-type": "application/json"}))


@settings(deadline=None, max_examples=30, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/recommend", "/recommend/batch", "/explain"]),
       raw=st.binary(max_size=200),
       ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_http_random_bytes_are_never_a_server_error(client: Any, path: str, raw: bytes,
                                                    ctype: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    _assert_not_server_error(client.post(path, content=raw, headers=headers))
