"""Error classification: the default table, cause chains, user rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
import pytest
import redis.exceptions as redis_exc

from streamwarden import (
    CircuitOpenError,
    ErrorClass,
    ErrorClassifier,
    HandlerTimeout,
    InvalidMessageError,
    MissingMessageIdError,
)
from streamwarden._classify import _MAX_CAUSE_DEPTH

TRANSIENT = ErrorClass.TRANSIENT
PERMANENT = ErrorClass.PERMANENT
UNKNOWN = ErrorClass.UNKNOWN


class DomainError(Exception):
    """An application exception the classifier knows nothing about."""


class Flagged(Exception):
    """An exception carrying an aiokafka-style ``retriable`` attribute."""

    def __init__(self, retriable: Any) -> None:
        super().__init__("flagged")
        self.retriable = retriable


class HttpError(Exception):
    """An HTTP client error with the status on the exception itself (``status_code``)."""

    def __init__(self, status_code: Any) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class Response:
    def __init__(self, status: Any) -> None:
        self.status = status


class ResponseError(Exception):
    """An HTTP client error with the status on its ``response`` (``status``, aiohttp-style)."""

    def __init__(self, status: Any) -> None:
        super().__init__(f"HTTP {status}")
        self.response = Response(status)


class RetriableConnectionError(ConnectionError):
    retriable = False


class RetriableValueError(ValueError):
    retriable = True


class FlaggedHttpError(HttpError):
    """An HTTP error that also says whether it is retriable."""

    def __init__(self, status_code: int, retriable: bool) -> None:
        super().__init__(status_code)
        self.retriable = retriable


def validation_error() -> pydantic.ValidationError:
    try:
        pydantic.TypeAdapter(int).validate_python("not a number")
    except pydantic.ValidationError as error:
        return error
    raise AssertionError("pydantic accepted a non-number")


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` as ``raise outer from cause`` leaves it."""
    try:
        raise outer from cause
    except BaseException as error:
        return error


def raised_during(outer: BaseException, context: BaseException) -> BaseException:
    """``outer`` raised while handling ``context`` (implicit chaining, no ``from``)."""
    try:
        try:
            raise context
        except BaseException:
            raise outer  # noqa: B904 - the implicit context is the point
    except BaseException as error:
        return error


def wrapped(depth: int, root: BaseException) -> BaseException:
    """``root`` under ``depth`` layers of unknown ``DomainError`` causes."""
    error = root
    for _ in range(depth):
        outer = DomainError("wrapper")
        outer.__cause__ = error
        error = outer
    return error


