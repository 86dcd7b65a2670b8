"""Wire helpers shared by every Redis-backed piece: reply decoding, key parts, text encoding.

Replies are decoded the same way whatever the client's ``decode_responses`` setting: ``bytes`` as UTF-8
with ``surrogateescape``, so a non-UTF-8 id read back from Redis is the same ``str`` that was written.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

__all__ = ["as_text", "encode", "safe_key_part"]

_SAFE_KEY_PART: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


def as_text(value: Any) -> str:
    """A reply value as ``str`` (clients with or without ``decode_responses``)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def encode(value: str) -> bytes:
    """Text for Redis; lone surrogates (non-UTF-8 ids) round-trip through ``surrogateescape``."""
    return value.encode("utf-8", "surrogateescape")


def safe_key_part(name: str) -> str:
    """``name`` if it is a short, printable key part; else ``#`` + the SHA-256 of its UTF-8 bytes."""
    if _SAFE_KEY_PART.fullmatch(name):
        return name
    return "#" + hashlib.sha256(encode(name)).hexdigest()
