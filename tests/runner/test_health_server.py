"""HealthServer: /healthz is liveness, /readyz follows the consumer's health and always answers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from streamwarden._runners._health import Health, HealthServer


class Source:
    """A health source the test controls: its answer, or a health check that never returns."""

    def __init__(self) -> None:
        self.ready = False
        self.hang = False

    async def health(self) -> Health:
        if self.hang:
            await asyncio.Event().wait()
        return Health(
            ready=self.ready, breakers={"default": "closed"}, redis_ok=True, dlq_ok=True, dlq_depth=0,
            lag=0, pending=0, reason="" if self.ready else "not consuming (run() is not running)",
        )  # fmt: skip


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_readyz_follows_the_consumer_and_healthz_is_liveness() -> None:
    """/readyz answers 503 with the reason until the consumer is ready, then 200; /healthz is always 200."""
    source = Source()
    server = HealthServer(source, port=0)
    port = await server.start()
    try:
        assert await get(port, "/healthz") == (200, {"status": "ok"})
        code, body = await get(port, "/readyz")
        assert (code, body["ready"]) == (503, False)
        assert "not consuming" in body["reason"]
        source.ready = True
        code, body = await get(port, "/readyz")
        assert (code, body["ready"], body["breakers"]) == (200, True, {"default": "closed"})
        assert (await get(port, "/nope"))[0] == 404
    finally:
        await server.close()


async def test_readyz_answers_503_when_the_health_check_hangs() -> None:
    """A health check that does not return in probe_timeout (a frozen broker) is a 503, not a hung probe."""
    source = Source()
    source.hang = True
    server = HealthServer(source, port=0, probe_timeout=0.05)
    port = await server.start()
    try:
        code, body = await get(port, "/readyz")
        assert (code, body["ready"]) == (503, False)
        assert "took longer than" in body["reason"]
    finally:
        await server.close()
