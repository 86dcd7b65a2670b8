"""Attack: handlers raising BaseExceptions, and real cancellation of the calling task.

Decided by the lead: a ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, a custom
``BaseException`` subclass or an ``asyncio.CancelledError`` raised *by the handler itself* (the calling task
is not being cancelled) is a failure of that one message: it is dead-lettered as permanent and counted,
``process()`` returns normally, the event loop keeps running and concurrent ``process()`` calls complete.

A real cancellation of the calling task (``task.cancel()``) still propagates as ``CancelledError``, and once
the handler has started the claim is not released: the lease expires, and the next claim is a counted
takeover (``ClaimResult.takeover``).

``KeyboardInterrupt`` and ``SystemExit`` escape asyncio's event loop itself (``Task.__step`` re-raises them),
which would end the pytest session; so those scenarios run on an event loop of their own, in a thread,
and whatever escapes it is reported as a test failure.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import pytest
import redis.asyncio

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep, build_layer, eventually
from streamwarden import _names as n

T = TypeVar("T")
_SRC_MARK = "/streamwarden/_"


class CustomBaseError(BaseException):
    """A BaseException subclass of the user's own (not an Exception)."""


BASE_EXCEPTIONS: list[tuple[str, Callable[[], BaseException], str]] = [
    ("SystemExit", lambda: SystemExit(3), "SystemExit"),
    ("KeyboardInterrupt", KeyboardInterrupt, "KeyboardInterrupt"),
    ("GeneratorExit", GeneratorExit, "GeneratorExit"),
    ("custom-BaseException", lambda: CustomBaseError("mine"), f"{__name__}.CustomBaseError"),
    (
        "CancelledError-raised-by-handler",
        lambda: asyncio.CancelledError("handler's own"),
        "asyncio.exceptions.CancelledError",
    ),
]


def _where(exc: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _SRC_MARK in f.filename]
    if not frames:
        return "<outside streamwarden>"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}"


def run_in_own_loop(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``scenario()`` with ``asyncio.run`` on a thread of its own; fail the test if anything escapes it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(scenario())
        except BaseException as exc:  # KeyboardInterrupt / SystemExit must not reach pytest's thread
            box["escaped"] = f"{exc!r} escaped asyncio.run (the event loop), from {_where(exc)}"

    thread = threading.Thread(target=target, name="attack-own-loop", daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        pytest.fail("the scenario's event loop did not finish within 60 s", pytrace=False)
    if "escaped" in box:
        pytest.fail(box["escaped"], pytrace=False)
    value: T = box["value"]
    return value


async def outcome_of(call: Awaitable[sw.ProcessResult]) -> sw.Outcome | str:
    """The outcome of ``call``, or ``"raised <type>"`` when it raised anything at all."""
    try:
        return (await call).outcome
    except BaseException as exc:
        return f"raised {type(exc).__name__} from {_where(exc)}"


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def redis_url_or_none(request: pytest.FixtureRequest) -> str | None:
    """``None`` for the embedded stores, or the URL of the session's redis-server."""
    if request.param == "embedded":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.mark.parametrize(
    ("make", "error_type"), [(m, t) for _, m, t in BASE_EXCEPTIONS], ids=[i for i, _, _ in BASE_EXCEPTIONS]
)
def test_base_exception_from_handler_is_a_permanent_failure_of_that_message(
    redis_url_or_none: str | None,
    make: Callable[[], BaseException],
    error_type: str,
    otel: Otel,
    clock: Clock,
    sleep: RecordingSleep,
) -> None:
    """A BaseException from the handler: that message is DEAD_LETTERED (permanent, counted), the loop and
    two concurrent messages carry on, and a redelivery is a DUPLICATE that does not run the handler again."""

    async def scenario() -> dict[str, Any]:
        client = None if redis_url_or_none is None else redis.asyncio.Redis.from_url(redis_url_or_none)
        try:
            if client is not None:
                await client.flushall()
            # threshold 1: a counted breaker failure would open it and defer the next message
            layer = build_layer(
                client,
                otel,
                clock=clock,
                sleep=sleep,
                retry_jitter=False,
                circuit_breaker_threshold=1,
                max_retries=3,
            )
            go, all_in = asyncio.Event(), asyncio.Event()
            calls = {"hostile": 0, "ok": 0}

            def arrived() -> None:
                if calls["hostile"] == 1 and calls["ok"] == 2:
                    all_in.set()

            async def hostile(message: Any) -> NoReturn:
                calls["hostile"] += 1
                arrived()
                await go.wait()
                raise make()

            async def ok(message: Any) -> str:
                calls["ok"] += 1
                arrived()
                await go.wait()
                await asyncio.sleep(0)  # a yield, not a wait: finish after the hostile handler raised
                return "ok"

            tasks = [
                asyncio.create_task(layer.process({"id": "bx"}, hostile)),
                asyncio.create_task(layer.process({"id": "ok-1"}, ok)),
                asyncio.create_task(layer.process({"id": "ok-2"}, ok)),
            ]
            await all_in.wait()
            go.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            redelivered = await outcome_of(layer.process({"id": "bx"}, hostile))
            after = await outcome_of(layer.process({"id": "after"}, ok))
            entries = await layer.dead_letter_store.list()
            return {
                "results": results,
                "redelivered": redelivered,
                "after": after,
                "entries": entries,
                "calls": dict(calls),
                "breaker": layer.circuit_breaker.state,
            }
        finally:
            if client is not None:
                await client.aclose()

    seen = run_in_own_loop(scenario)
    hostile_result, ok_1, ok_2 = seen["results"]
    assert isinstance(hostile_result, sw.ProcessResult), f"process() raised {hostile_result!r}"
    assert hostile_result.outcome is sw.Outcome.DEAD_LETTERED
    assert hostile_result.attempts == 1
    assert [r.outcome for r in (ok_1, ok_2)] == [sw.Outcome.PROCESSED, sw.Outcome.PROCESSED]
    assert seen["redelivered"] is sw.Outcome.DUPLICATE
    assert seen["after"] is sw.Outcome.PROCESSED
    assert seen["calls"] == {"hostile": 1, "ok": 3}
    assert seen["breaker"] == "closed"
    (entry,) = seen["entries"]
    assert (entry.message_id, entry.error_class, entry.error_type, entry.attempts) == (
        "bx",
        "permanent",
        error_type,
        1,
    )
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="dead_lettered") == 1
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="processed") == 3
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="duplicate") == 1
    assert otel.value(n.METRIC_DLQ_MESSAGES, error__type=error_type) == 1


