"""The embedded dead-letter store, bounded tracebacks and error.type names."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import redis.exceptions

from streamwarden import DeadLetterEntry, DeadLetterQueueFullError, DeadLetterStore, InMemoryDeadLetterStore
from streamwarden._dlq import (
    DEFAULT_REDACT_PATTERNS,
    MAX_ERROR_MESSAGE_CHARS,
    REDACTED,
    Redactor,
    error_type_name,
    format_traceback,
)


def entry(
    destination: str = "orders",
    *,
    message_id: str | None = "m1",
    error_type: str = "ConnectionError",
    error_class: str = "transient",
    error_message: str = "boom",
    payload: Any = None,
    at: float = 1_700_000_000.0,
    **extra: Any,
) -> DeadLetterEntry:
    return DeadLetterEntry(
        message_id=message_id,
        destination=destination,
        payload={"id": message_id, "data": 1} if payload is None else payload,
        reason="error",
        error_type=error_type,
        error_class=error_class,
        error_message=error_message,
        attempts=4,
        service="svc",
        dead_lettered_at=at,
        **extra,
    )


@pytest.fixture
def store() -> InMemoryDeadLetterStore:
    return InMemoryDeadLetterStore()


def test_store_satisfies_the_protocol(store: InMemoryDeadLetterStore) -> None:
    """The embedded store implements the shared DeadLetterStore protocol."""
    assert isinstance(store, DeadLetterStore)


async def test_add_then_get_returns_the_entry_with_its_id(store: InMemoryDeadLetterStore) -> None:
    """``add`` confirms with an id; ``get`` returns the same entry carrying that id."""
    original = entry()
    entry_id = await store.add(original)
    stored = await store.get(entry_id)
    assert stored is not None
    assert stored.entry_id == entry_id
    assert dataclasses.replace(stored, entry_id=None) == original
    assert original.entry_id is None  # the caller's entry is not mutated


async def test_entry_ids_are_unique(store: InMemoryDeadLetterStore) -> None:
    """Every add gets its own id, even for identical entries."""
    ids = [await store.add(entry()) for _ in range(100)]
    assert len(set(ids)) == 100
    assert await store.count() == 100


async def test_get_unknown_id_is_none(store: InMemoryDeadLetterStore) -> None:
    """An id the store never issued gives None."""
    assert await store.get("0-0") is None


async def test_list_is_oldest_first_and_limited(store: InMemoryDeadLetterStore) -> None:
    """``list`` returns entries in insertion order, at most ``limit``."""
    for i in range(5):
        await store.add(entry(message_id=f"m{i}"))
    assert [e.message_id for e in await store.list()] == ["m0", "m1", "m2", "m3", "m4"]
    assert [e.message_id for e in await store.list(limit=2)] == ["m0", "m1"]
    assert await store.list(limit=0) == []


async def test_list_filters(store: InMemoryDeadLetterStore) -> None:
    """Filters by destination, error type, error class and a time window combine."""
    await store.add(
        entry("orders", message_id="a", error_type="ValueError", error_class="permanent", at=100.0)
    )
    await store.add(entry("orders", message_id="b", at=200.0))
    await store.add(entry("payments", message_id="c", at=300.0))
    await store.add(
        entry("orders", message_id="d", error_type="ValueError", error_class="permanent", at=400.0)
    )

    async def ids(**filters: Any) -> list[str | None]:
        return [e.message_id for e in await store.list(**filters)]

    assert await ids(destination="orders") == ["a", "b", "d"]
    assert await ids(destination="payments") == ["c"]
    assert await ids(destination="nowhere") == []
    assert await ids(error_type="ValueError") == ["a", "d"]
    assert await ids(error_class="transient") == ["b", "c"]
    assert await ids(since=200.0) == ["b", "c", "d"]
    assert await ids(until=200.0) == ["a", "b"]
    assert await ids(since=150.0, until=350.0) == ["b", "c"]
    assert await ids(destination="orders", error_class="permanent", since=300.0) == ["d"]


async def test_limit_counts_matches_not_scanned_entries(store: InMemoryDeadLetterStore) -> None:
    """``limit`` applies to matching entries: non-matching ones before them do not use it up."""
    for i in range(5):
        await store.add(entry("other", message_id=f"x{i}"))
    await store.add(entry("orders", message_id="wanted"))
    assert [e.message_id for e in await store.list("orders", limit=1)] == ["wanted"]


async def test_count_per_destination(store: InMemoryDeadLetterStore) -> None:
    """``count`` totals all entries or those of one destination."""
    for dest in ["orders", "orders", "payments"]:
        await store.add(entry(dest))
    assert await store.count() == 3
    assert await store.count("orders") == 2
    assert await store.count("payments") == 1
    assert await store.count("nowhere") == 0


async def test_delete(store: InMemoryDeadLetterStore) -> None:
    """``delete`` removes one entry and reports whether it was there."""
    keep = await store.add(entry("orders", message_id="keep"))
    doomed = await store.add(entry("orders", message_id="doomed"))
    assert await store.delete(doomed) is True
    assert await store.delete(doomed) is False
    assert await store.get(doomed) is None
    assert await store.get(keep) is not None
    assert await store.count("orders") == 1


async def test_purge_one_destination(store: InMemoryDeadLetterStore) -> None:
    """``purge(destination)`` removes only that destination's entries and returns how many."""
    for dest in ["orders", "payments", "orders"]:
        await store.add(entry(dest))
    assert await store.purge("orders") == 2
    assert await store.count() == 1
    assert await store.count("orders") == 0
    assert await store.purge("orders") == 0


