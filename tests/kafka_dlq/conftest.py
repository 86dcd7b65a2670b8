"""Fixtures of the Kafka dead-letter suite: a real Tansu broker for the session (and one per test for the
fault tests, which stop and kill it), stores that are closed after each test, and a namespace per test
so destination-less reads (``list()``, ``count()``) see only that test's DLQ topics.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_DIR = str(Path(__file__).resolve().parent)
if _DIR not in sys.path:
    sys.path.insert(0, _DIR)

from _kafka_dlq_support import FAST  # noqa: E402

from _kafka_broker import KafkaBroker  # noqa: E402
from streamwarden._kafka import KafkaDeadLetterStore  # noqa: E402


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One Tansu broker for the session. Do not stop, pause or kill it: use ``own_broker``."""
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def own_broker() -> Iterator[KafkaBroker]:
    """A broker of this test's own, free to pause, kill and restart (memory only: a restart is empty)."""
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def ns() -> str:
    """A per-test prefix for destinations: ``{ns}.orders`` is written to ``{ns}.orders.dlq``."""
    return f"t{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def _factory(default: KafkaBroker, ns: str) -> AsyncIterator[Callable[..., KafkaDeadLetterStore]]:
    stores: list[KafkaDeadLetterStore] = []

    def make(broker: KafkaBroker | None = None, **options: Any) -> KafkaDeadLetterStore:
        options = {**FAST, "topic_pattern": rf"{ns}\..+\.dlq", **options}
        store = KafkaDeadLetterStore((broker or default).bootstrap, **options)
        stores.append(store)
        return store

    try:
        yield make
    finally:
        for store in stores:
            await store.aclose()


@pytest.fixture
async def make_store(
    kafka_broker: KafkaBroker, ns: str
) -> AsyncIterator[Callable[..., KafkaDeadLetterStore]]:
    """``make_store(**options)``: a store on the session broker that reads only this test's DLQ topics
    (``topic_pattern``); every store made is closed after the test. Each is what another process would
    have: its own clients and its own marker index."""
    async with _factory(kafka_broker, ns) as make:
        yield make


@pytest.fixture
async def make_own_store(
    own_broker: KafkaBroker, ns: str
) -> AsyncIterator[Callable[..., KafkaDeadLetterStore]]:
    """``make_store`` on this test's own broker; its stores are closed before that broker stops (a broker
    stopped under connected clients waits for them)."""
    async with _factory(own_broker, ns) as make:
        yield make


@pytest.fixture
def store(make_store: Callable[..., KafkaDeadLetterStore]) -> KafkaDeadLetterStore:
    """A store on the session broker (see ``make_store``)."""
    return make_store()
