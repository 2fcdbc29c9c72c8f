"""Remote OME-Zarr over http(s)://, s3:// (and other fsspec protocols), with bounded concurrency (torch-free).

:func:`open_remote_root` opens the zarr group at a URL read-only through zarr's fsspec store. Every
read of the slide — metadata and whole chunks — goes through :class:`BoundedStore`, which lets at most
``max_concurrency`` requests be in flight **in all** (zarr's own limit is per call, and several reader
threads call at once). Chunks are read whole (one GET each). A missing chunk — HTTP 404, a missing S3
key — is judged like a missing chunk file locally (:class:`AbsentAwareStore`; the rule:
:mod:`hishrst_runtime.slides.integrity`): background where the coarser level is uniform fill, else an
error naming the chunk's URL (or the fill value, counted, with ``--allow-missing-chunks``). Any other
HTTP error is an error.

Needs the ``remote`` extra (``pip install "hishrst[remote]"``: fsspec with aiohttp, s3fs); without it
the error names the extra. A network problem (refused connection, DNS, timeout, HTTP 5xx, access
denied) is a one-line :class:`~hishrst_runtime.slides.errors.RemoteSlideError` naming the URL, the
problem and the fix — at open or on the read that met it. URLs in messages never show credentials or
query strings (presigned signatures): :func:`hishrst_runtime.core.urls.redact_text`.

HTTP requests time out after :data:`HTTP_TIMEOUT_S` seconds (connecting: :data:`CONNECT_TIMEOUT_S`);
``storage_options`` replaces these defaults (it is passed to fsspec as is, e.g. ``{"anon": True}`` for
public S3 buckets).
"""

from __future__ import annotations

import asyncio
from typing import Any

from zarr.storage import WrapperStore

from hishrst_runtime.core.urls import redact_text
from hishrst_runtime.slides.chunks import ChunkAbsent, is_metadata_key
from hishrst_runtime.slides.errors import RemoteSlideError, SlideError, SlideExtraMissing

__all__ = ["DEFAULT_MAX_CONCURRENCY", "HTTP_TIMEOUT_S", "CONNECT_TIMEOUT_S", "AbsentAwareStore", "BoundedStore",
           "open_remote_root"]

#: Requests in flight at once per remote slide (all reader threads together).
DEFAULT_MAX_CONCURRENCY = 16
HTTP_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 20.0
_EXTRA = 'pip install "hishrst[remote]"'
_FIX = "check the URL, that the server is reachable from this machine and the object readable (credentials)"


def _one_line(e: BaseException) -> str:
    """``e`` on one line, at most 300 characters, its URLs redacted before it is cut."""
    text = redact_text(" ".join(str(e).split())) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def _remote_error(where: str, e: BaseException) -> RemoteSlideError:
    return RemoteSlideError(f"{where}: cannot read the remote slide ({_one_line(e)}); {_FIX}")


class AbsentAwareStore(WrapperStore):  # type: ignore[type-arg]
    """A zarr store wrapper under which an absent chunk is not silently the fill value: ``get`` raises
    :class:`~hishrst_runtime.slides.chunks.ChunkAbsent` for a chunk key the wrapped store does not have,
    until :meth:`admit_absent` admits it (after the slide level judged it). Metadata keys pass as usual."""

    def __init__(self, store: Any, *, admitted: set[str] | None = None) -> None:
        super().__init__(store)
        self._admitted: set[str] = set() if admitted is None else admitted

    def _with_store(self, store: Any) -> AbsentAwareStore:
        return type(self)(store, admitted=self._admitted)

    def admit_absent(self, key: str) -> None:
        """Let the absent chunk ``key`` read as the fill value from now on."""
        self._admitted.add(key)

    def _check_absent(self, key: str, value: Any) -> Any:
        if value is None and not is_metadata_key(key) and key not in self._admitted:
            raise ChunkAbsent(key)
        return value

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return self._check_absent(key, await self._store.get(key, prototype, byte_range))


class BoundedStore(AbsentAwareStore):
    """A zarr store wrapper that limits the requests in flight, names the URL in errors and reports absent
    chunks (see the module docstring)."""

    def __init__(self, store: Any, *, url: str = "", limit: int = DEFAULT_MAX_CONCURRENCY,
                 admitted: set[str] | None = None) -> None:
        super().__init__(store, admitted=admitted)
        self.url, self.limit = url, max(1, int(limit))
        self._sem: asyncio.Semaphore | None = None

    def _with_store(self, store: Any) -> BoundedStore:
        return type(self)(store, url=self.url, limit=self.limit, admitted=self._admitted)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on zarr's event loop, on first use
            self._sem = asyncio.Semaphore(self.limit)
        return self._sem

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        async with self._semaphore():
            try:
                value = await self._store.get(key, prototype, byte_range)
            except Exception as e:  # noqa: BLE001 - aiohttp / botocore / OS errors: one line naming the URL
                raise _remote_error(f"{self.url}/{key}", e) from e
        return self._check_absent(key, value)

    async def exists(self, key: str) -> bool:
        async with self._semaphore():
            try:
                return await self._store.exists(key)
            except Exception as e:  # noqa: BLE001 - as in get
                raise _remote_error(f"{self.url}/{key}", e) from e


def _default_options(url: str) -> dict[str, Any]:
    if not url.lower().startswith(("http://", "https://")):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)}}


def _fsspec_store(url: str, storage_options: dict[str, Any] | None) -> Any:
    try:
        import importlib.util

        from zarr.storage import FsspecStore

        if importlib.util.find_spec("fsspec") is None:
            raise ImportError("No module named 'fsspec'")

        options = _default_options(url) if storage_options is None else dict(storage_options)
        return FsspecStore.from_url(url, storage_options=options, read_only=True)
    except ImportError as e:
        raise SlideExtraMissing(f"{url}: reading slides over the network needs fsspec and its protocol package "
                                f"({e}); install them with: {_EXTRA}") from e
    except ValueError as e:
        if "protocol" in str(e).lower() or "unknown" in str(e).lower():
            raise SlideError(f"{url}: unsupported URL ({_one_line(e)}); use http(s)://, s3:// or a local path") from e
        raise _remote_error(url, e) from e


def open_remote_root(url: str, *, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                     storage_options: dict[str, Any] | None = None) -> Any:
    """The zarr group at ``url``, read-only, with at most ``max_concurrency`` requests in flight.

    Raises :class:`SlideExtraMissing` (naming the ``remote`` extra) without fsspec / aiohttp / s3fs,
    :class:`RemoteSlideError` naming the URL when it cannot be reached, and :class:`SlideError` when
    it is reachable but holds no zarr group.
    """
    import zarr

    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be an integer >= 1 requests, got {max_concurrency!r}")
    store = BoundedStore(_fsspec_store(url, storage_options), url=url, limit=max_concurrency)
    try:
        return zarr.open_group(store, mode="r")
    except SlideError:
        raise
    except FileNotFoundError as e:
        raise SlideError(f"{url}: no zarr group at this URL (no zarr.json / .zgroup found); check the URL of "
                         "the OME-Zarr store") from e
    except Exception as e:  # noqa: BLE001 - zarr / fsspec raise many types for an unreachable or odd URL
        if type(e).__name__ in ("GroupNotFoundError", "NodeTypeValidationError", "ContainsArrayError"):
            raise SlideError(f"{url}: no zarr group at this URL ({_one_line(e)}); check the URL of the OME-Zarr "
                             "store") from e
        raise _remote_error(url, e) from e
