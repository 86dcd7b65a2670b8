"""The ``streamwarden`` command line: the embedded demo, its live control endpoint, the command list."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from typing import Any

from click.testing import CliRunner

from _support import eventually
from streamwarden import ReliabilityLayer
from streamwarden._cli import main
from streamwarden._demo import ControlServer, DemoConfig, run_demo


def test_demo_reconciles_and_exits_zero() -> None:
    """A short demo run processes, deduplicates, dead-letters, and its numbers reconcile."""
    result = CliRunner().invoke(main, ["demo", "--messages", "400", "--rate", "4000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reconciled"] is True
    assert report["problems"] == []
    outcomes = report["outcomes"]
    assert outcomes["processed"] > 300
    assert outcomes.get("duplicate", 0) > 0
    assert outcomes.get("dead_lettered", 0) > 0
    assert report["dlq_reasons"].get("error", 0) > 0  # poison signals (bad quantity) reach the DLQ
    assert report["unique_ids"] == 400
    acked = outcomes["processed"] + outcomes.get("duplicate", 0) + outcomes["dead_lettered"]
    assert acked == report["produced"]
    assert "closed->open" in report["breaker_transitions"]
    assert report["breaker_transitions"][-1] == "half_open->closed"


def test_demo_workload_number_fixes_the_content() -> None:
    """The same --seed produces the same signals; another seed other ones (--workload is an alias)."""

    def content(workload: str) -> tuple[int, int, int]:
        result = CliRunner().invoke(
            main, ["demo", "--messages", "300", "--rate", "6000", "--seed", workload, "--json"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        return report["produced"], report["resent"], report["dlq_reasons"].get("error", 0)

    first = content("7")
    assert content("7") == first
    assert content("8") != first


def test_demo_table_output_without_a_terminal() -> None:
    """Without a TTY the demo prints a plain table (no progress bar escape codes) and the verdict."""
    result = CliRunner().invoke(main, ["demo", "--messages", "200", "--rate", "4000"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "processed (executed once)" in result.output
    assert "Reconciled" in result.output
    assert "\x1b[" not in result.output


def test_demo_rejects_nonsense_arguments() -> None:
    """Zero messages is a one-line usage error, not a crash."""
    result = CliRunner().invoke(main, ["demo", "--messages", "0"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Invalid value for '--messages': 0 is not in the range x>=1.")
    assert result.stderr.count("\n") == 1


def test_help_lists_commands() -> None:
    """``streamwarden --help`` lists every command and the global --debug option."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "consume", "dlq", "metrics", "breakers", "--debug"):
        assert command in result.output


def test_every_redis_command_has_the_connection_options() -> None:
    """consume, demo, dlq *, metrics and breakers all take the same connection options."""
    commands = [
        ["consume"],
        ["demo"],
        ["metrics"],
        ["breakers"],
        *(["dlq", name] for name in ("list", "show", "count", "replay", "purge")),
    ]
    for command in commands:
        result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for option in ("--redis-url", "--username", "--password", "--tls-ca-file", "--key-prefix"):
            assert option in result.output, (command, option)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


async def test_live_status_reports_live_counts() -> None:
    """GET /status of a running live demo reports what happened so far, not zeros, and POST /outage
    starts the outage."""
    port = _free_port()
    control = ControlServer(port, asyncio.get_running_loop())
    control.start()
    stop = asyncio.Event()
    config = DemoConfig(live=True, rate=2000.0, concurrency=8)
    demo = asyncio.create_task(run_demo(config, stop=stop, control=control.attach))
    url = f"http://127.0.0.1:{port}"
    seen: dict[str, Any] = {}

    async def progressed() -> bool:
        seen.update(await asyncio.to_thread(_get, f"{url}/status"))
        return seen["executed"] > 50 and seen["retries"] > 0

    try:
        await eventually(progressed, timeout=30)
        assert seen["produced"] >= seen["outcomes"]["processed"] > 0
        assert seen["elapsed_seconds"] > 0
        assert seen["metrics"]["total_messages"] > 0
        assert seen["outage"] is False
        request = urllib.request.Request(f"{url}/outage", method="POST")
        reply = await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
        assert json.loads(reply.read()) == {"outage": True}
        reply.close()

        async def outage_on() -> bool:
            return bool((await asyncio.to_thread(_get, f"{url}/status"))["outage"])

        await eventually(outage_on)
    finally:
        stop.set()
        await demo
        control.stop()


def test_group_without_command_prints_its_help() -> None:
    """``streamwarden dlq`` alone prints the group's help (its commands), not an error line."""
    result = CliRunner().invoke(main, ["dlq"])
    assert "Commands:" in result.output
    for command in ("count", "list", "purge", "replay", "show"):
        assert command in result.output
    assert "error:" not in result.output


async def test_demo_report_names_the_trace_of_every_dead_letter(otel: Any) -> None:
    """The demo's report (``--json``) lists each dead letter with the trace id of its failed attempt, the
    exported ERROR span, so an operator can go from the report to the trace."""
    from streamwarden import ReliabilitySettings
    from streamwarden._demo import _demo_settings

    config = DemoConfig(messages=400, rate=50_000.0)
    settings: ReliabilitySettings = _demo_settings(config)
    layer = ReliabilityLayer(
        None, settings, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    report = await run_demo(config, layer=layer)
    assert report.reconciled, report.problems
    assert report.dead_letters, "the demo workload dead-letters its poison messages"
    error_spans = {
        format(span.context.trace_id, "032x")
        for span in otel.spans()
        if span.name.startswith("process ") and not span.status.is_ok
    }
    for line in report.as_dict()["dead_letters"]:
        assert line["trace_id"] in error_spans, line
