"""The textual forms a media part's reference takes, taken apart: ``data:`` URLs, bare base64, ``file://`` URLs.

One place for the image reader, the request's header pass and the video reader, so that the three read a
reference the same way; each maps a malformed reference to its own answer.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote, urlparse


class NotLocal(ValueError):
    """A ``file://`` URL naming another host."""

    def __init__(self, host: str) -> None:
        super().__init__(f"file URL with a host {host!r} is not local")


def data_url_parts(url: str) -> tuple[str, str] | None:
    """``(media type with its parameters, base64 payload)`` of a ``data:<type>;base64,<payload>`` URL, or
    ``None`` when ``url`` is not of that form."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        return None
    return header[: -len(";base64")], payload


def mime_of(media_type: str) -> str:
    """The bare MIME type of a data URL's media type (``image/png;name=x`` -> ``image/png``)."""
    return media_type.split(";")[0].strip().lower()


def bare_base64(value: str) -> bytes | None:
    """``value`` decoded as base64 (whitespace ignored), or ``None`` when it is not base64."""
    compact = "".join(value.split())
    if len(compact) < 16 or len(compact) % 4:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def file_url_path(url: str) -> str:
    """A ``file://`` URL's path with its fragment (``#slice=40``) kept; raises :class:`NotLocal` for a URL
    naming another host."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise NotLocal(parsed.netloc)
    return unquote(parsed.path) + (f"#{parsed.fragment}" if parsed.fragment else "")
