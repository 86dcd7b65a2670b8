"""ReliabilityLayer: outcomes, the seed contract, bad input, and the signals each decision emits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep
from streamwarden import _names as n

MakeLayer = Callable[..., sw.ReliabilityLayer]


async def ok(message: Any) -> dict[str, Any]:
    return {"status": "processed", "echo": message.get("data")}


def failing(errors: Sequence[BaseException], then: Any = "done") -> Callable[[Any], Any]:
    """A processor raising each of ``errors`` in turn, then returning ``then``; counts its calls."""
    queue = list(errors)

    async def processor(message: Any) -> Any:
        processor.calls += 1  # type: ignore[attr-defined]
        if queue:
            raise queue.pop(0)
        return then

    processor.calls = 0  # type: ignore[attr-defined]
    return processor


# --- outcomes and the seed contract ------------------------------------------------------------


async def test_success_returns_result_and_second_delivery_is_a_duplicate(make_layer: MakeLayer) -> None:
    """The seed contract: the processor's result first, ``None`` for the duplicate."""
    layer = make_layer()
    message = {"id": "sig-1", "data": {"symbol": "AAPL"}}
    assert await layer.process_message_reliably(message=message, processor_func=ok) == {
        "status": "processed",
        "echo": {"symbol": "AAPL"},
    }
    assert await layer.process_message_reliably(message=message, processor_func=ok) is None
    metrics = await layer.metrics_collector.get_reliability_metrics()
    assert metrics["total_messages"] == 2
    assert metrics["messages_processed_successfully"] == 1
    assert metrics["messages_deduplicated"] == 1
    assert metrics["success_rate"] == 0.5


async def test_outcomes_say_whether_to_acknowledge(make_layer: MakeLayer) -> None:
    """PROCESSED, DUPLICATE and DEAD_LETTERED are acknowledged; DEFERRED and FAILED are not."""
    layer = make_layer(circuit_breaker_threshold=1, max_retries=0)
    processed = await layer.process({"id": "a"}, ok)
    duplicate = await layer.process({"id": "a"}, ok)
    dead = await layer.process({"id": "b"}, failing([ValueError("bad")]))
    await layer.process({"id": "c"}, failing([ConnectionError("down")]))  # opens the breaker
    deferred = await layer.process({"id": "d"}, ok)
    assert [r.outcome for r in (processed, duplicate, dead, deferred)] == [
        sw.Outcome.PROCESSED,
        sw.Outcome.DUPLICATE,
        sw.Outcome.DEAD_LETTERED,
        sw.Outcome.DEFERRED,
    ]
    assert [r.should_ack for r in (processed, duplicate, dead, deferred)] == [True, True, True, False]


async def test_transient_error_is_retried_then_succeeds(make_layer: MakeLayer, sleep: RecordingSleep) -> None:
    """Two transient failures then success: PROCESSED after 3 attempts, exact backoff without jitter."""
    layer = make_layer(retry_initial_delay=0.1, backoff_factor=2.0)
    processor = failing([ConnectionError("x"), TimeoutError("y")])
    result = await layer.process({"id": "r1"}, processor)
    assert result.outcome is sw.Outcome.PROCESSED
    assert result.result == "done"
    assert result.attempts == 3
    assert processor.calls == 3  # type: ignore[attr-defined]
    assert sleep.delays == [0.1, 0.2]


async def test_retries_exhausted_dead_letters_and_reraises_the_original(make_layer: MakeLayer) -> None:
    """After max_retries+1 attempts the message is dead-lettered and the seed API re-raises the same error."""
    layer = make_layer(max_retries=2)
    errors = [ConnectionError(f"down {i}") for i in range(3)]
    processor = failing(errors)
    with pytest.raises(ConnectionError) as caught:
        await layer.process_message_reliably(message={"id": "r2", "data": 1}, processor_func=processor)
    assert caught.value is errors[-1]
    entries = await layer.dead_letter_store.list()
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.message_id, entry.attempts, entry.error_class, entry.error_type) == (
        "r2",
        3,
        "transient",
        "ConnectionError",
    )
    assert entry.payload == {"id": "r2", "data": 1}
    assert "down 2" in entry.error_message
    assert "ConnectionError" in entry.traceback


