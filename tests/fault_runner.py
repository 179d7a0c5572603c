"""Run the ``retr`` CLI with a fault point, for tests that kill training from outside.

Usage: ``python tests/fault_runner.py RETR-ARGS...`` with, in the environment,

* ``RETR_FAULT=step:N``: pause inside the N-th training step of this process (after the
  forward pass, before the optimizer step), i.e. in the middle of an epoch;
* ``RETR_FAULT=write:NAME:N``: pause during the N-th write of run file ``NAME`` once half of
  its temporary file is on disk, i.e. before the rename that would publish it;
* ``RETR_FAULT_READY=PATH``: a file created once the process is paused, so the test knows
  when to send SIGKILL.

Without ``RETR_FAULT`` it is plain ``retr``. Nothing here is in the library: the hooks wrap
functions from outside (monkeypatching), so the code under test is the shipped code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import retr.training.checkpoint as checkpoint
import retr.training.trainer as trainer
import retr.utils as utils
from retr.cli import main


def _pause() -> None:
    """Signal readiness, then wait to be killed (never return within a test's lifetime)."""
    ready = os.environ.get("RETR_FAULT_READY")
    if ready:
        Path(ready).write_text(str(os.getpid()))
    time.sleep(600)
    raise SystemExit("fault_runner: nobody killed the paused process")


def _install(fault: str) -> None:
    kind, _, rest = fault.partition(":")
    if kind == "step":
        at = int(rest)
        calls = 0
        compute_loss = trainer.compute_loss

        def loss_then_pause(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == at:
                _pause()
            return compute_loss(*args, **kwargs)

        trainer.compute_loss = loss_then_pause
        return
    if kind == "write":
        name, _, nth = rest.rpartition(":")
        at = int(nth)
        writes = 0
        atomic_write = utils.atomic_write

        def half_write_then_pause(path: str | Path, write: Callable[[Path], object]) -> None:
            nonlocal writes
            if Path(path).name != name:
                atomic_write(path, write)
                return
            writes += 1
            if writes != at:
                atomic_write(path, write)
                return

            def write_half(tmp: Path) -> None:
                write(tmp)
                size = tmp.stat().st_size
                with open(tmp, "rb+") as fh:
                    fh.truncate(size // 2)
                    fh.flush()
                    os.fsync(fh.fileno())
                _pause()

            atomic_write(path, write_half)

        utils.atomic_write = half_write_then_pause
        checkpoint.atomic_write = half_write_then_pause
        return
    raise SystemExit(f"fault_runner: unknown RETR_FAULT {fault!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("RETR_FAULT"):
        _install(os.environ["RETR_FAULT"])
    raise SystemExit(main(sys.argv[1:]))
