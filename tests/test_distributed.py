"""Data-parallel training: two gloo processes against one, and an exact multi-process resume.

The two ranks are started the way torchrun starts them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
in the environment, running ``python -m retr train``), but meet through a rendezvous file
(``RETR_DIST_INIT=file://...``) and loopback-only gloo sockets, so the test opens no port beyond
127.0.0.1. Both tests use two cores for a few seconds and are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retr.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:n_users=300,n_items=120,n_themes=10,min_len=10,max_len=20,seed=2"
SASREC = ["model.hidden_size=16", "model.num_heads=2", "model.max_len=12", "model.dropout=0.0"]
RETR = ["model.hidden_size=16", "model.num_heads=2", "model.ffn_size=16", "model.max_len=12",
        "model.router_hidden=8"]
TRAIN = ["train.batch_size=64", "train.lr=0.005", "train.progress=false", "train.patience=0",
         "train.threads=1", "eval.negatives=20"]
# Tolerances of two-process vs one-process training at the same global batch (64), 3 epochs of
# 5 steps. The gradients agree up to float summation order; Adam's first steps move each weight
# by about lr whatever the gradient's size, so a near-zero gradient component whose sign the
# rounding flips moves that weight by up to 2 * lr: weights agree to 2 * lr, losses to 1e-5.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2 * 0.005
METRIC_ATOL = 0.02


def _argv(model: str, sets: list[str], out: Path, epochs: int) -> list[str]:
    return ["train", "--data", DATA, "--model", model, "--out", str(out),
            *[a for s in [*sets, *TRAIN, f"train.epochs={epochs}"] for a in ("--set", s)]]


def _launch(argv: list[str], tmp_path: Path, world: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """Run ``retr ARGV`` as ``world`` ranks of one job and wait for all of them."""
    rdzv = tmp_path / f"rdzv-{len(list(tmp_path.glob('rdzv-*')))}"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "RETR_DIST_INIT": f"file://{rdzv}",
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "retr", *argv], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert all(d.returncode == 0 for d in done), "\n".join(
        f"rank {rank} (exit {d.returncode}): {d.stderr}" for rank, d in enumerate(done))
    return done


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _valid(run: Path) -> dict[str, float]:
    results = json.loads((run / "results.json").read_text())["results"]
    return next(r["metrics"] for r in results if r["split"] == "valid" and r["protocol"] == "full")


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    sets = [*SASREC, "train.loss='ce'"]  # no dropout, no sampled negatives: same math per step
    two, one = tmp_path / "two", tmp_path / "one"
    rank0, rank1 = _launch(_argv("sasrec", sets, two, 3), tmp_path)
    assert "NDCG@10" in rank0.stdout and "run directory" in rank0.stdout
    assert rank1.stdout == "" and rank1.stderr == "", "only rank 0 prints"
    assert main(_argv("sasrec", sets, one, 3)) == 0
    capsys.readouterr()
    assert _losses(two) == pytest.approx(_losses(one), rel=LOSS_RTOL)
    a, b = load_file(str(two / "last.safetensors")), load_file(str(one / "last.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= WEIGHT_ATOL, worst
    for name, value in _valid(one).items():
        assert abs(_valid(two)[name] - value) <= METRIC_ATOL, name
    assert not (two / "tensorboard").exists() and len(_losses(two)) == 3


@pytest.mark.slow
def test_multi_process_resume_is_bit_exact(tmp_path: Path) -> None:
    """Dropout, stochastic routes and BPR negatives on two ranks; resumed after epoch 2."""
    sets = [*RETR, "train.loss='bpr'"]
    full, part = tmp_path / "full", tmp_path / "part"
    _launch(_argv("retr", sets, full, 4), tmp_path)
    _launch(_argv("retr", sets, part, 2), tmp_path)
    state = torch.load(part / "trainer_state.pt", weights_only=True)
    assert state["torch_rng_ranks"].shape[0] == 2  # every rank's dropout stream is saved
    cfg = json.loads((part / "config.json").read_text())
    cfg["train"]["epochs"] = 4
    (part / "config.json").write_text(json.dumps(cfg))
    _launch(["train", "--resume", str(part)], tmp_path)
    a, b = load_file(str(full / "last.safetensors")), load_file(str(part / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(full) == _losses(part)
