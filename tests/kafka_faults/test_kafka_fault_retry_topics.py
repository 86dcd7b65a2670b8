"""Retry topics under faults: real consumer processes with ``--retry-delays``, flaky messages that go
through ``orders.retry.0`` / ``.1``, and a member killed (-9) while copies and retries are in flight.
The oracle: nothing lost, every duplicate execution counted, no healthy message dead-lettered, and the
topic and its retry topics committed to their ends."""

from __future__ import annotations

import asyncio
from typing import Any

from _kafkalib import PROBE_S, KafkaFaultRig, ids_of, ok_messages
from aiokafka import AIOKafkaConsumer, TopicPartition

RETRY_TOPICS = ("orders.retry.0", "orders.retry.1")
SETTINGS = {
    "STREAMWARDEN_MAX_RETRIES": "0",
    "STREAMWARDEN_POISON_MAX_DELIVERIES": "20",
    "STREAMWARDEN_CIRCUIT_BREAKER_THRESHOLD": "1000",
}


async def retry_topic_ends(rig: KafkaFaultRig) -> dict[str, int] | None:
    """Records written to each retry topic, or ``None`` while the group has not committed all of them."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=rig.bootstrap, group_id=rig.group, enable_auto_commit=False, request_timeout_ms=3000
    )
    await asyncio.wait_for(reader.start(), timeout=PROBE_S)
    written: dict[str, int] = {}
    try:
        await asyncio.wait_for(reader.topics(), timeout=PROBE_S)  # metadata of the retry topics too
        for topic in RETRY_TOPICS:
            partitions = reader.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            ends = await asyncio.wait_for(reader.end_offsets(tps), timeout=PROBE_S) if tps else {}
            for tp in tps:
                committed = await asyncio.wait_for(reader.committed(tp), timeout=PROBE_S)
                if (committed or 0) < ends[tp]:
                    return None
            written[topic] = sum(ends.values())
        return written
    finally:
        await asyncio.wait_for(reader.stop(), timeout=PROBE_S)


async def test_retry_topics_under_kill_9_lose_nothing_and_count_every_duplicate(rig: KafkaFaultRig) -> None:
    await rig.create_topic(partitions=2)
    flaky = [(f"f{i}", {"fail_transient_n": 2, "sleep_ms": 30}) for i in range(12)]
    healthy = ok_messages("h", 36, sleep_ms=30)
    messages: list[tuple[str, Any]] = []
    for i, message in enumerate(healthy):
        messages.append(message)
        if i % 3 == 0:
            messages.append(flaky[i // 3])
    await rig.produce(messages)
    options = {"retry_delays": "0.2,0.5"}
    rig.spawn("c1", settings=SETTINGS, **options)
    rig.spawn("c2", settings=SETTINGS, **options)

    def under_way() -> bool:
        rig.tail.read_new()
        return rig.tail.phases["effect"] >= 12

    await rig.wait(under_way, timeout=60, what="effects under way")
    victim = rig.consumers[0]
    victim.kill()
    rig.spawn("c1", settings=SETTINGS, **options)

    async def done() -> bool:
        return not await rig.lost(ids_of(messages)) and await retry_topic_ends(rig) is not None

    await rig.wait(done, timeout=90, what="every message done and the retry topics drained")
    await rig.wait(rig.settled, timeout=30, what="the topic committed to its end")
    await rig.stop_all()

    assert await rig.lost(ids_of(messages)) == set()
    ledger = rig.ledger()
    rig.assert_duplicates_counted(ledger)
    assert await rig.dlq() == [], "no message reached the DLQ: the flaky ones succeed on a later try"
    for message_id, _payload in flaky:
        assert len(ledger.starts(message_id)) >= 3, f"{message_id} ran through the retry topics"
    assert victim.proc.returncode == -9
    written = await retry_topic_ends(rig)
    assert written is not None
    # each flaky message failed at least once where it was first read: copied to .retry.0 (Tansu may
    # report a lower end offset for a multi-record batch, never a higher one)
    assert written["orders.retry.0"] >= 1
