"""Run ``retr`` in-process the way a user sees it: exit code, stdout, and stderr lines.

Warnings count as stderr lines (a real process prints them there), and an argparse exit is
an exit code, not an exception.
"""

from __future__ import annotations

import warnings

import pytest

from retr.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's default filters: what a user would see
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                       ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    err = captured.err + "".join(f"warning: {w.message}\n" for w in caught)
    return code, captured.out, err


def one_error_line(err: str) -> str:
    """The single non-blank stderr line of a failed command (asserts there is exactly one)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]
