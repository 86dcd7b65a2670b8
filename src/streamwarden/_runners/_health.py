"""Readiness of a consumer and the tiny HTTP server orchestrator probes call.

``GET /healthz`` answers 200 while the process serves (liveness); ``GET /readyz`` answers 200 when the
consumer's :meth:`health` says ready and 503 otherwise, with the facts as JSON. Each probe is bounded:
a frozen broker makes ``/readyz`` answer 503 within ``probe_timeout``, never hang the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["Health", "HealthServer", "HealthSource"]

log = logging.getLogger("streamwarden.runner")

_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Health:
    """A readiness answer: ``ready`` plus the facts it is made of.

    ``ready`` means "this consumer is consuming right now": its loop runs (not stopped, not ended by a
    configuration error), it is not paused behind the open circuit breaker of its layer, it is not
    backing off from broker errors, and the broker and the dead-letter store answer. ``breakers`` lists
    every breaker of the layer's registry; only the layer's own breaker pauses consumption.
    ``redis_ok`` is the broker's answer (named for the Redis Streams transport).
    """

    ready: bool
    breakers: dict[str, str]
    redis_ok: bool
    dlq_ok: bool
    dlq_depth: int | None
    lag: int | None
    pending: int | None
    reason: str = ""
    consuming: bool = True
    paused_for_breaker: bool = False
    backing_off: bool = False
    in_flight: int = 0
    error: str | None = None


class HealthSource(Protocol):
    """Anything that can say whether it is ready (a consumer runner)."""

    async def health(self) -> Health:
        """The current readiness answer."""


class HealthServer:
    """A tiny HTTP endpoint for orchestrator probes, on loopback by default."""

    def __init__(
        self,
        consumer: HealthSource,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        probe_timeout: float = 5.0,
    ) -> None:
        self.consumer = consumer
        self.host = host
        self.port = port
        self.probe_timeout = probe_timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _ready(self) -> tuple[int, dict[str, Any]]:
        try:
            health = await asyncio.wait_for(self.consumer.health(), timeout=self.probe_timeout)
        except TimeoutError:
            return 503, {"ready": False, "reason": f"health check took longer than {self.probe_timeout:g}s"}
        except Exception as exc:  # a probe must answer, whatever went wrong
            log.warning("health check failed: %r", exc)
            return 503, {"ready": False, "reason": f"health check failed: {type(exc).__name__}"}
        return (200 if health.ready else 503), asdict(health)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            body: dict[str, Any]
            if path == "/healthz":
                code, body = 200, {"status": "ok"}
            elif path == "/readyz":
                code, body = await self._ready()
            else:
                code, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