async def test_purge_everything(store: InMemoryDeadLetterStore) -> None:
    """``purge()`` empties the store."""
    for dest in ["orders", "payments"]:
        await store.add(entry(dest))
    assert await store.purge() == 2
    assert await store.count() == 0
    assert await store.destinations() == []


async def test_destinations_lists_only_non_empty_ones(store: InMemoryDeadLetterStore) -> None:
    """``destinations`` is sorted and forgets a destination once its last entry is gone."""
    await store.add(entry("payments"))
    only = await store.add(entry("orders"))
    assert await store.destinations() == ["orders", "payments"]
    await store.delete(only)
    assert await store.destinations() == ["payments"]
    assert store.depths() == {"orders": 0, "payments": 1}


async def test_full_store_raises_and_stores_nothing() -> None:
    """At capacity ``add`` raises DeadLetterQueueFullError and neither stores nor overwrites anything."""
    store = InMemoryDeadLetterStore(max_entries=2)
    first = await store.add(entry("orders", message_id="a"))
    await store.add(entry("orders", message_id="b"))

    with pytest.raises(DeadLetterQueueFullError, match="full"):
        await store.add(entry("payments", message_id="c"))

    assert await store.count() == 2
    assert await store.count("payments") == 0
    assert await store.destinations() == ["orders"]
    stored = await store.get(first)
    assert stored is not None
    assert stored.message_id == "a"


async def test_full_store_accepts_again_after_delete() -> None:
    """Capacity freed by a delete can be used again."""
    store = InMemoryDeadLetterStore(max_entries=1)
    first = await store.add(entry())
    with pytest.raises(DeadLetterQueueFullError):
        await store.add(entry())
    await store.delete(first)
    assert await store.add(entry())


def test_full_error_is_retriable_dead_letter_error() -> None:
    """A full queue is a DeadLetterError the caller may retry later (the message is not acknowledged)."""
    error = DeadLetterQueueFullError("full")
    assert error.retriable is True


def test_max_entries_must_be_positive() -> None:
    """A store that can hold nothing is refused."""
    with pytest.raises(ValueError, match="max_entries"):
        InMemoryDeadLetterStore(max_entries=0)


# --- redaction: secrets are never stored, in the embedded store either ---------------------------


