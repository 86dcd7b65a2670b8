"""Fixtures of the Redis dedup suite: stores and clients that are closed after each test, and a
three-node Redis Cluster of real ``redis-server`` processes on free loopback ports (one per module).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

_REDIS_TESTS_DIR = str(Path(__file__).resolve().parent)
if _REDIS_TESTS_DIR not in sys.path:
    sys.path.insert(0, _REDIS_TESTS_DIR)

from _redis_server import RedisServer  # noqa: E402
from _support import eventually, wait_until  # noqa: E402
from streamwarden._redis._dedup import RedisDedupStore  # noqa: E402

_HOST = "127.0.0.1"
_CLUSTER_NODES = 3
_CLUSTER_READY_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _cluster_info(port: int) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", _HOST, "-p", str(port), "cluster", "info"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return done.stdout


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[list[int]]:
    """Three ``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create``; their ports.

    Each node's cluster bus gets its own free port (``--cluster-port``), so the default port + 10000
    never matters. The fixture returns once every node reports ``cluster_state:ok``.
    """
    if shutil.which("redis-cli") is None:
        raise RuntimeError("redis-cli not found: it is needed to create the test cluster")
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(_CLUSTER_NODES):
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-port", str(_free_port()), "--cluster-node-timeout", "5000"]
            ports.append(stack.enter_context(RedisServer(args)).port)
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"{_HOST}:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        try:
            wait_until(
                lambda: all("cluster_state:ok" in _cluster_info(p) for p in ports),
                timeout=_CLUSTER_READY_TIMEOUT,
                interval=0.05,
                what="cluster_state:ok on every node",
            )
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: {_cluster_info(ports[0])}") from None
        yield ports


@pytest.fixture
async def cluster_client(redis_cluster: list[int]) -> AsyncIterator[redis.asyncio.RedisCluster]:
    """A ``RedisCluster`` client of the module's cluster, closed after the test."""
    client = redis.asyncio.RedisCluster(host=_HOST, port=redis_cluster[0])
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def scope() -> str:
    """A dedup scope of this test's own, so tests sharing a server never see each other's records."""
    return f"t{uuid.uuid4().hex[:12]}"


ClientFactory = Callable[..., redis.asyncio.Redis]


@pytest.fixture
async def client_factory() -> AsyncIterator[ClientFactory]:
    """``factory(url_or_port, **options)``: clients that are all closed after the test.

    Defaults suit fault tests: short timeouts and no retries unless ``retry=`` is given.
    """
    clients: list[redis.asyncio.Redis] = []

    def factory(target: str | int, **options: Any) -> redis.asyncio.Redis:
        options.setdefault("socket_timeout", 2.0)
        options.setdefault("socket_connect_timeout", 2.0)
        options.setdefault("retry", Retry(NoBackoff(), 0))
        if isinstance(target, int):
            client = redis.asyncio.Redis(host=_HOST, port=target, **options)
        else:
            client = redis.asyncio.Redis.from_url(target, **options)
        clients.append(client)
        return client

    try:
        yield factory
    finally:
        for client in clients:
            await client.aclose()


StoreFactory = Callable[..., RedisDedupStore]


@pytest.fixture
async def store_factory(scope: str) -> AsyncIterator[StoreFactory]:
    """``factory(client, **options)``: stores in this test's scope, closed (flushed) after the test."""
    stores: list[RedisDedupStore] = []

    def factory(client: Any, **options: Any) -> RedisDedupStore:
        options.setdefault("scope", scope)
        store = RedisDedupStore(client, **options)
        stores.append(store)
        return store

    try:
        yield factory
    finally:
        for store in stores:
            await store.aclose()


LeaseExpiry = Callable[..., Awaitable[None]]


async def _wait_lease_expired(client: Any, key: str, timeout: float = 5.0) -> None:
    """Return once the lease (or dead-letter marker) recorded at ``key`` has run out on the server's
    clock (``e`` <= TIME)."""

    async def expired() -> bool:
        raw = await client.hget(key, "e")
        seconds, micros = await client.time()
        return raw is None or int(raw) <= seconds * 1000 + micros // 1000

    await eventually(expired, timeout, step=0, what=f"expiry of the lease at {key}")


@pytest.fixture
def lease_expired() -> LeaseExpiry:
    """``await lease_expired(client, key)``: poll (bounded) until the lease or dead-letter marker at
    ``key`` has expired."""
    return _wait_lease_expired


@pytest.fixture
async def store(redis_client: redis.asyncio.Redis, store_factory: StoreFactory) -> RedisDedupStore:
    """A store on the session server (emptied before the test) with the default options."""
    return store_factory(redis_client)
