"""A loopback TCP proxy in front of a test redis-server that can lose exactly one reply.

    async with ReplyDroppingProxy(upstream_port) as proxy:
        proxy.drop_reply_to(b"EVALSHA")       # the next request containing EVALSHA reaches Redis,
        client = Redis(port=proxy.port, ...)   # its reply is swallowed and the client's connection
                                               # is closed: redis-py sees a dropped connection

The proxy forwards requests untouched, so the dropped command *did* run on the server; only its answer
is lost. That is the case redis-py's retry turns into a second execution of the same command.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

__all__ = ["ReplyDroppingProxy"]

_HOST = "127.0.0.1"


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:``port`` to ``127.0.0.1:upstream_port``; can swallow one reply on demand."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._trigger: bytes | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: Requests seen per trigger word (counted whether or not a reply was dropped).
        self.seen: dict[bytes, int] = {}
        self.dropped = 0
        self.connections = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def drop_reply_to(self, trigger: bytes) -> None:
        """Swallow the reply to the next request whose bytes contain ``trigger``, then cut the client off."""
        self._trigger = trigger
        self.seen.setdefault(trigger, 0)

    def count(self, word: bytes) -> None:
        """Count requests containing ``word`` in :attr:`seen` from now on."""
        self.seen.setdefault(word, 0)

    async def __aenter__(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._accept, _HOST, 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(_HOST, self.upstream_port)
        self._writers |= {client_writer, upstream_writer}
        drop_next = asyncio.Event()

        async def requests() -> None:
            while data := await client_reader.read(65536):
                for word in self.seen:
                    if word in data:
                        self.seen[word] += 1
                if self._trigger is not None and self._trigger in data:
                    self._trigger = None
                    drop_next.set()
                upstream_writer.write(data)
                await upstream_writer.drain()
            upstream_writer.close()

        async def replies() -> None:
            while data := await upstream_reader.read(65536):
                if drop_next.is_set():
                    # The request ran on the server; its reply never reaches the client.
                    self.dropped += 1
                    client_writer.transport.abort()
                    upstream_writer.transport.abort()
                    return
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        pumps = [asyncio.ensure_future(requests()), asyncio.ensure_future(replies())]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for writer in (client_writer, upstream_writer):
                self._writers.discard(writer)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
