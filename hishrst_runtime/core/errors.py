"""The one error tree of hishrst.

Every error hishrst raises for a problem the user can fix derives from :class:`HishrstError`, in one
of three branches:

- :class:`InputError` — bad input (a slide, a bundle, a data set, an option value). The message names
  the file or option, what is wrong and the fix.
- :class:`EnvironmentProblem` — the machine lacks something (a package, a GPU, network access to
  gated weights, a TensorRT build).
- :class:`OutputStateError` — the output location is in a state that forbids the write (exists,
  incomplete, locked, not writable, would overwrite an input).

Library code raises these; only :mod:`hishrst_runtime.cli` turns them into exit codes and one-line
messages (:func:`hishrst_runtime.cli.errors.user_errors`). Concrete errors keep a builtin base too
(``ValueError``, ``RuntimeError``, ``FileExistsError``) so older ``except`` clauses still catch them.
A message never shows a URL's credentials or query string (:func:`hishrst_runtime.core.urls.redact_text`).
"""

from __future__ import annotations

from hishrst_runtime.core.urls import redact_text

__all__ = ["HishrstError", "InputError", "EnvironmentProblem", "OutputStateError"]


class HishrstError(Exception):
    """Base of every error hishrst raises for a problem the user can fix (one-line message); its text has
    the URLs in it redacted (user information and query strings removed)."""

    def __str__(self) -> str:
        return redact_text(super().__str__())


class InputError(HishrstError, ValueError):
    """Bad input: a slide, bundle, data set or option value. The message names it and the fix."""


class EnvironmentProblem(HishrstError, RuntimeError):
    """The environment lacks something: a package (names the extra), a GPU, weights access, a build tool."""


class OutputStateError(HishrstError, RuntimeError):
    """The output location forbids the write: exists, incomplete, locked, read-only, or would replace an input."""
