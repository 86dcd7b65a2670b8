"""Fixtures of the ops suite: real Prometheus, Alertmanager, a webhook receiver, the live demo and the
Redis Streams runner (`streamwarden consume`).

Every server runs as a child process on a free 127.0.0.1 port with its own temporary storage, and is
terminated (SIGTERM, then SIGKILL) and reaped in the fixture's teardown.
"""

from __future__ import annotations

import copy
import sys
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _opslib import (  # noqa: E402
    ALERTMANAGER_FILE,
    E2E_INTERVAL,
    HOST,
    OPS_DIR,
    RULES_FILE,
    SHIPPED_FOR_ALERTS,
    VENV_BIN,
    PrometheusApi,
    RunningAlertmanager,
    RunningDemo,
    RunningPrometheus,
    RunningRunner,
    ServerProcess,
    StartPrometheus,
    StartRunner,
    WebhookReceiver,
    child_environment,
    free_port,
    load_yaml,
    require_binary,
)

# Timings of the e2e configs. Prometheus scrapes and evaluates every second (the compose stack: 15 s).
# Alertmanager runs the shipped routing and timings unchanged. Alert rules keep their expressions,
# labels and annotations; only `for:` is shortened, except for the alerts whose shipped timing the e2e
# test measures (SHIPPED_FOR_ALERTS).
TEST_FOR_DURATION = "2s"
# The inhibition test alone shortens Alertmanager's grouping, to deliver within a second.
TEST_GROUP_WAIT = "1s"
TEST_GROUP_INTERVAL = "1s"


def alertmanager_test_config(
    shipped: dict[str, Any], webhook_url: str, *, shorten_grouping: bool = False
) -> dict[str, Any]:
    """The shipped Alertmanager config with webhooks sent to ``webhook_url`` (keeping each URL's path,
    which tells the receivers apart); with ``shorten_grouping``, group_wait / group_interval of 1 s."""
    config = copy.deepcopy(shipped)
    redirected = 0
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = webhook_url + urllib.parse.urlsplit(webhook["url"]).path
            redirected += 1
    if redirected == 0:
        raise AssertionError("alerts/alertmanager.yml has no webhook receiver to redirect")

    def shorten(route: dict[str, Any]) -> None:
        route["group_wait"] = TEST_GROUP_WAIT
        route["group_interval"] = TEST_GROUP_INTERVAL
        for child in route.get("routes", []):
            shorten(child)

    if shorten_grouping:
        shorten(config["route"])
    return config


