"""Fixtures of the ops suite: real Prometheus, Alertmanager, a webhook receiver and the demo service.

Every server runs as a child process on a free 127.0.0.1 port with its own temporary storage, and is
terminated (SIGTERM, then SIGKILL) and reaped in the fixture's teardown.
"""

from __future__ import annotations

import copy
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

_OPS_DIR = str(Path(__file__).resolve().parent)
if _OPS_DIR not in sys.path:
    sys.path.insert(0, _OPS_DIR)

from _opslib import (  # noqa: E402
    ALERTMANAGER_FILE,
    HOST,
    RULES_FILE,
    VENV_BIN,
    PrometheusApi,
    RunningAlertmanager,
    RunningDemo,
    RunningPrometheus,
    ServerProcess,
    StartPrometheus,
    WebhookReceiver,
    free_port,
    load_yaml,
    require_binary,
)

# Shortened timings of the e2e configs. Only timings change; every expression, label, annotation, route
# matcher, receiver and inhibition stays as shipped.
TEST_FOR_DURATION = "2s"
TEST_GROUP_WAIT = "1s"
TEST_GROUP_INTERVAL = "1s"


def alertmanager_test_config(shipped: dict[str, Any], webhook_url: str) -> dict[str, Any]:
    """The shipped Alertmanager config with webhooks sent to ``webhook_url`` (keeping each URL's path,
    which tells the receivers apart) and group_wait / group_interval shortened."""
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

    shorten(config["route"])
    return config


def rules_with_short_for(shipped: dict[str, Any]) -> dict[str, Any]:
    """The shipped rules with every alert's ``for:`` shortened so an e2e run fires within seconds.
    The expressions (and everything else) are the shipped ones."""
    rules = copy.deepcopy(shipped)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                rule["for"] = TEST_FOR_DURATION
    return rules


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1 that records every notification."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def alertmanager(tmp_path: Path, webhook_receiver: WebhookReceiver) -> Iterator[RunningAlertmanager]:
    """A real Alertmanager running the shipped routing, its webhooks pointed at ``webhook_receiver``."""
    workdir = tmp_path / "alertmanager"
    (workdir / "data").mkdir(parents=True)
    config_path = workdir / "alertmanager.yml"
    config = alertmanager_test_config(load_yaml(ALERTMANAGER_FILE), webhook_receiver.url)
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
    url = f"http://{HOST}:{port}"
    try:
        server.start()
        server.wait_ready(f"{url}/-/ready")
        yield RunningAlertmanager(url, server)
    finally:
        server.stop()


@pytest.fixture
def start_prometheus(tmp_path: Path, alertmanager: RunningAlertmanager) -> Iterator[StartPrometheus]:
    """Start a real Prometheus scraping the given ``host:port`` targets every second, evaluating the
    shipped rules every second (``for:`` shortened) and sending alerts to ``alertmanager``."""
    started: list[ServerProcess] = []

    def start(targets: list[str]) -> RunningPrometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        (workdir / "data").mkdir(parents=True)
        rules_path = workdir / RULES_FILE.name
        rules_path.write_text(yaml.safe_dump(rules_with_short_for(load_yaml(RULES_FILE)), sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_path)],
            "alerting": {
                "alertmanagers": [
                    {"static_configs": [{"targets": [alertmanager.url.removeprefix("http://")]}]}
                ]
            },
            "scrape_configs": [{"job_name": "streamwarden-demo", "static_configs": [{"targets": targets}]}],
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
                "--prometheus-port",
                str(prometheus_port),
                "--control-port",
                str(control_port),
                "--max-seconds",
                "240",
            ],
            tmp_path / f"demo-{len(started)}.log",
            # No OTLP export to wherever the environment points: the demo only serves /metrics here.
            env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")},
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