async def test_permanent_error_is_dead_lettered_on_the_first_attempt(make_layer: MakeLayer) -> None:
    """A ValueError is not retried and never trips the breaker, however often it happens."""
    layer = make_layer(circuit_breaker_threshold=2)
    for i in range(5):
        processor = failing([ValueError("bad quantity")])
        result = await layer.process({"id": f"p{i}"}, processor)
        assert result.outcome is sw.Outcome.DEAD_LETTERED
        assert result.attempts == 1
        assert processor.calls == 1  # type: ignore[attr-defined]
    assert layer.circuit_breaker.state == "closed"


@pytest.mark.parametrize(
    ("policy", "calls"), [("retry", 4), ("dead_letter", 1)], ids=["unknown-retried", "unknown-dead-lettered"]
)
async def test_unknown_errors_follow_the_policy(make_layer: MakeLayer, policy: str, calls: int) -> None:
    """``unknown_error_policy`` decides whether unclassified errors are retried."""
    layer = make_layer(unknown_error_policy=policy)
    processor = failing([RuntimeError("?")] * 4)
    result = await layer.process({"id": "u"}, processor)
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert processor.calls == calls  # type: ignore[attr-defined]
    assert result.dead_letter is not None
    assert result.dead_letter.error_class == "unknown"


async def test_dead_lettered_id_is_a_duplicate_for_one_lease_then_free(
    make_layer: MakeLayer, clock: Clock
) -> None:
    """After a confirmed DLQ write the id answers DUPLICATE for one lease period (a redelivery racing the
    ack is not dead-lettered twice), then is free again so a later delivery or replay runs it."""
    layer = make_layer(dedup_lease=60, processing_timeout=None, retry_deadline=None)
    processor = failing([ValueError("bad")])
    assert (await layer.process({"id": "x"}, processor)).outcome is sw.Outcome.DEAD_LETTERED
    assert (await layer.process({"id": "x"}, processor)).outcome is sw.Outcome.DUPLICATE
    assert processor.calls == 1  # type: ignore[attr-defined]
    assert await layer.dead_letter_store.count() == 1
    clock.advance(61)
    assert not await layer.deduplication_manager.is_duplicate("x")
    assert (await layer.process({"id": "x"}, ok)).outcome is sw.Outcome.PROCESSED


async def test_breaker_open_defers_without_running_the_handler(make_layer: MakeLayer, clock: Clock) -> None:
    """An open breaker defers (not acked, claim released); after the timeout one trial closes it."""
    layer = make_layer(circuit_breaker_threshold=2, circuit_breaker_timeout=30, max_retries=0)
    for i in range(2):
        await layer.process({"id": f"f{i}"}, failing([ConnectionError("down")]))
    assert layer.circuit_breaker.state == "open"
    processor = failing([])
    deferred = await layer.process({"id": "later"}, processor)
    assert deferred.outcome is sw.Outcome.DEFERRED
    assert isinstance(deferred.error, sw.CircuitOpenError)
    assert processor.calls == 0  # type: ignore[attr-defined]
    with pytest.raises(sw.CircuitOpenError):
        await layer.process_message_reliably(message={"id": "later"}, processor_func=processor)
    clock.advance(30)
    assert (await layer.process({"id": "later"}, processor)).outcome is sw.Outcome.PROCESSED
    assert layer.circuit_breaker.state == "closed"


async def test_one_messages_retries_count_once_toward_the_breaker(make_layer: MakeLayer) -> None:
    """A message whose retries all fail counts once toward the breaker: it cannot open it for everyone."""
    layer = make_layer(circuit_breaker_threshold=2, max_retries=5)
    processor = failing([ConnectionError("down")] * 6)
    result = await layer.process({"id": "m"}, processor)
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert processor.calls == 6  # type: ignore[attr-defined]
    assert layer.circuit_breaker.state == sw.BreakerState.CLOSED
    second = await layer.process({"id": "m2"}, failing([ConnectionError("down")] * 6))
    # a second message failing is a dependency problem: the breaker opens, its retry is refused
    assert layer.circuit_breaker.state == sw.BreakerState.OPEN
    assert second.outcome is sw.Outcome.DEFERRED
    assert isinstance(second.error, sw.CircuitOpenError)