# --- real cancellation of the calling task ----------------------------------------------------------


async def _wait_for_takeover(layer: sw.ReliabilityLayer, clock: Clock, mid: str, redis_backed: bool) -> Any:
    """Let the cancelled owner's lease run out (clock or Redis server time) and claim ``mid`` again."""
    if not redis_backed:
        clock.advance(layer.settings.dedup_lease + 1)
        return await layer.deduplication_manager.claim(mid)
    claimed: list[Any] = []

    async def claim_is_new() -> bool:
        result = await layer.deduplication_manager.claim(mid)
        if result.status is sw.ClaimStatus.NEW:
            claimed.append(result)
            return True
        assert result.status is sw.ClaimStatus.IN_PROGRESS, result
        return False

    await eventually(claim_is_new, timeout=10)  # the lease runs out on the Redis server's clock
    return claimed[0]


async def _cancel_and_check_claim_kept(
    backend: Any, layer: sw.ReliabilityLayer, mid: str, started: asyncio.Event, handler: Any
) -> None:
    task = asyncio.create_task(layer.process({"id": mid}, handler))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()

    # the claim was kept: an immediate redelivery is IN_PROGRESS and does not run the handler
    runs: list[str] = []

    async def second(message: Any) -> str:
        runs.append(message["id"])
        return "second"

    again = await backend.process(layer, {"id": mid}, second)
    assert again.outcome is sw.Outcome.IN_PROGRESS
    assert runs == []

    # after the lease ran out, the next claim is a takeover, and the layer counts it
    claim = await _wait_for_takeover(layer, backend.clock, mid, backend.client is not None)
    assert (claim.status, claim.takeover) == (sw.ClaimStatus.NEW, True)
    result = await backend.process(layer, {"id": mid}, second, claim=claim)
    assert result.outcome is sw.Outcome.PROCESSED
    assert runs == [mid]
    assert backend.otel.value(n.METRIC_DEDUP_CHECKS, streamwarden__dedup__result="takeover") == 1


def _lease_settings(backend: Any) -> dict[str, Any]:
    # Redis leases run on the server's clock: keep them short so the takeover comes quickly
    lease = 0.3 if backend.client is not None else 60.0
    return {"dedup_lease": lease, "processing_timeout": None, "retry_deadline": None}


async def test_cancelling_the_caller_during_the_handler_keeps_the_claim(backend: Any) -> None:
    """task.cancel() while the handler runs: CancelledError propagates, the claim is kept, later a takeover."""
    layer = backend.layer(**_lease_settings(backend))
    started = asyncio.Event()

    async def hang(message: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    await _cancel_and_check_claim_kept(backend, layer, "cancel-1", started, hang)


async def test_cancelling_the_caller_during_retry_backoff_keeps_the_claim(backend: Any) -> None:
    """task.cancel() while waiting to retry (the handler already ran once): same as during the handler."""
    sleeping = asyncio.Event()

    async def blocking_sleep(delay: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    layer = backend.layer(**_lease_settings(backend), max_retries=3, sleep=blocking_sleep)

    async def flaky(message: Any) -> NoReturn:
        raise ConnectionError("transient")

    await _cancel_and_check_claim_kept(backend, layer, "cancel-2", sleeping, flaky)


async def test_cancelled_handler_does_not_block_concurrent_messages(backend: Any) -> None:
    """Cancelling one in-flight message leaves the other in-flight messages to complete normally."""
    layer = backend.layer()
    started, release = asyncio.Event(), asyncio.Event()

    async def hang(message: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    async def waits(message: Any) -> str:
        await release.wait()
        return "ok"

    doomed = asyncio.create_task(layer.process({"id": "doomed"}, hang))
    other = asyncio.create_task(layer.process({"id": "other"}, waits))
    await started.wait()
    doomed.cancel()
    release.set()
    done: Awaitable[Any] = asyncio.gather(doomed, other, return_exceptions=True)
    doomed_result, other_result = await done
    assert isinstance(doomed_result, asyncio.CancelledError)
    assert other_result.outcome is sw.Outcome.PROCESSED