async def test_embedded_store_redacts_message_traceback_and_headers(store: InMemoryDeadLetterStore) -> None:
    """What the Redis store redacts, the embedded one does too: the error message (a quoted value up to
    its closing quote), the traceback and header values; the payload is kept for replay."""
    secret = entry(
        error_message='login failed {"password": "correct horse battery", "user": "bob"}',
        traceback="Traceback...\nRuntimeError: token=tok_live_42\n",
        headers={"authorization": "Bearer abcdefghijkl", "x-note": "api_key=zzz999", "traceparent": "00-x"},
        payload={"id": "m1", "password": "kept-for-replay"},
    )
    got = await store.get(await store.add(secret))
    assert got is not None
    assert got.error_message == f'login failed {{"password": "{REDACTED}", "user": "bob"}}'
    assert got.traceback == f"Traceback...\nRuntimeError: token={REDACTED}\n"
    assert got.headers == {"authorization": REDACTED, "x-note": f"api_key={REDACTED}", "traceparent": "00-x"}
    assert got.payload == {"id": "m1", "password": "kept-for-replay"}
    listed = " ".join(repr(e) for e in await store.list())
    for word in ("horse", "battery", "tok_live_42", "abcdefghijkl", "zzz999"):
        assert word not in listed


async def test_embedded_store_takes_the_redis_store_s_options() -> None:
    """redact_patterns, redact_header_names and max_traceback_chars work as on the Redis store."""
    store = InMemoryDeadLetterStore(
        redact_patterns=[r"card=(?P<secret>\d{16})", r"SSN \d+"],
        redact_header_names=["x-card"],
        max_traceback_chars=40,
    )
    got = await store.get(
        await store.add(
            entry(
                error_message="card=4111111111111111 SSN 123 password=visible",
                headers={"x-card": "4111", "authorization": "kept: not in the custom list"},
                traceback="frame\n" * 100 + "ValueError: the cause\n",
            )
        )
    )
    assert got is not None
    assert got.error_message == f"card={REDACTED} {REDACTED} password=visible"
    assert got.headers == {"x-card": REDACTED, "authorization": "kept: not in the custom list"}
    assert len(got.traceback) == 40
    assert got.traceback.endswith("ValueError: the cause\n")
    long = await store.get(await store.add(entry(error_message="m" * 10_000)))
    assert long is not None
    assert len(long.error_message) <= MAX_ERROR_MESSAGE_CHARS
    assert long.error_message.endswith("...[truncated]")


def test_redactor_lives_with_the_entry_model() -> None:
    """Redactor and DEFAULT_REDACT_PATTERNS come from the entry model and keep their old homes."""
    import streamwarden
    import streamwarden._redis

    assert streamwarden._redis.Redactor is Redactor
    assert streamwarden._redis.DEFAULT_REDACT_PATTERNS is DEFAULT_REDACT_PATTERNS
    assert streamwarden.Redactor is Redactor
    assert streamwarden.DEFAULT_REDACT_PATTERNS is DEFAULT_REDACT_PATTERNS


# --- entry model --------------------------------------------------------------------------------


