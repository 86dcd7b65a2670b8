"""Helpers of the Kafka suite, imported by its conftest and test modules (a module name of its own:
``conftest`` resolves to whichever suite's conftest was imported first)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import streamwarden as sw
from streamwarden._runners._kafka import KafkaConsumerRunner

#: A handler module for ``streamwarden consume`` processes: appends each message to $SW_TEST_OUT; the
#: message with ``n == 3`` fails permanently (dead-lettered).
HANDLERS = """
import json
import os
from pathlib import Path

OUT = Path(os.environ["SW_TEST_OUT"])


async def handle(message):
    if message.payload.get("n") == 3:
        raise ValueError("bad order")
    with OUT.open("a") as out:
        out.write(json.dumps({"id": message.id, "n": message.payload["n"]}) + "\\n")
"""

MakeTopic = Callable[..., Awaitable[str]]
MakeLayer = Callable[..., sw.ReliabilityLayer]

#: aiokafka options of every test consumer: a short session (fast joins, fast failover) with heartbeats
#: well inside it.
FAST_GROUP: dict[str, Any] = {
    "session_timeout_ms": 2000,
    "heartbeat_interval_ms": 200,
    "metadata_max_age_ms": 1000,
}


async def create_topic(bootstrap: str, partitions: int = 1, *, name: str | None = None) -> str:
    """Create a topic with ``partitions`` partitions (a unique name unless given); returns its name."""
    topic = name or f"t-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (partitions without a commit left out).

    Read by a consumer that never joins the group (``OffsetFetch``): Tansu 0.6 answers the admin
    client's ``list_consumer_group_offsets`` in a shape aiokafka cannot decode.
    """
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        found = {p: await reader.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await reader.stop()
    return {p: offset for p, offset in found.items() if offset is not None and offset >= 0}


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    count: int,
    *,
    partitions: int = 1,
    key: Callable[[int], str | None] = lambda i: None,
    prefix: str = "m",
    start: int = 0,
) -> list[str]:
    """``count`` JSON messages ``{"n": i}`` with a ``message_id`` header, round-robin over ``partitions``;
    their ids, in order."""
    ids = []
    futures = []
    for i in range(start, start + count):
        mid = f"{prefix}{i}"
        k = key(i)
        futures.append(
            await producer.send(
                topic,
                value=json.dumps({"n": i}).encode(),
                key=None if k is None else k.encode(),
                partition=i % partitions,
                headers=[("message_id", mid.encode())],
            )
        )
        ids.append(mid)
    await producer.flush()
    for f in futures:
        await f
    return ids


class Running:
    """A runner's ``run()`` as a task: ``async with Running(runner):`` stops and awaits it on exit."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.runner.stop()
        await asyncio.wait_for(asyncio.shield(self.task), timeout=30)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.task is not None
        if not self.task.done():
            await self.stop()
        elif not self.task.cancelled() and self.task.exception() is not None and exc_info[0] is None:
            raise self.task.exception()  # type: ignore[misc]


def make_runner(
    bootstrap: str, topic: str, group: str, handler: Any, layer: sw.ReliabilityLayer, **options: Any
) -> KafkaConsumerRunner:
    """A runner with the suite's fast group options, a short poll and a short shutdown."""
    options.setdefault("consumer_options", FAST_GROUP)
    options.setdefault("poll_timeout_ms", 100)
    options.setdefault("shutdown_timeout", 5.0)
    return KafkaConsumerRunner(
        bootstrap_servers=bootstrap, topic=topic, group=group, handler=handler, layer=layer, **options
    )


async def committed_is(bootstrap: str, group: str, topic: str, wanted: dict[int, int]) -> bool:
    """Whether the group's committed offsets of ``topic`` are ``wanted`` (partition -> offset)."""
    return await committed_offsets(bootstrap, group, topic, len(wanted)) == wanted
