"""Attack: hostile messages, ids, payloads and headers. ``process()`` never raises and loses nothing.

Promises under attack: ``ReliabilityLayer.process`` never raises for a message it cannot handle; a
message without a usable id is dead-lettered with a reason (``missing_id`` when there is none,
``invalid_message`` when the message or its id cannot be read) and counted in
``streamwarden.invalid_messages``; a message with a usable id, however odd, is processed at most once
per id (a redelivery is a DUPLICATE) or dead-lettered with its id when the handler fails; headers are
metadata: a header that cannot be read never stops the message. Every call ends in exactly one counted
outcome (nothing is lost silently). Each attack runs on the embedded stores and on Redis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import pytest

import streamwarden as sw
from streamwarden import _names as n

ONE_MB = 1024 * 1024
FIFTY_MB = 50 * ONE_MB


# --- hostile containers -------------------------------------------------------------------------


class _Base(Mapping[Any, Any]):
    """A read-only mapping over ``data``; subclasses break one method."""

    def __init__(self, data: Mapping[Any, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


class GetRaises(_Base):
    """``.get`` raises."""

    def get(self, key: Any, default: Any = None) -> Any:
        raise RuntimeError("get exploded")


class GetItemRaises(_Base):
    """``[key]`` raises (so the inherited ``.get`` raises too)."""

    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError("__getitem__ exploded")


class IterRaises(_Base):
    """Lookups work, iteration raises."""

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("__iter__ exploded")


class NonStrKeys(_Base):
    """Lookups of the real keys work; ``keys()`` and iteration yield non-strings."""

    def __iter__(self) -> Iterator[Any]:
        return iter([1, None, ("t",), b"\xff"])

    def keys(self) -> Any:
        return [1, None, ("t",), b"\xff"]

    def __getitem__(self, key: Any) -> Any:
        return self._data.get(key, "v") if isinstance(key, str) else "v"


class EverythingRaises(_Base):
    """Every mapping method raises, and so does ``repr``."""

    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError("__getitem__ exploded")

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("__iter__ exploded")

    def __len__(self) -> int:
        raise RuntimeError("__len__ exploded")

    def __contains__(self, key: object) -> bool:
        raise RuntimeError("__contains__ exploded")

    def get(self, key: Any, default: Any = None) -> Any:
        raise RuntimeError("get exploded")

    def keys(self) -> Any:
        raise RuntimeError("keys exploded")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")


class DictGetRaises(dict[Any, Any]):
    """A dict subclass whose ``.get`` raises."""

    def get(self, key: Any, default: Any = None) -> Any:
        raise RuntimeError("get exploded")


class StrRaises:
    """An id whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")


class ReprRaises:
    """A payload value whose ``repr()`` raises (and that JSON cannot encode)."""

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")