def rules_with_short_for(
    shipped: dict[str, Any], keep: Collection[str] = SHIPPED_FOR_ALERTS
) -> dict[str, Any]:
    """The shipped rules with the ``for:`` of every alert not in ``keep`` shortened, so an e2e run fires
    them within seconds. The expressions (and everything else) are the shipped ones."""
    rules = copy.deepcopy(shipped)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule and rule["alert"] not in keep:
                rule["for"] = TEST_FOR_DURATION
    return rules


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1 that records every notification."""
    with WebhookReceiver() as receiver:
        yield receiver


def _start_alertmanager(
    workdir: Path, webhook_receiver: WebhookReceiver, *, shorten_grouping: bool
) -> tuple[ServerProcess, str]:
    (workdir / "data").mkdir(parents=True)
    config_path = workdir / "alertmanager.yml"
    config = alertmanager_test_config(
        load_yaml(ALERTMANAGER_FILE), webhook_receiver.url, shorten_grouping=shorten_grouping
    )
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    port = free_port()
    server = ServerProcess(
        "alertmanager",
        [
            require_binary("prometheus-alertmanager"),
            f"--config.file={config_path}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            "--cluster.listen-address=",
            "--log.level=info",
        ],
        workdir / "alertmanager.log",
    )
    return server, f"http://{HOST}:{port}"


@pytest.fixture
def alertmanager(tmp_path: Path, webhook_receiver: WebhookReceiver) -> Iterator[RunningAlertmanager]:
    """A real Alertmanager running the shipped routing and timings, its webhooks pointed at
    ``webhook_receiver``."""
    server, url = _start_alertmanager(tmp_path / "alertmanager", webhook_receiver, shorten_grouping=False)
    try:
        server.start()
        server.wait_ready(f"{url}/-/ready")
        yield RunningAlertmanager(url, server)
    finally:
        server.stop()


@pytest.fixture
def fast_alertmanager(tmp_path: Path, webhook_receiver: WebhookReceiver) -> Iterator[RunningAlertmanager]:
    """The shipped routing with group_wait / group_interval of 1 s (for tests of routing and inhibition
    alone, where the timings are not what is tested)."""
    server, url = _start_alertmanager(tmp_path / "alertmanager-fast", webhook_receiver, shorten_grouping=True)
    try:
        server.start()
        server.wait_ready(f"{url}/-/ready")
        yield RunningAlertmanager(url, server)
    finally:
        server.stop()


@pytest.fixture
def start_prometheus(tmp_path: Path, alertmanager: RunningAlertmanager) -> Iterator[StartPrometheus]:
    """Start a real Prometheus scraping the given jobs (name -> ``host:port`` targets) every second,
    evaluating the shipped rules every second (``for:`` shortened except SHIPPED_FOR_ALERTS) and sending
    alerts to ``alertmanager``."""
    started: list[ServerProcess] = []

    def start(jobs: Mapping[str, list[str]]) -> RunningPrometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        (workdir / "data").mkdir(parents=True)
        rules_path = workdir / RULES_FILE.name
        rules_path.write_text(yaml.safe_dump(rules_with_short_for(load_yaml(RULES_FILE)), sort_keys=False))
        config = {
            "global": {
                "scrape_interval": E2E_INTERVAL,
                "scrape_timeout": E2E_INTERVAL,
                "evaluation_interval": E2E_INTERVAL,
            },
            "rule_files": [str(rules_path)],
            "alerting": {
                "alertmanagers": [
                    {"static_configs": [{"targets": [alertmanager.url.removeprefix("http://")]}]}
                ]
            },
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        port = free_port()
        server = ServerProcess(
            "prometheus",
            [
                require_binary("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={HOST}:{port}",
                "--rules.alert.resend-delay=1s",
                "--enable-feature=exemplar-storage",
                "--log.level=info",
            ],
            workdir / "prometheus.log",
        )
        started.append(server)
        server.start()
        url = f"http://{HOST}:{port}"
        server.wait_ready(f"{url}/-/ready")
        return RunningPrometheus(url, PrometheusApi(url), server)

    try:
        yield start
    finally:
        for server in started:
            server.stop()


# The demo's producer rate in the e2e tests: the rate of the run, and light on two shared cores.
DEMO_RATE = "200"


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[[], RunningDemo]]:
    """Start ``streamwarden demo --live`` with its Prometheus endpoint and control API on free ports."""
    started: list[ServerProcess] = []

    def start() -> RunningDemo:
        prometheus_port, control_port = free_port(), free_port()
        server = ServerProcess(
            "streamwarden demo",
            [
                str(VENV_BIN / "streamwarden"),
                "demo",
                "--live",
                "--rate",
                DEMO_RATE,
                "--prometheus-port",
                str(prometheus_port),
                "--control-port",
                str(control_port),
                "--max-seconds",
                "240",
            ],
            tmp_path / f"demo-{len(started)}.log",
            env=child_environment(),
        )
        started.append(server)
        server.start()
        demo = RunningDemo(server, f"{HOST}:{prometheus_port}", f"http://{HOST}:{control_port}")
        server.wait_ready(f"http://{demo.metrics_target}/metrics")
        server.wait_ready(f"{demo.control_url}/status")
        return demo

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def start_runner(tmp_path: Path, redis_url: str) -> Iterator[StartRunner]:
    """Start ``streamwarden consume`` on the session's redis-server with tests/ops/_ops_handler.py, its
    /metrics on a free port: ``start_runner(service=, stream=, group=, consumer=, key_prefix=)``."""
    started: list[ServerProcess] = []

    def start(*, service: str, stream: str, group: str, consumer: str, key_prefix: str) -> RunningRunner:
        prometheus_port = free_port()
        server = ServerProcess(
            f"streamwarden consume ({consumer})",
            [
                str(VENV_BIN / "streamwarden"),
                "consume",
                "--redis-url",
                redis_url,
                "--key-prefix",
                key_prefix,
                "--stream",
                stream,
                "--group",
                group,
                "--consumer",
                consumer,
                "--handler",
                "_ops_handler:handle",
                "--prometheus-port",
                str(prometheus_port),
                "--block-ms",
                "100",
                "--claim-idle-ms",
                "2000",
                "--claim-every",
                "0.5",
                "--shutdown-timeout",
                "5",
                "--log-level",
                "warning",
            ],
            tmp_path / f"runner-{consumer}.log",
            env=child_environment(PYTHONPATH=OPS_DIR, STREAMWARDEN_SERVICE_NAME=service),
        )
        started.append(server)
        server.start()
        runner = RunningRunner(server, f"{HOST}:{prometheus_port}", service, stream, group, key_prefix)
        server.wait_ready(f"http://{runner.metrics_target}/metrics")
        return runner

    try:
        yield start
    finally:
        for server in started:
            server.stop()
