"""The Redis dedup benchmark still runs end to end, and its round-trip counts are the designed ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dedup_redis.py"


@pytest.mark.timeout(120)
def test_benchmark_quick_run_reports_every_case_and_round_trips(tmp_path: Path) -> None:
    """`bench_dedup_redis.py --quick --json` exits 0; seed 3, per-message 2, deferred 1 and batch 0.02 round trips per message."""
    out = tmp_path / "dedup.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = json.loads(out.read_text())
    cases = results["cases"]
    assert {"seed", "sw_message", "sw_message_deferred", "sw_batch", "sw_batch_deferred"} <= set(cases)
    assert all(case["msgs_per_s"] > 0 for case in cases.values())
    round_trips = {name: round(case["commands_per_msg"], 2) for name, case in cases.items()}
    assert round_trips["seed"] == 3.0
    assert round_trips["sw_message"] == 2.0
    assert round_trips["sw_message_deferred"] <= 1.01
    assert round_trips["sw_batch"] <= 0.03
    assert round_trips["sw_batch_deferred"] <= 0.02
    assert set(results["checks"]) >= {"per_message_vs_seed", "batch_vs_seed"}
