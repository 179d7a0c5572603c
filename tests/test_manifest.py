"""Run-directory manifests (checksums verified on load) and format versions."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from retr.cli import main
from retr.errors import RunDirError
from retr.manifest import MANIFEST, verify_manifest, write_manifest
from retr.runs import load_run
from retr.serving.recommender import Recommender
from retr.utils import sha256_file

from .cli_run import one_error_line, run_cli

TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"
SASREC = ["--model", "sasrec", "--data", TINY, "--set", "train.progress=false", "--set",
          "train.epochs=2", "--set", "model.hidden_size=16", "--set", "model.num_heads=2",
          "--set", "model.max_len=10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sasrec") / "run"
    assert main(["train", *SASREC, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _flip_inside_a_tensor(path: Path) -> None:
    """Change bytes in the data of a tensor; the safetensors header stays valid."""
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header + (len(raw) - 8 - header) // 3
    for i in range(start, start + 64):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_finished_run_lists_every_file_with_its_checksum(run: Path) -> None:
    manifest = json.loads((run / MANIFEST).read_text())
    files = sorted(p.name for p in run.iterdir() if p.is_file() and p.name != MANIFEST)
    assert manifest["format_version"] == 1 and sorted(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (run / name).stat().st_size, "sha256": sha256_file(run / name)}
    newest = max((run / n).stat().st_mtime_ns for n in files)
    assert (run / MANIFEST).stat().st_mtime_ns >= newest, "the manifest must be written last"
    assert verify_manifest(run) is True


@pytest.mark.parametrize("argv", [["evaluate", "{run}"],
                                  ["recommend", "{run}", "--history", "1,2"],
                                  ["explain", "{run}", "--history", "1,2"],
                                  ["serve", "{run}", "--port", "1"]])
def test_flipped_bytes_inside_a_tensor_are_named(copy: Path, argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _flip_inside_a_tensor(copy / "model.safetensors")
    code, _, err = run_cli([a.replace("{run}", str(copy)) for a in argv], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "model.safetensors: checksum differs from the one in manifest.json" in line, line


def test_api_loaders_verify(copy: Path) -> None:
    _flip_inside_a_tensor(copy / "last.safetensors")
    with pytest.raises(RunDirError, match="last.safetensors: checksum differs"):
        load_run(copy)
    with pytest.raises(RunDirError, match="last.safetensors: checksum differs"):
        Recommender.load(copy, weights="last.safetensors")
    Recommender.load(copy)  # serving reads only its own files: model.safetensors is intact


def test_resized_and_missing_files_are_named(copy: Path) -> None:
    (copy / "results.json").write_text((copy / "results.json").read_text() + " ")
    with pytest.raises(RunDirError, match=r"results.json: [\d,]+ bytes, but manifest.json records"):
        Recommender.load(copy)
    (copy / "results.json").unlink()
    with pytest.raises(RunDirError, match="results.json: listed in manifest.json but missing"):
        Recommender.load(copy)


def test_a_run_without_manifest_loads_unverified(copy: Path) -> None:
    """Runs written before manifests existed (or interrupted ones) still load."""
    (copy / MANIFEST).unlink()
    assert verify_manifest(copy) is False
    assert Recommender.load(copy).recommend(["1", "2"], k=3).items
    load_run(copy)


def test_corrupted_manifest_is_named(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / MANIFEST).write_text('{"format_version": 1, "files": {"config.json": 3}}')
    code, _, err = run_cli(["evaluate", str(copy)], capsys)
    assert code == 2 and "manifest.json: corrupted manifest" in one_error_line(err)


def test_resume_rewrites_the_manifest(copy: Path) -> None:
    assert main(["train", "--resume", str(copy)]) == 0
    assert verify_manifest(copy) is True
    assert json.loads((copy / MANIFEST).read_text())["files"]["results.json"]["sha256"] == \
        sha256_file(copy / "results.json")


@pytest.mark.parametrize("name, argv", [
    ("config.json", ["evaluate", "{run}"]),
    ("config.json", ["recommend", "{run}", "--history", "1"]),
    ("vocab.json", ["recommend", "{run}", "--history", "1"]),
    ("model.safetensors", ["recommend", "{run}", "--history", "1"]),
    (MANIFEST, ["evaluate", "{run}"]),
])
def test_unknown_format_version_is_refused(copy: Path, name: str, argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if name == "model.safetensors":
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(copy / name)), str(copy / name), metadata={"format_version": "99"})
    else:
        obj = json.loads((copy / name).read_text())
        obj["format_version"] = 99
        (copy / name).write_text(json.dumps(obj))
    if name != MANIFEST:
        write_manifest(copy)  # a consistent run directory, only from another format
    code, _, err = run_cli([a.replace("{run}", str(copy)) for a in argv], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"{name}: format_version" in line and "99" in line, line
    assert "is not one this release of retr reads (1)" in line, line