async def test_breaker_opening_during_retries_defers_the_message(make_layer: MakeLayer) -> None:
    """When the breaker opens between attempts (other messages failing), the next attempt is refused."""
    layer = make_layer(circuit_breaker_threshold=2, max_retries=5)
    calls = 0

    async def processor(message: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            layer.circuit_breaker.force_open(60.0)  # as if concurrent messages had tripped it
        raise ConnectionError("down")

    result = await layer.process({"id": "m"}, processor)
    assert result.outcome is sw.Outcome.DEFERRED
    assert isinstance(result.error, sw.CircuitOpenError)
    assert calls == 2
    assert await layer.dead_letter_store.count() == 0


async def test_timeout_is_a_transient_error(make_layer: MakeLayer) -> None:
    """An attempt that overruns processing_timeout raises HandlerTimeout, which is retried."""
    layer = make_layer(processing_timeout=0.01, max_retries=1, dedup_lease=10)
    never = asyncio.Event()
    calls = 0

    async def slow_then_fast(message: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await never.wait()  # released only by the watchdog's cancellation
        return "fast"

    result = await layer.process({"id": "t"}, slow_then_fast)
    assert result.outcome is sw.Outcome.PROCESSED
    assert result.attempts == 2


async def test_timeouts_exhausted_dead_letter_as_handler_timeout(make_layer: MakeLayer) -> None:
    """Every attempt timing out ends in the DLQ with error type streamwarden.HandlerTimeout."""
    layer = make_layer(processing_timeout=0.01, max_retries=1, dedup_lease=10)
    never = asyncio.Event()

    async def hang(message: Any) -> None:
        await never.wait()

    result = await layer.process({"id": "t2"}, hang)
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert isinstance(result.error, sw.HandlerTimeout)
    assert result.dead_letter is not None
    assert result.dead_letter.error_type == "streamwarden.HandlerTimeout"


async def test_concurrent_delivery_of_the_same_id_runs_once(make_layer: MakeLayer) -> None:
    """While one owner holds the lease, another delivery is IN_PROGRESS (not acked, not run)."""
    layer = make_layer()
    started, release = asyncio.Event(), asyncio.Event()
    runs = 0

    async def holder(message: Any) -> str:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return "first"

    first = asyncio.create_task(layer.process({"id": "same"}, holder))
    await started.wait()
    second = await layer.process({"id": "same"}, holder)
    assert second.outcome is sw.Outcome.IN_PROGRESS
    assert not second.should_ack
    with pytest.raises(sw.MessageInProgressError):
        await layer.process_message_reliably(message={"id": "same"}, processor_func=holder)
    release.set()
    assert (await first).outcome is sw.Outcome.PROCESSED
    assert runs == 1
    assert (await layer.process({"id": "same"}, holder)).outcome is sw.Outcome.DUPLICATE


async def test_handler_gets_its_lease_with_increasing_fencing_tokens(make_layer: MakeLayer) -> None:
    """current_lease() inside the handler carries the message id and a fencing token that only grows."""
    layer = make_layer()
    seen: list[sw.Lease | None] = []

    async def record(message: Any) -> None:
        seen.append(sw.current_lease())

    for i in range(3):
        await layer.process({"id": f"l{i}"}, record)
    assert [lease.message_id for lease in seen if lease] == ["l0", "l1", "l2"]
    tokens = [lease.fencing_token for lease in seen if lease]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 3
    assert sw.current_lease() is None


async def test_cancellation_after_the_handler_started_keeps_the_claim(
    make_layer: MakeLayer, clock: Clock
) -> None:
    """A handler cancelled mid-run may have done its effect: the claim is not given back; the redelivery
    waits for the lease to expire and then runs as a counted takeover, never as an uncounted re-run."""
    layer = make_layer(dedup_lease=60, processing_timeout=30)
    started = asyncio.Event()

    async def hang(message: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(layer.process({"id": "c"}, hang))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await layer.process({"id": "c"}, ok)).outcome is sw.Outcome.IN_PROGRESS
    clock.advance(61)
    again = await layer.process({"id": "c"}, ok)
    assert again.outcome is sw.Outcome.PROCESSED
    assert layer.metrics_collector.snapshot()["dedup_takeovers"] == 1


async def test_wrap_decorates_a_handler(make_layer: MakeLayer) -> None:
    """layer.wrap(handler) behaves like process_message_reliably."""
    layer = make_layer()
    handler = layer.wrap(ok)
    assert await handler({"id": "w", "data": 1}) == {"status": "processed", "echo": 1}
    assert await handler({"id": "w", "data": 1}) is None


async def test_envelope_messages_keep_destination_and_delivery(make_layer: MakeLayer, otel: Otel) -> None:
    """An Envelope's destination names the span; its delivery count is the delivery attempt attribute."""
    layer = make_layer()
    env = sw.Envelope(id="e1", payload={"x": 1}, destination="orders", delivery_count=3)
    received: list[Any] = []

    async def take(message: Any) -> None:
        received.append(message)

    assert (await layer.process(env, take)).outcome is sw.Outcome.PROCESSED
    assert received == [env]
    (span,) = otel.spans("process orders")
    assert span.attributes is not None
    assert span.attributes[n.ATTR_DELIVERY_ATTEMPT] == 3
    assert span.attributes[n.ATTR_MESSAGING_DESTINATION] == "orders"


# --- bad input ---------------------------------------------------------------------------------


async def test_missing_id_is_dead_lettered_with_reason(make_layer: MakeLayer, otel: Otel) -> None:
    """No id and policy dead_letter: DLQ entry reason missing_id, handler never runs, seed API raises."""
    layer = make_layer()
    processor = failing([])
    result = await layer.process({"data": {"qty": 1}}, processor)
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert processor.calls == 0  # type: ignore[attr-defined]
    assert result.dead_letter is not None
    assert result.dead_letter.reason == "missing_id"
    with pytest.raises(sw.MissingMessageIdError):
        await layer.process_message_reliably(message={"data": 2}, processor_func=processor)
    assert otel.value(n.METRIC_INVALID_MESSAGES, streamwarden__dlq__reason="missing_id") == 2


async def test_missing_id_with_content_hash_policy_deduplicates_by_payload(make_layer: MakeLayer) -> None:
    """With missing_id_policy=content_hash, identical payloads share an id regardless of key order."""
    layer = make_layer(missing_id_policy="content_hash")
    first = await layer.process({"data": {"a": 1, "b": 2}}, ok)
    second = await layer.process({"data": {"b": 2, "a": 1}}, ok)
    other = await layer.process({"data": {"a": 1, "b": 3}}, ok)
    assert first.outcome is sw.Outcome.PROCESSED
    assert first.message_id is not None
    assert first.message_id.startswith("sha256:")
    assert second.outcome is sw.Outcome.DUPLICATE
    assert other.outcome is sw.Outcome.PROCESSED


@pytest.mark.parametrize(
    "message", ["a string", b"bytes", ["a", "list"], None, 42], ids=["str", "bytes", "list", "none", "int"]
)
async def test_non_mapping_messages_are_dead_lettered_not_crashed(
    make_layer: MakeLayer, message: Any
) -> None:
    """Anything but a mapping or Envelope is dead-lettered with reason invalid_message, and kept."""
    layer = make_layer()
    result = await layer.process(message, ok)
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert isinstance(result.error, sw.InvalidMessageError)
    assert result.dead_letter is not None
    assert result.dead_letter.reason == "invalid_message"
    assert result.dead_letter.payload == message


async def test_none_result_is_a_success(make_layer: MakeLayer) -> None:
    """A processor returning None processed the message: the id is completed."""
    layer = make_layer()

    async def nothing(message: Any) -> None:
        return None

    result = await layer.process({"id": "n"}, nothing)
    assert result.outcome is sw.Outcome.PROCESSED
    assert result.result is None
    assert (await layer.process({"id": "n"}, nothing)).outcome is sw.Outcome.DUPLICATE


async def test_sync_processor_is_a_clear_error_and_loses_nothing(make_layer: MakeLayer) -> None:
    """A processor that returns a non-awaitable fails with InvalidProcessorError; no DLQ, claim released."""
    layer = make_layer()

    def sync_handler(message: Any) -> str:
        return "sync"

    result = await layer.process({"id": "s"}, sync_handler)  # type: ignore[arg-type]
    assert result.outcome is sw.Outcome.FAILED
    assert isinstance(result.error, sw.InvalidProcessorError)
    assert "async def" in str(result.error)
    assert await layer.dead_letter_store.count() == 0
    with pytest.raises(TypeError):
        await layer.process_message_reliably(message={"id": "s"}, processor_func=sync_handler)  # type: ignore[arg-type]
    assert (await layer.process({"id": "s"}, ok)).outcome is sw.Outcome.PROCESSED


async def test_full_dlq_fails_the_message_without_acknowledging(make_layer: MakeLayer, otel: Otel) -> None:
    """A full dead-letter store: FAILED (not acked), write error counted, original error re-raised."""
    store = sw.InMemoryDeadLetterStore(max_entries=1)
    layer = make_layer(dead_letter_store=store)
    await layer.process({"id": "d1"}, failing([ValueError("one")]))
    error = ValueError("two")
    result = await layer.process({"id": "d2"}, failing([error]))
    assert result.outcome is sw.Outcome.FAILED
    assert not result.should_ack
    assert result.error is error
    assert any("dead-letter write failed" in note for note in getattr(error, "__notes__", []))
    assert await store.count() == 1
    assert otel.value(n.METRIC_DLQ_WRITE_ERRORS) == 1
    assert not await layer.deduplication_manager.is_duplicate("d2")


async def test_dlq_disabled_fails_the_message(make_layer: MakeLayer) -> None:
    """With dlq_enabled=False a failed message is FAILED (not acknowledged) and nothing is stored."""
    layer = make_layer(dlq_enabled=False)
    result = await layer.process({"id": "z"}, failing([ValueError("bad")]))
    assert result.outcome is sw.Outcome.FAILED
    assert await layer.dead_letter_store.count() == 0
    metrics = await layer.metrics_collector.get_reliability_metrics()
    assert metrics["messages_failed"] == 1


async def test_processor_must_be_callable(make_layer: MakeLayer) -> None:
    """A non-callable processor is a TypeError before anything is claimed."""
    layer = make_layer()
    with pytest.raises(TypeError, match="callable"):
        await layer.process({"id": "q"}, "not callable")  # type: ignore[arg-type]
    assert (await layer.process({"id": "q"}, ok)).outcome is sw.Outcome.PROCESSED


class BrokenStore(sw.InMemoryDedupStore):
    """A dedup store whose claims fail, as a store would during an outage."""

    async def claim(
        self, message_id: str, lease_seconds: float, fingerprint: str | None = None
    ) -> sw.ClaimResult:
        raise ConnectionError("dedup store unreachable")


@pytest.mark.parametrize(
    ("mode", "outcome", "runs"),
    [("fail_closed", sw.Outcome.DEFERRED, 0), ("fail_open", sw.Outcome.PROCESSED, 1)],
    ids=["fail-closed-defers", "fail-open-processes"],
)
async def test_dedup_store_failure_follows_the_policy(
    make_layer: MakeLayer, otel: Otel, mode: str, outcome: sw.Outcome, runs: int
) -> None:
    """Dedup store down: fail-closed defers without running the handler; fail-open runs it. Both counted."""
    layer = make_layer(dedup_failure_mode=mode, dedup_store=BrokenStore())
    processor = failing([])
    result = await layer.process({"id": "k"}, processor)
    assert result.outcome is outcome
    assert processor.calls == runs  # type: ignore[attr-defined]
    assert otel.value(n.METRIC_DEDUP_CHECKS, streamwarden__dedup__result="error") == 1
    if mode == "fail_closed":
        assert isinstance(result.error, sw.DeduplicationUnavailableError)
        assert isinstance(result.error.__cause__, ConnectionError)


async def test_payload_conflict_is_flagged(make_layer: MakeLayer, otel: Otel) -> None:
    """With conflict detection, the same id with another payload is not re-run and is counted as conflict."""
    layer = make_layer(detect_payload_conflicts=True)
    await layer.process({"id": "p", "data": 1}, ok)
    result = await layer.process({"id": "p", "data": 2}, ok)
    assert result.outcome is sw.Outcome.DUPLICATE
    assert otel.value(n.METRIC_DEDUP_CHECKS, streamwarden__dedup__result="conflict") == 1
    assert len(otel.events(n.EVENT_DEDUP_CONFLICT)) == 1


# --- signals -----------------------------------------------------------------------------------


async def test_process_span_follows_messaging_conventions(make_layer: MakeLayer, otel: Otel) -> None:
    """One CONSUMER span ``process {destination}`` with the semconv attributes, unset status on success."""
    layer = make_layer(destination="trading.signals", consumer_group="executors")
    await layer.process({"id": "sig-9"}, ok)
    (span,) = otel.spans()
    assert span.name == "process trading.signals"
    assert span.kind is SpanKind.CONSUMER
    assert span.attributes is not None
    attrs = dict(span.attributes)
    assert attrs[n.ATTR_MESSAGING_OPERATION_NAME] == "process"
    assert attrs[n.ATTR_MESSAGING_OPERATION_TYPE] == "process"
    assert attrs[n.ATTR_MESSAGING_DESTINATION] == "trading.signals"
    assert attrs[n.ATTR_MESSAGING_CONSUMER_GROUP] == "executors"
    assert attrs[n.ATTR_MESSAGING_MESSAGE_ID] == "sig-9"
    assert attrs[n.ATTR_DELIVERY_ATTEMPT] == 1
    assert n.ATTR_ERROR_TYPE not in attrs
    assert span.status.status_code is StatusCode.UNSET
    assert otel.value(n.METRIC_CONSUMED_MESSAGES) == 1
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="processed") == 1
    assert otel.value(n.METRIC_DEDUP_CHECKS, streamwarden__dedup__result="new") == 1
    assert otel.value(n.METRIC_PROCESS_DURATION) == 1
    duration_attrs = [a for a, _ in otel.points(n.METRIC_PROCESS_DURATION)]
    assert all("messaging.message.id" not in a for a in duration_attrs)


async def test_traceparent_header_links_the_producer(make_layer: MakeLayer, otel: Otel) -> None:
    """A ``traceparent`` header becomes a span link to the producer's context."""
    layer = make_layer()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    await layer.process({"id": "tp", "headers": {"traceparent": f"00-{trace_id}-{span_id}-01"}}, ok)
    (span,) = otel.spans()
    assert len(span.links) == 1
    linked = span.links[0].context
    assert (format(linked.trace_id, "032x"), format(linked.span_id, "016x")) == (trace_id, span_id)


async def test_duplicate_emits_one_event_and_one_metric_point(make_layer: MakeLayer, otel: Otel) -> None:
    """A duplicate: exactly one dedup.duplicate span event and dedup/outcome counts of one."""
    layer = make_layer()
    await layer.process({"id": "dup"}, ok)
    await layer.process({"id": "dup"}, ok)
    assert len(otel.events(n.EVENT_DEDUP_DUPLICATE)) == 1
    assert otel.value(n.METRIC_DEDUP_CHECKS, streamwarden__dedup__result="duplicate") == 1
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="duplicate") == 1


