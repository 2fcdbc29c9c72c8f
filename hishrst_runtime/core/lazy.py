"""Lazy public attributes for the hishrst packages (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, where: dict[str, str], *, extra: str | None = None
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` importing ``package.<where[name]>`` on first access of ``name``.

    With ``extra``, an ImportError names the pip extra that provides the missing dependency.
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(f"{package}.{where[name]}")
        except ImportError as e:
            if extra is None:
                raise
            raise ImportError(f'{package}.{name} needs the {extra} extra: pip install "hishrst[{extra}]" ({e})') from e
        return getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
