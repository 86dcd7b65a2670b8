"""The handler that fault-injection and soak consumers run: ``--handler _fault_handler:handle``.

It runs inside real ``streamwarden consume`` processes. What it does is decided by the message payload
and by marker files the test controls; everything it does is appended to a LEDGER, one file per
process (``ledger-{pid}.jsonl`` in ``SW_FAULT_LEDGER_DIR``), one JSON line per event::

    {"id": "m1", "phase": "start", "delivery": 1, "pid": 4242, "t": 1718000000.123, "src": "1-0", "fence": 1}

Phases: ``start`` (the handler was entered), ``effect`` (the side effect happened: the handler is about
to return successfully), ``takeover`` (the layer logged that its claim replaced an expired lease: a
possible duplicate), ``die_before_ack`` (this process kills itself instead of acknowledging).
Each line is one ``write(2)`` on an ``O_APPEND`` descriptor, fsynced unless ``SW_FAULT_FSYNC=0``, before
the handler returns or blocks, so a ``kill -9`` right after can never lose it (the kernel owns written
data; fsync only adds power-loss safety, which the soak does without).

Payload (a JSON object; unknown keys are ignored)::

    {"action": "ok"}                   start, effect
    {"action": "hang_before_effect"}   start, wait until CTRL/release exists, effect
    {"action": "hang_after_effect"}    start, effect, wait until CTRL/release exists
    {"action": "die_before_ack"}       start, effect, return; on the first delivery the process
                                       SIGKILLs itself when the runner sends XACK for this entry
                                       (after the dedup completion)
    {"action": "crash"}                start, SIGKILL this process (a poison pill)
    {"action": "fail_permanent"}       start, raise ValueError (classified permanent)
    {"action": "fail_transient"}       start, raise ConnectionError (transient), every time
    {"action": "raise_system_exit"}    start, raise SystemExit(3) (likewise raise_keyboard_interrupt,
                                       raise_cancelled: its own CancelledError, raise_base: a custom
                                       BaseException): must fail this message only, never the process
    {"fail_transient_n": k}            the first k attempts in this process raise ConnectionError
    {"sleep_ms": n}                    sleep n ms between start and effect
    {"die_before_ack": true}           with any action, on the first delivery: die when the runner
                                       acknowledges this entry (e.g. after a confirmed DLQ write)

While the marker file ``CTRL/outage`` exists every message fails with ``ConnectionError`` (a downstream
outage) right after its start line.

The kill-before-ack hook wraps ``redis.asyncio.Redis.xack`` and ``RedisDedupStore.complete_and_xack``
in this process only (test code, never in ``src``). A processed message's completion and XACK go in one
group-commit script, so the process dies after the effect with neither written; a dead-lettered one is
acknowledged with ``xack`` after the confirmed DLQ write, so it dies between the two.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import redis.asyncio

import streamwarden

_LEDGER_DIR = Path(os.environ.get("SW_FAULT_LEDGER_DIR", "."))
_CTRL_DIR = Path(os.environ.get("SW_FAULT_CTRL_DIR", "."))
_FSYNC = os.environ.get("SW_FAULT_FSYNC", "1") != "0"
_POLL_S = 0.01

_fd: int | None = None
_fd_pid = 0
_attempts: dict[str, int] = {}
_die_on_ack: set[str] = set()


def _ledger_fd() -> int:
    global _fd, _fd_pid
    pid = os.getpid()
    if _fd is None or _fd_pid != pid:
        _fd = os.open(_LEDGER_DIR / f"ledger-{pid}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fd_pid = pid
    return _fd


def append(record: dict[str, Any]) -> None:
    """Append one ledger line (one ``write``; fsynced unless disabled)."""
    record["pid"] = os.getpid()
    record["t"] = time.time()
    fd = _ledger_fd()
    os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    if _FSYNC:
        os.fsync(fd)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _TakeoverLedger(logging.Handler):
    """Turns the layer's takeover log line into a durable ``takeover`` ledger line."""

    def emit(self, record: logging.LogRecord) -> None:
        if "took over an expired lease (possible duplicate" in record.msg and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            append({"id": str(args[0]), "phase": "takeover"})