async def test_retry_emits_event_and_counter_without_error_status(make_layer: MakeLayer, otel: Otel) -> None:
    """A retry: one streamwarden.retry event (attempt, delay, error.type), one counter point, no error status."""
    layer = make_layer(retry_initial_delay=0.25)
    await layer.process({"id": "re"}, failing([ConnectionError("blip")]))
    (event,) = otel.events(n.EVENT_RETRY)
    assert event.attributes[n.ATTR_RETRY_ATTEMPT] == 1
    assert event.attributes[n.ATTR_RETRY_DELAY] == 0.25
    assert event.attributes[n.ATTR_ERROR_TYPE] == "ConnectionError"
    assert otel.value(n.METRIC_RETRY_ATTEMPTS, error__type="ConnectionError") == 1
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.UNSET
    assert n.ATTR_ERROR_TYPE not in (span.attributes or {})


async def test_dead_lettering_emits_producer_span_with_the_failed_trace(
    make_layer: MakeLayer, otel: Otel
) -> None:
    """DLQ write: a PRODUCER ``send {dest}.dlq`` span, child of the failed process span, whose ids the entry keeps."""
    layer = make_layer(destination="orders")
    result = await layer.process({"id": "dl"}, failing([ValueError("bad")]))
    (process,) = otel.spans("process orders")
    (send,) = otel.spans("send orders.dlq")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None
    assert send.parent.span_id == process.context.span_id
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes is not None
    assert process.attributes[n.ATTR_ERROR_TYPE] == "ValueError"
    entry = result.dead_letter
    assert entry is not None
    assert entry.trace_id == format(process.context.trace_id, "032x")
    assert entry.span_id == format(process.context.span_id, "016x")
    assert entry.traceparent == f"00-{entry.trace_id}-{entry.span_id}-01"
    assert len(otel.events(n.EVENT_DEAD_LETTERED)) == 1
    assert (
        otel.value(
            n.METRIC_DLQ_MESSAGES,
            error__type="ValueError",
            streamwarden__error__class="permanent",
            streamwarden__dlq__reason="error",
        )
        == 1
    )
    assert otel.value(n.METRIC_DLQ_DEPTH, messaging__destination__name="orders") == 1
    failed = [
        a for a, _ in otel.points(n.METRIC_PROCESS_DURATION) if a.get(n.ATTR_ERROR_TYPE) == "ValueError"
    ]
    assert len(failed) == 1


