"""The exception tree of streamwarden.

::

    StreamwardenError
    ├── ConfigurationError (ValueError)          bad settings or a store that cannot be used safely
    ├── InvalidMessageError (ValueError)         the message cannot be turned into an envelope
    │   └── MissingMessageIdError                no id and the policy is ``dead_letter``
    ├── PoisonMessageError                       delivered more than ``poison_max_deliveries`` times
    ├── InvalidProcessorError (TypeError)        the processor did not return an awaitable
    ├── HandlerTimeout (TimeoutError)            one attempt ran past ``processing_timeout``
    ├── CircuitOpenError                         the circuit breaker refused the call
    ├── MessageInProgressError                   another owner holds a live lease on the id
    ├── DeduplicationUnavailableError            the dedup store failed and the policy is fail-closed
    └── DeadLetterError                          a dead-letter write was not confirmed
        └── DeadLetterQueueFullError             the dead-letter store is at capacity

Every exception may carry a ``retriable`` attribute; :class:`~streamwarden.ErrorClassifier` honours it.
Where the meaning matches a builtin, the class also subclasses the builtin so ``except TimeoutError``
keeps working in user code.
"""

from __future__ import annotations

__all__ = [
    "CircuitOpenError",
    "ConfigurationError",
    "DeadLetterError",
    "DeadLetterQueueFullError",
    "DeduplicationUnavailableError",
    "HandlerTimeout",
    "InvalidMessageError",
    "InvalidProcessorError",
    "MessageInProgressError",
    "MissingMessageIdError",
    "PoisonMessageError",
    "StreamwardenError",
]


class StreamwardenError(Exception):
    """Root of every exception streamwarden raises itself."""

    retriable: bool | None = None


class ConfigurationError(StreamwardenError, ValueError):
    """Settings or an external store are configured in a way streamwarden cannot use safely."""

    retriable = False


class InvalidMessageError(StreamwardenError, ValueError):
    """The message is not something streamwarden can process (not a mapping, undecodable, ...)."""

    retriable = False

    def __init__(self, message: str, *, reason: str = "invalid_message") -> None:
        super().__init__(message)
        self.reason = reason


class MissingMessageIdError(InvalidMessageError):
    """The message has no usable id and ``missing_id_policy`` is ``dead_letter``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="missing_id")


class PoisonMessageError(StreamwardenError):
    """The message was delivered too many times (its handler keeps crashing or its ack keeps getting lost)."""

    retriable = False

    def __init__(self, message_id: str, deliveries: int, limit: int) -> None:
        super().__init__(f"message {message_id!r} delivered {deliveries} times (limit {limit}): poison")
        self.message_id = message_id
        self.deliveries = deliveries


class InvalidProcessorError(StreamwardenError, TypeError):
    """The processor returned something that is not awaitable: it must be an ``async def``."""

    retriable = False


class HandlerTimeout(StreamwardenError, TimeoutError):
    """One processing attempt took longer than ``processing_timeout`` seconds."""

    retriable = True

    def __init__(self, timeout: float) -> None:
        super().__init__(f"processing attempt exceeded {timeout:g}s")
        self.timeout = timeout


class CircuitOpenError(StreamwardenError):
    """The circuit breaker is open (or a half-open trial is already running) and refused the call."""

    retriable = True

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; retry in {max(retry_after, 0.0):.3g}s")
        self.name = name
        self.retry_after = retry_after


class MessageInProgressError(StreamwardenError):
    """Another consumer holds a live lease on this message id; it was not processed here."""

    retriable = True

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message {message_id!r} is being processed by another owner")
        self.message_id = message_id


class DeduplicationUnavailableError(StreamwardenError):
    """The dedup store could not answer and ``dedup_failure_mode`` is ``fail_closed``."""

    retriable = True


class DeadLetterError(StreamwardenError):
    """A dead-letter write failed; the message must not be acknowledged."""

    retriable = True


class DeadLetterQueueFullError(DeadLetterError):
    """The dead-letter store reached its capacity; nothing is overwritten or dropped."""


# Public exceptions report their public home, so ``error.type`` values and tracebacks read
# ``streamwarden.HandlerTimeout`` rather than the private module.
for _name in __all__:
    globals()[_name].__module__ = "streamwarden"
del _name
