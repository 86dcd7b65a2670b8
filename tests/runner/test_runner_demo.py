"""``streamwarden demo --redis-url``: the demo's workload through runners on a real stream."""

from __future__ import annotations

import json

from click.testing import CliRunner

from _redis_server import RedisServer
from streamwarden._cli import main


def test_redis_demo_reconciles(redis_server_per_test: RedisServer) -> None:
    """Three runners on one group: every signal once or dead-lettered, every entry acknowledged, stream removed."""
    result = CliRunner().invoke(
        main,
        ["demo", "--redis-url", redis_server_per_test.url, "--messages", "600", "--rate", "3000", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reconciled"] is True, report["problems"]
    assert report["unique_ids"] == 600
    outcomes = report["outcomes"]
    assert outcomes["processed"] > 500
    assert outcomes.get("duplicate", 0) > 0
    acked = outcomes["processed"] + outcomes.get("duplicate", 0) + outcomes.get("dead_lettered", 0)
    assert acked == report["produced"]
