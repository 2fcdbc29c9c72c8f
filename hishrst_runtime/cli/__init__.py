"""Click commands: parsing options and mapping hishrst errors to exit codes. The only layer that imports click for user-facing errors."""

from hishrst_runtime.cli.main import run_main

__all__ = ["run_main"]
