"""Envelopes: what streamwarden knows about one message besides its payload.

A message is either a plain mapping (the original module's ``{"id": ..., "data": ...}``) or an :class:`Envelope`
built by a stream runner. Id extraction follows ``missing_id_policy``:

* ``dead_letter`` (default): a message without a usable id raises
  :class:`~streamwarden.MissingMessageIdError`; the layer dead-letters it with reason ``missing_id``
  and never runs the processor, because without an id duplicates cannot be detected.
* ``content_hash``: the id is ``sha256:`` + the SHA-256 of the message's canonical JSON (sorted keys,
  compact separators, UTF-8), so byte-identical redeliveries deduplicate.

``None``, ``""`` and booleans are not ids. ``bytes`` ids are decoded with ``surrogateescape`` so that
non-UTF-8 ids round-trip. Anything that is neither a mapping nor an envelope is an
:class:`~streamwarden.InvalidMessageError` with reason ``invalid_message``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import InvalidMessageError, MissingMessageIdError

__all__ = ["Envelope", "canonical_fingerprint", "coerce_message_id"]

_EMPTY: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message with its id, headers (e.g. ``traceparent``), source reference and delivery count."""

    id: str
    payload: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    destination: str | None = None
    source_ref: str | None = None
    delivery_count: int = 1
    key: str | None = None
    #: span attributes of the transport for this message (Kafka: partition, offset, key), set on the
    #: ``process`` span; empty for messages that do not come from a runner
    attributes: Mapping[str, str | int] | None = None


def coerce_message_id(raw: object) -> str | None:
    """Turn a raw id into the string streamwarden keys on, or ``None`` when it is not a usable id."""
    if type(raw) is str:
        return raw or None
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, bytes | bytearray | memoryview):
        text = bytes(raw).decode("utf-8", "surrogateescape")
        return text or None
    if isinstance(raw, str):
        return str(raw) or None
    if isinstance(raw, int | float):
        return str(raw)
    text = str(raw)
    return text or None


def canonical_fingerprint(value: Any) -> str:
    """SHA-256 of the canonical JSON form of ``value`` (sorted keys, compact), as ``sha256:<hex>``.

    Never raises for data a message can carry: mappings whose keys cannot be sorted against each other
    (``{1: "a", "b": 2}``) are canonicalised with keys ordered by type and ``repr``; text with lone
    surrogates (JSON ``"\\ud800"``) is encoded with ``surrogatepass``.
    """
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    except TypeError:
        text = json.dumps(
            _normalise_keys(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
        )
    try:
        encoded = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def fingerprint_or_none(value: Any) -> str | None:
    """:func:`canonical_fingerprint`, or ``None`` for a payload that has no canonical form (nested too
    deep, self-referential, a ``repr`` that raises): conflict detection then skips that message."""
    try:
        return canonical_fingerprint(value)
    except Exception:
        return None


def _normalise_keys(value: Any) -> Any:
    """Mappings with mixed key types become ordered lists of ``[type:repr(key), value]`` pairs."""
    if isinstance(value, Mapping):
        items = sorted(
            ((f"{type(k).__name__}:{k!r}", _normalise_keys(v)) for k, v in value.items()), key=_first
        )
        return [[k, v] for k, v in items]
    if isinstance(value, list | tuple):
        return [_normalise_keys(v) for v in value]
    return value


def envelope_from_message(
    message: object, *, id_field: str, content_hash_ids: bool, destination: str | None = None
) -> Envelope:
    """Build the envelope for ``message``; raises :class:`InvalidMessageError` when it has none."""
    if isinstance(message, Envelope):
        if not message.id:
            raise MissingMessageIdError("envelope has an empty id")
        return message
    if not isinstance(message, Mapping):
        raise InvalidMessageError(
            f"message must be a mapping or an Envelope, got {type(message).__name__}",
            reason="invalid_message",
        )
    message_id = coerce_message_id(message.get(id_field))
    if message_id is None:
        if not content_hash_ids:
            raise MissingMessageIdError(
                f"message has no usable {id_field!r} field; set missing_id_policy='content_hash' "
                "to derive ids from the payload"
            )
        message_id = canonical_fingerprint(message)
    headers = message.get("headers")
    return Envelope(
        id=message_id,
        payload=message,
        headers=headers if isinstance(headers, Mapping) else _EMPTY,
        destination=destination,
    )


def _first(pair: tuple[str, Any]) -> str:
    return pair[0]
