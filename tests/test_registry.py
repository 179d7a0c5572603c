"""Dataset registry and verified downloads (network: a local http.server on 127.0.0.1 only)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from retr.data import registry
from retr.data.download import (
    download,
    extract_zip,
    file_checksum,
    parse_checksum,
    verify_checksum,
)
from retr.data.registry import DatasetEntry, Source
from retr.errors import DataError

NAMES = {"ml-1m", "ml-100k", "beauty", "sports", "yelp", "lastfm", "office", "magazine",
         "musical-instruments"}


class _Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                super().do_GET()

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    served = tmp_path / "served"
    served.mkdir()
    srv = _Server(served)
    yield srv
    srv.close()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- registry ------------------------------------------------------------------------------


def test_data_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETR_DATA_DIR", str(tmp_path / "d"))
    assert registry.data_dir() == tmp_path / "d"
    monkeypatch.delenv("RETR_DATA_DIR")
    default = registry.data_dir()
    assert default.name == "data" and "retr" in default.parts


def test_entries_complete_and_consistent() -> None:
    entries = registry.list_datasets()
    assert {e.name for e in entries} == NAMES
    for e in entries:
        assert e.description and e.license and e.sources and e.n_interactions
        assert all(not f.startswith("/") and ".." not in f for f in e.files)
        for src in e.sources:
            assert src.url.startswith(("https://", "http://"))
            if src.checksum is not None:
                parse_checksum(src.checksum)
        verified = {rel for s in e.sources if s.checksum for rel in s.provides}
        stems = {r.removesuffix(".gz") for r in verified}
        assert any(all(f.removesuffix(".gz") in stems for f in lay.files) for lay in e.layouts()), \
            f"{e.name}: no layout is fully downloadable from verified sources"
    assert registry.get_entry("magazine").columns is not None


def test_get_entry_names_aliases_and_unknown() -> None:
    assert registry.get_entry("Beauty").name == "beauty"
    assert registry.get_entry("Sports_and_Outdoors").name == "sports"
    assert registry.get_entry("ML-1M").name == "ml-1m"
    assert registry.get_entry("Musical_Instruments").name == "musical-instruments"
    with pytest.raises(DataError, match=r"unknown dataset 'amazon'.*ml-100k.*beauty.*synthetic"):
        registry.get_entry("amazon")


def test_is_registered() -> None:
    assert registry.is_registered("yelp") and registry.is_registered("LastFM")
    assert registry.is_registered("synthetic") and registry.is_registered("synthetic:seed=2")
    assert not registry.is_registered("data/beauty.csv")
    assert not registry.is_registered("no-such-set")


def test_missing_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETR_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        registry.load_log("beauty")
    msg = str(err.value)
    assert str(tmp_path / "Beauty" / "Beauty.txt") in msg
    assert "RETR_DATA_DIR" in msg and "retr data download beauty" in msg
    with pytest.raises(DataError, match=r"ratings\.dat"):
        registry.load_log("ml-1m", data_dir=tmp_path)


def test_load_local_layouts(tmp_path: Path) -> None:
    (tmp_path / "Beauty").mkdir()
    (tmp_path / "Beauty" / "Beauty.txt").write_text("1 1 2 3\n2 2 3\n")
    log = registry.load_log("beauty", data_dir=tmp_path)
    assert log["user"].tolist() == ["1", "1", "1", "2", "2"]
    assert log["item"].tolist() == ["1", "2", "3", "2", "3"]

    office = tmp_path / "Office"
    office.mkdir()
    (office / "train.csv").write_text("user_id\titem_id\ttime\n1\t1\t10\n1\t2\t20\n")
    (office / "dev.csv").write_text("user_id\titem_id\ttime\tneg_items\n1\t3\t30\t[5, 6]\n")
    with gzip.open(office / "test.csv.gz", "wt") as fh:
        fh.write("user_id\titem_id\ttime\tneg_items\n1\t4\t40\t[5, 6]\n")
    log = registry.load_log("office", data_dir=tmp_path)
    assert log["item"].tolist() == ["1", "2", "3", "4"]
    assert log["timestamp"].tolist() == [10.0, 20.0, 30.0, 40.0]

    mag = tmp_path / "Magazine_Subscriptions"
    mag.mkdir()
    (mag / "Magazine_Subscriptions.csv").write_text("B0001,AUSER1,5.0,1005177600\n"
                                                    "B0002,AUSER1,4.0,1005177700\n")
    log = registry.load_log("magazine", data_dir=tmp_path)
    assert log["user"].tolist() == ["AUSER1", "AUSER1"]
    assert log["item"].tolist() == ["B0001", "B0002"]
    assert log["rating"].tolist() == [5.0, 4.0]


def test_ml1m_reads_sequences_or_downloaded_ratings(tmp_path: Path) -> None:
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    log = registry.load_log("ml-1m", data_dir=tmp_path)
    assert log["item"].tolist() == ["1193", "661"] and "timestamp" in log.columns
    with gzip.open(tmp_path / "ml-1m" / "ml-1m.user_sequences.txt.gz", "wt") as fh:
        fh.write("1 3186 1721 1022\n")
    log = registry.load_log("ml-1m", data_dir=tmp_path)
    assert log["item"].tolist() == ["3186", "1721", "1022"]


def test_load_synthetic_through_registry() -> None:
    log = registry.load_log("synthetic:n_users=30,seed=1")
    assert log["user"].nunique() == 30
    with pytest.raises(DataError, match="generated"):
        registry.download_dataset("synthetic")


# --- download ------------------------------------------------------------------------------


def test_parse_checksum() -> None:
    assert parse_checksum("MD5:" + "A" * 32) == ("md5", "a" * 32)
    for bad in ("abc", "sha1:" + "0" * 40, "sha256:1234", "md5:" + "z" * 32):
        with pytest.raises(DataError, match="checksum"):
            parse_checksum(bad)


def test_file_checksums_match_git_and_hashlib(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"hello\n")
    assert file_checksum(p, "gitblob") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert file_checksum(p, "md5") == hashlib.md5(b"hello\n").hexdigest()
    assert verify_checksum(p, _sha(b"hello\n"))


def test_download_good(server: _Server, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    (server.root / "data.bin").write_bytes(payload)
    dest = tmp_path / "out" / "data.bin"
    assert download(server.url("data.bin"), dest, _sha(payload), progress=False) == dest
    assert dest.read_bytes() == payload
    assert _leftovers(dest.parent) == ["data.bin"]
    md5 = "md5:" + hashlib.md5(payload).hexdigest()
    assert download(server.url("data.bin"), tmp_path / "b", md5, progress=False).exists()


def test_download_checksum_mismatch_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    (server.root / "data.bin").write_bytes(b"tampered")
    dest = tmp_path / "out" / "data.bin"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(server.url("data.bin"), dest, _sha(b"original"), progress=False)
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_download_http_error(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "missing.bin"
    with pytest.raises(DataError, match="HTTP 404"):
        download(server.url("missing.bin"), dest, _sha(b"x"), progress=False)
    assert _leftovers(dest.parent) == []


def test_unreachable_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "*")
    with pytest.raises(DataError, match="could not reach"):
        download("http://127.0.0.1:9/x", tmp_path / "x", _sha(b"x"), progress=False, timeout=2)
    assert _leftovers(tmp_path) == []


def test_unverified_refused_unless_allowed(server: _Server, tmp_path: Path) -> None:
    (server.root / "data.bin").write_bytes(b"abc")
    dest = tmp_path / "data.bin"
    with pytest.raises(DataError, match="no checksum.*allow_unverified"):
        download(server.url("data.bin"), dest, None, progress=False)
    assert server.requests == [] and not dest.exists()
    download(server.url("data.bin"), dest, None, allow_unverified=True, progress=False)
    assert dest.read_bytes() == b"abc"


def test_extract_zip_members_and_zip_slip(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/ratings.dat", "1::2::3::4\n")
        zf.writestr("../evil.txt", "x")
    out = tmp_path / "out"
    written = extract_zip(archive, out, [("top/ratings.dat", "ml/ratings.dat")])
    assert written == [out / "ml" / "ratings.dat"] and written[0].read_text() == "1::2::3::4\n"
    with pytest.raises(DataError, match="outside"):
        extract_zip(archive, out)
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(DataError, match="not in the archive"):
        extract_zip(archive, out, [("nope", "nope")])
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        extract_zip(tmp_path / "bad.zip", out)


def test_download_dataset_end_to_end(server: _Server, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Mirror fallback, zip unpacking, unverified skipping and load_log(download=True)."""
    archive = server.root / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("toy/u.data", "1\t10\t5\t100\n1\t11\t4\t200\n2\t10\t3\t150\n")
    text = b"item text\n"
    (server.root / "text.txt").write_bytes(text)
    entry = DatasetEntry(
        name="toy", description="toy", files=("Toy/u.data",), fmt="movielens",
        has_timestamps=True, license="test data", n_interactions=3,
        sources=(
            Source(server.url("gone.zip"), "Toy/toy.zip", _sha(b"?"),
                   unpack=(("toy/u.data", "Toy/u.data"),)),
            Source(server.url("toy.zip"), "Toy/toy.zip", _sha(archive.read_bytes()),
                   unpack=(("toy/u.data", "Toy/u.data"),)),
            Source(server.url("text.txt"), "Toy/text.txt", None, part="item-text"),
        ),
    )
    monkeypatch.setitem(registry._BY_NAME, "toy", entry)
    data = tmp_path / "data"
    with pytest.raises(DataError, match="item-text.*no checksum known"):
        registry.load_log("toy", data_dir=data, download=True)
    assert _leftovers(data / "Toy") == ["u.data"]
    log = registry.load_log("toy", data_dir=data)
    assert len(log) == 3 and log["timestamp"].tolist() == [100.0, 200.0, 150.0]
    n = len(server.requests)
    folder = registry.download_dataset("toy", data_dir=data, allow_unverified=True, progress=False)
    assert folder == data / "Toy" and (folder / "text.txt").read_bytes() == text
    assert len(server.requests) == n + 1  # the present interaction file is not fetched again


# --- real data (opt-in) ----------------------------------------------------------------------

README_ROWS = {"ml-1m": 1_000_209, "ml-100k": 100_000, "beauty": 198_502, "sports": 296_337,
               "yelp": 316_354, "lastfm": 52_551, "office": 53_258, "magazine": 89_689,
               "musical-instruments": 10_261}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_real_dataset_row_counts(name: str) -> None:
    root = os.environ.get("RETR_DATA_DIR")
    if not root:
        pytest.skip("set RETR_DATA_DIR to a directory holding the benchmark data")
    log = registry.load_log(name, data_dir=Path(root))
    assert isinstance(log, pd.DataFrame)
    assert len(log) == README_ROWS[name] == registry.get_entry(name).n_interactions
    assert log["user"].map(type).eq(str).all()