def test_traceparent_from_trace_and_span_ids() -> None:
    """An entry with trace and span ids gives the W3C traceparent of the failed span; without them None."""
    linked = entry(trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b7169203331")
    assert linked.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert entry().traceparent is None
    assert entry(trace_id="0af7651916cd43dd8448eb211c80319c").traceparent is None


def test_bound_message_caps_long_error_messages() -> None:
    """Error messages are cut to the documented maximum and marked as truncated; short ones are kept."""
    assert DeadLetterEntry.bound_message("short") == "short"
    cut = DeadLetterEntry.bound_message("x" * 10_000)
    assert len(cut) <= MAX_ERROR_MESSAGE_CHARS
    assert cut.endswith("[truncated]")


# --- format_traceback ---------------------------------------------------------------------------


def raise_deep(depth: int) -> None:
    if depth == 0:
        raise ValueError("the real cause at the bottom")
    raise_deep(depth - 1)


def deep_error() -> ValueError:
    try:
        raise_deep(50)
    except ValueError as error:
        return error
    raise AssertionError("unreachable")


def test_short_traceback_is_kept_whole() -> None:
    """A traceback under the limit is returned complete."""
    error = deep_error()
    full = format_traceback(error, 1_000_000)
    assert full.startswith("Traceback (most recent call last):")
    assert full.rstrip().endswith("ValueError: the real cause at the bottom")


@pytest.mark.parametrize("max_chars", [19, 50, 200, 400], ids=lambda m: f"max={m}")
def test_long_traceback_keeps_the_tail_within_max_chars(max_chars: int) -> None:
    """A long traceback is cut to at most ``max_chars``, keeping its end (where the error is)."""
    error = deep_error()
    full = format_traceback(error, 1_000_000)
    assert len(full) > max_chars
    cut = format_traceback(error, max_chars)
    assert len(cut) <= max_chars
    assert cut.startswith("...[truncated]...")
    kept = cut.removeprefix("...[truncated]...\n")
    assert full.endswith(kept)


@pytest.mark.parametrize(
    "max_chars",
    [pytest.param(1, id="max=1"), pytest.param(5, id="max=5"), pytest.param(18, id="max=marker-length")],
)
def test_tiny_limits_are_respected(max_chars: int) -> None:
    """Even a limit shorter than the truncation marker bounds the result."""
    assert len(format_traceback(deep_error(), max_chars)) <= max_chars


def test_zero_limit_keeps_nothing() -> None:
    """``max_chars=0`` (tracebacks disabled) gives an empty string."""
    assert format_traceback(deep_error(), 0) == ""


def test_traceback_includes_the_cause_chain() -> None:
    """The formatted traceback shows the ``raise ... from`` cause, which is what operators need."""
    try:
        try:
            raise ConnectionError("socket closed")
        except ConnectionError as cause:
            raise RuntimeError("handler failed") from cause
    except RuntimeError as error:
        text = format_traceback(error, 100_000)
    assert "ConnectionError: socket closed" in text
    assert "RuntimeError: handler failed" in text


# --- error_type_name ----------------------------------------------------------------------------


class DomainError(Exception):
    class Nested(Exception):
        pass


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(ValueError(), "ValueError", id="builtin"),
        pytest.param(TimeoutError(), "TimeoutError", id="builtin-TimeoutError"),
        pytest.param(KeyError("k"), "KeyError", id="builtin-KeyError"),
        pytest.param(redis.exceptions.ConnectionError(), "redis.exceptions.ConnectionError", id="redis"),
        pytest.param(DomainError(), f"{__name__}.DomainError", id="module-qualified"),
        pytest.param(DomainError.Nested(), f"{__name__}.DomainError.Nested", id="nested-class"),
    ],
)
def test_error_type_name(error: BaseException, expected: str) -> None:
    """Builtins are named bare; everything else is module-qualified, so same-named classes stay apart."""
    assert error_type_name(error) == expected


async def test_a_refused_dead_letter_write_is_logged_and_the_message_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full DLQ: the message is FAILED (not acknowledged) and a WARNING says so, with the reason."""
    import logging

    from streamwarden import Outcome, ReliabilityLayer, ReliabilitySettings

    store = InMemoryDeadLetterStore(max_entries=1)
    layer = ReliabilityLayer(None, ReliabilitySettings(max_retries=0), dead_letter_store=store)

    async def bad(message: object) -> None:
        raise ValueError("permanent")

    assert (await layer.process({"id": "first"}, bad)).outcome is Outcome.DEAD_LETTERED
    with caplog.at_level(logging.WARNING, logger="streamwarden"):
        result = await layer.process({"id": "second"}, bad)
    assert result.outcome is Outcome.FAILED
    [line] = [r.getMessage() for r in caplog.records if "could not be dead-lettered" in r.getMessage()]
    assert "'second'" in line
    assert "full" in line.lower()