async def test_each_breaker_transition_emits_event_and_metric(
    make_layer: MakeLayer, otel: Otel, clock: Clock
) -> None:
    """closed->open, open->half_open, half_open->open, half_open->closed: an event and a counter point each."""
    layer = make_layer(circuit_breaker_threshold=1, circuit_breaker_timeout=10, max_retries=0)
    await layer.process({"id": "b1"}, failing([ConnectionError("down")]))  # closed -> open
    clock.advance(10)
    await layer.process({"id": "b2"}, failing([ConnectionError("down")]))  # open -> half_open -> open
    clock.advance(10)
    await layer.process({"id": "b3"}, ok)  # open -> half_open -> closed
    changes = [
        (e.attributes[n.ATTR_BREAKER_FROM], e.attributes[n.ATTR_BREAKER_TO])
        for e in otel.events(n.EVENT_BREAKER_STATE_CHANGE)
    ]
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    for src, dst, count in [("closed", "open", 1), ("open", "half_open", 2), ("half_open", "open", 1)]:
        assert (
            otel.value(
                n.METRIC_BREAKER_TRANSITIONS,
                streamwarden__circuit_breaker__from=src,
                streamwarden__circuit_breaker__to=dst,
            )
            == count
        )
    status = {a[n.ATTR_BREAKER_STATE]: v for a, v in otel.points(n.METRIC_BREAKER_STATUS)}
    assert status == {"closed": 1, "open": 0, "half_open": 0}


