"""``hishrst-run``: the runtime's own entry point (the ``hishrst`` umbrella lives in :mod:`hishrst.cli`)."""

from __future__ import annotations

__all__ = ["run_main"]


def run_main() -> None:
    """Entry point of ``hishrst-run`` (same as ``hishrst run``)."""
    from hishrst_runtime.cli.run import run

    run(prog_name="hishrst-run")
