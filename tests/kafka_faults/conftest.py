"""Fixtures of the Kafka fault-injection suite: a Tansu broker, a redis-server and a rig per test.

Every test gets a broker of its own (it may SIGSTOP or kill it; Tansu starts in a fraction of a second)
and a redis-server of its own (``redis_server_per_test``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# tests/kafka_faults (the rig) and tests/faults (the shared ledger helpers) on sys.path, so test modules
# import `from _kafkalib import ...`
_HERE = Path(__file__).resolve().parent
for _directory in (_HERE.parent / "faults", _HERE):
    if str(_directory) not in sys.path:
        sys.path.insert(0, str(_directory))

from _kafkalib import KafkaFaultRig  # noqa: E402

from _kafka_broker import KafkaBroker  # noqa: E402
from _redis_server import RedisServer  # noqa: E402


@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    """A Tansu broker of this test's own, free to pause and kill."""
    with KafkaBroker() as kafka:
        yield kafka


@pytest.fixture
async def rig(
    broker: KafkaBroker, redis_server_per_test: RedisServer, tmp_path: Path
) -> AsyncIterator[KafkaFaultRig]:
    """A topic and group on this test's broker and redis-server; every consumer process is killed after."""
    fault_rig = KafkaFaultRig(broker, redis_server_per_test.url, tmp_path)
    try:
        yield fault_rig
    finally:
        await fault_rig.close()
