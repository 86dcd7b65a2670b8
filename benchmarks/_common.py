"""Helpers shared by the benchmark scripts: timed rounds, summaries, environment, tables.

A benchmark case is an object with an ``id``, a ``label`` and ``async run(count) -> seconds``: ``run``
prepares its inputs untimed, then times exactly ``count`` messages with :func:`time.perf_counter` and
returns the elapsed seconds. :func:`measure` warms every case up, then runs ``rounds`` rounds in which
every case runs once (interleaved, so drift of the machine hits every case alike).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Case",
    "FunctionCase",
    "environment",
    "load_average",
    "markdown_table",
    "measure",
    "print_table",
    "summarize",
]


class Case(Protocol):
    """One benchmark case."""

    id: str
    label: str

    async def run(self, count: int) -> float:
        """Time ``count`` messages; return elapsed seconds (inputs are prepared before the clock starts)."""
        ...


@dataclass
class FunctionCase:
    """A :class:`Case` made of a name and a ``run`` coroutine function."""

    id: str
    label: str
    runner: Callable[[int], Awaitable[float]]

    async def run(self, count: int) -> float:
        """Delegate to ``runner``."""
        return await self.runner(count)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def measure(
    cases: Sequence[Case],
    *,
    count: int,
    rounds: int,
    warmup: int,
    gc_off_too: bool = False,
    tag: str = "",
) -> dict[str, dict[str, list[float]]]:
    """Per-message µs of every case in every round: ``{id: {"gc_on": [...], "gc_off": [...]}}``.

    The garbage collector stays enabled while timing, as in a real application; it is collected
    before every timed run so each starts from the same state. With ``gc_off_too`` every case also
    runs once per round with the collector disabled.
    """
    if count < 1 or rounds < 1 or warmup < 0:
        raise ValueError("count and rounds must be at least 1, warmup not negative")
    results: dict[str, dict[str, list[float]]] = {case.id: {"gc_on": [], "gc_off": []} for case in cases}
    for case in cases:
        if warmup:
            await case.run(warmup)
    _progress(f"{tag}warm-up done ({warmup} messages per case)")
    for round_no in range(rounds):
        for case in cases:
            gc.collect()
            results[case.id]["gc_on"].append(await case.run(count) / count * 1e6)
            if gc_off_too:
                gc.collect()
                gc.disable()
                try:
                    elapsed = await case.run(count)
                finally:
                    gc.enable()
                results[case.id]["gc_off"].append(elapsed / count * 1e6)
        _progress(f"{tag}round {round_no + 1}/{rounds} done")
    return results


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median and minimum of per-round samples."""
    return {"median": statistics.median(samples), "min": min(samples)}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none): other work skews timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(packages: Sequence[str]) -> dict[str, Any]:
    """Where the numbers come from: date, interpreter, machine, package versions."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in packages},
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right-aligned)."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a table with rich when it is importable, as plain aligned text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the numbers matter more than the frame
        widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
        print(title)
        for line in [headers, *rows]:
            cells = [
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ]
            print("  ".join(cells))
        return
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i != 0)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns and wrap the labels
        console = Console(width=200)
    console.print(table)
