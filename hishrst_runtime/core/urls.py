"""URLs as they may be written or logged: credentials removed (torch-free, standard library only).

A slide URL can carry secrets: user information (``https://user:token@host/…``) and query strings
(presigned ``?X-Amz-Signature=…``, ``?sig=…`` SAS tokens). Nothing hishrst writes (run reports, output
metadata) or prints (messages, logs) may hold them: :func:`redact_url` drops both from one URL and
:func:`redact_text` from every URL inside a message.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url", "redact_text"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: A URL inside free text: up to whitespace or a quote.
_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
#: Punctuation that ends a sentence or clause rather than a URL (``{url}: cannot read``).
_TRAILING = ":;,.)]}"


def redact_url(url: str) -> str:
    """``url`` without user information (``user:token@``), query string and fragment; any text that is not
    a ``scheme://`` URL is returned unchanged (``file://`` paths carry no secrets but are handled alike)."""
    if not isinstance(url, str) or not _SCHEME.match(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 netloc: keep only what precedes any secret
        head = url.split("?", 1)[0].split("#", 1)[0]
        scheme, _, rest = head.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _redact_match(m: re.Match[str]) -> str:
    text = m.group(0)
    core = text.rstrip(_TRAILING)
    return redact_url(core) + text[len(core):]


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url` (messages, report fields)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _IN_TEXT.sub(_redact_match, text)
