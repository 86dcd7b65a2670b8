"""streamwarden: reliable, observable event-stream consumers.

Wrap a message handler with deduplication, a circuit breaker, retries with backoff and jitter,
timeouts, error classification and a dead-letter queue; every decision emits OpenTelemetry signals.

>>> from streamwarden import ReliabilityLayer, ReliabilitySettings
>>> layer = ReliabilityLayer(None, ReliabilitySettings())  # embedded in-memory stores
"""

from ._breaker import BreakerPolicy as BreakerPolicy
from ._breaker import BreakerRegistry as BreakerRegistry
from ._breaker import BreakerRejection as BreakerRejection
from ._breaker import BreakerState as BreakerState
from ._breaker import BreakerTransition as BreakerTransition
from ._breaker import CircuitBreaker as CircuitBreaker
from ._classify import ErrorClass as ErrorClass
from ._classify import ErrorClassifier as ErrorClassifier
from ._compat import DeduplicationManager as DeduplicationManager
from ._compat import MetricsCollector as MetricsCollector
from ._counters import CounterStore as CounterStore
from ._dead_letters import ErrorHandler as ErrorHandler
from ._dedup import ClaimResult as ClaimResult
from ._dedup import ClaimStatus as ClaimStatus
from ._dedup import DedupPolicy as DedupPolicy
from ._dedup import DedupStore as DedupStore
from ._dedup import InMemoryDedupStore as InMemoryDedupStore
from ._dedup import Lease as Lease
from ._dedup import RecordState as RecordState
from ._dlq import DEFAULT_REDACT_PATTERNS as DEFAULT_REDACT_PATTERNS
from ._dlq import DeadLetterEntry as DeadLetterEntry
from ._dlq import DeadLetterReason as DeadLetterReason
from ._dlq import DeadLetterStore as DeadLetterStore
from ._dlq import InMemoryDeadLetterStore as InMemoryDeadLetterStore
from ._dlq import OmittedPayload as OmittedPayload
from ._dlq import Redactor as Redactor
from ._envelope import Envelope as Envelope
from ._exceptions import CircuitOpenError as CircuitOpenError
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import DeadLetterError as DeadLetterError
from ._exceptions import DeadLetterQueueFullError as DeadLetterQueueFullError
from ._exceptions import DeduplicationUnavailableError as DeduplicationUnavailableError
from ._exceptions import HandlerAborted as HandlerAborted
from ._exceptions import HandlerTimeout as HandlerTimeout
from ._exceptions import InvalidMessageError as InvalidMessageError
from ._exceptions import InvalidProcessorError as InvalidProcessorError
from ._exceptions import MessageInProgressError as MessageInProgressError
from ._exceptions import MissingMessageIdError as MissingMessageIdError
from ._exceptions import PoisonMessageError as PoisonMessageError
from ._exceptions import StreamwardenError as StreamwardenError
from ._layer import ProcessResult as ProcessResult
from ._layer import ReliabilityLayer as ReliabilityLayer
from ._layer import StagedCompletion as StagedCompletion
from ._layer import current_lease as current_lease
from ._redis import CounterFlusher as CounterFlusher
from ._redis import RedisCounterStore as RedisCounterStore
from ._redis import RedisDeadLetterStore as RedisDeadLetterStore
from ._redis import RedisDedupStore as RedisDedupStore
from ._redis import SharedBreakerState as SharedBreakerState
from ._redis import SharedBreakerSync as SharedBreakerSync
from ._redis import read_shared_breakers as read_shared_breakers
from ._redis import run_periodic_flush as run_periodic_flush
from ._replay import DeadLetterReplayer as DeadLetterReplayer
from ._replay import ReplayItem as ReplayItem
from ._replay import ReplayReport as ReplayReport
from ._replay import ReplayResult as ReplayResult
from ._retry import Retrier as Retrier
from ._retry import RetryDetails as RetryDetails
from ._retry import RetryPolicy as RetryPolicy
from ._runners import ConsumerStats as ConsumerStats
from ._runners import Health as Health
from ._runners import RedisStreamConsumer as RedisStreamConsumer
from ._runners import StreamProducer as StreamProducer
from ._sampling import KeepFailures as KeepFailures
from ._settings import ReliabilitySettings as ReliabilitySettings
from ._telemetry import configure_telemetry as configure_telemetry
from ._types import Outcome as Outcome

__all__ = [
    "DEFAULT_REDACT_PATTERNS",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerRejection",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClaimResult",
    "ClaimStatus",
    "ConfigurationError",
    "ConsumerStats",
    "CounterFlusher",
    "CounterStore",
    "DeadLetterEntry",
    "DeadLetterError",
    "DeadLetterQueueFullError",
    "DeadLetterReason",
    "DeadLetterReplayer",
    "DeadLetterStore",
    "DedupPolicy",
    "DedupStore",
    "DeduplicationManager",
    "DeduplicationUnavailableError",
    "Envelope",
    "ErrorClass",
    "ErrorClassifier",
    "ErrorHandler",
    "HandlerAborted",
    "HandlerTimeout",
    "Health",
    "InMemoryDeadLetterStore",
    "InMemoryDedupStore",
    "InvalidMessageError",
    "InvalidProcessorError",
    "KeepFailures",
    "Lease",
    "MessageInProgressError",
    "MetricsCollector",
    "MissingMessageIdError",
    "OmittedPayload",
    "Outcome",
    "PoisonMessageError",
    "ProcessResult",
    "RecordState",
    "Redactor",
    "RedisCounterStore",
    "RedisDeadLetterStore",
    "RedisDedupStore",
    "RedisStreamConsumer",
    "ReliabilityLayer",
    "ReliabilitySettings",
    "ReplayItem",
    "ReplayReport",
    "ReplayResult",
    "Retrier",
    "RetryDetails",
    "RetryPolicy",
    "SharedBreakerState",
    "SharedBreakerSync",
    "StagedCompletion",
    "StreamProducer",
    "StreamwardenError",
    "configure_telemetry",
    "current_lease",
    "read_shared_breakers",
    "run_periodic_flush",
]
