"""Two members of one group on a shared Redis dedup store, with a rebalance while the first is busy:
no message is lost, none runs twice without a counted takeover, and commits reach the end."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import redis.asyncio
from _kafka_suite import MakeLayer, MakeTopic, Running, committed_is, make_runner, produce
from aiokafka import AIOKafkaProducer

from _support import eventually
from streamwarden._envelope import Envelope


async def test_rebalance_while_processing_loses_nothing(
    bootstrap: str,
    make_topic: MakeTopic,
    group: str,
    producer: AIOKafkaProducer,
    make_layer: MakeLayer,
    redis_client: redis.asyncio.Redis,
) -> None:
    """Member A holds records in flight past its revoke timeout while B joins: their acknowledgements
    arrive after the rebalance and are not committed; whoever reads them again finds them in progress
    or done in the shared dedup store. Every message runs exactly once; commits reach the end."""
    topic = await make_topic(4)
    ids = await produce(producer, topic, 400, partitions=4, key=lambda i: f"k{i % 10}")
    runs: collections.Counter[str] = collections.Counter()
    b_joined = asyncio.Event()
    by_member: dict[str, set[str]] = {"a": set(), "b": set()}

    def handler_of(member: str) -> Any:
        async def handler(env: Envelope) -> None:
            runs[env.id] += 1
            by_member[member].add(env.id)
            if member == "a" and len(by_member["a"]) > 50:
                # stuck until B is in the group: A's revoke times out with these in flight
                await asyncio.wait_for(b_joined.wait(), timeout=20)

        return handler

    layer_a = make_layer(redis_client)
    layer_b = make_layer(redis_client)
    runner_a = make_runner(
        bootstrap, topic, group, handler_of("a"), layer_a, concurrency=8, revoke_timeout=0.5
    )
    runner_b = make_runner(
        bootstrap, topic, group, handler_of("b"), layer_b, concurrency=8, revoke_timeout=0.5
    )
    async with Running(runner_a):
        await eventually(lambda: len(by_member["a"]) > 50, what="A busy")
        async with Running(runner_b):
            await eventually(lambda: bool(runner_b.kafka_transport.assignment()), what="B assigned")
            b_joined.set()
            await eventually(lambda: set(runs) == set(ids), timeout=30, what="every message handled")
            await eventually(
                lambda: committed_is(bootstrap, group, topic, {p: 100 for p in range(4)}),
                timeout=30,
                what="committed to the end",
            )
            assert runner_a.kafka_transport.assignment().isdisjoint(runner_b.kafka_transport.assignment())
    takeovers = sum(r.stats.isolated for r in (runner_a, runner_b))
    twice = {mid: n for mid, n in runs.items() if n > 1}
    assert len(twice) <= takeovers, f"ran more than once without a takeover: {twice}"
    assert by_member["b"], "B never got work"
    assert runner_a.kafka_transport.rebalances >= 2
