"""Fixtures of the fault-injection suite: a redis-server and a :class:`FaultRig` per test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# tests/faults on sys.path, so test modules import the helpers as `from _faultlib import ...`
_FAULTS_DIR = str(Path(__file__).resolve().parent)
if _FAULTS_DIR not in sys.path:
    sys.path.insert(0, _FAULTS_DIR)

from _faultlib import FaultRig  # noqa: E402

from _redis_server import RedisServer  # noqa: E402


@pytest.fixture
async def rig(redis_server_per_test: RedisServer, tmp_path: Path) -> AsyncIterator[FaultRig]:
    """A stream on a redis-server of this test's own; every consumer process is killed afterwards."""
    fault_rig = FaultRig(redis_server_per_test.url, tmp_path)
    try:
        yield fault_rig
    finally:
        await fault_rig.close()