async def test_rejection_emits_event_and_metric(make_layer: MakeLayer, otel: Otel) -> None:
    """A call refused by the open breaker: one rejected event and one rejection point."""
    layer = make_layer(circuit_breaker_threshold=1, max_retries=0)
    await layer.process({"id": "o1"}, failing([ConnectionError("down")]))
    await layer.process({"id": "o2"}, ok)
    assert len(otel.events(n.EVENT_BREAKER_REJECTED)) == 1
    assert otel.value(n.METRIC_BREAKER_REJECTIONS, streamwarden__circuit_breaker__name="default") == 1
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="deferred") == 1
    status = {a[n.ATTR_BREAKER_STATE]: v for a, v in otel.points(n.METRIC_BREAKER_STATUS)}
    assert status == {"closed": 0, "open": 1, "half_open": 0}


async def test_hooks_that_raise_never_fail_a_message(
    otel: Otel, clock: Clock, sleep: RecordingSleep, caplog: pytest.LogCaptureFixture
) -> None:
    """User hooks get frozen details; one that raises is logged and swallowed."""
    seen: list[sw.RetryDetails] = []

    def on_retry(details: sw.RetryDetails) -> None:
        seen.append(details)
        raise RuntimeError("hook bug")

    def on_dead_letter(entry: sw.DeadLetterEntry) -> None:
        raise RuntimeError("hook bug")

    layer = sw.ReliabilityLayer(
        None,
        sw.ReliabilitySettings(max_retries=1, retry_jitter=False),
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        clock=clock,
        sleep=sleep,
        on_retry=on_retry,
        on_dead_letter=on_dead_letter,
    )
    result = await layer.process({"id": "h"}, failing([ConnectionError("a"), ConnectionError("b")]))
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert [(d.attempt, d.error_class) for d in seen] == [(1, sw.ErrorClass.TRANSIENT)]
    assert sum("hook" in r.getMessage() for r in caplog.records) == 2


