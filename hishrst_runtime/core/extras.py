"""Optional features behind pip extras: the one error class and the one import helper.

A command or reader that needs an optional package imports it through :func:`import_extra`; when the
package is missing (or installed but broken) the user gets one line naming what needs it, what is missing
and the exact ``pip install "hishrst[EXTRA]"`` to run — never a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hishrst_runtime.core.errors import EnvironmentProblem

__all__ = ["MissingExtraError", "install_hint", "import_extra"]


class MissingExtraError(EnvironmentProblem, ImportError):
    """A package of an optional extra (``[train]``, ``[export]``, ``[spatialdata]``, ``[openslide]``, …) is
    not installed or does not import; the message names the extra to install."""


def install_hint(extra: str) -> str:
    """``pip install "hishrst[EXTRA]"``."""
    return f'pip install "hishrst[{extra}]"'


def import_extra(module: str, *, extra: str, needed_by: str) -> ModuleType:
    """Import ``module``; a missing or broken dependency is a :class:`MissingExtraError` saying that
    ``needed_by`` (a command, a file, an output format) needs it and naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        how = "is not installed" if isinstance(e, ModuleNotFoundError) else f"does not import ({e})"
        raise MissingExtraError(f"{needed_by} needs {missing!r}, which {how}; install the {extra} extra: "
                                f"{install_hint(extra)}") from e
    except OSError as e:  # a Python package whose shared library does not load
        raise MissingExtraError(f"{needed_by} needs {module!r}, whose library does not load ({e}); reinstall the "
                                f"{extra} extra: {install_hint(extra)}") from e
