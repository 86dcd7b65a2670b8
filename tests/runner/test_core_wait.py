"""How the runner core waits for a read (or a slot, a sleep) unless it is stopped (``_unless_stopped``).

Every wait of the consume loop goes through it, once per read at least, so it is kept cheap (one task,
the operation's) while a stop stays prompt. Ordered with events and futures, never the wall clock.
"""

from __future__ import annotations

import asyncio

import pytest
from _memory_transport import MemoryGroup

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep
from streamwarden._runners._core import ConsumerRunner


async def handler(_payload: object) -> None:
    return None


@pytest.fixture
def runner(otel: Otel) -> ConsumerRunner:
    clock = Clock()
    layer = sw.ReliabilityLayer(
        None,
        sw.ReliabilitySettings(),
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    return ConsumerRunner(
        MemoryGroup(clock), handler=handler, layer=layer, clock=clock, sleep=RecordingSleep(clock)
    )


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_the_result_of_an_operation_that_ends_first(runner: ConsumerRunner) -> None:
    """An operation that ends before any stop gives its result (or its error) to the loop."""
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read() -> str:
        return await gate

    waiting = asyncio.ensure_future(runner._unless_stopped(read()))
    await turns()
    assert not waiting.done()
    gate.set_result("entries")
    assert await waiting == "entries"

    async def failing() -> None:
        raise LookupError("broker said no")

    with pytest.raises(LookupError):
        await runner._unless_stopped(failing())


async def test_a_stop_ends_a_blocked_operation_at_once_and_cancels_it(runner: ConsumerRunner) -> None:
    """stop() while the operation blocks (a frozen broker): None at once, the operation cancelled."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def frozen_read() -> None:
        started.set()
        try:
            await asyncio.get_running_loop().create_future()  # never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = asyncio.ensure_future(runner._unless_stopped(frozen_read()))
    await started.wait()
    runner.stop()
    assert await waiting is None
    assert cancelled.is_set()


async def test_an_operation_that_fails_as_it_is_cancelled_by_a_stop_does_not_matter(
    runner: ConsumerRunner,
) -> None:
    """An operation that raises while being cancelled by a stop: None, not its error."""
    started = asyncio.Event()

    async def read() -> None:
        started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            raise OSError("connection reset while closing") from None

    waiting = asyncio.ensure_future(runner._unless_stopped(read()))
    await started.wait()
    runner.stop()
    assert await waiting is None


async def test_after_a_stop_a_blocking_operation_is_not_waited_for(runner: ConsumerRunner) -> None:
    """Called when stop() came already: a blocking operation gives None and is cancelled."""
    runner.stop()
    operation_cancelled = asyncio.Event()

    async def read() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            operation_cancelled.set()
            raise

    assert await runner._unless_stopped(read()) is None
    await turns()
    assert operation_cancelled.is_set()


async def test_cancelling_the_loop_cancels_the_operation_and_propagates(runner: ConsumerRunner) -> None:
    """A real cancellation of the waiting loop (shutdown) is not swallowed, and the operation goes too."""
    started = asyncio.Event()
    operation_cancelled = asyncio.Event()

    async def read() -> None:
        started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            operation_cancelled.set()
            raise

    waiting = asyncio.ensure_future(runner._unless_stopped(read()))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await turns()
    assert operation_cancelled.is_set()
    runner.stop()  # a later stop finds no waiter left behind
    assert not runner._stop_waiters


async def test_one_task_per_wait_and_none_left_behind(runner: ConsumerRunner) -> None:
    """Waiting runs the operation as one task (no second task waiting for the stop event), and the
    wait leaves no task or stop waiter behind, whether the operation ends or a stop comes first."""
    before = asyncio.all_tasks()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[int] = []

    async def read() -> None:
        seen.append(len(asyncio.all_tasks() - before))
        await gate

    waiting = asyncio.ensure_future(runner._unless_stopped(read()))
    await turns()
    assert seen == [2]  # the waiting coroutine's own task (made here) and the operation's
    gate.set_result(None)
    await waiting
    await turns()
    assert asyncio.all_tasks() - before == set()
    assert not runner._stop_waiters

    blocked = asyncio.ensure_future(runner._unless_stopped(asyncio.get_running_loop().create_future()))
    await turns()
    runner.stop()
    assert await blocked is None
    await turns()
    assert asyncio.all_tasks() - before == set()
    assert not runner._stop_waiters
