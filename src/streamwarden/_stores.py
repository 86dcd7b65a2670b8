"""Factories for the Redis-backed stores (dedup, dead letters, counters).

The layer, ``DeduplicationManager`` and ``MetricsCollector`` import these lazily when a Redis client is
given, so the embedded default never imports Redis store code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["redis_counter_store", "redis_dead_letter_store", "redis_dedup_store"]


def redis_dedup_store(client: Any, *, key_prefix: str, **options: Any) -> Any:
    """The Redis dedup store (:class:`~streamwarden.RedisDedupStore`) for ``client``."""
    from ._redis_dedup import RedisDedupStore

    return RedisDedupStore(client, key_prefix=key_prefix, **options)


def redis_dead_letter_store(client: Any, *, key_prefix: str, **options: Any) -> Any:
    """The Redis Streams dead-letter store (:class:`~streamwarden.RedisDeadLetterStore`) for ``client``."""
    from ._redis_dlq import RedisDeadLetterStore

    return RedisDeadLetterStore(client, key_prefix=key_prefix, **options)


def redis_counter_store(client: Any, *, service_name: str, key_prefix: str, **options: Any) -> Any:
    """The Redis hash counter store (:class:`~streamwarden.RedisCounterStore`) for ``client``."""
    from ._redis_counters import RedisCounterStore

    return RedisCounterStore(client, service_name=service_name, key_prefix=key_prefix, **options)