async def test_layers_of_one_service_share_instruments(otel: Otel) -> None:
    """Two layers on the same providers add up in the same series instead of shadowing each other."""
    make = lambda: sw.ReliabilityLayer(  # noqa: E731
        None,
        sw.ReliabilitySettings(),
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    first, second = make(), make()
    await first.process({"id": "1"}, ok)
    await second.process({"id": "2"}, ok)
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="processed") == 2


async def test_poison_counts_handler_runs_not_deliveries(make_layer: MakeLayer, otel: Otel) -> None:
    """A message whose handler already ran poison_max_deliveries times (failing while the breaker stayed
    closed) is dead-lettered as poison without running again; the delivery count plays no part."""
    layer = make_layer(poison_max_deliveries=3, exhausted_transient_action="defer", max_retries=0)
    processor = failing([ConnectionError("flaky")] * 10)
    high_delivery = await layer.process(sw.Envelope(id="fresh", payload={}, delivery_count=50), failing([]))
    assert high_delivery.outcome is sw.Outcome.PROCESSED  # a redelivered message is not poison by itself
    for _ in range(3):
        deferred = await layer.process(sw.Envelope(id="pm", payload={"x": 2}), processor)
        assert deferred.outcome is sw.Outcome.DEFERRED
    result = await layer.process(sw.Envelope(id="pm", payload={"x": 2}), processor)
    assert result.outcome is sw.Outcome.DEAD_LETTERED
    assert isinstance(result.error, sw.PoisonMessageError)
    assert processor.calls == 3  # type: ignore[attr-defined]
    assert result.dead_letter is not None
    assert result.dead_letter.reason == "poison"
    assert otel.value(n.METRIC_DLQ_MESSAGES, streamwarden__dlq__reason="poison") == 1