class HostileStr(str):
    """A ``str`` subclass whose ``str()``, ``len()`` and hashing raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")

    def __len__(self) -> int:
        raise RuntimeError("__len__ exploded")

    def __hash__(self) -> int:
        raise RuntimeError("__hash__ exploded")


def deep(levels: int) -> Any:
    """``levels`` nested lists, built without recursion."""
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


def self_referential() -> dict[str, Any]:
    message: dict[str, Any] = {"id": "self-ref"}
    message["self"] = message
    return message


# --- helpers ------------------------------------------------------------------------------------


def counting(fail_with: BaseException | None = None) -> Callable[[Any], Any]:
    """A handler counting its calls; raises ``fail_with`` when given, else returns ``"ok"``."""

    async def handler(message: Any) -> Any:
        handler.calls += 1  # type: ignore[attr-defined]
        if fail_with is not None:
            raise fail_with
        return "ok"

    handler.calls = 0  # type: ignore[attr-defined]
    return handler


def calls(handler: Callable[[Any], Any]) -> int:
    return int(handler.calls)  # type: ignore[attr-defined]


async def failing(message: Any) -> NoReturn:
    raise ValueError("handler rejects it")


def nothing_lost(backend: Any, processed_calls: int) -> None:
    """Every call to ``process`` was consumed and ended in exactly one counted outcome."""
    otel = backend.otel
    assert otel.value(n.METRIC_CONSUMED_MESSAGES) == processed_calls
    assert otel.value(n.METRIC_MESSAGES) == processed_calls


# --- invalid messages: dead-lettered with a reason, counted, handler never run --------------------

INVALID: list[tuple[str, Callable[[], Any], str]] = [
    ("mapping-get-raises", lambda: GetRaises({"id": "m1"}), "invalid_message"),
    ("mapping-getitem-raises", lambda: GetItemRaises({"id": "m1"}), "invalid_message"),
    ("mapping-everything-raises", lambda: EverythingRaises({"id": "m1"}), "invalid_message"),
    ("dict-subclass-get-raises", lambda: DictGetRaises({"id": "m1"}), "invalid_message"),
    ("id-str-raises", lambda: {"id": StrRaises()}, "invalid_message"),
    ("id-str-subclass-hostile", lambda: {"id": HostileStr("m1")}, "invalid_message"),
    ("id-int-too-long-for-str", lambda: {"id": 10**5000}, "invalid_message"),
    ("id-empty", lambda: {"id": ""}, "missing_id"),
    ("id-none", lambda: {"id": None}, "missing_id"),
    ("id-missing", lambda: {"data": 1}, "missing_id"),
    ("envelope-empty-id", lambda: sw.Envelope(id="", payload={"x": 1}), "missing_id"),
    ("not-a-mapping-object-repr-raises", ReprRaises, "invalid_message"),
    ("not-a-mapping-set", lambda: {1, 2, 3}, "invalid_message"),
    ("not-a-mapping-bytes-non-utf8", lambda: b"\xff\xfe\x00", "invalid_message"),
    ("not-a-mapping-float-nan", lambda: math.nan, "invalid_message"),
]


@pytest.mark.parametrize(("make", "reason"), [(m, r) for _, m, r in INVALID], ids=[i for i, _, _ in INVALID])
async def test_invalid_message_is_dead_lettered_with_reason_and_counted(
    backend: Any, make: Callable[[], Any], reason: str
) -> None:
    """A message without a usable id: DEAD_LETTERED with its reason, invalid counted, handler not run."""
    layer = backend.layer()
    handler = counting()
    result = await backend.process(layer, make(), handler)
    assert result.outcome is sw.Outcome.DEAD_LETTERED, result
    assert calls(handler) == 0
    assert isinstance(result.error, sw.InvalidMessageError)
    assert result.dead_letter is not None
    assert result.dead_letter.reason == reason
    (entry,) = await layer.dead_letter_store.list()
    assert entry.entry_id == result.dead_letter.entry_id
    assert entry.reason == reason
    otel = backend.otel
    assert otel.value(n.METRIC_INVALID_MESSAGES, streamwarden__dlq__reason=reason) == 1
    assert otel.value(n.METRIC_DLQ_MESSAGES, streamwarden__dlq__reason=reason) == 1
    nothing_lost(backend, 1)


# --- odd but usable ids: processed once per id, dead-lettered with the id ------------------------

ODD_IDS: list[tuple[str, Any, str]] = [
    ("huge-1MB", "i" * ONE_MB, "i" * ONE_MB),
    ("nul", "a\x00b", "a\x00b"),
    ("lone-surrogate", "\ud800", "\ud800"),
    ("surrogateescape", "\udcff\udcfe", "\udcff\udcfe"),
    ("int", 7, "7"),
    ("float-nan", math.nan, "nan"),
    ("bytes-non-utf8", b"\xff\xfe", "\udcff\udcfe"),
    ("list", ["a", 1], "['a', 1]"),
]


@pytest.mark.parametrize(("raw", "expected"), [(r, e) for _, r, e in ODD_IDS], ids=[i for i, _, _ in ODD_IDS])
async def test_odd_ids_are_processed_once(backend: Any, raw: Any, expected: str) -> None:
    """A usable but odd id is processed once under its string form; the redelivery is a DUPLICATE."""
    layer = backend.layer()
    handler = counting()
    first = await backend.process(layer, {"id": raw, "data": 1}, handler)
    assert (first.outcome, first.message_id) == (sw.Outcome.PROCESSED, expected)
    second = await backend.process(layer, {"id": raw, "data": 1}, handler)
    assert second.outcome is sw.Outcome.DUPLICATE
    assert calls(handler) == 1
    nothing_lost(backend, 2)


@pytest.mark.parametrize(("raw", "expected"), [(r, e) for _, r, e in ODD_IDS], ids=[i for i, _, _ in ODD_IDS])
async def test_odd_ids_are_dead_lettered_under_their_id(backend: Any, raw: Any, expected: str) -> None:
    """A failing handler on an odd id: DEAD_LETTERED, and the stored entry reads back with that id."""
    layer = backend.layer(max_retries=0)
    result = await backend.process(layer, {"id": raw, "data": 1}, failing)
    assert result.outcome is sw.Outcome.DEAD_LETTERED, result.outcome
    (entry,) = await layer.dead_letter_store.list()
    assert entry.message_id == expected
    assert result.dead_letter is not None
    assert entry.entry_id == result.dead_letter.entry_id
    nothing_lost(backend, 1)


# --- hostile payloads with a usable id ------------------------------------------------------------

PAYLOADS: list[tuple[str, Callable[[], Any]]] = [
    ("nested-10000", lambda: {"id": "p1", "data": deep(10_000)}),
    ("huge-50MB", lambda: {"id": "p1", "data": "x" * FIFTY_MB}),
    ("self-referential", self_referential),
    ("set-and-repr-raises", lambda: {"id": "p1", "tags": {1, 2}, "obj": ReprRaises()}),
    ("non-str-keys", lambda: {"id": "p1", 1: "one", None: "none", ("t", 1): "tuple", b"\xff": 2}),
    ("mapping-iter-raises", lambda: IterRaises({"id": "p1", "data": 1})),
    ("mapping-keys-non-str", lambda: NonStrKeys({"id": "p1"})),
]


def _payload_message(make: Callable[[], Any]) -> tuple[Any, str]:
    message = make()
    mid = "self-ref" if isinstance(message, dict) and "self" in message else "p1"
    return message, mid


@pytest.mark.parametrize("make", [m for _, m in PAYLOADS], ids=[i for i, _ in PAYLOADS])
async def test_hostile_payload_is_dead_lettered_and_readable(backend: Any, make: Callable[[], Any]) -> None:
    """A failing handler on a hostile payload: DEAD_LETTERED under its id, entry stored and readable."""
    layer = backend.layer(max_retries=0)
    message, mid = _payload_message(make)
    result = await backend.process(layer, message, failing)
    assert result.outcome is sw.Outcome.DEAD_LETTERED, result.outcome
    (entry,) = await layer.dead_letter_store.list()
    assert entry.message_id == mid
    assert result.dead_letter is not None
    assert entry.entry_id == result.dead_letter.entry_id
    assert await layer.dead_letter_store.get(entry.entry_id) is not None
    nothing_lost(backend, 1)


@pytest.mark.parametrize("make", [m for _, m in PAYLOADS], ids=[i for i, _ in PAYLOADS])
async def test_hostile_payload_with_conflict_detection_is_processed_once(
    backend: Any, make: Callable[[], Any]
) -> None:
    """detect_payload_conflicts fingerprints the payload: a hostile one is still processed once, then DUPLICATE."""
    layer = backend.layer(detect_payload_conflicts=True)
    handler = counting()
    message, mid = _payload_message(make)
    first = await backend.process(layer, message, handler)
    assert (first.outcome, first.message_id) == (sw.Outcome.PROCESSED, mid)
    second = await backend.process(layer, message, handler)
    assert second.outcome is sw.Outcome.DUPLICATE
    assert calls(handler) == 1
    nothing_lost(backend, 2)


def _without_id(make: Callable[[], Any]) -> Any:
    message = make()
    if isinstance(message, dict):
        message.pop("id", None)
        return message
    return {"data": message}


@pytest.mark.parametrize("make", [m for _, m in PAYLOADS], ids=[i for i, _ in PAYLOADS])
async def test_hostile_payload_without_id_under_content_hash_is_not_lost(
    backend: Any, make: Callable[[], Any]
) -> None:
    """content_hash ids over a hostile payload: PROCESSED, or dead-lettered as invalid and counted; never raised."""
    layer = backend.layer(missing_id_policy="content_hash")
    handler = counting()
    result = await backend.process(layer, _without_id(make), handler)
    if result.outcome is sw.Outcome.PROCESSED:
        assert result.message_id is not None
        assert result.message_id.startswith("sha256:")
        assert calls(handler) == 1
    else:
        assert result.outcome is sw.Outcome.DEAD_LETTERED, result.outcome
        assert result.dead_letter is not None
        assert result.dead_letter.reason == "invalid_message"
        assert backend.otel.value(n.METRIC_INVALID_MESSAGES) == 1
        assert calls(handler) == 0
    nothing_lost(backend, 1)


# --- headers ----------------------------------------------------------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

HEADERS: list[tuple[str, Callable[[], Any]]] = [
    ("headers-str", lambda: f"traceparent: {TRACEPARENT}"),
    ("headers-list", lambda: [("traceparent", TRACEPARENT)]),
    ("headers-int", lambda: 42),
    ("traceparent-int", lambda: {"traceparent": 123}),
    ("traceparent-bytes", lambda: {"traceparent": TRACEPARENT.encode()}),
    ("traceparent-list-of-ints", lambda: {"traceparent": [1, 2]}),
    ("traceparent-object", lambda: {"traceparent": object()}),
    ("traceparent-1MB", lambda: {"traceparent": "0" * ONE_MB}),
    ("traceparent-surrogate-nul", lambda: {"traceparent": "00-\ud800-\x00-01"}),
    ("traceparent-hostile-str", lambda: {"traceparent": HostileStr(TRACEPARENT)}),
    ("tracestate-int", lambda: {"traceparent": TRACEPARENT, "tracestate": 7}),
    ("baggage-int", lambda: {"traceparent": TRACEPARENT, "baggage": 7}),
    ("values-non-str", lambda: {"x-int": 1, "x-none": None, "x-bytes": b"\xff", "x-obj": ReprRaises()}),
    ("keys-non-str", lambda: {1: "a", None: "b", ("t",): "c"}),
    ("mapping-get-raises", lambda: GetRaises({"traceparent": TRACEPARENT})),
    ("mapping-everything-raises", lambda: EverythingRaises({"traceparent": TRACEPARENT})),
    ("mapping-keys-non-str", lambda: NonStrKeys({"traceparent": TRACEPARENT})),
]


@pytest.mark.parametrize("make_headers", [m for _, m in HEADERS], ids=[i for i, _ in HEADERS])
async def test_hostile_headers_never_stop_the_message(backend: Any, make_headers: Callable[[], Any]) -> None:
    """Unreadable or ill-typed headers are ignored: the message is PROCESSED once (dict and Envelope forms)."""
    layer = backend.layer()
    handler = counting()
    as_dict = await backend.process(layer, {"id": "h-dict", "headers": make_headers()}, handler)
    envelope = sw.Envelope(id="h-env", payload={"x": 1}, headers=make_headers())
    as_envelope = await backend.process(layer, envelope, handler)
    assert (as_dict.outcome, as_envelope.outcome) == (sw.Outcome.PROCESSED, sw.Outcome.PROCESSED)
    assert calls(handler) == 2
    nothing_lost(backend, 2)


@pytest.mark.parametrize("make_headers", [m for _, m in HEADERS], ids=[i for i, _ in HEADERS])
async def test_hostile_headers_on_a_failed_message_are_dead_lettered(
    backend: Any, make_headers: Callable[[], Any]
) -> None:
    """A failing handler on a message with hostile headers: DEAD_LETTERED (dict and Envelope), entries readable."""
    layer = backend.layer(max_retries=0)
    as_dict = await backend.process(layer, {"id": "h-dict", "headers": make_headers()}, failing)
    envelope = sw.Envelope(id="h-env", payload={"x": 1}, headers=make_headers())
    as_envelope = await backend.process(layer, envelope, failing)
    assert (as_dict.outcome, as_envelope.outcome) == (sw.Outcome.DEAD_LETTERED, sw.Outcome.DEAD_LETTERED)
    entries = await layer.dead_letter_store.list()
    assert sorted(e.message_id or "" for e in entries) == ["h-dict", "h-env"]
    for entry in entries:
        assert isinstance(entry.headers, Mapping)
    nothing_lost(backend, 2)


@pytest.mark.parametrize(
    "traceparent",
    ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0", "ff-" + "1" * 32 + "-" + "1" * 16 + "-01", ""],
    ids=["truncated", "version-ff", "empty"],
)
async def test_malformed_traceparent_gives_no_link(backend: Any, traceparent: str) -> None:
    """A malformed ``traceparent`` is ignored: PROCESSED, and the process span has no link."""
    layer = backend.layer()
    result = await backend.process(layer, {"id": "tp", "headers": {"traceparent": traceparent}}, counting())
    assert result.outcome is sw.Outcome.PROCESSED
    (span,) = backend.otel.spans("process default")
    assert len(span.links) == 0
