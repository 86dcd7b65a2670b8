"""The exception tree of streamwarden.

::

    StreamwardenError
    ├── ConfigurationError (ValueError)          bad settings or a store that cannot be used safely
    ├── InvalidMessageError (ValueError)         the message cannot be turned into an envelope
    │   └── MissingMessageIdError                no id and the policy is ``dead_letter``
    ├── PoisonMessageError                       the handler ran ``poison_max_deliveries`` times already
    ├── InvalidProcessorError (TypeError)        the processor did not return an awaitable
    ├── HandlerTimeout (TimeoutError)            one attempt ran past ``processing_timeout``
    ├── HandlerAborted                           the handler raised a BaseException (SystemExit, ...)
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

import contextlib

__all__ = [
    "CircuitOpenError",
    "ConfigurationError",
    "DeadLetterError",
    "DeadLetterQueueFullError",
    "DeduplicationUnavailableError",
    "HandlerAborted",
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
    """The handler already ran for this message as often as allowed without success (it keeps crashing
    its process, or keeps failing while everything else succeeds)."""

    retriable = False

    def __init__(self, message_id: str, attempts: int, limit: int) -> None:
        super().__init__(f"handler ran {attempts} times for message {message_id!r} (limit {limit}): poison")
        self.message_id = message_id
        self.attempts = attempts
        #: the same number, under its earlier name
        self.deliveries = attempts


class InvalidProcessorError(StreamwardenError, TypeError):
    """The processor returned something that is not awaitable: it must be an ``async def``."""

    retriable = False


class HandlerTimeout(StreamwardenError, TimeoutError):
    """One processing attempt took longer than ``processing_timeout`` seconds."""

    retriable = True

    def __init__(self, timeout: float) -> None:
        super().__init__(f"processing attempt exceeded {timeout:g}s")
        self.timeout = timeout


class HandlerAborted(StreamwardenError):
    """The handler raised a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit``, its own ``CancelledError``, a custom one).

    Left alone it would end the event loop or the consumer and take the in-flight messages of other
    handlers with it; instead it fails this one message (permanent: retrying cannot help) and the original
    is kept as ``__cause__``. A real cancellation of the calling task is not this: it propagates.
    """

    retriable = False

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"handler raised {error_type_name(error)}: {error_text(error)}")
        self.original = error


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


_BROKEN = "<unprintable: str() raised>"
#: the longest ``error.type`` value streamwarden reports
MAX_ERROR_TYPE_CHARS = 256


def error_text(error: BaseException) -> str:
    """``str(error)``, or a placeholder when the exception's ``__str__`` raises or returns no ``str``.

    Exceptions come from user code; describing one must never fail the message it belongs to.
    """
    try:
        return str(error)
    except Exception:  # str() also raises when __str__ returns something that is not a str
        try:
            return f"<unprintable {type(error).__qualname__}>"
        except Exception:
            return _BROKEN


def error_type_name(error: BaseException) -> str:
    """Low-cardinality ``error.type`` value: the exception's qualified name, module-prefixed unless builtin.

    Never raises: a class with a non-text ``__module__`` or ``__qualname__`` reads as its ``__name__``.
    """
    cls = type(error)
    try:
        module: object = cls.__module__  # class attributes a hostile class may set to anything
        name: object = cls.__qualname__
        if not isinstance(name, str):
            name = cls.__name__
        text = str(name) if module == "builtins" or not isinstance(module, str) else f"{module}.{name}"
    except Exception:
        return "_OTHER"
    # a metric attribute and a span attribute: bounded, whatever a class calls itself
    return text if len(text) <= MAX_ERROR_TYPE_CHARS else text[: MAX_ERROR_TYPE_CHARS - 3] + "..."


def describe(error: BaseException) -> str:
    """``Type: text`` of an exception for a log line (redis-py's ``repr`` drops the text); never raises."""
    text = error_text(error)
    name = error_type_name(error)
    return f"{name}: {text}" if text else name


def reported_type(error: BaseException) -> str:
    """The ``error.type`` an operator should see: the original type for a :class:`HandlerAborted`
    (``SystemExit``), the exception's own otherwise."""
    return error_type_name(error.original if isinstance(error, HandlerAborted) else error)


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, unless the exception object refuses notes (never fails the message)."""
    with contextlib.suppress(Exception):
        error.add_note(note)


# Public exceptions report their public home, so ``error.type`` values and tracebacks read
# ``streamwarden.HandlerTimeout`` rather than the private module.
for _name in __all__:
    globals()[_name].__module__ = "streamwarden"
del _name
