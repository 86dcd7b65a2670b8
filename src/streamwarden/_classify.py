"""Error classification: is a failure worth retrying?

:class:`ErrorClassifier` answers ``transient``, ``permanent`` or ``unknown`` for an exception. Rules
are consulted in this order, the first answer wins:

1. rules added by the user (:meth:`ErrorClassifier.add_type`, :meth:`ErrorClassifier.add_predicate`);
2. a ``retriable`` attribute on the exception (``True`` -> transient, ``False`` -> permanent), the
   convention of aiokafka and of streamwarden's own exceptions;
3. an HTTP-like status code on the exception or its ``response`` (``status_code`` or ``status``):
   408, 425, 429 and 5xx are transient, other 4xx permanent;
4. Redis error kinds: connection, timeout, loading, ``TRYAGAIN``, ``CLUSTERDOWN`` and ``READONLY``
   (a failover) are transient; permission, authentication, data and other response errors are
   configuration or programming errors and permanent;
5. builtins, as in the original module: ``ConnectionError`` and ``TimeoutError`` are transient;
   ``ValueError`` (pydantic's ``ValidationError`` is one), ``TypeError``, ``LookupError``,
   ``NotImplementedError`` and ``PermissionError`` are permanent;
6. otherwise the explicit cause (``raise X from Y``): an exception that is ``unknown`` by itself takes
   the class of its ``__cause__``, so a domain wrapper around a ``ConnectionError`` is retried.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import redis.exceptions as redis_exc

__all__ = ["ErrorClass", "ErrorClassifier"]


class ErrorClass(enum.StrEnum):
    """How a failure is treated: retried (transient), dead-lettered at once (permanent) or by policy."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


# Checked first: these subclass redis' ConnectionError but are configuration errors, never transient.
_REDIS_CONFIGURATION: tuple[type[BaseException], ...] = (
    redis_exc.NoPermissionError,
    redis_exc.AuthenticationError,
    redis_exc.AuthorizationError,
)
_REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
    redis_exc.TryAgainError,
    redis_exc.ClusterDownError,
    redis_exc.ReadOnlyError,
    redis_exc.MasterDownError,
)
_REDIS_PERMANENT: tuple[type[BaseException], ...] = (
    redis_exc.DataError,
    redis_exc.ResponseError,
)
_BUILTIN_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
_BUILTIN_PERMANENT: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    NotImplementedError,
    PermissionError,
)
_MAX_CAUSE_DEPTH = 16


def _attribute(obj: object, name: str) -> Any:
    """``getattr(obj, name, None)`` that also survives a property raising something else than
    ``AttributeError``: exceptions come from user code, and classifying one must never fail."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _status_code(error: BaseException) -> int | None:
    for holder in (error, _attribute(error, "response")):
        if holder is None:
            continue
        for attr in ("status_code", "status"):
            value = _attribute(holder, attr)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
    return None


def _classify_status(code: int) -> ErrorClass:
    if code in (408, 425, 429) or code >= 500:
        return ErrorClass.TRANSIENT
    if code >= 400:
        return ErrorClass.PERMANENT
    return ErrorClass.UNKNOWN


class ErrorClassifier:
    """Classifies exceptions as transient, permanent or unknown; extensible with rules.

    >>> c = ErrorClassifier()
    >>> c.classify(ConnectionError()).value
    'transient'
    """

    __slots__ = ("_rules",)

    def __init__(self) -> None:
        self._rules: list[Callable[[BaseException], ErrorClass | None]] = []

    def add_type(self, exc_type: type[BaseException], error_class: ErrorClass | str) -> None:
        """Classify ``exc_type`` and its subclasses as ``error_class`` (takes precedence over defaults)."""
        cls = ErrorClass(error_class)
        self._rules.append(lambda e: cls if isinstance(e, exc_type) else None)

    def add_predicate(self, predicate: Callable[[BaseException], ErrorClass | str | None]) -> None:
        """Add a rule: ``predicate(error)`` returns a class, or ``None`` to let later rules decide."""

        def rule(e: BaseException) -> ErrorClass | None:
            answer = predicate(e)
            return None if answer is None else ErrorClass(answer)

        self._rules.append(rule)

    def classify(self, error: BaseException) -> ErrorClass:
        """Return the class of ``error``, following its ``__cause__`` chain when it is unknown by itself.

        Never raises, whatever the exception object does: anything that is not an ``Exception`` (a
        ``SystemExit`` from a handler, say) is permanent; a cause that is not an exception ends the chain.
        """
        if not isinstance(error, Exception):
            return ErrorClass.PERMANENT
        seen: set[int] = set()
        current: object = error
        depth = 0
        while isinstance(current, BaseException) and id(current) not in seen and depth < _MAX_CAUSE_DEPTH:
            seen.add(id(current))
            answer = self._classify_one(current)
            if answer is not ErrorClass.UNKNOWN:
                return answer
            current = _attribute(current, "__cause__")
            depth += 1
        return ErrorClass.UNKNOWN

    def _classify_one(self, error: BaseException) -> ErrorClass:
        for rule in self._rules:
            try:
                answer = rule(error)
            except Exception:  # a broken user rule must not fail the message
                answer = None
            if answer is not None:
                return answer
        retriable: Any = _attribute(error, "retriable")
        if isinstance(retriable, bool):
            return ErrorClass.TRANSIENT if retriable else ErrorClass.PERMANENT
        code = _status_code(error)
        if code is not None:
            by_status = _classify_status(code)
            if by_status is not ErrorClass.UNKNOWN:
                return by_status
        if isinstance(error, _REDIS_CONFIGURATION):
            return ErrorClass.PERMANENT
        if isinstance(error, _REDIS_TRANSIENT):
            return ErrorClass.TRANSIENT
        if isinstance(error, _REDIS_PERMANENT):
            return ErrorClass.PERMANENT
        if isinstance(error, _BUILTIN_TRANSIENT):
            return ErrorClass.TRANSIENT
        if isinstance(error, _BUILTIN_PERMANENT):
            return ErrorClass.PERMANENT
        return ErrorClass.UNKNOWN
