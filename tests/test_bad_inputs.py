"""Bad input end to end: every case gives a non-zero exit and one stderr line, never a traceback.

The files live in ``tests/bad_inputs/``; each row of ``CASES`` says which command reads which
file, the exit code it must end with and a piece of the one-line error. Rows with exit code 0
are inputs that look odd but must work (a BOM and CRLF line ends, a huge k, unknown items among
known ones, a 100,000-item history).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from retr.cli import main

from .cli_run import one_error_line, run_cli

BAD = Path(__file__).with_name("bad_inputs")
TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"
POP = ["--model", "pop", "--data", TINY, "--set", "train.progress=false"]

# (case, argv with {f}=a file in bad_inputs/, {run}=a trained pop run, {tmp}=a scratch dir,
#  expected exit code, expected piece of the error line, or of the output when the exit is 0)
CASES: list[tuple[str, list[str], int, str]] = [
    # interaction logs
    ("truncated gzip", ["data", "describe", "{f}truncated.csv.gz"], 2,
     "truncated.csv.gz: gzip data is truncated or corrupt"),
    ("wrong delimiter, detected", ["data", "describe", "{f}semicolon_delimited.csv"], 2,
     "cannot tell the format"),
    ("wrong delimiter, --format csv",
     ["data", "describe", "{f}semicolon_delimited.csv", "--format", "csv"], 2,
     "columns found: 'user_id;item_id;timestamp'"),
    ("non-UTF-8 bytes", ["data", "describe", "{f}latin1.csv"], 2,
     "latin1.csv:34: bytes are not valid UTF-8"),
    ("random bytes", ["data", "describe", "{f}random_bytes.bin"], 2, "not valid UTF-8"),
    ("missing item column", ["data", "describe", "{f}missing_item_column.csv"], 2,
     "no item column"),
    ("column mapped to a missing name",
     ["data", "describe", "{f}missing_item_column.csv", "--item-col", "sku"], 2,
     "no column 'sku' (given by --item-col)"),
    ("NaN timestamp", ["data", "describe", "{f}nan_timestamp.csv"], 2,
     "nan_timestamp.csv:3: column 'timestamp': timestamp is missing or NaN"),
    ("unparsable timestamp", ["data", "describe", "{f}unparsable_timestamp.csv"], 2,
     "unparsable_timestamp.csv:3: column 'timestamp': cannot parse timestamp 'yesterday'"),
    ("empty file", ["data", "describe", "{f}empty.csv"], 2, "empty.csv: the file is empty"),
    ("header only", ["data", "describe", "{f}header_only.csv"], 2,
     "header_only.csv: the file is empty (it has no interactions)"),
    ("a line too short", ["data", "describe", "{f}ragged.csv"], 2,
     "ragged.csv:4: column 'item_id' is empty or null"),
    ("invalid JSON line", ["data", "describe", "{f}broken.jsonl"], 2,
     "broken.jsonl:2: invalid JSON"),
    ("text named .parquet", ["data", "describe", "{f}not_parquet.parquet"], 2,
     "not a readable parquet file"),
    ("user-lines with a lone user", ["data", "describe", "{f}single_token_lines.txt",
                                     "--format", "user-lines"], 2,
     "single_token_lines.txt:2: line has a user id but no items"),
    ("unknown --format", ["data", "describe", "{f}empty.csv", "--format", "xlsx"], 2,
     "unknown format 'xlsx'"),
    ("no such file", ["data", "describe", "{f}no_such_file.csv"], 2,
     "neither a file nor a known dataset"),
    ("empty after 5-core", ["data", "describe", "{f}too_sparse.csv"], 2,
     "too_sparse.csv: no interactions left after filtering"),
    ("empty after 5-core, train", ["train", "--data", "{f}too_sparse.csv", "--model", "pop",
                                   "--out", "{tmp}run"], 2, "no interactions left"),
    ("bad line, train", ["train", "--data", "{f}ragged.csv", "--model", "pop", "--out",
                         "{tmp}run"], 2, "ragged.csv:4"),
    ("BOM and CRLF work", ["data", "describe", "{f}bom_crlf_ok.csv", "--json"], 0,
     '"interactions": 240'),
    # model sizes: refused before any tensor is allocated
    ("hidden_size 10**9", ["train", "--data", TINY, "--model", "retr", "--set",
                           "model.hidden_size=1000000000", "--out", "{tmp}run"], 2,
     "model.hidden_size = 1,000,000,000 is over the limit of 65,536"),
    ("max_len 10**9", ["train", "--data", TINY, "--model", "sasrec", "--set",
                       "model.max_len=1000000000", "--out", "{tmp}run"], 2,
     "model.max_len = 1,000,000,000 is over the limit of 65,536 positions"),
    ("num_layers 10**6", ["train", "--data", TINY, "--model", "retr", "--set",
                          "model.num_layers=1000000", "--out", "{tmp}run"], 2,
     "model.num_layers = 1,000,000 is over the limit of 256"),
    ("GRU num_layers 10**6", ["train", "--data", TINY, "--model", "gru4rec", "--set",
                              "model.num_layers=1000000", "--out", "{tmp}run"], 2,
     "model.num_layers = 1,000,000 is over the limit of 256"),
    ("weights over memory (16 TiB)", ["train", "--data", TINY, "--model", "retr", "--set",
                                      "model.hidden_size=65536", "--set", "model.num_heads=1",
                                      "--set", "model.num_layers=200", "--out", "{tmp}run"], 2,
     "GiB of memory available; lower model.hidden_size"),
    # configuration
    ("bad TOML", ["train", "--config", "{f}bad_syntax.toml", *POP, "--out", "{tmp}run"], 2,
     "bad_syntax.toml: invalid TOML (Invalid value (at line 3, column 10))"),
    ("TOML not UTF-8", ["config", "show", "--config", "{f}not_utf8.toml"], 2,
     "not_utf8.toml: not UTF-8 text"),
    ("unknown config key", ["train", "--config", "{f}unknown_key.toml", *POP, "--out",
                            "{tmp}run"], 2,
     "unknown_key.toml with command-line overrides: train: unknown key(s) learning_rate"),
    ("wrong-typed config value", ["config", "show", "--config", "{f}wrong_type.toml"], 2,
     "wrong_type.toml: train.epochs: expected an integer, got 'ten'"),
    ("model as a string", ["config", "show", "--config", "{f}model_not_table.toml"], 2,
     "model_not_table.toml: model must be a table"),
    ("missing config file", ["config", "show", "--config", "{f}nope.toml"], 2,
     "nope.toml: config file not found"),
    ("--set without =", ["config", "show", "--set", "train.lr"], 2, "expected key=value"),
    ("--set into a value", ["config", "show", "--set", "train.lr.x=1"], 2,
     "train.lr: expected a number"),
    ("--set section as value", ["config", "show", "--set", "model=3"], 2,
     "model must be a table"),
    ("unknown model", ["config", "show", "--model", "transformer9000"], 2,
     "unknown model 'transformer9000'"),
    ("negative epochs", ["config", "show", "--set", "train.epochs=-1"], 2,
     "train.epochs must be >= 1, got -1"),
    ("argparse: bad integer", ["train", "--seed", "x", *POP, "--out", "{tmp}run"], 2,
     "retr train: error: argument --seed: invalid int value: 'x'"),
    ("argparse: unknown flag", ["evaluate", "{run}", "--fast"], 2,
     "unrecognized arguments: --fast"),
    # recommend
    ("k = 0", ["recommend", "{run}", "--history", "1,2", "-k", "0"], 2, "-k must be >= 1, got 0"),
    ("negative k", ["recommend", "{run}", "--history", "1,2", "-k", "-5"], 2,
     "-k must be >= 1, got -5"),
    ("k not a number", ["recommend", "{run}", "--history", "1,2", "-k", "ten"], 2,
     "argument -k/--k: invalid int value: 'ten'"),
    ("huge k is every item", ["recommend", "{run}", "--history", "1,2", "-k", "10" * 12,
                              "--json", "--keep-seen"], 0, '"items"'),
    ("only unknown items", ["recommend", "{run}", "--history", "nope1,nope2"], 2,
     "history has no known item (every id was unknown)"),
    ("unknown items skipped", ["recommend", "{run}", "--history", "nope1,1,2"], 0,
     "skipped unknown: nope1"),
    ("unknown items refused", ["recommend", "{run}", "--history", "nope1,1", "--unknown",
                               "error"], 2, "unknown item id(s) 'nope1'"),
    ("empty history", ["recommend", "{run}", "--history", ","], 2, "history has no known item"),
    ("history id with undecodable bytes", ["recommend", "{run}", "--history", "1,a\udcff"], 2,
     "history[1]: item id 'a\\udcff' is not valid Unicode text"),
    ("unknown candidates", ["recommend", "{run}", "--history", "1", "--candidates", "x,y"], 2,
     "none of the candidate ids is known"),
    ("histories: bad JSON", ["recommend", "{run}", "--input", "{f}histories_bad_json.jsonl"], 2,
     "histories_bad_json.jsonl:2: invalid JSON"),
    ("histories: no usable column", ["recommend", "{run}", "--input",
                                     "{f}histories_no_columns.csv"], 2, "no user column"),
    ("histories: bad timestamp", ["recommend", "{run}", "--input",
                                  "{f}histories_bad_time.csv"], 2,
     "row 2: timestamp 'soon' is not a number"),
    ("histories: unknown extension", ["recommend", "{run}", "--input",
                                      "{f}random_bytes.bin"], 2, "cannot tell the format"),
    ("--output without --input", ["recommend", "{run}", "--history", "1", "--output",
                                  "{tmp}x.csv"], 2, "--output goes with --input"),
    # serve
    ("serve --read-timeout 0", ["serve", "{run}", "--read-timeout", "0"], 2,
     "--read-timeout must be > 0 seconds, got 0.0"),
    ("serve --max-idle 0", ["serve", "{run}", "--max-idle", "0"], 2,
     "--max-idle must be >= 1, got 0"),
    # run directories
    ("no such run", ["evaluate", "{tmp}missing"], 2, "no such run directory"),
    ("empty run dir", ["recommend", "{tmp}", "--history", "1"], 2,
     "config.json: file missing from the run directory"),
    ("a file as run dir", ["evaluate", "{f}empty.csv"], 2, "no such run directory"),
    ("resume a missing run", ["train", "--resume", "{tmp}missing"], 2, "no such run directory"),
    ("overwrite a run", ["train", *POP, "--out", "{run}"], 2, "already holds a run"),
    ("train without --out", ["train", *POP], 2, "--out RUN_DIR is required"),
]


@pytest.fixture(scope="module")
def pop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pop") / "run"
    assert main(["train", *POP, "--out", str(out)]) == 0
    return out


def _fill(argv: list[str], run: Path, tmp: Path) -> list[str]:
    return [a.replace("{f}", f"{BAD}/").replace("{run}", str(run)).replace("{tmp}", f"{tmp}/")
            for a in argv]


@pytest.mark.parametrize("case, argv, code, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(case: str, argv: list[str], code: int, needle: str, pop_run: Path,
                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got, out, err = run_cli(_fill(argv, pop_run, tmp_path), capsys)
    assert got == code, err
    if code == 0:
        assert "Traceback" not in err and needle in out + err
        return
    line = one_error_line(err)
    assert needle in line, line
    assert not (tmp_path / "run" / "config.json").exists(), "a failed start left a run behind"


def test_every_corpus_file_is_in_the_table() -> None:
    used = {Path(a.replace("{f}", "")).name for _, argv, _, _ in CASES for a in argv
            if a.startswith("{f}")}
    assert {p.name for p in BAD.iterdir()} <= used


def test_huge_k_returns_the_whole_catalogue(pop_run: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["recommend", str(pop_run), "--history", "1", "-k", str(10**15),
                              "--json"], capsys)
    assert code == 0, err
    n_items = len(json.loads((pop_run / "vocab.json").read_text())["items"])
    assert len(json.loads(out)["items"]) == n_items - 1  # all but the one history item


def test_100k_item_history_is_truncated_and_works(pop_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    items = json.loads((pop_run / "vocab.json").read_text())["items"]
    history = [items[i % 20] for i in range(100_000)]  # 20 items seen, the rest rankable
    code, out, err = run_cli(["recommend", str(pop_run), "--history", ",".join(history),
                              "--json", "-k", "5"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["truncated"] and 0 < len(result["used_history"]) < 100_000
    assert len(result["items"]) == 5
    code, out, err = run_cli(["recommend", str(pop_run), "--history", ",".join(history),
                              "-k", "5"], capsys)
    assert code == 0 and "history truncated to its last" in err
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "history": history}) + "\n")
    code, out, err = run_cli(["recommend", str(pop_run), "--input", str(path), "-k", "5",
                              "--no-progress"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["id"] == "long" and row["truncated"] and len(row["items"]) == 5


# --- generated inputs: too big to keep in the corpus, or made from a trained run --------------

SASREC = ["--model", "sasrec", "--data", TINY, "--set", "train.progress=false", "--set",
          "train.epochs=1", "--set", "model.hidden_size=16", "--set", "model.num_heads=2",
          "--set", "model.max_len=10"]


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sasrec") / "run"
    assert main(["train", *SASREC, "--out", str(out)]) == 0
    return out


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_json(run: Path, name: str) -> None:
    (run / name).write_text('{"format_version": 1, "x": ' + _nested(150_000) + "}\n")


def _other_shapes(run: Path, name: str) -> None:
    """Weights with the run's tensor names but another vocabulary's shapes."""
    from retr.config import RunConfig
    from retr.models import build_model
    from retr.training.checkpoint import save_weights
    from retr.utils import read_json

    cfg = RunConfig.from_dict(read_json(run / "config.json"))
    n_items = len(json.loads((run / "vocab.json").read_text())["items"])
    save_weights(build_model(cfg.model_name, n_items + 5, cfg.model), run / name)


def _huge_model(run: Path, name: str) -> None:
    cfg = json.loads((run / name).read_text())
    cfg["model"]["hidden_size"] = 10**9
    (run / name).write_text(json.dumps(cfg))


RUN_CASES: list[tuple[str, str, object, list[str], str]] = [
    # (case, file changed, how, command with {run}, expected piece of the one error line)
    ("config.json nested 150k deep", "config.json", _deep_json, ["evaluate", "{run}"],
     "config.json: corrupted JSON (nested deeper than 64 levels"),
    ("config.json nested, recommend", "config.json", _deep_json,
     ["recommend", "{run}", "--history", "1"], "config.json: corrupted JSON (nested deeper"),
    ("results.json nested 150k deep", "results.json", _deep_json,
     ["recommend", "{run}", "--history", "1"], "results.json: corrupted JSON (nested deeper"),
    ("wrong shapes, evaluate", "model.safetensors", _other_shapes, ["evaluate", "{run}"],
     "model.safetensors: tensor 'item_embedding.table.weight' has shape"),
    ("wrong shapes, recommend", "model.safetensors", _other_shapes,
     ["recommend", "{run}", "--history", "1"], "model.safetensors: tensor 'item_embedding"),
    ("wrong shapes, serve", "model.safetensors", _other_shapes, ["serve", "{run}", "--port", "1"],
     "model.safetensors: tensor 'item_embedding"),
    ("wrong shapes, resume", "model.safetensors", _other_shapes,
     ["train", "--resume", "{run}"], "model.safetensors: tensor 'item_embedding"),
    ("hidden_size 10**9 in config.json", "config.json", _huge_model,
     ["recommend", "{run}", "--history", "1"], "model.hidden_size = 1,000,000,000 is over"),
]


@pytest.mark.parametrize("case, name, change, argv, needle", RUN_CASES,
                         ids=[c[0] for c in RUN_CASES])
def test_damaged_run_directory(case: str, name: str, change: Callable[[Path, str], None],
                               argv: list[str], needle: str, sasrec_run: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(sasrec_run, run)
    (run / "manifest.json").unlink(missing_ok=True)  # these probe the loaders themselves
    change(run, name)
    code, _, err = run_cli([a.replace("{run}", str(run)) for a in argv], capsys)
    assert code == 2, err
    assert needle in one_error_line(err)


def test_deeply_nested_toml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("[train]\nepochs = " + _nested(200_000) + "\n")
    code, _, err = run_cli(["config", "show", "--config", str(path)], capsys)
    assert code == 2
    assert "deep.toml: invalid TOML (nested deeper than 64 levels)" in one_error_line(err)


# --- inputs that would take all memory ---------------------------------------------------------


def _gzip_stream(path: Path, head: bytes, block: bytes, total: int) -> None:
    """Write gzip data inflating to about ``total`` bytes without holding them in memory."""
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    with path.open("wb") as fh:
        fh.write(comp.compress(head))
        for _ in range(total // len(block)):
            fh.write(comp.compress(block))
        fh.write(comp.flush())


def test_device_as_data_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["data", "describe", "/dev/zero"],
                 ["train", "--data", "/dev/zero", "--model", "pop", "--out", str(tmp_path / "r")]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2
        assert "/dev/zero: not a regular file" in one_error_line(err)


_PEAK = """
import resource, sys
import retr.data.load  # the libraries (numpy, pandas, torch) are loaded before measuring
from retr.cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(["data", "describe", sys.argv[1]])
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(code, grew // 1024)
"""


@pytest.mark.parametrize("what, head, block, total, needle", [
    ("zeros", b"", b"\0" * (1 << 20), 1 << 28, "inflates more than 100 times"),
    ("repetitive CSV", b"user_id,item_id,timestamp\n",  # 20 rows repeated: about 230x
     b"".join(b"%d,%d,%d\n" % (i % 50, i % 37, 10**9 + i) for i in range(20)) * 2000, 1 << 28,
     "inflates more than 100 times"),
])
def test_gzip_bombs_stop_early_in_bounded_memory(tmp_path: Path, what: str, head: bytes,
                                                 block: bytes, total: int, needle: str) -> None:
    """A .gz of under 1 MB inflating to 256 MiB is refused after about 64 MiB, not read whole.

    The peak growth is measured in a fresh process, after the libraries are loaded."""
    import subprocess
    import sys

    path = tmp_path / "bomb.csv.gz"
    _gzip_stream(path, head, block, total)
    assert path.stat().st_size < 8 * 2**20
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True,
                          text=True, timeout=300)
    code, grew_mb = (int(x) for x in proc.stdout.split())
    assert code == 2 and needle in one_error_line(proc.stderr), proc.stderr
    assert grew_mb < 200, f"{what}: peak memory grew by {grew_mb} MB"  # was 2.4 GB for 1 GiB


def test_input_over_the_read_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    rows = "".join(f'{{"user_id": "u{i % 97}", "item_id": "i{i % 89}"}}\n' for i in range(20_000))
    plain, packed = tmp_path / "log.jsonl", tmp_path / "log.jsonl.gz"
    plain.write_text(rows)
    packed.write_bytes(gzip.compress(rows.encode()))
    monkeypatch.setenv("RETR_MAX_INPUT_BYTES", "100000")
    code, _, err = run_cli(["data", "describe", str(plain)], capsys)
    assert code == 2
    assert f"log.jsonl: is {len(rows):,} bytes, over the 100,000-byte limit" in \
        one_error_line(err)
    code, _, err = run_cli(["data", "describe", str(packed)], capsys)
    assert code == 2
    assert "log.jsonl.gz: decompresses to more than 100,000 bytes" in one_error_line(err)
    csv = tmp_path / "log.csv"  # streamed: its memory follows the rows, not the text
    csv.write_text("user_id,item_id\n" + "".join(f"u{i % 97},i{i % 89}\n" for i in range(20_000)))
    code, out, err = run_cli(["data", "describe", str(csv), "--no-filter", "--json"], capsys)
    assert code == 0 and '"interactions": 20000' in out, err
    monkeypatch.setenv("RETR_MAX_INPUT_BYTES", str(len(rows)))
    code, out, err = run_cli(["data", "describe", str(packed), "--no-filter", "--json"], capsys)
    assert code == 0 and '"interactions": 20000' in out, err
    monkeypatch.setenv("RETR_MAX_INPUT_BYTES", "lots")
    code, _, err = run_cli(["data", "describe", str(plain)], capsys)
    assert code == 2 and "$RETR_MAX_INPUT_BYTES must be a number of bytes" in one_error_line(err)


def test_history_files_are_bounded_too(pop_run: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`retr recommend --input` hands files to pandas: the same checks run before it does."""
    import gzip

    packed = tmp_path / "histories.csv.gz"
    packed.write_bytes(gzip.compress(b"user,item\n" + b"u1,1\n" * 50_000))
    monkeypatch.setenv("RETR_MAX_INPUT_BYTES", "100000")
    code, _, err = run_cli(["recommend", str(pop_run), "--input", str(packed)], capsys)
    assert code == 2
    assert "histories.csv.gz: decompresses to more than 100,000 bytes" in one_error_line(err)
    code, _, err = run_cli(["recommend", str(pop_run), "--input", "/dev/zero", "--input-format",
                            "csv"], capsys)
    assert code == 2 and "/dev/zero: not a regular file" in one_error_line(err)
