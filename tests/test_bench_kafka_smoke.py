"""``benchmarks/bench_kafka.py --quick`` runs end to end and measures every case (not the targets).

It starts its own Tansu broker and redis-server and runs itself in three modes (no SDK, SDK with every
span sampled, SDK with 10 % sampled); a case that did not do what it claims (not every record handled
and committed, no span exported) makes it exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kafka.py"
CASES = (
    "bare", "faststream", "faststream_ack", "seed_off", "runner_off", "seed_on", "runner_on", "seed_on10",
    "runner_on10",
)  # fmt: skip


def test_quick_run_measures_every_case(tmp_path: Path) -> None:
    """Every case has a rate and Redis numbers, every ratio a value, every mode an RSS series."""
    out = tmp_path / "kafka.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--rss-messages", "1000", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary["cases"]) == set(CASES)
    for case_id, case in summary["cases"].items():
        assert case["msgs_per_s"] > 0, case_id
        assert case["redis_us_per_msg"] >= 0, case_id
    for case_id in ("seed_off", "runner_off", "seed_on", "runner_on"):
        assert summary["cases"][case_id]["redis_us_per_msg"] > 0, f"{case_id} used Redis"
    assert all(check["value"] is not None for check in summary["checks"].values()), summary["checks"]
    assert set(summary["rss"]) == {"nosdk", "sdk", "sdk10"}
    assert all(len(rss["samples"]) == 10 for rss in summary["rss"].values())
    spans = summary["spans_exported"]
    assert spans["sdk"]["streamwarden"] > 0
    assert 0 < spans["sdk10"]["streamwarden"] < spans["sdk"]["streamwarden"], "10 % sampled exports fewer"
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
