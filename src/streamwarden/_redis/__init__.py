"""The Redis-backed stores: dedup records, dead letters, fleet counters, shared breaker state.

Each sits beside its embedded twin's contract (``streamwarden._dedup``, ``._dlq``, ``._counters``,
``._breaker``) and talks to Redis only through a client handed to it; :mod:`._wire` holds what they
share (reply decoding, safe key parts). Keys are Redis Cluster safe (see ``docs/dedup.md``).
"""

# The redactor lives with the dead-letter entry model (every store uses it); re-exported here for
# code that imported it from the Redis stores.
from .._dlq import DEFAULT_REDACT_PATTERNS as DEFAULT_REDACT_PATTERNS
from .._dlq import Redactor as Redactor
from ._breaker import SharedBreakerState as SharedBreakerState
from ._breaker import SharedBreakerSync as SharedBreakerSync
from ._breaker import read_shared_breakers as read_shared_breakers
from ._counters import CounterFlusher as CounterFlusher
from ._counters import RedisCounterStore as RedisCounterStore
from ._counters import run_periodic_flush as run_periodic_flush
from ._dedup import RedisDedupStore as RedisDedupStore
from ._dlq import RedisDeadLetterStore as RedisDeadLetterStore

__all__ = [
    "DEFAULT_REDACT_PATTERNS",
    "CounterFlusher",
    "Redactor",
    "RedisCounterStore",
    "RedisDeadLetterStore",
    "RedisDedupStore",
    "SharedBreakerState",
    "SharedBreakerSync",
    "read_shared_breakers",
    "run_periodic_flush",
]
