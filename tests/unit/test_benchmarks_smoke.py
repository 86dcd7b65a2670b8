"""The overhead benchmark still runs end to end (a smoke test: it never asserts on speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_overhead.py"

CASES = (
    "bare_nosdk",
    "bare_sdk",
    "otel_floor",
    "layer_on",
    "layer_on_duplicate",
    "layer_off",
    "layer_off_seed_api",
    "layer_off_no_timeout",
    "layer_off_duplicate",
    "layer_off_store_full",
    "tenacity",
    "pybreaker",
)


def test_overhead_benchmark_quick_run_reports_every_case(tmp_path: Path) -> None:
    """`bench_overhead.py --quick --json` exits 0 and reports a positive cost for every case and both checks."""
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = json.loads(out.read_text())
    assert set(results["cases"]) == set(CASES)
    for case_id in CASES:
        case = results["cases"][case_id]
        assert case["median_us"] > 0, case_id
        assert case["min_us"] > 0, case_id
    assert set(results["checks"]) == {"telemetry_on_vs_floor", "telemetry_off_above_bare"}
    assert all(isinstance(check["passed"], bool) for check in results["checks"].values())
