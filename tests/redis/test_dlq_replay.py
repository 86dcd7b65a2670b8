"""Dead letters through the layer and back: the DLQ round trip, replay rules, rate limit, telemetry."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from _fixtures_dlq import Handler, entry, make_layer
from click.testing import CliRunner
from opentelemetry.trace import SpanKind

from _support import Clock, Otel, OtlpTraceReceiver, RecordingSleep
from streamwarden import Envelope, InMemoryDeadLetterStore, Outcome
from streamwarden import _names as n
from streamwarden._cli._ops import register
from streamwarden._redis._dlq import OmittedPayload, RedisDeadLetterStore
from streamwarden._replay import (
    HEADER_REPLAY_COUNT,
    HEADER_REPLAY_OF,
    DeadLetterReplayer,
    ReplayResult,
    TokenBucket,
)

TESTS_REDIS = Path(__file__).resolve().parent


@pytest.fixture
def store(redis_client: redis.asyncio.Redis) -> RedisDeadLetterStore:
    """A Redis DLQ store on the session server, emptied before the test."""
    return RedisDeadLetterStore(redis_client)


def _replays(otel: Otel) -> dict[str, int]:
    return {attrs[n.ATTR_REPLAY_RESULT]: value for attrs, value in otel.points(n.METRIC_DLQ_REPLAYS)}


async def test_dlq_round_trip(store: RedisDeadLetterStore, otel: Otel, redis_url: str) -> None:
    """dead-letter -> show (trace id) -> replay succeeds once (entry removed, span linked to the failed
    trace) -> a second replay is a no-op."""
    layer = make_layer(store, otel=otel)
    handler = Handler(fail=True)
    result = await layer.process({"id": "order-7", "qty": 3}, handler)
    assert result.outcome is Outcome.DEAD_LETTERED
    assert result.dead_letter is not None
    entry_id = result.dead_letter.entry_id
    assert entry_id is not None
    [failed_span] = otel.spans("process orders")
    failed_trace = format(failed_span.context.trace_id, "032x")

    stored = await store.get(entry_id)
    assert stored is not None
    assert stored.trace_id == failed_trace
    assert stored.span_id == format(failed_span.context.span_id, "016x")
    assert stored.payload == {"id": "order-7", "qty": 3}
    assert "hunter2" not in stored.error_message

    cli = _cli()
    shown = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["dlq", "show", entry_id, "--redis-url", redis_url, "--trace-url-template", "https://t/{trace_id}"],
    )
    assert shown.exit_code == 0, shown.output
    assert f"trace id: {failed_trace}" in shown.output
    assert f"trace link: https://t/{failed_trace}" in shown.output

    handler.fail = False
    replayer = DeadLetterReplayer(layer, store, rate_per_second=None)
    report = await replayer.replay(handler, entry_ids=[entry_id])
    assert [(i.result, i.entry_id) for i in report.items] == [(ReplayResult.PROCESSED, entry_id)]
    assert handler.calls[-1] == {"id": "order-7", "qty": 3}  # the handler gets the original message
    assert await store.get(entry_id) is None
    assert await store.count() == 0

    [replay_span] = otel.spans("process orders.dlq")
    assert replay_span.kind is SpanKind.CONSUMER
    linked = {(link.context.trace_id, link.context.span_id) for link in replay_span.links}
    assert (failed_span.context.trace_id, failed_span.context.span_id) in linked
    rerun = [s for s in otel.spans("process orders") if s is not failed_span]
    assert rerun[0].parent is not None
    assert rerun[0].parent.span_id == replay_span.context.span_id

    again = await replayer.replay(handler, entry_ids=[entry_id])
    assert again.items == []
    assert again.missing == [entry_id]
    by_destination = await replayer.replay(handler, destination="orders")
    assert by_destination.items == []
    assert len(handler.calls) == 2
    assert _replays(otel) == {"processed": 1}


def _cli() -> Any:
    import click

    @click.group()
    def cli() -> None:
        """Test group."""

    register(cli)
    return cli


async def test_completed_id_is_skipped_unless_forced(store: RedisDeadLetterStore, otel: Otel) -> None:
    """An id completed after its entry was written is reported skipped_duplicate and kept; force runs it."""
    layer = make_layer(store, otel=otel)
    handler = Handler(fail=False)
    assert (await layer.process({"id": "done-1"}, handler)).outcome is Outcome.PROCESSED
    # dead-lettered an hour ago, past the layer's dead-letter marker window: the completion is real
    an_hour_ago = time.time() - 3600
    stale = await store.add(
        entry(message_id="done-1", payload={"id": "done-1"}, dead_lettered_at=an_hour_ago)
    )
    replayer = DeadLetterReplayer(layer, store, rate_per_second=None)

    skipped = await replayer.replay(handler)
    assert [i.result for i in skipped.items] == [ReplayResult.SKIPPED_DUPLICATE]
    assert len(handler.calls) == 1
    assert await store.get(stale) is not None

    forced = await replayer.replay(handler, force=True)
    assert [i.result for i in forced.items] == [ReplayResult.PROCESSED]
    assert len(handler.calls) == 2
    assert await store.count() == 0
    assert _replays(otel) == {"skipped_duplicate": 1, "processed": 1}


async def test_refailure_leaves_one_entry_with_summed_attempts(
    store: RedisDeadLetterStore, otel: Otel
) -> None:
    """A replay that fails again leaves exactly one entry: attempts add up, first_failed_at stays,
    replay headers are replaced rather than appended."""
    layer = make_layer(store, otel=otel, max_retries=2, circuit_breaker_threshold=100)
    handler = Handler(fail=True, error=lambda: ConnectionError("downstream down"))
    message = {"id": "m-9", "headers": {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "k": "v"}}
    first = await layer.process(message, handler)
    assert first.outcome is Outcome.DEAD_LETTERED
    assert first.dead_letter is not None
    assert first.dead_letter.attempts == 3
    original = await store.get(first.dead_letter.entry_id or "")
    assert original is not None

    replayer = DeadLetterReplayer(layer, store, rate_per_second=None)
    report = await replayer.replay(handler)
    [item] = report.items
    assert item.result is ReplayResult.FAILED
    assert item.outcome == "dead_lettered"
    assert item.attempts == 6
    [left] = await store.list()
    assert left.entry_id == item.new_entry_id
    assert left.attempts == 6
    assert left.first_failed_at == original.first_failed_at
    assert left.headers[HEADER_REPLAY_OF] == original.entry_id
    assert left.headers[HEADER_REPLAY_COUNT] == "1"

    second = await replayer.replay(handler)
    [left2] = await store.list()
    assert second.items[0].new_entry_id == left2.entry_id
    assert left2.attempts == 9
    assert left2.headers[HEADER_REPLAY_COUNT] == "2"
    assert set(left2.headers) == set(left.headers)  # replaced, not grown
    assert left2.headers["k"] == "v"
    assert _replays(otel) == {"failed": 2}
    [*_, last_replay] = otel.spans("process orders.dlq")
    assert not last_replay.status.is_ok


async def test_refailure_merge_on_a_store_without_replace(otel: Otel) -> None:
    """On a store without replace() the merged entry is written first, then both others are deleted."""
    store = InMemoryDeadLetterStore()
    layer = make_layer(store, otel=otel)
    handler = Handler(fail=True)
    await layer.process({"id": "x"}, handler)
    report = await DeadLetterReplayer(layer, rate_per_second=None).replay(handler)
    assert report.items[0].attempts == 2
    [left] = await store.list()
    assert left.attempts == 2
    assert left.entry_id == report.items[0].new_entry_id


async def test_dlq_write_failure_during_replay_keeps_the_entry(
    store: RedisDeadLetterStore, otel: Otel, redis_client: redis.asyncio.Redis
) -> None:
    """When the re-failure cannot be dead-lettered (queue full), the replayed entry stays untouched."""
    full = RedisDeadLetterStore(redis_client, max_entries_per_destination=1)
    layer = make_layer(full, otel=otel)
    handler = Handler(fail=True)
    first = await layer.process({"id": "only"}, handler)
    assert first.outcome is Outcome.DEAD_LETTERED
    report = await DeadLetterReplayer(layer, full, rate_per_second=None).replay(handler)
    [item] = report.items
    assert item.result is ReplayResult.FAILED
    assert item.outcome == "failed"
    [left] = await full.list()
    assert left.entry_id == first.dead_letter.entry_id  # type: ignore[union-attr]


async def test_unreplayable_entries_are_reported_and_kept(store: RedisDeadLetterStore, otel: Otel) -> None:
    """Entries without a message id or without a stored payload fail without running the handler."""
    layer = make_layer(store, otel=otel)
    await store.add(entry(message_id=None))
    big = RedisDeadLetterStore(store.client, max_payload_bytes=10)
    await big.add(entry(message_id="big", payload={"blob": "x" * 100}))
    handler = Handler(fail=False)
    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(handler)
    assert [i.result for i in report.items] == [ReplayResult.FAILED, ReplayResult.FAILED]
    assert "no message id" in report.items[0].detail
    assert "oversize" in report.items[1].detail
    assert handler.calls == []
    assert await store.count() == 2
    assert isinstance((await store.list())[1].payload, OmittedPayload)


async def test_dry_run_lists_without_running(store: RedisDeadLetterStore, otel: Otel) -> None:
    """A dry run reports every selected entry, runs nothing and removes nothing."""
    layer = make_layer(store, otel=otel)
    for i in range(3):
        await store.add(entry(message_id=f"m-{i}", payload={"id": f"m-{i}"}))
    handler = Handler(fail=False)
    report = await DeadLetterReplayer(layer, store).replay(handler, dry_run=True, limit=2)
    assert [i.result for i in report.items] == [ReplayResult.DRY_RUN] * 2
    assert {i.detail for i in report.items} == {"would replay"}
    assert handler.calls == []
    assert await store.count() == 3
    assert _replays(otel) == {"dry_run": 2}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param({"error_type": "KeyError"}, ["k"], id="error-type"),
        pytest.param({"destination": "payments"}, ["p"], id="destination"),
        pytest.param({"error_class": "transient"}, ["t"], id="error-class"),
    ],
)
async def test_replay_filters(
    store: RedisDeadLetterStore, otel: Otel, filters: dict[str, Any], expected: list[str]
) -> None:
    """Only entries matching the filters are replayed."""
    layer = make_layer(store, otel=otel)
    await store.add(entry(message_id="k", payload={"id": "k"}, error_type="KeyError"))
    await store.add(entry("payments", message_id="p", payload={"id": "p"}))
    await store.add(entry(message_id="t", payload={"id": "t"}, error_class="transient"))
    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(
        Handler(fail=False), **filters
    )
    assert [i.message_id for i in report.items] == expected
    assert await store.count() == 2


async def test_replay_is_rate_limited_on_the_injected_clock(store: RedisDeadLetterStore, otel: Otel) -> None:
    """At 4 replays per second, five entries wait 0.25 s between each (on the fake clock)."""
    clock = Clock(100.0)
    sleep = RecordingSleep(clock)
    layer = make_layer(store, otel=otel)
    for i in range(5):
        await store.add(entry(message_id=f"r-{i}", payload={"id": f"r-{i}"}))
    replayer = DeadLetterReplayer(layer, store, rate_per_second=4.0, clock=clock, sleep=sleep)
    report = await replayer.replay(Handler(fail=False))
    assert report.processed == 5
    assert sleep.delays == pytest.approx([0.25] * 4)


async def test_token_bucket_does_not_wait_after_idle_time() -> None:
    """Time already passed counts: a slow caller is never made to wait."""
    clock = Clock(0.0)
    sleep = RecordingSleep(clock)
    bucket = TokenBucket(2.0, clock=clock, sleep=sleep)
    await bucket.acquire()
    clock.advance(10.0)
    await bucket.acquire()
    assert sleep.delays == []


async def test_open_breaker_stops_the_run(store: RedisDeadLetterStore, otel: Otel) -> None:
    """A replay deferred by an open breaker stops the run and keeps every entry."""
    layer = make_layer(store, otel=otel, circuit_breaker_threshold=1)
    for i in range(3):
        await store.add(entry(message_id=f"b-{i}", payload={"id": f"b-{i}"}))
    handler = Handler(fail=True, error=lambda: ConnectionError("down"))
    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(handler)
    assert [i.result for i in report.items] == [ReplayResult.FAILED, ReplayResult.FAILED]
    assert report.items[1].outcome == "deferred"
    assert report.stopped is not None
    assert "circuit breaker" in report.stopped
    assert await store.count() == 3  # the first re-failure replaced its own entry


async def test_pass_envelope_hands_the_envelope(store: RedisDeadLetterStore, otel: Otel) -> None:
    """pass_envelope=True gives the handler the replay Envelope with the replay headers."""
    layer = make_layer(store, otel=otel)
    entry_id = await store.add(entry(message_id="e-1", payload={"id": "e-1"}))
    handler = Handler(fail=False)
    await DeadLetterReplayer(layer, store, rate_per_second=None).replay(handler, pass_envelope=True)
    [env] = handler.calls
    assert isinstance(env, Envelope)
    assert env.id == "e-1"
    assert env.headers[HEADER_REPLAY_OF] == entry_id


def test_replayer_refuses_a_foreign_store(store: RedisDeadLetterStore) -> None:
    """The replayer must write re-failures where the entry came from: another store is refused."""
    layer = make_layer(InMemoryDeadLetterStore())
    with pytest.raises(ValueError, match="dead-letter store"):
        DeadLetterReplayer(layer, store)


@pytest.mark.parametrize(
    ("source_ref", "pass_envelope", "gets_envelope"),
    [
        pytest.param(None, None, False, id="dict-message-gets-payload"),
        pytest.param("orders:1-0", None, True, id="runner-message-gets-envelope"),
        pytest.param("orders:1-0", False, False, id="forced-payload"),
    ],
)
async def test_handler_gets_what_the_consumer_got(
    store: RedisDeadLetterStore,
    otel: Otel,
    source_ref: str | None,
    pass_envelope: bool | None,
    gets_envelope: bool,
) -> None:
    """By default entries from a stream runner (with a source ref) replay as envelopes, others as payloads."""
    layer = make_layer(store, otel=otel)
    await store.add(entry(message_id="s-1", payload={"id": "s-1"}, source_ref=source_ref))
    handler = Handler(fail=False)
    await DeadLetterReplayer(layer, store, rate_per_second=None).replay(handler, pass_envelope=pass_envelope)
    [got] = handler.calls
    assert isinstance(got, Envelope) is gets_envelope
    if gets_envelope:
        assert got.source_ref == source_ref
    else:
        assert got == {"id": "s-1"}


async def test_replay_right_after_dead_lettering_runs_despite_the_marker(
    store: RedisDeadLetterStore, otel: Otel
) -> None:
    """The layer marks a dead-lettered id completed for one lease; a replay within it still runs the entry."""
    layer = make_layer(store, otel=otel)
    failing = Handler(fail=True)
    assert (await layer.process({"id": "fresh-1"}, failing)).outcome is Outcome.DEAD_LETTERED
    assert (await layer.process({"id": "fresh-1"}, failing)).outcome is Outcome.DUPLICATE  # the marker
    assert len(failing.calls) == 1
    fixed = Handler(fail=False)
    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(fixed)
    assert [i.result for i in report.items] == [ReplayResult.PROCESSED]
    assert len(fixed.calls) == 1
    assert await store.count() == 0


@pytest.mark.parametrize("backend", ["embedded-dedup", "redis-dedup"])
async def test_a_young_real_completion_is_never_taken_for_the_marker(
    store: RedisDeadLetterStore, otel: Otel, redis_client: redis.asyncio.Redis, backend: str
) -> None:
    """Two replayers of one entry, one right after the other (inside the marker window): the second sees
    the first one's real completion and skips it; the handler runs once (it ran twice before the marker
    became its own record state)."""
    client = redis_client if backend == "redis-dedup" else None
    layer = make_layer(store, otel=otel, redis_client=client)
    assert (await layer.process({"id": "twice-1"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
    (entry,) = await store.list()
    fixed = Handler(fail=False)
    first = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(
        fixed, entry_ids=[entry.entry_id or ""]
    )
    assert [i.result for i in first.items] == [ReplayResult.PROCESSED]
    await store.add(entry)  # the same entry seen by a second replayer (e.g. read before the first deleted it)
    (again,) = await store.list()
    second = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(
        fixed, entry_ids=[again.entry_id or ""]
    )
    assert [i.result for i in second.items] == [ReplayResult.SKIPPED_DUPLICATE]
    assert len(fixed.calls) == 1


async def test_a_dry_run_changes_nothing(
    store: RedisDeadLetterStore, otel: Otel, redis_client: redis.asyncio.Redis
) -> None:
    """A dry run reads only: the dead-letter marker survives it, so a redelivery racing the ack is still a
    duplicate and is not dead-lettered twice (a dry run used to delete the marker)."""
    layer = make_layer(store, otel=otel, redis_client=redis_client)
    failing = Handler(fail=True)
    assert (await layer.process({"id": "dry-1"}, failing)).outcome is Outcome.DEAD_LETTERED
    report = await DeadLetterReplayer(layer, store, rate_per_second=None).replay(
        Handler(fail=False), dry_run=True
    )
    assert [(i.result, i.detail) for i in report.items] == [(ReplayResult.DRY_RUN, "would replay")]
    assert (await layer.process({"id": "dry-1"}, failing)).outcome is Outcome.DUPLICATE
    assert len(failing.calls) == 1
    assert await store.count() == 1


async def test_fencing_tokens_keep_rising_through_dead_letter_replay_and_forget(
    store: RedisDeadLetterStore, otel: Otel, redis_client: redis.asyncio.Redis
) -> None:
    """Every run of an id sees a higher fencing token than the one before, across dead-lettering, replay
    and a forced forget (tokens went 1 -> 2 -> 1 before)."""
    import streamwarden

    layer = make_layer(store, otel=otel, redis_client=redis_client)
    tokens: list[int] = []

    async def record(message: Any, *, fail: bool) -> str:
        lease = streamwarden.current_lease()
        assert lease is not None
        tokens.append(lease.fencing_token)
        if fail:
            raise ValueError("fails")
        return "ok"

    async def failing(message: Any) -> str:
        return await record(message, fail=True)

    async def fine(message: Any) -> str:
        return await record(message, fail=False)

    assert (await layer.process({"id": "fence-1"}, failing)).outcome is Outcome.DEAD_LETTERED
    replayer = DeadLetterReplayer(layer, store, rate_per_second=None)
    assert [i.result for i in (await replayer.replay(failing)).items] == [ReplayResult.FAILED]
    assert [i.result for i in (await replayer.replay(fine)).items] == [ReplayResult.PROCESSED]
    await layer.dedup_store.forget("fence-1")
    assert (await layer.process({"id": "fence-1"}, fine)).outcome is Outcome.PROCESSED
    assert len(tokens) == 4
    assert tokens == sorted(set(tokens)), tokens


async def test_replay_runs_in_the_scope_of_the_group_that_failed_it(
    store: RedisDeadLetterStore, otel: Otel, redis_client: redis.asyncio.Redis
) -> None:
    """A dead letter remembers its consumer group; the replay checks and completes that group's scope,
    not another group's (two groups on one stream each have their own records)."""
    billing = make_layer(store, otel=otel, redis_client=redis_client, consumer_group="billing")
    shipping = make_layer(store, otel=otel, redis_client=redis_client, consumer_group="shipping")
    assert (await shipping.process({"id": "g-1"}, Handler(fail=False))).outcome is Outcome.PROCESSED
    assert (await billing.process({"id": "g-1"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
    (entry,) = await store.list()
    assert entry.consumer_group == "billing"
    fixed = Handler(fail=False)
    report = await DeadLetterReplayer(shipping, store, rate_per_second=None).replay(fixed)
    assert [i.result for i in report.items] == [ReplayResult.PROCESSED]  # not "already completed" by shipping
    assert len(fixed.calls) == 1
    assert (await billing.process({"id": "g-1"}, Handler(fail=False))).outcome is Outcome.DUPLICATE


async def test_a_refailed_replay_keeps_the_service_and_every_failed_trace(
    store: RedisDeadLetterStore, otel: Otel
) -> None:
    """A replay that fails again, run by a command under another service name and without tracing, keeps
    the entry's service and trace; a traced re-failure adds its trace and keeps the earlier one."""
    failing_service = make_layer(store, otel=otel, service_name="orders-svc")
    assert (await failing_service.process({"id": "t-1"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
    (original,) = await store.list()
    assert original.trace_id is not None
    assert original.service == "orders-svc"

    untraced = make_layer(store)  # the default service name, no tracer provider: spans are not recorded
    await DeadLetterReplayer(untraced, store, rate_per_second=None).replay(Handler(fail=True))
    (merged,) = await store.list()
    assert (merged.service, merged.trace_id, merged.span_id) == (
        "orders-svc",
        original.trace_id,
        original.span_id,
    )

    await DeadLetterReplayer(failing_service, store, rate_per_second=None).replay(Handler(fail=True))
    (again,) = await store.list()
    assert again.trace_id not in (None, original.trace_id)
    assert again.earlier_traces == (original.traceparent,)
    assert again.service == "orders-svc"


async def test_cli_replay_exports_its_spans_over_otlp(
    store: RedisDeadLetterStore, otel: Otel, redis_url: str
) -> None:
    """``streamwarden dlq replay`` honours OTEL_EXPORTER_OTLP_ENDPOINT: a real OTLP/gRPC receiver on
    loopback gets the replay span, linked to the failed attempt."""
    import subprocess
    import sys

    with OtlpTraceReceiver() as receiver:
        layer = make_layer(store, otel=otel)
        assert (await layer.process({"id": "otlp-1"}, Handler(fail=True))).outcome is Outcome.DEAD_LETTERED
        (entry,) = await store.list()
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_METRICS_EXPORTER": "none",
            "PYTHONPATH": os.pathsep.join([str(TESTS_REDIS), str(TESTS_REDIS.parent)]),
        }
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", "from streamwarden._cli import main; main()", "dlq", "replay",
             "--redis-url", redis_url, "--handler", "_fixtures_dlq:ok_handler", "--rate", "0"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    (replay_span,) = receiver.named("process orders.dlq")
    assert entry.trace_id is not None
    assert [link.trace_id.hex() for link in replay_span.links][:1] == [entry.trace_id]
