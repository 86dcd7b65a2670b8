"""End to end: the live demo, a real Prometheus running the shipped rules, a real Alertmanager running the
shipped routing, and a webhook receiver standing in for the pager.

The e2e configs differ from the shipped ones in timings only (see conftest.py): alert ``for:`` is
shortened to seconds and Alertmanager's group_wait / group_interval to one second. Expressions,
labels, annotations, routes, receivers and the inhibition are the shipped ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _opslib import (
    RUNNER_ONLY_METRICS,
    PrometheusApi,
    RunningAlertmanager,
    RunningDemo,
    StartPrometheus,
    WebhookReceiver,
    alert_rules,
    dashboard_files,
    data_panels,
    load_json,
    metric_names,
    parse_label_values,
    promql_regex_literal,
)

from _support import wait_until

pytestmark = pytest.mark.e2e

ALERTS = {rule["alert"]: rule for rule in alert_rules()}
SEVERITY_PATHS = {"critical": "/critical", "warning": "/warning"}
BREAKER_OPEN = "StreamwardenCircuitBreakerOpen"
DLQ_ACCUMULATING = "StreamwardenDLQAccumulating"
HIGH_ERROR_RATE = "StreamwardenHighErrorRate"
CONSUMER_STALLED = "StreamwardenConsumerStalled"
RATE_INTERVAL = "1m"


def description_pattern(template: str, labels: Mapping[str, str]) -> re.Pattern[str]:
    """The shipped description template as a regex: $labels.x filled in, any other action one token."""
    parts = []
    for part in re.split(r"(\{\{.*?\}\})", template):
        label = re.fullmatch(r"\{\{\s*\$labels\.(\w+)\s*\}\}", part)
        if label:
            parts.append(re.escape(labels[label[1]]))
        elif part.startswith("{{"):
            parts.append(r"\S+")
        else:
            parts.append(re.escape(part))
    return re.compile("".join(parts))


def assert_notification_matches_rule(path: str, alert: Mapping[str, Any], *, service: str) -> None:
    """A received alert carries the rule's severity, goes to that severity's receiver, names the service
    and has the rule's description rendered with its labels."""
    labels = alert["labels"]
    rule = ALERTS[labels["alertname"]]
    assert labels["severity"] == rule["labels"]["severity"]
    assert path == SEVERITY_PATHS[labels["severity"]]
    assert labels["service_name"] == service
    assert alert["annotations"]["summary"] == rule["annotations"]["summary"]
    assert alert["annotations"]["runbook_url"] == rule["annotations"]["runbook_url"]
    description = alert["annotations"]["description"]
    assert "{{" not in description
    assert description_pattern(rule["annotations"]["description"], labels).fullmatch(description), description


# --- Alertmanager alone: the inhibition ------------------------------------------------------------


def _posted_alert(alertname: str, service: str, **labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {
            "alertname": alertname,
            "severity": ALERTS[alertname]["labels"]["severity"],
            "service_name": service,
            **labels,
        },
        "annotations": {"summary": ALERTS[alertname]["annotations"]["summary"]},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
    }


