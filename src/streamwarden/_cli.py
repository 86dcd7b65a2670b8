"""The ``streamwarden`` command line: ``demo`` here; operator commands register themselves.

Output uses rich: progress bars on long work, tables for results. Colour follows the terminal:
none when output is not a TTY, or when ``NO_COLOR`` is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._demo import ControlServer, DemoConfig, DemoReport, install_stop_signals, run_demo

__all__ = ["main"]


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamwarden")
def main() -> None:
    """streamwarden: reliable, observable event-stream consumers."""


@main.command()
@click.option("--messages", default=4000, show_default=True, help="Signals to produce (not with --live).")
@click.option("--rate", default=800.0, show_default=True, help="Signals per second the producer emits.")
@click.option("--concurrency", default=16, show_default=True, help="Concurrent workers.")
@click.option("--seed", default=1, show_default=True, help="Random seed of the workload.")
@click.option("--live", is_flag=True, help="Run an endless stream until SIGTERM/SIGINT or --max-seconds.")
@click.option("--max-seconds", type=float, default=None, help="Stop producing after this many seconds.")
@click.option("--outage-every", type=float, default=None, help="--live: start an outage every N seconds.")
@click.option(
    "--outage-duration", type=float, default=20.0, show_default=True, help="--live: outage length, s."
)
@click.option("--prometheus-port", type=int, default=None, help="Serve /metrics on 127.0.0.1:PORT.")
@click.option("--prometheus-host", default="127.0.0.1", show_default=True, help="Address for /metrics.")
@click.option("--control-port", type=int, default=None, help="POST/DELETE /outage, GET /status on 127.0.0.1.")
@click.option("--otlp-endpoint", default=None, help="Export traces and metrics over OTLP (gRPC).")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def demo(
    messages: int,
    rate: float,
    concurrency: int,
    seed: int,
    live: bool,
    max_seconds: float | None,
    outage_every: float | None,
    outage_duration: float,
    prometheus_port: int | None,
    prometheus_host: str,
    control_port: int | None,
    otlp_endpoint: str | None,
    as_json: bool,
) -> None:
    """Push a trading-signal stream with duplicates, faults, an outage and poison through the layer.

    Runs on the embedded in-memory stores (no Redis). Exits 1 if the numbers do not reconcile.
    """
    if messages < 1 or rate <= 0 or concurrency < 1:
        raise click.BadParameter("--messages, --rate and --concurrency must be positive")
    config = DemoConfig(
        messages=messages,
        rate=rate,
        concurrency=concurrency,
        seed=seed,
        live=live,
        max_seconds=max_seconds,
        outage_every=outage_every,
        outage_duration=outage_duration,
    )
    if prometheus_port is not None or otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from ._telemetry import configure_telemetry

        configure_telemetry(
            config.service_name,
            otlp_endpoint=otlp_endpoint,
            prometheus_port=prometheus_port,
            prometheus_host=prometheus_host,
        )
    console = _console(stderr=as_json)
    report = asyncio.run(_run(config, console, control_port, quiet=as_json))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(console, report, live)
    if not live and not report.reconciled:
        sys.exit(1)


async def _run(config: DemoConfig, console: Console, control_port: int | None, *, quiet: bool) -> DemoReport:
    stop = asyncio.Event()
    install_stop_signals(stop)
    control: ControlServer | None = None
    if control_port is not None:
        control = ControlServer(control_port, asyncio.get_running_loop())
        control.start()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=quiet or not console.is_terminal,
    )
    total = None if config.live else config.messages
    task = progress.add_task("signals", total=total, stats="")

    def on_progress(report: DemoReport, backlog: int) -> None:
        done = report.outcomes.get("processed", 0) + report.outcomes.get("dead_lettered", 0)
        stats = (
            f"dup {report.outcomes.get('duplicate', 0)}  dlq {report.outcomes.get('dead_lettered', 0)}  "
            f"deferred {report.outcomes.get('deferred', 0)}  backlog {backlog}"
        )
        progress.update(task, completed=min(done, report.unique_ids), stats=stats)

    try:
        with progress:
            report = await run_demo(
                config,
                on_progress=on_progress,
                stop=stop,
                control=control.attach if control is not None else None,
            )
    finally:
        if control is not None:
            control.stop()
    return report


def _print_report(console: Console, report: DemoReport, live: bool) -> None:
    table = Table(title="streamwarden demo", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows: list[tuple[str, Any]] = [
        ("messages produced", report.produced),
        ("  unique signals", report.unique_ids),
        ("  re-sent (duplicates injected)", report.resent),
        ("processed (executed once)", report.outcomes.get("processed", 0)),
        ("duplicates skipped", report.outcomes.get("duplicate", 0)),
        ("retries", report.retries),
        ("dead-lettered", report.outcomes.get("dead_lettered", 0)),
    ]
    rows += [(f"  reason {reason}", count) for reason, count in sorted(report.dlq_reasons.items())]
    rows += [
        ("deferred (breaker open, redelivered)", report.outcomes.get("deferred", 0)),
        ("in progress elsewhere (redelivered)", report.outcomes.get("in_progress", 0)),
        ("breaker transitions", " ".join(f"{a}->{b}" for a, b in report.transitions) or "none"),
        ("success rate", f"{report.metrics.get('success_rate', 0.0):.2%}"),
        ("elapsed", f"{report.elapsed:.1f}s"),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    console.print(table)
    if live:
        return
    if report.reconciled:
        console.print(
            "[green]Reconciled:[/green] every signal was executed exactly once or sits in the dead-letter "
            "queue; every re-send was answered without running the handler twice."
        )
    else:
        console.print("[red]NOT reconciled:[/red]")
        for problem in report.problems:
            console.print(f"  - {problem}")
