"""Wire helpers shared by every Redis-backed piece: reply decoding, key parts, text encoding.

Replies are decoded the same way whatever the client's ``decode_responses`` setting: ``bytes`` as UTF-8
with ``surrogateescape``, so a non-UTF-8 id read back from Redis is the same ``str`` that was written.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

__all__ = ["as_text", "encode", "encode_text", "safe_key_part"]

_SAFE_KEY_PART: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


def as_text(value: Any) -> str:
    """A reply value as ``str`` (clients with or without ``decode_responses``); never raises (a value
    whose ``__str__`` fails, which only a producer's hostile object could be, reads as a placeholder)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    try:
        return str(value)
    except Exception:
        return f"<unreadable {type(value).__name__}>"


def encode(value: str) -> bytes:
    """Text for Redis; lone surrogates (non-UTF-8 ids) round-trip through ``surrogateescape``.

    Raises ``UnicodeEncodeError`` for surrogates that no bytes produce (``"\\ud800"`` from JSON);
    :func:`encode_text` never does.
    """
    return value.encode("utf-8", "surrogateescape")


def encode_text(value: str) -> bytes:
    """Any ``str`` as bytes for Redis, never raising: UTF-8 with ``surrogateescape`` (so text decoded
    from non-UTF-8 bytes round-trips through :func:`as_text`), and lone surrogates that no bytes
    produce written as ``\\udXXX`` escapes (readable, not round-tripped)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")


def safe_key_part(name: str) -> str:
    """``name`` if it is a short, printable key part; else ``#`` + the SHA-256 of its bytes
    (:func:`encode_text`: any ``str`` works, and a name read back from Redis maps to the same key)."""
    if _SAFE_KEY_PART.fullmatch(name):
        return name
    return "#" + hashlib.sha256(encode_text(name)).hexdigest()
