"""The soak in miniature: consumers killed, terminated, frozen past the lease, crashed by a killer
message, Redis paused; reconciled exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_short_soak_loses_nothing_and_reconciles_with_the_metrics(tmp_path: Path) -> None:
    """3,000 messages through 3 consumers under kill -9, SIGTERM, SIGSTOP, a killer message and CLIENT
    PAUSE: lost 0, every duplicate counted, the killer poison after <= 3 runs, no healthy id dead-lettered."""
    report_path = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable, str(SOAK),
            "--messages", "3000", "--consumers", "3", "--seconds", "55", "--rate", "300", "--handler-ms", "20",
            "--kill-every", "3", "--term-every", "4", "--stop-every", "5", "--stop-ms", "3500",
            "--pause-every", "3", "--pause-ms", "300", "--killers", "1", "--poison-max", "3",
            "--json", str(report_path), "--workdir", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    report = json.loads(report_path.read_text())
    assert report["problems"] == []
    assert report["lost"] == 0
    assert report["kills"] >= 1, "consumers were killed"
    assert report["terms"] >= 1, "consumers were stopped gracefully"
    assert report["stops"] >= 1, "consumers were frozen past the lease"
    assert report["crashes"] >= 1, "the killer message crashed a consumer"
    assert report["pauses"] >= 1, "Redis was paused"
    assert report["processed"] + report["dead_lettered_ids"] == report["unique_ids"]
    assert report["duplicate_executions"] <= report["takeovers_durable"]
    assert report["uncounted_duplicates"] == 0, (
        "every duplicate execution follows a counted takeover of its id"
    )
    poison = report["kinds"]["poison"] + report["kinds"]["killer"]
    assert report["dead_lettered_by_reason"].get("poison", 0) >= poison
