"""An unwritable DLQ topic makes ``add()`` raise within its bound, so the layer does not acknowledge:
a stalled broker (SIGSTOP), a dead one (SIGKILL), none at all, and a record the client refuses as too
large. Each test runs its own broker (``own_broker``, with ``make_own_store``, whose stores close before their
broker stops)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from _kafka_dlq_support import entry

from _kafka_broker import KafkaBroker
from _support import Otel, build_layer, eventually
from streamwarden import DeadLetterError, Envelope, Outcome
from streamwarden import _names as n
from streamwarden._kafka import KafkaDeadLetterStore

Factory = Callable[..., KafkaDeadLetterStore]

#: add() must give up within delivery_timeout; this much more is scheduling slack on a shared machine
SLACK_S = 2.0


def _quick(make_store: Factory, broker: KafkaBroker) -> KafkaDeadLetterStore:
    return make_store(broker, request_timeout_ms=1_000, delivery_timeout=2.0, read_timeout=3.0)


async def test_stalled_broker_add_raises_within_the_bound(
    own_broker: KafkaBroker, make_own_store: Factory
) -> None:
    """SIGSTOP: the write is not confirmed, add() raises DeadLetterError within delivery_timeout; after
    SIGCONT writes are confirmed again."""
    store = _quick(make_own_store, own_broker)
    await store.add(entry("orders", message_id="before"))
    own_broker.pause()
    try:
        started = time.monotonic()
        with pytest.raises(DeadLetterError) as raised:
            await store.add(entry("orders", message_id="during"))
        assert time.monotonic() - started < store.delivery_timeout + SLACK_S
        assert raised.value.__cause__ is not None
        with pytest.raises(DeadLetterError):  # reads are bounded too
            await store.count("orders")
    finally:
        own_broker.resume()

    async def writable() -> bool:
        try:
            await store.add(entry("orders", message_id="after"))
        except DeadLetterError:
            return False
        return True

    await eventually(writable, timeout=20, step=0.2, what="writes confirmed after SIGCONT")
    assert "before" in {e.message_id for e in await store.list("orders")}


async def test_dead_broker_add_raises(own_broker: KafkaBroker, make_own_store: Factory) -> None:
    """SIGKILL: connection refused; add() raises within the bound instead of hanging."""
    store = _quick(make_own_store, own_broker)
    await store.add(entry("orders"))
    own_broker.kill()
    started = time.monotonic()
    with pytest.raises(DeadLetterError):
        await store.add(entry("orders", message_id="lost-broker"))
    assert time.monotonic() - started < store.delivery_timeout + SLACK_S


async def test_no_broker_at_all(make_store: Factory) -> None:
    """Nothing listens: the first add() cannot even start its clients; it raises, it does not hang."""
    broker = KafkaBroker()  # never started
    try:
        store = _quick(make_store, broker)
        started = time.monotonic()
        with pytest.raises(DeadLetterError, match=r"orders\.dlq"):
            await store.add(entry("orders"))
        assert time.monotonic() - started < store.delivery_timeout + SLACK_S
    finally:
        broker.close()


async def test_a_record_too_large_raises(own_broker: KafkaBroker, make_own_store: Factory) -> None:
    """Even without its payload the record does not fit max_request_size: add() raises (nothing is cut
    silently beyond the documented bounds)."""
    store = make_own_store(own_broker, max_request_size=4_096, max_traceback_chars=50_000)
    with pytest.raises(DeadLetterError, match="MessageSizeTooLarge"):
        await store.add(entry("orders", traceback="frame\n" * 5_000))


async def test_layer_does_not_ack_when_the_dlq_is_unwritable(
    own_broker: KafkaBroker, make_own_store: Factory, otel: Otel
) -> None:
    """Through the layer: a permanent failure whose DLQ write fails is FAILED (not acknowledged, the
    broker redelivers) and counted as a DLQ write error; once the broker is back it is dead-lettered."""
    store = _quick(make_own_store, own_broker)
    layer = build_layer(
        None, otel, dead_letter_store=store, max_retries=0, processing_timeout=None, destination="orders"
    )

    async def broken(_message: object) -> None:
        raise ValueError("bad order")

    message = Envelope(id="o-1", payload={"id": "o-1"}, destination="orders", source_ref="orders/0/3")
    await store.add(entry("orders", message_id="warm-up"))  # topics exist, clients started
    own_broker.pause()
    try:
        result = await layer.process(message, broken)
    finally:
        own_broker.resume()
    assert result.outcome is Outcome.FAILED
    assert not result.should_ack
    assert otel.value(n.METRIC_DLQ_WRITE_ERRORS) == 1

    async def dead_lettered() -> bool:
        again = await layer.process(message, broken)
        return again.outcome is Outcome.DEAD_LETTERED

    await eventually(dead_lettered, timeout=20, step=0.2, what="dead-lettered once the broker is back")
    stored = [e for e in await store.list("orders") if e.message_id == "o-1"]
    # at least once: the write that timed out on our side may still have landed after SIGCONT
    assert 1 <= len(stored) <= 2
    assert all(e.source_ref == "orders/0/3" and e.error_type == "ValueError" for e in stored)