def test_open_breaker_inhibits_error_rate_and_stalled_consumer_of_its_own_service_only(
    alertmanager: RunningAlertmanager, webhook_receiver: WebhookReceiver
) -> None:
    """With the shipped routing, an open breaker suppresses HighErrorRate and ConsumerStalled of the same
    service; another service's HighErrorRate still pages."""
    stream = {"messaging_destination_name": "orders", "messaging_consumer_group_name": "workers"}
    alertmanager.post_alerts(
        [
            _posted_alert(BREAKER_OPEN, "orders", streamwarden_circuit_breaker_name="payments-api"),
            _posted_alert(HIGH_ERROR_RATE, "orders"),
            _posted_alert(CONSUMER_STALLED, "orders", **stream),
            _posted_alert(HIGH_ERROR_RATE, "billing"),
        ]
    )

    def state_of(alertname: str, service: str) -> Mapping[str, Any]:
        (alert,) = [
            a
            for a in alertmanager.alerts()
            if a["labels"]["alertname"] == alertname and a["labels"]["service_name"] == service
        ]
        status: Mapping[str, Any] = alert["status"]
        return status

    def delivered() -> bool:
        services = {a["labels"]["service_name"] for _, a in webhook_receiver.alerts(HIGH_ERROR_RATE)}
        return bool(webhook_receiver.alerts(BREAKER_OPEN)) and "billing" in services

    wait_until(delivered, timeout=30, what="notifications for the breaker and billing's error rate")
    for alertname in (HIGH_ERROR_RATE, CONSUMER_STALLED):
        wait_until(
            lambda name=alertname: state_of(name, "orders")["state"] == "suppressed",
            timeout=10,
            what=f"orders' {alertname} to be marked suppressed",
        )
    breaker_fingerprint = next(
        a["fingerprint"] for a in alertmanager.alerts() if a["labels"]["alertname"] == BREAKER_OPEN
    )
    assert state_of(HIGH_ERROR_RATE, "orders")["inhibitedBy"] == [breaker_fingerprint]
    assert state_of(CONSUMER_STALLED, "orders")["inhibitedBy"] == [breaker_fingerprint]
    assert state_of(HIGH_ERROR_RATE, "billing")["state"] == "active"
    assert state_of(BREAKER_OPEN, "orders")["state"] == "active"
    received = webhook_receiver.alerts(HIGH_ERROR_RATE)
    assert {a["labels"]["service_name"] for _, a in received} == {"billing"}
    assert webhook_receiver.alerts(CONSUMER_STALLED) == []
    assert {path for path, _ in received + webhook_receiver.alerts(BREAKER_OPEN)} == {"/critical"}


# --- the live demo -------------------------------------------------------------------------------


