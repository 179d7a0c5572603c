"""What several benchmark scripts share: running one ``retr`` command into a JSON record
(`grid`, `cross_domain`, `pathway_only`), where and with which code a measurement ran, and peak
memory.

A record is ``<out>/<name>.json``: the exact command, the hardware, the commit of the code,
wall time, epochs and training seconds, how training ended and the command's JSON results.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hardware(argv: list[str]) -> str:
    """Where a run ran, for its record: the GPU's name for a CUDA run, else the CPU count."""
    text = f"{platform.machine()}, {os.cpu_count()} CPUs"
    devices = [a.split("=", 1)[1] for a in argv if a.startswith("train.device=")]
    if devices and devices[-1].startswith("cuda"):  # the last override is the one in force
        try:
            proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True)
            names = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
        except OSError:
            names = []
        text += f", {names[0].strip() if names else 'CUDA device'}"
    return text


def code_version() -> str:
    """The commit the run's code came from ("-dirty" when src/ had local changes), else the
    package version: rows made by different code can be told apart."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"],
                               capture_output=True, text=True)
    except OSError:
        head = dirty = None
    if head is not None and dirty is not None and head.returncode == 0:
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    import retr

    return f"retr {retr.__version__}"


def median_epoch_seconds(epochs: list[dict[str, Any]]) -> float | None:
    """The typical epoch: robust to one epoch slowed by a paused or busy machine."""
    return round(statistics.median(e["train_seconds"] for e in epochs), 2) if epochs else None


def epoch_validation_seconds(epochs: list[dict[str, Any]]) -> list[float]:
    """Per epoch (metrics.jsonl rows), the seconds spent outside training: validation and the
    checkpoint writes, the share a faster ranking can save."""
    before = [0.0] + [e["elapsed_seconds"] for e in epochs[:-1]]
    return [e["elapsed_seconds"] - b - e["train_seconds"]
            for e, b in zip(epochs, before, strict=True)]


def validation_seconds(epochs: list[dict[str, Any]]) -> float | None:
    """The run's total of :func:`epoch_validation_seconds`; None for a record without them."""
    if not epochs or "elapsed_seconds" not in epochs[0]:
        return None
    return round(sum(epoch_validation_seconds(epochs)), 1)


def training_record(run_dir: Path) -> dict[str, Any] | None:
    """How the trainer says the run's training ended: results.json's ``"training"``
    (``epochs_run``, ``best_epoch``, ``best_valid``, ``stopped_by``); None for a run written
    before results.json held it."""
    results = run_dir / "results.json"
    if not results.exists():
        return None
    training = json.loads(results.read_text()).get("training")
    return training if isinstance(training, dict) else None


def stop_reason(run_dir: Path, epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the run's training ended: ``best_epoch``, the epoch of the best validation value,
    and ``stopped_by``: "patience", "time cap" (``train.max_minutes``), "epoch cap" or
    "interrupted". A row cut by a cap while still improving must never pass for a converged
    one. Empty without training.

    The trainer's own record (:func:`training_record`) decides; a run directory written before
    it existed is read from its config.json against ``epochs`` (its metrics.jsonl).
    """
    training = training_record(run_dir)
    if training is not None:
        if training["stopped_by"] == "not trained":
            return {}
        return {"best_epoch": training["best_epoch"], "stopped_by": training["stopped_by"]}
    config = run_dir / "config.json"
    if not config.exists() or not epochs:
        return {}
    tc = json.loads(config.read_text())["train"]
    scored = [(e["valid"][tc["valid_metric"]], e["epoch"]) for e in epochs
              if e.get("valid", {}).get("protocol", tc["valid_protocol"]) == tc["valid_protocol"]
              and tc["valid_metric"] in e.get("valid", {})]
    best_epoch = min((-v, ep) for v, ep in scored)[1] if scored else 0
    last = epochs[-1]
    if last["epoch"] >= tc["epochs"]:
        stopped = "epoch cap"
    elif tc["patience"] and last["epoch"] - best_epoch >= tc["patience"] \
            and last["epoch"] >= tc.get("min_epochs", 0):
        stopped = "patience"
    elif tc.get("max_minutes") and last.get("elapsed_seconds", 0) >= tc["max_minutes"] * 60:
        stopped = "time cap"
    else:
        stopped = "interrupted"
    return {"best_epoch": best_epoch, "stopped_by": stopped}


def run_and_record(out: Path, name: str, argv: list[str], run_dir: Path,
                   extra: dict[str, Any]) -> bool:
    """Run one ``retr`` command (``argv`` after ``retr``) unless its record exists.

    Writes ``<out>/<name>.json``: ``extra`` plus the exact command, wall time, epochs, training
    seconds and the command's JSON results. A run directory left by a killed run resumes
    from its last epoch; one killed before any epoch ended (no trainer state) starts over.
    Returns whether the record exists afterwards.
    """
    record_path = out / f"{name}.json"
    if record_path.exists():
        return True
    shown = " ".join(shlex.quote(a) for a in ["retr", *argv])
    full = [sys.executable, "-m", "retr", *argv]
    if (run_dir / "trainer_state.pt").exists():
        full = [sys.executable, "-m", "retr", "train", "--resume", str(run_dir), "--json"]
    elif run_dir.exists():  # killed before its first epoch ended: nothing to resume
        shutil.rmtree(run_dir)
    print(f"[grid] {name}: {shown}", flush=True)
    code = code_version()
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"[grid] {name} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return False
    results = json.loads(proc.stdout)
    metrics = run_dir / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    training = training_record(run_dir)
    record = {**extra, "command": shown, "hardware": hardware(argv), "code": code,
              "wall_seconds": round(wall, 1),
              "epochs": training["epochs_run"] if training is not None else len(epochs),
              "train_seconds": round(sum(e["train_seconds"] for e in epochs), 1),
              "validation_seconds": validation_seconds(epochs),
              "median_epoch_seconds": median_epoch_seconds(epochs), **stop_reason(run_dir, epochs),
              "results": results}
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"[grid] {name} done in {wall:.0f}s", flush=True)
    return True