async def test_deliveries_refused_by_the_breaker_never_make_poison(make_layer: MakeLayer) -> None:
    """Deferrals while the breaker is open (the handler never ran) do not count toward poison."""
    layer = make_layer(poison_max_deliveries=2)
    layer.circuit_breaker.force_open(60.0)
    for _ in range(5):
        assert (await layer.process({"id": "healthy"}, ok)).outcome is sw.Outcome.DEFERRED
    layer.circuit_breaker.force_close()
    assert (await layer.process({"id": "healthy"}, ok)).outcome is sw.Outcome.PROCESSED


async def test_exhausted_transient_errors_can_be_deferred(make_layer: MakeLayer) -> None:
    """exhausted_transient_action=defer: retries run out on a transient error -> DEFERRED, no DLQ entry."""
    layer = make_layer(exhausted_transient_action="defer", max_retries=1)
    result = await layer.process({"id": "e"}, failing([ConnectionError("a"), ConnectionError("b")]))
    assert result.outcome is sw.Outcome.DEFERRED
    assert not result.should_ack
    assert await layer.dead_letter_store.count() == 0
    permanent = await layer.process({"id": "p"}, failing([ValueError("bad")]))
    assert permanent.outcome is sw.Outcome.DEAD_LETTERED


async def test_takeover_of_an_expired_lease_is_counted(
    make_layer: MakeLayer, otel: Otel, clock: Clock
) -> None:
    """A claim that replaces an expired lease (owner died after its effect?) counts a possible duplicate."""
    layer = make_layer(dedup_lease=60, processing_timeout=None, retry_deadline=None)
    stale = await layer.deduplication_manager.claim("t")  # an owner that then "dies"
    assert stale.lease is not None
    clock.advance(61)
    result = await layer.process({"id": "t"}, ok)
    assert result.outcome is sw.Outcome.PROCESSED
    assert otel.value(n.METRIC_DEDUP_CHECKS, streamwarden__dedup__result="takeover") == 1
    assert len(otel.events(n.EVENT_DEDUP_TAKEOVER)) == 1
    metrics = await layer.metrics_collector.get_reliability_metrics()
    assert metrics["dedup_takeovers"] == 1
    assert not await layer.deduplication_manager.complete(stale.lease)
