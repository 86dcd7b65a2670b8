"""What a live process exports before anything has gone wrong: every counter series a rule or panel uses
exists (at 0) from the first scrape, and every series is exported once.

A counter series that appears at its first event is born at N: `increase()` reads that as no increase, so
a rule or panel misses the first burst (the issue's ConsumerLostMessages missed 10 lost entries). The
rules are written to tolerate such births (the born-tolerant increase, alerts/streamwarden.rules.yml);
these tests check what the library itself exports, against the real `streamwarden demo --live` and
`streamwarden consume` processes.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _opslib import (
    HOST,
    OPS_DIR,
    VENV_BIN,
    Sample,
    ServerProcess,
    alert_rules,
    all_dashboard_panels,
    child_environment,
    free_port,
    metric_names,
    recording_rules,
    scrape,
)

from _support import wait_until

pytestmark = pytest.mark.e2e

DEMO_SERVICE, DEMO_DESTINATION = "streamwarden-demo", "trading.signals"
RUNNER_SERVICE, RUNNER_GROUP = "ops-live-runner", "ops-live"
BREAKER = "default"
STATES = ("closed", "open", "half_open")
OUTCOMES = ("processed", "duplicate", "in_progress", "dead_lettered", "deferred", "failed")
DEDUP_RESULTS = ("new", "duplicate", "in_progress", "conflict", "error", "takeover", "lease_lost")


def _expected(service: str, destination: str) -> dict[str, list[dict[str, str]]]:
    """Counter family -> the label sets a process serving ``destination`` must export from the start."""
    dest = {"service_name": service, "messaging_destination_name": destination}
    breaker = {"service_name": service, "streamwarden_circuit_breaker_name": BREAKER}
    return {
        "streamwarden_dlq_write_errors_total": [dest],
        "streamwarden_invalid_messages_total": [
            {**dest, "streamwarden_dlq_reason": r} for r in ("invalid_message", "missing_id")
        ],
        "streamwarden_retry_outcomes_total": [
            {**dest, "streamwarden_retry_result": r} for r in ("succeeded", "exhausted")
        ],
        "streamwarden_circuit_breaker_rejections_total": [breaker],
        "streamwarden_circuit_breaker_transitions_total": [
            {**breaker, "streamwarden_circuit_breaker_from": a, "streamwarden_circuit_breaker_to": b}
            for a, b in itertools.permutations(STATES, 2)
        ],
        "streamwarden_messages_total": [{**dest, "streamwarden_outcome": o} for o in OUTCOMES],
        "streamwarden_dedup_checks_total": [{**dest, "streamwarden_dedup_result": r} for r in DEDUP_RESULTS],
    }


# Families that cannot have counted anything before the first failure, so must read exactly 0.
ZERO_UNTIL_SOMETHING_FAILS = frozenset(
    {
        "streamwarden_dlq_write_errors_total",
        "streamwarden_circuit_breaker_rejections_total",
        "streamwarden_circuit_breaker_transitions_total",
        "streamwarden_consumer_lost_total",
    }
)
# Counters whose label sets cannot be known in advance (the rules read them born-tolerant).
UNKNOWN_IN_ADVANCE = frozenset(
    {
        "streamwarden_retry_attempts_total",  # error.type
        "streamwarden_dlq_messages_total",  # error.type, error class, reason
        "streamwarden_dlq_replays_total",  # counted by `streamwarden dlq replay`, per replay result
        "messaging_process_duration_seconds_bucket",  # a histogram: error.type
        "messaging_process_duration_seconds_count",
        "messaging_client_consumed_messages_total",  # exists with the destination; no rare labels
        "streamwarden_retry_topic_records_total",  # per retry topic and result; Kafka with retry topics
    }
)
RUNNER_FAMILIES = {"streamwarden_consumer_lost_total"}


def _used_counters() -> set[str]:
    exprs = [r["expr"] for r in alert_rules() + recording_rules()]
    exprs += [t["expr"] for _, p in all_dashboard_panels() for t in p["targets"]]
    return {
        name
        for expr in exprs
        for name in metric_names(expr)
        if name.endswith(("_total", "_bucket", "_count"))
    }


def test_every_counter_the_rules_and_panels_use_is_checked_here() -> None:
    """Each counter a rule or panel selects is either in the table of series that must exist from the
    start, or documented as having label sets that cannot be known in advance."""
    known = set(_expected("s", "d")) | RUNNER_FAMILIES | UNKNOWN_IN_ADVANCE
    assert _used_counters() <= known, _used_counters() - known


def _first_scrape(target: str, process: ServerProcess) -> list[Sample]:
    def ready() -> list[Sample] | None:
        process.check_running()
        samples = scrape(target)
        return samples or None

    return wait_until(ready, timeout=30, what=f"the first scrape of {target}")


@pytest.fixture(scope="module")
def demo_samples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sample]]:
    """The first scrape of a fresh `streamwarden demo --live` (its traffic has just started)."""
    workdir: Path = tmp_path_factory.mktemp("live-demo")
    port = free_port()
    server = ServerProcess(
        "streamwarden demo",
        [str(VENV_BIN / "streamwarden"), "demo", "--live", "--rate", "200", "--prometheus-port", str(port)],
        workdir / "demo.log",
        env=child_environment(),
    )
    server.start()
    try:
        samples = _first_scrape(f"{HOST}:{port}", server)
        # A few seconds of traffic later, once a missing-id message was dead-lettered (0.2% of 200/s).
        wait_until(
            lambda: any(
                s.name == "streamwarden_dlq_messages_total"
                and s.labels.get("streamwarden_dlq_reason") == "missing_id"
                for s in scrape(f"{HOST}:{port}")
            ),
            timeout=60,
            what="a missing-id dead letter in the demo",
        )
        yield [*samples, Sample("_later_", {}, 0.0), *scrape(f"{HOST}:{port}")]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def runner_samples(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[list[Sample]]:
    """The first scrape of a fresh `streamwarden consume` on an empty stream."""
    workdir: Path = tmp_path_factory.mktemp("live-runner")
    port = free_port()
    prefix = f"ops-live-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(
        "streamwarden consume",
        [
            str(VENV_BIN / "streamwarden"),
            "consume",
            "--redis-url",
            redis_url,
            "--key-prefix",
            prefix,
            "--stream",
            f"{prefix}-orders",
            "--group",
            RUNNER_GROUP,
            "--handler",
            "_ops_handler:handle",
            "--prometheus-port",
            str(port),
            "--log-level",
            "warning",
        ],
        workdir / "runner.log",
        env=child_environment(PYTHONPATH=OPS_DIR, STREAMWARDEN_SERVICE_NAME=RUNNER_SERVICE),
    )
    server.start()
    try:
        server.wait_ready(f"http://{HOST}:{port}/metrics")
        samples = _first_scrape(f"{HOST}:{port}", server)
        yield [Sample("_stream_", {"stream": f"{prefix}-orders"}, 0.0), *samples]
    finally:
        server.stop()


def _first(samples: list[Sample]) -> list[Sample]:
    """The samples of the first scrape (before the ``_later_`` marker)."""
    out = []
    for sample in samples:
        if sample.name == "_later_":
            break
        out.append(sample)
    return out


def _missing(
    samples: list[Sample], family: str, label_sets: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[tuple[dict[str, str], float]]]:
    """(label sets not exported, (label set, value) exported but not 0 where it must be)."""
    missing, nonzero = [], []
    for wanted in label_sets:
        found = [s for s in samples if s.name == family and wanted.items() <= s.labels.items()]
        if not found:
            missing.append(wanted)
        elif family in ZERO_UNTIL_SOMETHING_FAILS and any(s.value != 0 for s in found):
            nonzero.append((wanted, max(s.value for s in found)))
    return missing, nonzero


DEMO_FAMILIES = list(_expected(DEMO_SERVICE, DEMO_DESTINATION))


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_the_demo_exports_the_counter_at_zero_from_its_first_scrape(
    demo_samples: list[Sample], family: str
) -> None:
    """The first scrape of the demo has every label set of the family (at 0 where nothing can have
    happened yet): no series is born at its first event."""
    missing, nonzero = _missing(
        _first(demo_samples), family, _expected(DEMO_SERVICE, DEMO_DESTINATION)[family]
    )
    assert missing == [], f"{family}: not exported from the start: {missing}"
    assert nonzero == []


RUNNER_DESTINATION_FAMILIES = [
    "streamwarden_dlq_write_errors_total",
    "streamwarden_invalid_messages_total",
    "streamwarden_retry_outcomes_total",
]


@pytest.mark.parametrize(
    "family",
    [
        "streamwarden_consumer_lost_total",
        "streamwarden_circuit_breaker_rejections_total",
        "streamwarden_circuit_breaker_transitions_total",
        *RUNNER_DESTINATION_FAMILIES,
    ],
)
def test_the_runner_exports_the_counter_at_zero_before_its_first_message(
    runner_samples: list[Sample], family: str
) -> None:
    """A runner that has not read a message yet already exports its rare-event counters at 0."""
    stream = runner_samples[0].labels["stream"]
    expected: dict[str, list[dict[str, str]]] = _expected(RUNNER_SERVICE, stream)
    expected["streamwarden_consumer_lost_total"] = [
        {
            "service_name": RUNNER_SERVICE,
            "messaging_destination_name": stream,
            "messaging_consumer_group_name": RUNNER_GROUP,
        }
    ]
    missing, nonzero = _missing(runner_samples[1:], family, expected[family])
    assert missing == [], f"{family}: not exported before the first message: {missing}"
    assert nonzero == []


def _duplicates(samples: list[Sample]) -> list[str]:
    counts = Counter((s.name, tuple(sorted(s.labels.items()))) for s in samples if not s.name.startswith("_"))
    return [
        f"{name}{{{', '.join(f'{k}={v!r}' for k, v in labels if not k.startswith('otel_scope'))}}} x{n}"
        for (name, labels), n in counts.items()
        if n > 1
    ]


@pytest.mark.parametrize("process", ["demo", "runner"])
def test_every_series_is_exported_once(request: pytest.FixtureRequest, process: str) -> None:
    """No scrape holds the same series twice: Prometheus keeps one of the two samples and drops the other
    (here the 0 of a pre-created series could hide the real count)."""
    samples: list[Sample] = request.getfixturevalue(f"{process}_samples")
    scrapes: list[list[Sample]] = [[]]
    for sample in samples:
        if sample.name.startswith("_"):
            scrapes.append([])
        else:
            scrapes[-1].append(sample)
    found = [d for one in scrapes for d in _duplicates(one)]
    assert found == [], found
