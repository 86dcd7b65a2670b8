"""Per-attempt timeouts: the watchdog turns its own cancellation, and only that one, into HandlerTimeout.

These tests wait on the real loop clock for tiny timeouts (10 ms and less): the watchdog is the thing under
test. Nothing sleeps; handlers wait on events that are never set, so only the watchdog can end them.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from streamwarden import HandlerTimeout, StreamwardenError
from streamwarden._timeout import run_with_timeout, watchdog

TINY = 0.01


async def forever() -> None:
    """Wait on an event nobody sets: only a cancellation ends this."""
    await asyncio.Event().wait()


def current_task() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task


def assert_clean(task: asyncio.Task[object]) -> None:
    """The watchdog holds nothing for ``task`` and the task has no pending cancel request."""
    dog = watchdog()
    assert task not in dog._armed
    assert task not in dog.fired
    assert task.cancelling() == 0


async def test_exceeding_the_timeout_raises_handler_timeout() -> None:
    """An attempt that outlives its timeout raises HandlerTimeout, a TimeoutError and a StreamwardenError."""
    with pytest.raises(HandlerTimeout) as caught:
        await run_with_timeout(forever(), TINY)
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, StreamwardenError)
    assert caught.value.timeout == TINY
    assert_clean(current_task())


async def test_task_keeps_working_after_a_timeout() -> None:
    """After a HandlerTimeout the same task can await normally and time out again."""
    for _ in range(3):
        with pytest.raises(HandlerTimeout):
            await run_with_timeout(forever(), TINY)
        await asyncio.sleep(0)  # one loop turn: a leftover cancel request would fire here
    assert_clean(current_task())


async def test_result_returned_in_time_is_kept() -> None:
    """A handler that finishes in time returns its result and leaves nothing armed."""

    async def quick() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await run_with_timeout(quick(), 30.0) == "done"
    assert_clean(current_task())


async def test_exception_raised_in_time_propagates_unchanged() -> None:
    """A handler's own exception passes through as it is, and nothing stays armed."""
    error = ConnectionError("refused")

    async def failing() -> None:
        raise error

    with pytest.raises(ConnectionError) as caught:
        await run_with_timeout(failing(), 30.0)
    assert caught.value is error
    assert_clean(current_task())


async def test_no_timeout_just_awaits() -> None:
    """``timeout=None`` awaits the handler without arming anything."""

    async def value() -> int:
        return 7

    assert await run_with_timeout(value(), None) == 7
    assert current_task() not in watchdog()._armed


async def test_outside_cancel_propagates_as_cancelled_error() -> None:
    """``task.cancel()`` from outside is a CancelledError, never a HandlerTimeout."""
    started = asyncio.Event()

    async def handler() -> None:
        started.set()
        await forever()

    task = asyncio.create_task(run_with_timeout(handler(), 30.0))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert task not in watchdog()._armed
    assert task not in watchdog().fired


async def test_outside_cancel_during_the_timeout_wins() -> None:
    """When an outside cancel arrives while the watchdog's cancel is in flight, CancelledError propagates."""

    async def handler() -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            current_task().cancel()  # an outside cancel landing at the same moment as the timeout
            raise

    task = asyncio.create_task(run_with_timeout(handler(), TINY))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_handler_that_swallows_the_timeout_keeps_its_result() -> None:
    """A handler that catches the timeout's cancellation and returns keeps its result, with no pending cancel."""
    cancelled = False

    async def stubborn() -> str:
        nonlocal cancelled
        try:
            await forever()
        except asyncio.CancelledError:
            cancelled = True
        return "finished anyway"

    assert await run_with_timeout(stubborn(), TINY) == "finished anyway"
    assert cancelled
    assert_clean(current_task())
    await asyncio.sleep(0)  # would raise CancelledError if a cancel request were still pending


async def test_handler_that_swallows_the_timeout_in_a_task() -> None:
    """The same, observed from outside: the task completes with the result and is not cancelled."""

    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await forever()
        await asyncio.sleep(0)
        return "finished anyway"

    async def attempt() -> tuple[str, int]:
        result = await run_with_timeout(stubborn(), TINY)
        return result, current_task().cancelling()

    task = asyncio.create_task(attempt())
    assert await task == ("finished anyway", 0)
    assert not task.cancelled()


async def test_handler_that_converts_the_timeout_leaves_no_pending_cancel() -> None:
    """A handler that turns the timeout's cancellation into its own error leaves the task clean."""

    async def converting() -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    async def attempt() -> int:
        with pytest.raises(RuntimeError, match="cleanup failed"):
            await run_with_timeout(converting(), TINY)
        return current_task().cancelling()

    # in a task of its own, so a stale cancel request cannot leak into the test runner's task
    assert await asyncio.create_task(attempt()) == 0


async def test_next_timeout_after_a_converted_one_is_still_a_handler_timeout() -> None:
    """A later attempt in the same task still gets HandlerTimeout, not a bare CancelledError."""

    async def converting() -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    async def two_attempts() -> type[BaseException]:
        with pytest.raises(RuntimeError):
            await run_with_timeout(converting(), TINY)
        try:
            await run_with_timeout(forever(), TINY)
        except BaseException as second:  # the type is the observation
            return type(second)
        raise AssertionError("the second attempt did not time out")

    assert await asyncio.create_task(two_attempts()) is HandlerTimeout


async def test_many_concurrent_timeouts_each_fire() -> None:
    """50 concurrent attempts with different timeouts all time out; fast neighbours keep their results."""
    timeouts = [0.001 * (1 + i % 10) for i in range(50)]

    async def slow(timeout: float) -> float:
        with pytest.raises(HandlerTimeout) as caught:
            await run_with_timeout(forever(), timeout)
        assert current_task().cancelling() == 0
        return caught.value.timeout

    async def fast(i: int) -> int:
        return await run_with_timeout(asyncio.sleep(0, result=i), 30.0)

    slow_tasks = [asyncio.create_task(slow(t)) for t in timeouts]
    fast_tasks = [asyncio.create_task(fast(i)) for i in range(20)]

    assert await asyncio.gather(*slow_tasks) == timeouts
    assert await asyncio.gather(*fast_tasks) == list(range(20))
    dog = watchdog()
    assert not any(t in dog._armed or t in dog.fired for t in slow_tasks + fast_tasks)


async def test_a_long_timeout_does_not_delay_a_shorter_one() -> None:
    """Arming a long timeout first must not postpone a shorter one armed later (one timer, earliest wins)."""
    long_started = asyncio.Event()

    async def long_attempt() -> str:
        async def handler() -> str:
            long_started.set()
            await forever()
            return "never"

        try:
            return await run_with_timeout(handler(), 60.0)
        except asyncio.CancelledError:
            return "cancelled by the test"

    long_task = asyncio.create_task(long_attempt())
    await long_started.wait()
    async with asyncio.timeout(5):  # safety bound: a broken watchdog would wait the full 60 s
        with pytest.raises(HandlerTimeout):
            await run_with_timeout(forever(), TINY)
    assert not long_task.done()
    long_task.cancel()
    assert await long_task == "cancelled by the test"
