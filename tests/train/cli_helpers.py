"""Shared helpers of the training-CLI tests: fast fit options, in-process invocation, the one-line error check."""

from __future__ import annotations

import warnings
from typing import Any

from click.testing import CliRunner, Result

#: Options that make ``hishrst fit`` as fast as a test needs (one epoch, CPU, the random test encoder).
FAST = ["--epochs", "1", "--no-progress", "--device", "cpu", "--task", "full", "--val-frac", "0", "--encoder", "test-vit",
        "--allow-test-encoder"]


def invoke(cmd: Any, args: list[Any]) -> Result:
    """Run a click command in-process with one torch thread and warnings silenced."""
    from tests.conftest import torch_threads

    with torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cmd, [str(a) for a in args])


def one_line_error(r: Result, *needles: str) -> str:
    """Assert exit status 1 with exactly one ``Error:`` line on stderr holding every needle, and no traceback."""
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