def _substitute(expr: str, values: Mapping[str, list[str]]) -> str:
    """Grafana's substitution of multi-value variables in a regex matcher: (a|b), $__rate_interval -> 1m."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):
        chosen = values[name]
        joined = chosen[0] if len(chosen) == 1 else "(" + "|".join(chosen) + ")"
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", lambda _m, j=joined: j, expr)
    assert "$" not in expr, expr
    return expr


def _variable_values(api: PrometheusApi, start: float, end: float) -> dict[str, list[str]]:
    """Values of every dashboard query variable, each query run with the earlier variables substituted."""
    values: dict[str, list[str]] = {}
    for path in dashboard_files():
        for var in load_json(path)["templating"]["list"]:
            if var["type"] != "query" or var["name"] in values:
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector, label = parse_label_values(query)
            if selector is not None:
                selector = _substitute(selector, values)
            found = api.label_values(label, selector, start, end)
            assert found, f"dashboard variable ${var['name']} ({query}) has no values"
            values[var["name"]] = [promql_regex_literal(v) for v in sorted(found)]
    return values


def _service_of(api: PrometheusApi) -> str | None:
    result = api.query("sum by (service_name) (streamwarden_messages_total)")
    if not result:
        return None
    (series,) = result
    service: str = series["metric"]["service_name"]
    return service


def _open_breakers(api: PrometheusApi, service: str) -> set[str]:
    result = api.query(
        f'streamwarden_circuit_breaker_status{{service_name="{service}", streamwarden_circuit_breaker_state="open"}} == 1'
    )
    return {s["metric"]["streamwarden_circuit_breaker_name"] for s in result}


def test_outage_pages_for_breaker_and_dlq_resolves_and_every_dashboard_query_has_data(
    start_demo: Callable[[], RunningDemo],
    start_prometheus: StartPrometheus,
    webhook_receiver: WebhookReceiver,
) -> None:
    """A downstream outage in the live demo fires the breaker (critical) and DLQ (warning) alerts with their
    rendered annotations; ending it resolves the breaker alert; every dashboard query then returns data."""
    started = time.time()
    demo = start_demo()
    prometheus = start_prometheus([demo.metrics_target])
    api = prometheus.api

    service = wait_until(lambda: _service_of(api), timeout=30, what="the demo's messages in Prometheus")
    assert webhook_receiver.alerts(BREAKER_OPEN) == []
    assert _open_breakers(api, service) == set()

    outage_started = datetime.now(UTC)
    status, body = demo.control("POST", "/outage")
    assert 200 <= status < 300, body

    def firing(alertname: str) -> list[tuple[str, dict[str, Any]]]:
        demo.server.check_running()
        return webhook_receiver.alerts(alertname, "firing")

    breaker_firing = wait_until(lambda: firing(BREAKER_OPEN), timeout=45, what=f"a firing {BREAKER_OPEN}")
    dlq_firing = wait_until(lambda: firing(DLQ_ACCUMULATING), timeout=30, what=f"a firing {DLQ_ACCUMULATING}")

    for path, alert in breaker_firing + dlq_firing:
        assert_notification_matches_rule(path, alert, service=service)
    # The breaker alert is the outage's; the demo also dead-letters poison signals all along, so the
    # DLQ alert may have started before it.
    for _, alert in breaker_firing:
        assert datetime.fromisoformat(alert["startsAt"]) >= outage_started - timedelta(seconds=2)
    opened = {a["labels"]["streamwarden_circuit_breaker_name"] for _, a in breaker_firing}
    recently_open = api.query(
        f'max_over_time(streamwarden_circuit_breaker_status{{service_name="{service}", '
        'streamwarden_circuit_breaker_state="open"}[5m]) == 1'
    )
    assert opened <= {s["metric"]["streamwarden_circuit_breaker_name"] for s in recently_open}
    dead_lettered = {
        s["metric"]["messaging_destination_name"]
        for s in api.query(f'streamwarden_dlq_messages_total{{service_name="{service}"}} > 0')
    }
    assert {a["labels"]["messaging_destination_name"] for _, a in dlq_firing} <= dead_lettered

    status, body = demo.control("DELETE", "/outage")
    assert 200 <= status < 300, body
    resolved = wait_until(
        lambda: [
            (p, a)
            for p, a in webhook_receiver.alerts(BREAKER_OPEN, "resolved")
            if a["labels"]["streamwarden_circuit_breaker_name"] in opened
        ],
        timeout=45,
        what=f"the resolved {BREAKER_OPEN}",
    )
    for path, alert in resolved:
        assert path == SEVERITY_PATHS["critical"]
        assert alert["labels"]["service_name"] == service
    assert _open_breakers(api, service) == set()
    # The demo's own account agrees: the outage is over and its breaker went closed -> open.
    demo_status = demo.status()
    assert demo_status["outage"] is False
    assert "closed->open" in demo_status["breaker_transitions"]

    # Every dashboard query, variables substituted with values found in the data, over the whole run.
    end = time.time()
    values = _variable_values(api, started, end)
    assert values["service"] == [promql_regex_literal(service)]
    empty, expected_empty = [], []
    for path in dashboard_files():
        for panel in data_panels(load_json(path)):
            for target in panel["targets"]:
                expr = _substitute(target["expr"], values)
                result = api.query_range(expr, started, end, step="2s")
                runner_only = metric_names(target["expr"]) & RUNNER_ONLY_METRICS
                label = f"{path.name}: {panel['title']} [{target['refId']}]"
                if runner_only:
                    assert metric_names(target["expr"]) <= RUNNER_ONLY_METRICS, label
                    expected_empty.append(label)
                    if result:
                        pytest.fail(f"{label} returned data: remove {runner_only} from RUNNER_ONLY_METRICS")
                elif not result:
                    empty.append(f"{label}: {expr}")
    assert empty == []
    assert expected_empty  # the runner's panels exist and were checked

    code = demo.server.stop()
    assert code == 0, demo.server.log_tail()