def _install_logging() -> None:
    # A handler on "streamwarden" would hide warnings from logging's last-resort handler: keep them on
    # stderr explicitly, and lower the level only so the INFO takeover line reaches the ledger handler.
    logger = logging.getLogger("streamwarden")
    logger.setLevel(logging.INFO)
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(stderr)
    logger.addHandler(_TakeoverLedger(logging.INFO))


def _install_ack_trap() -> None:
    original = redis.asyncio.Redis.xack

    def xack(self: redis.asyncio.Redis, name: Any, groupname: Any, *ids: Any) -> Any:
        doomed = [_text(i) for i in ids if _text(i) in _die_on_ack]
        if doomed:
            append({"id": doomed[0], "phase": "die_before_ack", "src": doomed[0]})
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)  # not reached: SIGKILL to oneself is delivered before kill() returns
        return original(self, name, groupname, *ids)

    redis.asyncio.Redis.xack = xack  # type: ignore[method-assign]

    # The runner's group commit sends the completions and the XACK in one script: die before it is sent
    # (the window is then "effect done, neither completion nor acknowledgement written").
    from streamwarden._redis._dedup import RedisDedupStore

    original_commit = RedisDedupStore.complete_and_xack

    async def complete_and_xack(self: RedisDedupStore, *args: Any, **kwargs: Any) -> Any:
        doomed = [_text(i) for i in kwargs.get("entry_ids", ()) if _text(i) in _die_on_ack]
        if doomed:
            append({"id": doomed[0], "phase": "die_before_ack", "src": doomed[0]})
            os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)
        return await original_commit(self, *args, **kwargs)

    RedisDedupStore.complete_and_xack = complete_and_xack  # type: ignore[method-assign]


_install_logging()
_install_ack_trap()


class HandlerBaseException(BaseException):
    """A BaseException that is neither an Exception nor one of the builtin exits."""


_RAISES: dict[str, type[BaseException]] = {
    "raise_system_exit": SystemExit,
    "raise_keyboard_interrupt": KeyboardInterrupt,
    "raise_cancelled": asyncio.CancelledError,
    "raise_base": HandlerBaseException,
}


async def _wait_for(marker: str) -> None:
    path = _CTRL_DIR / marker
    while not path.exists():  # noqa: ASYNC110 - a marker file written by another process
        await asyncio.sleep(_POLL_S)


async def handle(env: streamwarden.Envelope) -> str:
    """Do what the payload says, recording every step in the ledger."""
    payload = env.payload if isinstance(env.payload, dict) else {}
    action = payload.get("action", "ok")
    lease = streamwarden.current_lease()
    base = {
        "id": env.id,
        "delivery": env.delivery_count,
        "src": env.source_ref,
        "fence": lease.fencing_token if lease is not None else None,
    }
    append({**base, "phase": "start"})
    doomed = action == "die_before_ack" or payload.get("die_before_ack")
    if doomed and env.delivery_count == 1 and env.source_ref is not None:
        _die_on_ack.add(env.source_ref)
    attempt = _attempts[env.id] = _attempts.get(env.id, 0) + 1
    if (_CTRL_DIR / "outage").exists():
        raise ConnectionError("downstream outage (marker file)")
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action in _RAISES:
        raise _RAISES[action](f"{action} from the handler of {env.id}")
    if action == "fail_permanent":
        raise ValueError(f"malformed order {env.id}")
    if action == "fail_transient" or attempt <= int(payload.get("fail_transient_n", 0)):
        raise ConnectionError(f"downstream refused {env.id} (attempt {attempt})")
    if payload.get("sleep_ms"):
        await asyncio.sleep(payload["sleep_ms"] / 1000)
    if action == "hang_before_effect":
        await _wait_for("release")
    append({**base, "phase": "effect"})
    if action == "hang_after_effect":
        await _wait_for("release")
    return "done"
