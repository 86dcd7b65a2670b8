"""The handler or what it writes to misbehaves: a message that kills its process, a dead-letter topic
that refuses writes, a downstream outage that opens the breaker. Real consumer processes on Kafka."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _kafkalib import KafkaConsumerProcess, KafkaFaultRig, ids_of, ok_messages

from streamwarden._kafka import KafkaDeadLetterStore


@pytest.mark.parametrize(
    "ordering",
    [
        "partition",
        "key",
    ],
)
async def test_a_killer_message_is_dead_lettered_after_n_runs_and_its_batch_mates_are_not(
    rig: KafkaFaultRig, ordering: str
) -> None:
    """A message that SIGKILLs the process running it, read in one batch with 7 healthy ones (each its
    own key): each restart gets the partition back from the committed offset; the killer runs alone
    after its first crash and is dead-lettered as poison, unrun, after N runs; no healthy message
    reaches the DLQ. With ``partition`` ordering the records run one after another; with ``key``
    ordering (distinct keys) they run side by side, and after a crash each comes back a suspect."""
    await rig.create_topic(partitions=1)
    healthy = ok_messages("h", 7, sleep_ms=300)
    batch = [*healthy[:3], ("killer", {"action": "crash"}), *healthy[3:]]
    await rig.produce(batch, key=lambda mid: mid)
    settings = {
        "STREAMWARDEN_POISON_MAX_DELIVERIES": "2",
        "STREAMWARDEN_DEDUP_LEASE": "1.0",
        "STREAMWARDEN_PROCESSING_TIMEOUT": "0.8",
    }
    rig.spawn("c1", settings=settings, ordering=ordering)

    async def supervised() -> bool:  # the orchestrator restarts whatever died
        if not rig.consumers[-1].alive():
            rig.spawn("c1", settings=settings, ordering=ordering)
        return await rig.settled()

    await rig.wait(supervised, timeout=60, what="settled under a supervisor")
    await rig.stop_all()

    ledger = await rig.assert_oracle(ids_of(batch))
    dead = [(e["message_id"], e["reason"]) for e in await rig.dlq()]
    assert dead == [("killer", "poison")], "only the killer is poison"
    assert len(ledger.starts("killer")) == 2, "crashed poison_max_deliveries times, then dead-lettered unrun"
    assert ledger.executed_ids() == set(ids_of(healthy))
    for began in [s["t"] for s in ledger.starts("killer")][1:]:  # after the first crash it runs alone
        assert not [r for r in ledger.runs() if r[2] < began < r[3]], f"something ran beside it at {began}"
    assert [c.proc.returncode for c in rig.consumers] == [-9, -9, 0], rig.consumers[0].stderr()[-3000:]


async def test_dlq_topic_refusing_writes_holds_the_commit_until_it_takes_them(rig: KafkaFaultRig) -> None:
    """Dead letters go to ``{topic}.dlq``, which is full (capacity 1) after the first: the second failure
    cannot be written, so it is not acknowledged and the partition's commit stops right below it while
    the records behind it are handled. Once the queue is purged, the redelivery writes it, the commit
    passes, and each failure is in the DLQ exactly once."""
    await rig.create_topic(partitions=1)
    first_batch, second_batch = ok_messages("a", 5), ok_messages("b", 5)
    messages = [
        ("bad1", {"action": "fail_permanent"}),
        *first_batch,
        ("bad2", {"action": "fail_permanent"}),
        *second_batch,
    ]
    await rig.produce(messages)
    settings = {"STREAMWARDEN_DLQ_MAX_ENTRIES_PER_DESTINATION": "1", "STREAMWARDEN_MAX_RETRIES": "0"}
    # one record at a time: the store's capacity check is approximate with concurrent writers (documented),
    # and two failures written side by side could both pass a limit of 1
    consumer = rig.spawn("c1", dlq="kafka", settings=settings, ordering="partition")

    async def refused_twice() -> bool:
        ledger = rig.ledger()
        return (
            ledger.executed_ids() >= set(ids_of(first_batch + second_batch))
            and len(ledger.starts("bad2")) >= 2
            and [e["message_id"] for e in await rig.kafka_dlq()] == ["bad1"]
        )

    await rig.wait(refused_twice, what="bad2 refused by the full DLQ and redelivered")
    assert await rig.committed() == {0: rig.where("bad2").offset}, "the commit stops right below bad2"

    async with KafkaDeadLetterStore(rig.bootstrap) as store:
        assert await store.purge(rig.topic) == 1
    await rig.wait(rig.settled, what="bad2 dead-lettered and committed")
    await rig.stop_all()

    await rig.assert_oracle(ids_of(messages))
    assert [e["message_id"] for e in await rig.kafka_dlq()] == ["bad2"]
    assert rig.dead_lettered == {"bad1", "bad2"}, "no healthy message was dead-lettered"
    assert rig.ledger().duplicate_executions() == 0
    assert consumer.proc.returncode == 0, consumer.stderr()
    outcomes = consumer.stats_line()["outcomes"]
    assert outcomes["dead_lettered"] == 2
    assert outcomes["failed"] >= 1, "the refused writes: failed, not acknowledged"


async def test_outage_opens_the_breaker_pauses_without_a_rebalance_then_handles_everything(
    rig: KafkaFaultRig,
) -> None:
    """Every handler fails while a downstream outage lasts: both members' breakers open, reading pauses
    (readiness 503) for longer than max.poll.interval, yet neither member leaves the group (no
    rebalance); nothing is dead-lettered, and after the outage every message runs to its effect once."""
    await rig.create_topic(partitions=2)
    settings = {
        "STREAMWARDEN_EXHAUSTED_TRANSIENT_ACTION": "defer",
        "STREAMWARDEN_MAX_RETRIES": "1",
        "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "3",
        "STREAMWARDEN_CIRCUIT_BREAKER_TIMEOUT": "1.0",
        "STREAMWARDEN_POISON_MAX_DELIVERIES": "50",
    }
    options: dict[str, Any] = {"settings": settings, "health": True, "max_poll_interval_ms": 2000}
    members = [rig.spawn("c1", **options), rig.spawn("c2", **options)]
    await rig.wait(lambda: _balanced(members, rig.partitions), what="both members own a partition")
    rig.outage(True)
    messages = ok_messages("o", 40)
    await rig.produce(messages)
    await rig.wait(lambda: _all_ready(members, 503), what="both breakers open")
    assignments = [m.assignments() for m in members]

    async def outage_outlasted_the_poll_interval() -> bool:
        starts = [s["t"] for s in rig.ledger().starts()]
        return bool(starts) and max(starts) - min(starts) > 3.5 and await _all_ready(members, 503)

    await rig.wait(outage_outlasted_the_poll_interval, what="3.5 s of outage, breakers open")
    assert [m.assignments() for m in members] == assignments, "a paused member left the group"
    assert rig.ledger().executed_ids() == set()
    rig.outage(False)
    await rig.wait(rig.settled, what="everything handled after the outage")
    await rig.wait(lambda: _all_ready(members, 200), what="both ready again")
    assert [m.assignments() for m in members] == assignments, "no rebalance after the outage either"
    await rig.stop_all()

    ledger = await rig.assert_oracle(ids_of(messages))
    assert ledger.effect_counts() == dict.fromkeys(ids_of(messages), 1)
    assert await rig.dlq() == []
    counters = await rig.counters()
    assert counters["circuit_breaker_opened"] >= 2, "each member's breaker opened"
    assert counters["messages_deferred"] > 0
    assert all(m.proc.returncode == 0 for m in members), rig.diagnostics()


def _balanced(members: list[KafkaConsumerProcess], partitions: int) -> bool:
    owned = [m.assigned() for m in members]
    return all(owned) and set().union(*owned) == set(range(partitions))


async def _all_ready(members: list[KafkaConsumerProcess], code: int) -> bool:
    codes = await asyncio.gather(*(asyncio.to_thread(m.readyz) for m in members))
    return all(c == code for c in codes)
