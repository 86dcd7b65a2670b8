"""Fixtures of the Kafka suite: one real Tansu broker per session (tests/_kafka_broker.py), unique
topics per test, a started producer, layers wired to in-memory SDK readers, and the consumer options
that keep group joins short (Tansu holds a JoinGroup for about half the session timeout, at least 1 s).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from _kafka_suite import create_topic
from aiokafka import AIOKafkaProducer

import streamwarden as sw
from _kafka_broker import KafkaBroker
from _support import Otel, make_otel


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One Tansu broker for the session. Do not kill or pause it: start a KafkaBroker of your own."""
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def make_topic(bootstrap: str) -> Callable[..., Awaitable[str]]:
    """``await make_topic(partitions=N)``: a new topic of this test."""

    async def make(partitions: int = 1) -> str:
        return await create_topic(bootstrap, partitions)

    return make


@pytest.fixture
def group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer (not idempotent: Tansu refuses InitProducerId), stopped after the test."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = make_otel()
    yield o
    o.shutdown()


@pytest.fixture
def make_layer(otel: Otel) -> Callable[..., sw.ReliabilityLayer]:
    """A layer on the embedded stores (or ``redis_client=`` / store keywords), fast retries."""

    def make(redis_client: Any = None, **settings: Any) -> sw.ReliabilityLayer:
        options = {k: settings.pop(k) for k in ("dedup_store", "dead_letter_store") if k in settings}
        settings.setdefault("retry_initial_delay", 0.001)
        settings.setdefault("retry_max_delay", 0.01)
        return sw.ReliabilityLayer(
            redis_client,
            sw.ReliabilitySettings(**settings),
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
            **options,
        )

    return make
