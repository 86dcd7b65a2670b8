"""Per-attempt timeouts without a timer per message.

``asyncio.timeout`` schedules and cancels one timer handle per use, which costs about 4 µs: more than
the whole budget streamwarden allows itself per message. :class:`Watchdog` instead keeps the armed
deadlines of in-flight attempts in a dict keyed by task and one loop timer at the earliest of them.
Arming and disarming are a dict store and a dict pop. When the timer fires, expired tasks are
cancelled exactly as ``asyncio.timeout`` would cancel them, and :func:`run_with_timeout` turns that
cancellation (and only that one: ``Task.uncancel`` tells it apart from an outside cancel) into
:class:`~streamwarden.HandlerTimeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from ._exceptions import HandlerTimeout

# The running task of each loop, as asyncio.current_task() reads it, without its Python wrapper
# (~0.15 µs per message). Python versions without the dict fall back to asyncio.current_task().
_current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = getattr(
    asyncio.tasks, "_current_tasks", None
)

__all__ = ["Watchdog", "run_with_timeout"]

T = TypeVar("T")


class Watchdog:
    """Cancels tasks whose armed deadline (event-loop time) has passed; one timer per event loop."""

    __slots__ = ("_armed", "_handle", "_loop", "_when", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._armed: dict[asyncio.Task[Any], float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        #: tasks this watchdog cancelled and whose attempt has not yet seen the cancellation
        self.fired: set[asyncio.Task[Any]] = set()

    def arm(self, task: asyncio.Task[Any], timeout: float) -> None:
        """Cancel ``task`` if it is still armed ``timeout`` seconds from now."""
        deadline = self._loop.time() + timeout
        self._armed[task] = deadline
        if self._handle is None or deadline < self._when:
            self._schedule(deadline)

    def arm_current(self, timeout: float) -> asyncio.Task[Any] | None:
        """Arm the running task (``None`` when there is none); settle it with :meth:`settle_ok` /
        :meth:`settle_error` in the same task."""
        task = (
            _current_tasks.get(self._loop) if _current_tasks is not None else asyncio.current_task(self._loop)
        )
        if task is not None:
            deadline = self._loop.time() + timeout
            self._armed[task] = deadline
            if self._handle is None or deadline < self._when:
                self._schedule(deadline)
        return task

    def settle_ok(self, task: asyncio.Task[Any]) -> None:
        """The attempt returned. If the watchdog fired but the handler swallowed the cancellation and
        finished anyway, keep its result and undo the cancel request."""
        if self._armed.pop(task, None) is None and task in self.fired:
            self.fired.discard(task)
            task.uncancel()

    def settle_error(self, task: asyncio.Task[Any], timeout: float, error: BaseException) -> None:
        """The attempt raised ``error``: raise :class:`HandlerTimeout` instead if it is our cancellation."""
        if self._armed.pop(task, None) is None and task in self.fired:
            self.fired.discard(task)
            # undo our cancel request whatever the handler turned it into, as asyncio.timeout does
            remaining = task.uncancel()
            if isinstance(error, asyncio.CancelledError) and remaining == 0:
                raise HandlerTimeout(timeout) from None

    def _schedule(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time()
        earliest: float | None = None
        expired: list[asyncio.Task[Any]] = []
        for task, deadline in self._armed.items():
            if deadline <= now:
                expired.append(task)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        for task in expired:
            del self._armed[task]
            self.fired.add(task)
            task.cancel()
        if earliest is not None:
            self._schedule(earliest)


_watchdogs: dict[asyncio.AbstractEventLoop, Watchdog] = {}


def _watchdog_for(loop: asyncio.AbstractEventLoop) -> Watchdog:
    dog = _watchdogs.get(loop)
    if dog is None:
        for stale in [lp for lp in _watchdogs if lp.is_closed()]:
            del _watchdogs[stale]
        dog = _watchdogs[loop] = Watchdog(loop)
    return dog


def watchdog() -> Watchdog:
    """The watchdog of the running event loop."""
    loop = asyncio.get_running_loop()
    return _watchdogs.get(loop) or _watchdog_for(loop)


async def run_with_timeout(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await ``awaitable``; raise :class:`HandlerTimeout` if it takes longer than ``timeout`` seconds."""
    if timeout is None:
        return await awaitable
    dog = watchdog()
    task = dog.arm_current(timeout)
    if task is None:  # not inside a task (unusual): fall back to the standard library
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError as exc:
            raise HandlerTimeout(timeout) from exc
    try:
        result = await awaitable
    except BaseException as error:
        dog.settle_error(task, timeout, error)
        raise
    dog.settle_ok(task)
    return result
