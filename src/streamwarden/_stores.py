"""Factories for the Redis-backed stores (dedup, dead letters, counters).

The layer, ``DeduplicationManager`` and ``MetricsCollector`` import these lazily when a Redis client is
given, so the embedded default never imports Redis store code.
"""

from __future__ import annotations

from typing import Any

from ._exceptions import ConfigurationError

__all__ = ["redis_counter_store", "redis_dead_letter_store", "redis_dedup_store"]

_NOT_YET = (
    "Redis-backed stores are not part of this release yet (tracked as issue #3); pass "
    "redis_client=None for the embedded in-memory stores"
)


def redis_dedup_store(client: Any, *, key_prefix: str) -> Any:
    """The Redis dedup store for ``client``."""
    raise ConfigurationError(_NOT_YET)


def redis_dead_letter_store(client: Any, *, key_prefix: str) -> Any:
    """The Redis Streams dead-letter store for ``client``."""
    raise ConfigurationError(_NOT_YET)


def redis_counter_store(client: Any, *, service_name: str, key_prefix: str) -> Any:
    """The Redis hash counter store for ``client``."""
    raise ConfigurationError(_NOT_YET)
