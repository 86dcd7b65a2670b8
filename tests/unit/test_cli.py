"""The ``streamwarden`` command line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streamwarden._cli import main


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


def test_demo_table_output_without_a_terminal() -> None:
    """Without a TTY the demo prints a plain table (no progress bar escape codes) and the verdict."""
    result = CliRunner().invoke(main, ["demo", "--messages", "200", "--rate", "4000"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "processed (executed once)" in result.output
    assert "Reconciled" in result.output
    assert "\x1b[" not in result.output


def test_demo_rejects_nonsense_arguments() -> None:
    """Zero messages is a usage error, not a crash."""
    result = CliRunner().invoke(main, ["demo", "--messages", "0"])
    assert result.exit_code == 2
    assert "must be positive" in result.output


def test_help_lists_commands() -> None:
    """``streamwarden --help`` lists the demo."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output
