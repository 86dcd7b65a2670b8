"""Attack: handlers raising hostile exception objects. ``process()`` must still return a ProcessResult.

The promise under attack (README, ``ReliabilityLayer.process``): a failed message never makes
``process()`` raise; it is dead-lettered when the DLQ write is possible (FAILED, not acknowledged, when it
is not), counted (``streamwarden.messages`` and ``streamwarden.dlq.messages``), traced, and its DLQ entry
can be read back with bounded text fields. Each attack runs on the embedded stores and on Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import pytest
from opentelemetry.trace import StatusCode

import streamwarden as sw
from streamwarden import _names as n

# ``MAX_ERROR_MESSAGE_CHARS`` of ``streamwarden._dlq``: the cap on an entry's error message; error types
# are held to the same cap (a class name is no excuse for an unbounded entry).
ERROR_TEXT_BOUND = 2048
TEN_MB = 10 * 1024 * 1024


def describe(exc: BaseException) -> str:
    """Type and (safe) text of ``exc``."""
    try:
        text = str(exc)[:200]
    except Exception:
        text = "<str() raised>"
    return f"{type(exc).__name__}: {text!r}"


# --- the hostile exceptions -------------------------------------------------------------------------


class StrRaises(Exception):
    """``str(error)`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


class ReprRaises(Exception):
    """``repr(error)`` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")


class BothRaise(Exception):
    """``str`` and ``repr`` both raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")


class StrNotText(Exception):
    """``__str__`` returns an int, so ``str(error)`` raises TypeError."""

    def __str__(self) -> Any:
        return 42


class RetriableRaises(Exception):
    """The classifier's ``retriable`` attribute is a property that raises."""

    @property
    def retriable(self) -> bool:
        raise RuntimeError("retriable exploded")


class StatusCodeRaises(Exception):
    """``status_code`` is a property that raises."""

    @property
    def status_code(self) -> int:
        raise RuntimeError("status_code exploded")


class StatusRaises(Exception):
    """``status`` is a property that raises."""

    @property
    def status(self) -> int:
        raise RuntimeError("status exploded")


class _HostileResponse:
    @property
    def status_code(self) -> int:
        raise RuntimeError("response.status_code exploded")

    @property
    def status(self) -> int:
        raise RuntimeError("response.status exploded")


class ResponseStatusRaises(Exception):
    """``error.response.status_code`` raises (an HTTP client error whose response is broken)."""

    def __init__(self) -> None:
        super().__init__("upstream failed")
        self.response = _HostileResponse()


class ResponseRaises(Exception):
    """``error.response`` itself is a property that raises."""

    @property
    def response(self) -> Any:
        raise RuntimeError("response exploded")


class GetattrRaises(Exception):
    """Every attribute lookup that misses raises (``retriable``, ``__notes__``, ``status_code`` ...)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"__getattr__({name!r}) exploded")


class NotesRaise(Exception):
    """``__notes__`` is a property that raises: traceback formatting raises."""

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise RuntimeError("__notes__ exploded")


class _IterRaises(Sequence[str]):
    def __getitem__(self, index: Any) -> Any:
        raise RuntimeError("note sequence exploded")

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("note iteration exploded")


class Unhashable(Exception):
    """Unhashable, and ``==`` raises."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__ exploded")


def _named(qualname: str, module: Any, name: str | None = None) -> type[Exception]:
    cls = type("Weird", (Exception,), {})
    cls.__qualname__ = qualname
    cls.__module__ = module
    if name is not None:
        cls.__name__ = name
    return cls


WEIRD_SURROGATE = _named("We\ud800ird\x00Na\nme", "mod\ud800ule\x00")
WEIRD_HUGE = _named("Q" * 100_000, "m" * 100_000)
WEIRD_NONE_MODULE = _named("NoModule", None)
WEIRD_INT_MODULE = _named("IntModule", 42)
WEIRD_EMPTY = _named("", "", "")


def cause_cycle() -> Exception:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    return a


def context_cycle() -> Exception:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    return a


def deep_cause_chain(depth: int = 10_000) -> Exception:
    top = RuntimeError("level 0")
    current = top
    for level in range(1, depth):
        nxt = RuntimeError(f"level {level}")
        current.__cause__ = nxt
        current = nxt
    return top


def notes_not_a_list() -> Exception:
    error = RuntimeError("notes are an int")
    error.__notes__ = 42  # type: ignore[assignment]
    return error


def notes_iteration_raises() -> Exception:
    error = RuntimeError("notes cannot be iterated")
    error.__notes__ = _IterRaises()  # type: ignore[assignment]
    return error


def syntax_error_bad_offset() -> Exception:
    # traceback formatting of a SyntaxError computes with offset/lineno: wrong types make it raise
    return SyntaxError("bad", ("f.py", 1, "abc", "code\n", 1, "q"))  # type: ignore[arg-type]


HOSTILE: list[tuple[str, Callable[[], BaseException]]] = [
    ("str-raises", lambda: StrRaises("x")),
    ("repr-raises", lambda: ReprRaises("x")),
    ("str-and-repr-raise", lambda: BothRaise("x")),
    ("str-returns-non-str", lambda: StrNotText("x")),
    ("retriable-property-raises", lambda: RetriableRaises("x")),
    ("status_code-property-raises", lambda: StatusCodeRaises("x")),
    ("status-property-raises", lambda: StatusRaises("x")),
    ("response-status_code-raises", ResponseStatusRaises),
    ("response-property-raises", lambda: ResponseRaises("x")),
    ("getattr-raises", lambda: GetattrRaises("x")),
    ("cause-cycle", cause_cycle),
    ("context-cycle", context_cycle),
    ("cause-chain-10000", deep_cause_chain),
    ("args-10MB", lambda: RuntimeError("x" * TEN_MB)),
    ("lone-surrogate-and-nul", lambda: RuntimeError("bad \ud800 byte \x00 and \udcff here")),
    ("qualname-surrogate-nul", lambda: WEIRD_SURROGATE("x")),
    ("qualname-module-100k", lambda: WEIRD_HUGE("x")),
    ("module-none", lambda: WEIRD_NONE_MODULE("x")),
    ("module-int", lambda: WEIRD_INT_MODULE("x")),
    ("names-empty", lambda: WEIRD_EMPTY("x")),
    ("notes-property-raises", lambda: NotesRaise("x")),
    ("notes-not-a-list", notes_not_a_list),
    ("notes-iteration-raises", notes_iteration_raises),
    ("syntaxerror-bad-offset", syntax_error_bad_offset),
    ("unhashable-eq-raises", lambda: Unhashable("x")),
]


def raising(make_error: Callable[[], BaseException]) -> tuple[Callable[[Any], Any], list[BaseException]]:
    """A handler raising a fresh ``make_error()`` on every call, and the list of what it raised."""
    raised: list[BaseException] = []

    async def handler(message: Any) -> NoReturn:
        error = make_error()
        raised.append(error)
        raise error

    return handler, raised


async def ok(message: Any) -> str:
    return "ok"


def bounded_text(entry: sw.DeadLetterEntry, settings: sw.ReliabilitySettings) -> None:
    """The entry's text fields are str and bounded (message, type, traceback)."""
    assert isinstance(entry.error_message, str)
    assert isinstance(entry.error_type, str)
    assert isinstance(entry.traceback, str)
    assert len(entry.error_message) <= ERROR_TEXT_BOUND
    assert len(entry.error_type) <= ERROR_TEXT_BOUND
    assert len(entry.traceback) <= settings.dlq_max_traceback_chars
    assert entry.error_class in {c.value for c in sw.ErrorClass}


@pytest.mark.parametrize("make_error", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
async def test_hostile_exception_is_dead_lettered_counted_and_readable(
    backend: Any, make_error: Callable[[], BaseException]
) -> None:
    """A hostile exception from the handler: DEAD_LETTERED, counted, traced, entry readable and bounded."""
    layer = backend.layer(max_retries=1)
    handler, raised = raising(make_error)
    result = await backend.process(layer, {"id": "hostile-1", "data": 1}, handler)

    assert result.outcome is sw.Outcome.DEAD_LETTERED, (
        result.outcome,
        result.error and describe(result.error),
    )
    assert result.should_ack
    assert result.error is raised[-1]
    assert result.attempts == len(raised)
    assert result.dead_letter is not None
    entries = await layer.dead_letter_store.list()
    assert len(entries) == 1
    (entry,) = entries
    assert entry.entry_id == result.dead_letter.entry_id
    assert await layer.dead_letter_store.get(entry.entry_id) is not None
    assert entry.message_id == "hostile-1"
    assert entry.reason == sw.DeadLetterReason.ERROR
    assert entry.attempts == result.attempts
    bounded_text(entry, layer.settings)

    otel = backend.otel
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="dead_lettered") == 1
    assert otel.value(n.METRIC_MESSAGES) == 1
    assert otel.value(n.METRIC_DLQ_MESSAGES) == 1
    (span,) = otel.spans("process default")
    assert span.status.status_code is StatusCode.ERROR
    assert entry.trace_id == format(span.context.trace_id, "032x")

    # the layer is unharmed: the next message goes through
    assert (await backend.process(layer, {"id": "after"}, ok)).outcome is sw.Outcome.PROCESSED


class NoteRefused(Exception):
    """``add_note`` itself raises."""

    def add_note(self, note: str) -> None:
        raise RuntimeError("add_note exploded")


@pytest.mark.parametrize(
    "make_error",
    [lambda: NoteRefused("x"), notes_not_a_list],
    ids=["add_note-raises", "notes-not-a-list-so-add_note-raises"],
)
async def test_unconfirmed_dlq_write_with_broken_add_note_is_failed_not_raised(
    backend: Any, make_error: Callable[[], BaseException]
) -> None:
    """DLQ full and ``add_note`` broken: FAILED (not acked, claim released, write error counted), never raised."""
    if backend.client is None:
        layer = backend.layer(max_retries=0, dead_letter_store=sw.InMemoryDeadLetterStore(max_entries=1))
    else:
        layer = backend.layer(max_retries=0, dlq_max_entries_per_destination=1)
    filler, _ = raising(lambda: ValueError("fills the DLQ"))
    assert (await backend.process(layer, {"id": "filler"}, filler)).outcome is sw.Outcome.DEAD_LETTERED

    handler, raised = raising(make_error)
    result = await backend.process(layer, {"id": "note-1"}, handler)
    assert result.outcome is sw.Outcome.FAILED
    assert not result.should_ack
    assert result.error is raised[-1]
    assert await layer.dead_letter_store.count() == 1
    otel = backend.otel
    assert otel.value(n.METRIC_MESSAGES, streamwarden__outcome="failed") == 1
    assert otel.value(n.METRIC_DLQ_WRITE_ERRORS) == 1
    # the claim was released: a redelivery runs (it is not IN_PROGRESS and not a duplicate)
    assert (await backend.process(layer, {"id": "note-1"}, ok)).outcome is sw.Outcome.PROCESSED