CASES = [
    # builtins, after the seed design
    pytest.param(ConnectionError("reset"), TRANSIENT, id="ConnectionError"),
    pytest.param(ConnectionResetError("reset"), TRANSIENT, id="ConnectionResetError-subclass"),
    pytest.param(TimeoutError("slow"), TRANSIENT, id="TimeoutError"),
    pytest.param(asyncio.TimeoutError(), TRANSIENT, id="asyncio.TimeoutError"),  # noqa: UP041 - the seed spelling
    pytest.param(ValueError("bad"), PERMANENT, id="ValueError"),
    pytest.param(validation_error(), PERMANENT, id="pydantic-ValidationError"),
    pytest.param(KeyError("k"), PERMANENT, id="KeyError"),
    pytest.param(IndexError("i"), PERMANENT, id="IndexError"),
    pytest.param(TypeError("t"), PERMANENT, id="TypeError"),
    pytest.param(NotImplementedError(), PERMANENT, id="NotImplementedError"),
    pytest.param(PermissionError("denied"), PERMANENT, id="PermissionError"),
    pytest.param(RuntimeError("?"), UNKNOWN, id="RuntimeError-unknown"),
    pytest.param(DomainError("?"), UNKNOWN, id="domain-error-unknown"),
    # the retriable attribute (rule 2) beats the builtin table (rule 5)
    pytest.param(Flagged(True), TRANSIENT, id="retriable-True"),
    pytest.param(Flagged(False), PERMANENT, id="retriable-False"),
    pytest.param(Flagged("yes"), UNKNOWN, id="retriable-str-ignored"),
    pytest.param(Flagged(1), UNKNOWN, id="retriable-int-ignored"),
    pytest.param(Flagged(None), UNKNOWN, id="retriable-None-ignored"),
    pytest.param(RetriableConnectionError(), PERMANENT, id="retriable-False-beats-ConnectionError"),
    pytest.param(RetriableValueError(), TRANSIENT, id="retriable-True-beats-ValueError"),
    pytest.param(FlaggedHttpError(503, retriable=False), PERMANENT, id="retriable-False-beats-status-503"),
    pytest.param(FlaggedHttpError(404, retriable=True), TRANSIENT, id="retriable-True-beats-status-404"),
    # HTTP-like status codes on the exception and on .response
    pytest.param(HttpError(429), TRANSIENT, id="status_code-429"),
    pytest.param(HttpError(408), TRANSIENT, id="status_code-408"),
    pytest.param(HttpError(503), TRANSIENT, id="status_code-503"),
    pytest.param(HttpError(500), TRANSIENT, id="status_code-500"),
    pytest.param(HttpError(404), PERMANENT, id="status_code-404"),
    pytest.param(HttpError(400), PERMANENT, id="status_code-400"),
    pytest.param(HttpError(200), UNKNOWN, id="status_code-200-unknown"),
    pytest.param(HttpError(True), UNKNOWN, id="status_code-bool-ignored"),
    pytest.param(HttpError("503"), UNKNOWN, id="status_code-str-ignored"),
    pytest.param(HttpError(999), UNKNOWN, id="status_code-out-of-range-ignored"),
    pytest.param(ResponseError(429), TRANSIENT, id="response.status-429"),
    pytest.param(ResponseError(408), TRANSIENT, id="response.status-408"),
    pytest.param(ResponseError(503), TRANSIENT, id="response.status-503"),
    pytest.param(ResponseError(500), TRANSIENT, id="response.status-500"),
    pytest.param(ResponseError(404), PERMANENT, id="response.status-404"),
    pytest.param(ResponseError(400), PERMANENT, id="response.status-400"),
    pytest.param(ResponseError(200), UNKNOWN, id="response.status-200-unknown"),
    # redis error kinds
    pytest.param(redis_exc.ConnectionError("down"), TRANSIENT, id="redis-ConnectionError"),
    pytest.param(redis_exc.TimeoutError("slow"), TRANSIENT, id="redis-TimeoutError"),
    pytest.param(redis_exc.BusyLoadingError("loading"), TRANSIENT, id="redis-BusyLoadingError"),
    pytest.param(redis_exc.ReadOnlyError("replica"), TRANSIENT, id="redis-ReadOnlyError"),
    pytest.param(redis_exc.TryAgainError("TRYAGAIN"), TRANSIENT, id="redis-TryAgainError"),
    pytest.param(redis_exc.ClusterDownError("CLUSTERDOWN"), TRANSIENT, id="redis-ClusterDownError"),
    pytest.param(redis_exc.NoPermissionError("NOPERM"), PERMANENT, id="redis-NoPermissionError"),
    pytest.param(redis_exc.AuthenticationError("auth"), PERMANENT, id="redis-AuthenticationError"),
    pytest.param(redis_exc.AuthorizationError("acl"), PERMANENT, id="redis-AuthorizationError"),
    pytest.param(redis_exc.DataError("bad arg"), PERMANENT, id="redis-DataError"),
    pytest.param(redis_exc.ResponseError("WRONGTYPE"), PERMANENT, id="redis-ResponseError"),
    # cause chains
    pytest.param(raised_from(DomainError(), ConnectionError()), TRANSIENT, id="domain-from-ConnectionError"),
    pytest.param(raised_from(DomainError(), ValueError()), PERMANENT, id="domain-from-ValueError"),
    pytest.param(
        raised_from(ValueError(), ConnectionError()), PERMANENT, id="ValueError-from-ConnectionError"
    ),
    pytest.param(
        raised_from(ConnectionError(), ValueError()), TRANSIENT, id="ConnectionError-from-ValueError"
    ),
    pytest.param(wrapped(3, redis_exc.TimeoutError()), TRANSIENT, id="three-wrappers-around-redis-timeout"),
    pytest.param(
        raised_during(DomainError(), ConnectionError()), UNKNOWN, id="implicit-context-not-followed"
    ),
    # streamwarden's own exceptions
    pytest.param(HandlerTimeout(1.0), TRANSIENT, id="HandlerTimeout"),
    pytest.param(CircuitOpenError("db", 3.0), TRANSIENT, id="CircuitOpenError"),
    pytest.param(InvalidMessageError("not a dict"), PERMANENT, id="InvalidMessageError"),
    pytest.param(MissingMessageIdError("no id"), PERMANENT, id="MissingMessageIdError"),
]


@pytest.mark.parametrize(("error", "expected"), CASES)
def test_default_classification(error: BaseException, expected: ErrorClass) -> None:
    """Each exception kind gets its documented class from a fresh classifier."""
    assert ErrorClassifier().classify(error) is expected


def test_status_code_beats_builtin_table() -> None:
    """A ValueError carrying status 503 is transient: the status rule comes before the builtin table."""

    class BadGateway(ValueError):
        status_code = 503

    assert ErrorClassifier().classify(BadGateway()) is TRANSIENT


def test_cause_cycle_terminates() -> None:
    """A ``__cause__`` cycle of unknown exceptions is classified unknown instead of looping."""
    first, second = DomainError("a"), DomainError("b")
    first.__cause__ = second
    second.__cause__ = first
    assert ErrorClassifier().classify(first) is UNKNOWN


