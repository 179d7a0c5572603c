"""Faults: SIGKILL mid-epoch and mid-write, corrupted run files, divergence, pickle payloads.

The kill tests run ``retr train`` in a subprocess through ``tests/fault_runner.py``, which pauses
the process at an exact point (inside a training step, or half-way through writing a run file)
so that SIGKILL lands there every time; then ``retr train --resume`` must finish with exactly the
weights of an uninterrupted run, and every file in the run directory must load after each kill.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retr.cli import main
from retr.config import RunConfig
from retr.data.dataset import Vocabulary
from retr.data.splits import Split
from retr.errors import RunDirError
from retr.models import build_model
from retr.runs import load_run
from retr.serving.recommender import Recommender
from retr.training.checkpoint import load_array, load_trainer_state, load_weights
from retr.utils import read_json

from .cli_run import one_error_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("fault_runner.py")
DATA = "synthetic:n_users=300,n_items=120,n_themes=10,min_len=10,max_len=20,seed=2"
# 300 training users in batches of 64: 5 steps per epoch.
STEPS_PER_EPOCH = 5
MODEL = ["model.hidden_size=16", "model.num_heads=2", "model.ffn_size=16", "model.max_len=12",
         "model.router_hidden=8"]
TRAIN = ["train.batch_size=64", "train.lr=0.005", "train.loss='bpr'", "train.progress=false",
         "train.patience=0", "train.threads=1", "eval.negatives=20"]


def _argv(out: Path, epochs: int, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [*MODEL, *TRAIN, f"train.epochs={epochs}", *extra]
    return ["train", "--data", DATA, "--model", "retr", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETR_FAULT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_to_end(argv: list[str]) -> None:
    """Uninterrupted runs and final resumes run in-process (same code, no interpreter start)."""
    assert main(argv) == 0


def _kill_at(argv: list[str], fault: str, tmp_path: Path) -> None:
    """Run until the fault point, SIGKILL the process there, and reap it."""
    ready = tmp_path / f"ready-{fault.replace(':', '-')}-{time.monotonic_ns()}"
    env = {**_env(), "RETR_FAULT": fault, "RETR_FAULT_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, str(RUNNER), *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before reaching {fault}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached {fault}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _epochs_done(run_dir: Path) -> int:
    return len((run_dir / "metrics.jsonl").read_text().splitlines())


def _assert_every_file_loads(run_dir: Path) -> None:
    """What a killed run left behind is whole: each published file loads with retr's loaders."""
    cfg = RunConfig.from_dict(read_json(run_dir / "config.json"))
    read_json(run_dir / "env.json")
    vocab = Vocabulary.load(run_dir / "vocab.json")
    Split.load(run_dir / "split.npz")
    for name in ("negatives_valid.npy", "negatives_test.npy", "item_counts.npy"):
        load_array(run_dir / name)
    for name in ("model.safetensors", "last.safetensors"):
        if (run_dir / name).exists():
            load_weights(build_model(cfg.model_name, vocab.n_items, cfg.model), run_dir / name)
    if (run_dir / "trainer_state.pt").exists():
        state = load_trainer_state(run_dir / "trainer_state.pt")
        assert state["epoch"] == _epochs_done(run_dir) or state["epoch"] + 1 == _epochs_done(run_dir)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() \
            if (run_dir / "metrics.jsonl").exists() else []:
        json.loads(line)


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{a.name}: {k} differs"


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    _assert_same_weights(run_dir / "last.safetensors", reference / "last.safetensors")
    _assert_same_weights(run_dir / "model.safetensors", reference / "model.safetensors")
    got = [{k: v for k, v in json.loads(line).items() if "second" not in k}
           for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [{k: v for k, v in json.loads(line).items() if "second" not in k}
            for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert got == want
    assert json.loads((run_dir / "results.json").read_text())["results"] == \
        json.loads((reference / "results.json").read_text())["results"]
    assert not list(run_dir.glob(".*.tmp")), "a killed write's temporary file was left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 4-epoch run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run_to_end(_argv(out, 4))
    return out


def test_sigkill_mid_epoch_then_resume_is_bit_exact(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Killed in the first epoch, before any checkpoint: resume starts the run over.
    _kill_at(_argv(run, 4), "step:2", tmp_path)
    assert not (run / "trainer_state.pt").exists() and not (run / "metrics.jsonl").exists()
    # Killed in the middle of epoch 3 (step 3 of 5): epochs 1-2 are safe on disk.
    _kill_at(["train", "--resume", str(run)], f"step:{2 * STEPS_PER_EPOCH + 3}", tmp_path)
    assert _epochs_done(run) == 2
    assert load_trainer_state(run / "trainer_state.pt")["epoch"] == 2
    _assert_every_file_loads(run)
    _run_to_end(["train", "--resume", str(run)])
    _assert_same_run(run, reference)


def test_sigkill_mid_checkpoint_write_keeps_last_good_files(reference: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Half of epoch 2's trainer_state.pt is on disk (as a temporary) when the kill lands.
    _kill_at(_argv(run, 4), "write:trainer_state.pt:2", tmp_path)
    assert list(run.glob(".trainer_state.pt.*.tmp")), "the kill did not land mid-write"
    assert load_trainer_state(run / "trainer_state.pt")["epoch"] == 1
    assert _epochs_done(run) == 2  # last.safetensors and metrics.jsonl of epoch 2 were published
    _assert_every_file_loads(run)
    best_before = (run / "model.safetensors").read_bytes()
    # The resumed process redoes epoch 2 and dies writing its best weights.
    _kill_at(["train", "--resume", str(run)], "write:model.safetensors:1", tmp_path)
    assert list(run.glob(".model.safetensors.*.tmp"))
    assert (run / "model.safetensors").read_bytes() == best_before
    _assert_every_file_loads(run)
    _run_to_end(["train", "--resume", str(run)])
    _assert_same_run(run, reference)


class _Crash(BaseException):
    """Stands in for SIGKILL in-process: nothing in retr catches it, no cleanup runs."""


@pytest.mark.slow
def test_crash_at_every_write_of_a_run_then_resume(reference: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every atomic write of a whole run, in turn, is cut half-way; each time the published
    files all load and a resume ends bit-exact. (A crash inside ``write`` leaves a half-written
    temporary, exactly what SIGKILL leaves; the subprocess tests above show the real thing.)"""
    import retr.training.checkpoint as checkpoint
    import retr.utils as utils

    original = utils.atomic_write
    count = 0
    crash_at = 0

    def crashing_write(path: str | Path, write: Callable[[Path], object]) -> None:
        nonlocal count
        count += 1
        if count != crash_at:
            original(path, write)
            return
        tmp = Path(path).with_name(f".{Path(path).name}.crash.tmp")
        write(tmp)
        tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
        raise _Crash(str(path))

    monkeypatch.setattr(utils, "atomic_write", crashing_write)
    monkeypatch.setattr(checkpoint, "atomic_write", crashing_write)
    crash_at = -1
    assert main(_argv(tmp_path / "count", 4)) == 0
    total, crash_at = count, 0
    for point in range(1, total + 1):
        run = tmp_path / f"crash-{point}"
        count, crash_at = 0, point
        with pytest.raises(_Crash):
            main(_argv(run, 4))
        if (run / "metrics.jsonl").exists():
            _assert_every_file_loads(run)
        crash_at = -1
        assert main(["train", "--resume", str(run)] if (run / "config.json").exists()
                    else _argv(run, 4)) == 0
        _assert_same_run(run, reference)


# --- corrupted run files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    assert main(_argv(out, 2)) == 0
    return out


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: bytes(range(256)) * 3,
}
COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "evaluate": lambda d: ["evaluate", str(d)],
    "resume": lambda d: ["train", "--resume", str(d)],
    "recommend": lambda d: ["recommend", str(d), "--history", "1,2,3"],
}
# Which command reads which file (the others never open it).
READERS = {
    "model.safetensors": ("evaluate", "resume", "recommend"),
    "trainer_state.pt": ("resume",),
    "config.json": ("evaluate", "resume", "recommend"),
    "vocab.json": ("recommend",),
    "split.npz": ("evaluate", "resume"),
    "env.json": ("evaluate", "resume"),
    "negatives_valid.npy": ("evaluate", "resume"),
    "negatives_test.npy": ("evaluate", "resume"),
    "item_counts.npy": ("recommend",),
    "results.json": ("recommend",),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("name", sorted(READERS))
def test_corrupted_run_file_gives_one_line_naming_it(small_run: Path, tmp_path: Path, name: str,
                                                     corruption: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for command in READERS[name]:
        run = tmp_path / command
        shutil.copytree(small_run, run)
        (run / name).write_bytes(CORRUPTIONS[corruption]((run / name).read_bytes()))
        code, _, err = run_cli(COMMANDS[command](run), capsys)
        assert code != 0, f"{command} accepted a {corruption} {name}"
        line = one_error_line(err)
        assert line.startswith("retr: error: ") and name in line, line


@pytest.mark.parametrize("name, content", [
    ("config.json", b"[]"), ("env.json", b"1"), ("results.json", b'"x"'),
    ("vocab.json", b'{"users": 3, "items": 4}'), ("split.npz", None),
    ("negatives_test.npy", None), ("trainer_state.pt", b"model"),
    ("trainer_state.pt", b"epoch"), ("trainer_state.pt", b"torch_rng"),
])
def test_well_formed_but_wrong_content_is_named(small_run: Path, tmp_path: Path, name: str,
                                                content: bytes | None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Files that parse but cannot belong to the run (another run's, or damaged values)."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    if name == "split.npz":
        split = Split.load(run / name)
        split.test.users = split.test.users + 10_000
        split.save(run / name)
    elif name == "negatives_test.npy":
        np.save(run / name, np.full((3, 20), 9999, dtype=np.int64))
    elif name == "trainer_state.pt":  # another model's weights, a wrong type, a short RNG
        state = load_trainer_state(run / name)
        state.update({b"model": {"model": {"not.a.parameter": torch.zeros(2)}},
                      b"epoch": {"epoch": "2"},
                      b"torch_rng": {"torch_rng": torch.zeros(10, dtype=torch.uint8)}}[content])
        torch.save(state, run / name)
    else:
        assert content is not None
        (run / name).write_bytes(content)
    for command in (c for c in COMMANDS if c in READERS[name]):
        code, _, err = run_cli(COMMANDS[command](run), capsys)
        assert code != 0, command
        assert name in one_error_line(err)


def test_rng_state_stored_as_a_view_resumes(small_run: Path, tmp_path: Path) -> None:
    """torch.load can return a tensor viewing a shared storage at an offset; torch's
    set_rng_state misreads such a view (a segfault), so resume must copy it first. Run in a
    subprocess so that a regression fails this test instead of killing the session."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    state = load_trainer_state(run / "trainer_state.pt")
    state["torch_rng"] = torch.stack([torch.zeros_like(state["torch_rng"]),
                                      state["torch_rng"]])[1]
    torch.save(state, run / "trainer_state.pt")
    proc = subprocess.run([sys.executable, str(RUNNER), "train", "--resume", str(run)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_corrupted_last_weights_are_named_by_the_api(small_run: Path, tmp_path: Path) -> None:
    """No command reads last.safetensors (resume rewrites it); the API names it when asked."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    raw = (run / "last.safetensors").read_bytes()
    (run / "last.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RunDirError, match="last.safetensors"):
        load_run(run, weights="last.safetensors")
    with pytest.raises(RunDirError, match="last.safetensors"):
        Recommender.load(run, weights="last.safetensors")


def test_missing_run_files_are_named(small_run: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("config.json", "model.safetensors", "split.npz", "env.json", "vocab.json",
                 "negatives_valid.npy"):
        for command in (c for c in COMMANDS if c in READERS[name]):
            run = tmp_path / f"{name}-{command}"
            shutil.copytree(small_run, run)
            (run / name).unlink()
            code, _, err = run_cli(COMMANDS[command](run), capsys)
            assert code != 0 and name in one_error_line(err), (name, command)


# --- divergence --------------------------------------------------------------------------------


def test_nan_loss_from_the_start_stops_with_a_clear_message(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    run = tmp_path / "nan"
    code, _, err = run_cli(_argv(run, 2, ("train.lr=1e30",)), capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert re.search(r"loss became (nan|inf) at epoch 1, step \d+", last), last
    assert "none had been written yet" in last and "train.lr" in last
    assert not (run / "model.safetensors").exists() and not (run / "trainer_state.pt").exists()


def test_nan_loss_after_good_epochs_leaves_best_checkpoint_untouched(
        small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two good epochs, then the optimizer's step size blows up (lr 1e30 from epoch 3 on)."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["epochs"] = 4
    (run / "config.json").write_text(json.dumps(cfg))
    state = load_trainer_state(run / "trainer_state.pt")
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e30
    torch.save(state, run / "trainer_state.pt")
    kept = {n: (run / n).read_bytes() for n in ("model.safetensors", "last.safetensors",
                                                "trainer_state.pt", "metrics.jsonl")}
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert re.search(r"loss became (nan|inf) at epoch 3, step \d+", last), last
    best = int(load_trainer_state(small_run / "trainer_state.pt")["best_epoch"])
    assert f"untouched (last: epoch 2, best: epoch {best})" in last
    assert {n: (run / n).read_bytes() for n in kept} == kept
    code, out, err = run_cli(["evaluate", str(run), "--protocol", "full", "--json"], capsys)
    assert code == 0, err
    saved = [r for r in json.loads((small_run / "results.json").read_text())["results"]
             if r["split"] == "test" and r["protocol"] == "full"]
    assert json.loads(out)["results"][0]["metrics"] == saved[0]["metrics"]


# --- pickle payloads ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this object would create ``marker``: what a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (shutil.copyfile, (__file__, str(self.marker)))


def _payload_files(run: Path, marker: Path) -> dict[str, Callable[[], None]]:
    """Ways to plant the payload in each file type the project loads."""
    evil = _Payload(marker)

    def torch_state() -> None:
        state = load_trainer_state(run / "trainer_state.pt")
        state["history"] = [evil]
        torch.save(state, run / "trainer_state.pt")

    def raw_pickle() -> None:
        (run / "trainer_state.pt").write_bytes(pickle.dumps({"format_version": "1", "x": evil}))

    def npy(name: str) -> Callable[[], None]:
        def plant() -> None:
            with open(run / name, "wb") as fh:
                np.save(fh, np.array([evil, 1], dtype=object), allow_pickle=True)
        return plant

    def npz() -> None:
        arrays = dict(np.load(run / "split.npz"))
        arrays["test_users"] = np.array([evil], dtype=object)
        with open(run / "split.npz", "wb") as fh:
            np.savez(fh, **arrays)

    return {"trainer_state.pt (torch.save)": torch_state,
            "trainer_state.pt (plain pickle)": raw_pickle,
            "negatives_test.npy": npy("negatives_test.npy"),
            "item_counts.npy": npy("item_counts.npy"), "split.npz": npz}


@pytest.mark.parametrize("target", ["trainer_state.pt (torch.save)",
                                    "trainer_state.pt (plain pickle)", "negatives_test.npy",
                                    "item_counts.npy", "split.npz"])
def test_pickle_payload_is_refused_and_never_runs(small_run: Path, tmp_path: Path, target: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    marker = tmp_path / "pwned"
    _payload_files(run, marker)[target]()
    name = target.split(" ")[0]
    if name == "trainer_state.pt":  # the payload is live: unsafe loading would run it
        try:
            torch.load(run / name, weights_only=False)
        except RuntimeError:  # a plain pickle runs the payload, then fails torch's magic check
            pass
        assert marker.exists()
        marker.unlink()
    for command in READERS[name]:
        code, _, err = run_cli(COMMANDS[command](run), capsys)
        line = one_error_line(err)
        assert code != 0 and name in line, (command, err)
        if name == "trainer_state.pt":
            assert "refused to load" in line
        assert not marker.exists(), f"{command} ran the pickle payload in {name}"


def test_no_pickle_loading_anywhere_in_the_library() -> None:
    """Every loader in src refuses pickle: a static guard so a new loader cannot slip in."""
    unsafe = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                        r"read_pickle|import (c?pickle|dill|joblib|shelve|marshal)\b")
    torch_load = re.compile(r"torch\.load\((?![^)]*weights_only=True)")
    found = []
    for path in sorted((ROOT / "src" / "retr").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if unsafe.search(line) or torch_load.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found
