"""A stop is prompt even while the consumer is still joining: aiokafka's ``start()`` waits for the first
assignment (and for a broker that does not answer, up to its request timeout), so a runner that only
checked for a stop between steps would not exit until then (found by the Kafka soak: a member sent
SIGTERM during a join that never completed ran on for good)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from _kafka_suite import FAST_GROUP, MakeLayer, create_topic, make_runner

from _kafka_broker import KafkaBroker
from _support import eventually
from streamwarden._envelope import Envelope


def _connected_to(port: int) -> bool:
    """Whether some socket on this machine has an established connection to ``port`` (IPv4 loopback)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            return True
    return False


async def test_stop_during_a_join_the_broker_never_answers_returns_promptly(make_layer: MakeLayer) -> None:
    with KafkaBroker() as broker:
        topic = await create_topic(broker.bootstrap, 1)
        port = int(broker.bootstrap.rpartition(":")[2])

        async def handler(env: Envelope) -> None:
            return None

        runner = make_runner(
            broker.bootstrap,
            topic,
            "g-stop",
            handler,
            make_layer(),
            close_timeout=2.0,
            consumer_options={**FAST_GROUP, "request_timeout_ms": 60_000},
        )
        broker.pause()
        try:
            task = asyncio.create_task(runner.run())
            await eventually(lambda: _connected_to(port), what="the consumer connected to the frozen broker")
            started = time.monotonic()
            runner.stop()
            await asyncio.wait_for(task, timeout=20)  # without the fix: the 60 s request timeout
            assert time.monotonic() - started < 20
            assert runner.kafka_transport.client is None
        finally:
            broker.resume()
