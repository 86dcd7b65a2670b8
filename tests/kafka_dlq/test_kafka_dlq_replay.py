"""Replaying Kafka dead letters through ``DeadLetterReplayer`` and a ``ReliabilityLayer`` on the Kafka
store: a replayed entry runs once, and a second replay (another process: new store, new layer) does not
run it again; completed ids are skipped (Redis dedup, shared across processes); a re-failure leaves one
entry; the replay span links to the failed attempt's trace."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio
from _kafka_dlq_support import entry
from opentelemetry.trace import SpanKind

from _support import Otel, build_layer
from streamwarden import Envelope, Outcome, ReliabilityLayer
from streamwarden._kafka import KafkaDeadLetterStore
from streamwarden._replay import DeadLetterReplayer, ReplayResult

Factory = Callable[..., KafkaDeadLetterStore]


class Handler:
    """Fails while ``fail`` is set; records what it was called with."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.calls: list[Any] = []

    async def __call__(self, message: Any) -> str:
        self.calls.append(message)
        if self.fail:
            raise ValueError("bad price")
        return "ok"


def _layer(
    store: KafkaDeadLetterStore, otel: Otel | None, redis_client: Any = None, **settings: Any
) -> ReliabilityLayer:
    settings.setdefault("max_retries", 0)
    settings.setdefault("processing_timeout", None)
    return build_layer(redis_client, otel, dead_letter_store=store, **settings)


async def test_replayed_once_and_a_second_replay_skips_it(make_store: Factory, ns: str, otel: Otel) -> None:
    """dead-letter -> replay (processed, the handler gets the Envelope, the entry is marked done) -> a
    second process replays the topic again: nothing is selected, the handler does not run again."""
    topic = f"{ns}.orders"
    store = make_store()
    layer = _layer(store, otel, consumer_group="billing")
    handler = Handler(fail=True)
    message = Envelope(id="o-7", payload={"qty": 3}, destination=topic, source_ref=f"{topic}/0/12")
    failed = await layer.process(message, handler)
    assert failed.outcome is Outcome.DEAD_LETTERED
    assert failed.dead_letter is not None
    entry_id = failed.dead_letter.entry_id
    assert entry_id == f"{topic}.dlq/0/0"
    [failed_span] = otel.spans(f"process {topic}")

    handler.fail = False
    report = await DeadLetterReplayer(layer, rate_per_second=None).replay(handler, destination=topic)
    assert [(i.result, i.entry_id) for i in report.items] == [(ReplayResult.PROCESSED, entry_id)]
    assert len(handler.calls) == 2
    replayed = handler.calls[-1]
    assert isinstance(replayed, Envelope)
    assert (replayed.id, replayed.payload, replayed.source_ref) == ("o-7", {"qty": 3}, f"{topic}/0/12")
    [replay_span] = otel.spans(f"process {topic}.dlq")
    assert replay_span.kind is SpanKind.CONSUMER
    linked = {(link.context.trace_id, link.context.span_id) for link in replay_span.links}
    assert (failed_span.context.trace_id, failed_span.context.span_id) in linked
    assert await store.count(topic) == 0

    other_store = make_store()  # another process: its own clients, marker index and embedded dedup
    other = _layer(other_store, None, consumer_group="billing")
    again = await DeadLetterReplayer(other, rate_per_second=None).replay(handler, destination=topic)
    assert again.items == []
    by_id = await DeadLetterReplayer(other, rate_per_second=None).replay(handler, entry_ids=[entry_id])
    assert by_id.items == []
    assert by_id.missing == [entry_id]
    assert len(handler.calls) == 2


async def test_completed_ids_are_skipped_across_processes(
    make_store: Factory, ns: str, redis_client: redis.asyncio.Redis
) -> None:
    """Dedup-aware on a shared (Redis) dedup store: an id completed elsewhere is skipped_duplicate and
    its entry kept; force runs it once and marks it done."""
    topic = f"{ns}.orders"
    store = make_store()
    an_hour_ago = time.time() - 3600  # past the layer's dead-letter marker window: a real completion
    stale = await store.add(
        entry(
            topic,
            message_id="done-1",
            payload={"id": "done-1"},
            source_ref=None,
            dead_lettered_at=an_hour_ago,
            consumer_group=None,
        )
    )
    consumer = _layer(make_store(), None, redis_client, destination=topic)
    handler = Handler(fail=False)
    assert (await consumer.process({"id": "done-1"}, handler)).outcome is Outcome.PROCESSED

    replaying = _layer(store, None, redis_client, destination=topic)
    replayer = DeadLetterReplayer(replaying, rate_per_second=None)
    skipped = await replayer.replay(handler, destination=topic)
    assert [i.result for i in skipped.items] == [ReplayResult.SKIPPED_DUPLICATE]
    assert await store.get(stale) is not None
    assert len(handler.calls) == 1

    forced = await replayer.replay(handler, destination=topic, force=True)
    assert [i.result for i in forced.items] == [ReplayResult.PROCESSED]
    assert len(handler.calls) == 2
    assert await make_store().count(topic) == 0


async def test_a_refailure_leaves_one_entry(make_store: Factory, ns: str) -> None:
    """A replay that fails again: the merged entry (attempts summed, first failure kept) replaces both
    the replayed one and the layer's new one (written first, then both marked done)."""
    topic = f"{ns}.orders"
    store = make_store()
    layer = _layer(store, None, destination=topic)
    handler = Handler(fail=True)
    first = await layer.process({"id": "m-9", "v": 1}, handler)
    assert first.dead_letter is not None
    old = first.dead_letter
    report = await DeadLetterReplayer(layer, rate_per_second=None).replay(handler, destination=topic)
    [item] = report.items
    assert item.result is ReplayResult.FAILED
    assert item.new_entry_id is not None
    remaining = await make_store().list(topic)
    assert [e.entry_id for e in remaining] == [item.new_entry_id]
    [merged] = remaining
    assert merged.attempts == old.attempts + 1
    assert merged.first_failed_at == old.first_failed_at
    assert await store.get(old.entry_id or "") is None


async def test_dry_run_changes_nothing(make_store: Factory, ns: str) -> None:
    """A dry run lists what it would do; the entry stays and runs on the real replay."""
    topic = f"{ns}.orders"
    store = make_store()
    layer = _layer(store, None, destination=topic)
    await store.add(entry(topic, message_id="m-1", source_ref=None, consumer_group=None))
    handler = Handler(fail=False)
    replayer = DeadLetterReplayer(layer, rate_per_second=None)
    dry = await replayer.replay(handler, destination=topic, dry_run=True)
    assert [(i.result, i.detail) for i in dry.items] == [(ReplayResult.DRY_RUN, "would replay")]
    assert handler.calls == []
    assert await store.count(topic) == 1
    real = await replayer.replay(handler, destination=topic)
    assert [i.result for i in real.items] == [ReplayResult.PROCESSED]
    assert handler.calls == [{"id": "m-1", "price": 10}]
