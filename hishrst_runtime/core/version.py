"""The installed hishrst version: the one home of ``__version__`` (re-exported by ``hishrst_runtime``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("hishrst")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