def test_self_cause_terminates() -> None:
    """An exception that is its own cause is classified unknown instead of looping."""
    error = DomainError()
    error.__cause__ = error
    assert ErrorClassifier().classify(error) is UNKNOWN


def test_cause_chain_depth_limit() -> None:
    """The cause chain is followed to a bounded depth: the last reachable link counts, deeper ones do not."""
    classifier = ErrorClassifier()
    assert classifier.classify(wrapped(_MAX_CAUSE_DEPTH - 1, ConnectionError())) is TRANSIENT
    assert classifier.classify(wrapped(_MAX_CAUSE_DEPTH, ConnectionError())) is UNKNOWN
    assert classifier.classify(wrapped(10_000, ConnectionError())) is UNKNOWN


def test_add_type_takes_precedence_over_defaults() -> None:
    """A user type rule overrides the default table, for the type and its subclasses."""
    classifier = ErrorClassifier()
    classifier.add_type(ConnectionError, ErrorClass.PERMANENT)
    classifier.add_type(RuntimeError, "transient")
    assert classifier.classify(ConnectionError()) is PERMANENT
    assert classifier.classify(ConnectionResetError()) is PERMANENT
    assert classifier.classify(RuntimeError()) is TRANSIENT
    assert classifier.classify(TimeoutError()) is TRANSIENT  # untouched default


def test_add_type_beats_retriable_flag() -> None:
    """User rules come before the ``retriable`` attribute."""
    classifier = ErrorClassifier()
    classifier.add_type(Flagged, ErrorClass.PERMANENT)
    assert classifier.classify(Flagged(True)) is PERMANENT


def test_first_matching_user_rule_wins() -> None:
    """User rules are consulted in the order they were added."""
    classifier = ErrorClassifier()
    classifier.add_type(DomainError, ErrorClass.TRANSIENT)
    classifier.add_type(DomainError, ErrorClass.PERMANENT)
    assert classifier.classify(DomainError()) is TRANSIENT


def test_add_type_rejects_unknown_class_name() -> None:
    """A class name that is not transient/permanent/unknown is refused when the rule is added."""
    with pytest.raises(ValueError, match="sometimes"):
        ErrorClassifier().add_type(DomainError, "sometimes")


def test_predicate_returning_none_falls_through() -> None:
    """A predicate that returns None leaves the decision to later rules and the defaults."""
    seen: list[BaseException] = []

    def undecided(error: BaseException) -> None:
        seen.append(error)

    classifier = ErrorClassifier()
    classifier.add_predicate(undecided)
    error = ConnectionError()
    assert classifier.classify(error) is TRANSIENT
    assert seen == [error]


def test_predicate_answer_is_used() -> None:
    """A predicate's answer (enum or string) decides the class."""
    classifier = ErrorClassifier()
    classifier.add_predicate(lambda e: "transient" if "deadlock" in str(e) else None)
    assert classifier.classify(RuntimeError("deadlock detected")) is TRANSIENT
    assert classifier.classify(RuntimeError("other")) is UNKNOWN


@pytest.mark.parametrize(
    "predicate",
    [
        pytest.param(lambda e: 1 / 0, id="raises"),
        pytest.param(lambda e: "maybe", id="returns-nonsense"),
    ],
)
def test_broken_predicate_is_ignored(predicate: Any) -> None:
    """A predicate that raises or answers nonsense is skipped; the defaults still decide."""
    classifier = ErrorClassifier()
    classifier.add_predicate(predicate)
    classifier.add_type(RuntimeError, ErrorClass.PERMANENT)
    assert classifier.classify(ValueError()) is PERMANENT
    assert classifier.classify(ConnectionError()) is TRANSIENT
    assert classifier.classify(RuntimeError()) is PERMANENT  # a later user rule still runs


def test_user_rules_apply_along_the_cause_chain() -> None:
    """A user rule classifies the cause of an otherwise unknown wrapper."""
    classifier = ErrorClassifier()
    classifier.add_type(KeyError, ErrorClass.TRANSIENT)
    assert classifier.classify(raised_from(DomainError(), KeyError("shard"))) is TRANSIENT


def test_rules_are_per_classifier() -> None:
    """Rules added to one classifier do not leak into another."""
    ErrorClassifier().add_type(ValueError, ErrorClass.TRANSIENT)
    assert ErrorClassifier().classify(ValueError()) is PERMANENT


def test_error_class_values_are_the_seed_strings() -> None:
    """The class values are the seed's strings, so ``classify_error`` callers can compare to them."""
    assert [c.value for c in ErrorClass] == ["transient", "permanent", "unknown"]
    assert ErrorClass.TRANSIENT == "transient"
