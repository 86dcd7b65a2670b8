"""Lint of the shipped Grafana dashboards and provisioning: what an operator relies on when opening them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from _opslib import (
    PROVISIONING_DIR,
    all_dashboard_panels,
    counters_outside_rate,
    dashboard_files,
    load_json,
    load_yaml,
    metric_names,
    parse_label_values,
    range_windows,
    run_tool,
    variable_queries,
)

DASHBOARDS = {path.name: load_json(path) for path in dashboard_files()}
PANELS = all_dashboard_panels()
PANEL_IDS = [f"{name}:{panel['title']}" for name, panel in PANELS]
DATASOURCE_UIDS = {"${datasource}", "$datasource"}

# Grafana unit ids (packages/grafana-data/src/valueFormats/categories.ts) these dashboards may use.
GRAFANA_UNITS = frozenset(
    {"none", "short", "percent", "percentunit", "s", "ms", "µs", "ns", "dtdurations"}
    | {"ops", "reqps", "rps", "wps", "cps", "opm", "bytes", "decbytes", "Bps"}
)

OVERVIEW = "streamwarden-overview.json"


def _targets(panel: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    targets: list[Mapping[str, Any]] = panel.get("targets", [])
    return targets


def test_dashboards_are_shipped() -> None:
    """The overview dashboard exists and parses as JSON."""
    assert OVERVIEW in DASHBOARDS
    assert DASHBOARDS[OVERVIEW]["uid"] == "streamwarden-overview"


@pytest.mark.parametrize("name", sorted(DASHBOARDS), ids=sorted(DASHBOARDS))
def test_dashboard_is_read_only_with_a_prometheus_datasource_variable(name: str) -> None:
    """The dashboard is not editable and has a `datasource` variable of type datasource (prometheus)."""
    dashboard = DASHBOARDS[name]
    assert dashboard["editable"] is False
    assert dashboard["title"]
    assert dashboard["description"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


EXPECTED_VARIABLES = {
    "service": ("streamwarden_messages_total", "service_name"),
    "destination": ("streamwarden_messages_total", "messaging_destination_name"),
    "breaker": ("streamwarden_circuit_breaker_status", "streamwarden_circuit_breaker_name"),
}


@pytest.mark.parametrize("variable", sorted(EXPECTED_VARIABLES), ids=sorted(EXPECTED_VARIABLES))
def test_overview_has_label_values_variables(variable: str) -> None:
    """Service, destination and breaker are label_values() variables on the datasource variable, multi-select with All."""
    dashboard = DASHBOARDS[OVERVIEW]
    var = next(v for v in dashboard["templating"]["list"] if v["name"] == variable)
    assert var["type"] == "query"
    assert var["datasource"]["uid"] in DATASOURCE_UIDS
    assert var["multi"] is True
    assert var["includeAll"] is True
    assert var["allValue"] == ".*"
    selector, label = parse_label_values(dict(variable_queries(dashboard))[variable])
    metric, expected_label = EXPECTED_VARIABLES[variable]
    assert label == expected_label
    assert selector is not None
    assert metric_names(selector) == {metric}


@pytest.mark.parametrize(("name", "panel"), PANELS, ids=PANEL_IDS)
def test_panel_has_datasource_title_description_and_unit(name: str, panel: Mapping[str, Any]) -> None:
    """Each panel uses the datasource variable (panel and targets), and has a title, a description and a unit."""
    assert panel["datasource"]["uid"] in DATASOURCE_UIDS
    assert panel["title"].strip()
    assert len(panel["description"].strip()) >= 20
    assert panel["fieldConfig"]["defaults"]["unit"] in GRAFANA_UNITS
    assert _targets(panel)
    for target in _targets(panel):
        assert target["datasource"]["uid"] in DATASOURCE_UIDS
        assert target["expr"].strip()


@pytest.mark.parametrize(("name", "panel"), PANELS, ids=PANEL_IDS)
def test_panel_queries_rate_counters_over_rate_interval(name: str, panel: Mapping[str, Any]) -> None:
    """Counters and histogram series appear only inside rate()/increase(), and every window is $__rate_interval."""
    for target in _targets(panel):
        assert counters_outside_rate(target["expr"]) == [], target["expr"]
        assert set(range_windows(target["expr"])) <= {"$__rate_interval"}, target["expr"]


@pytest.mark.parametrize(("name", "panel"), PANELS, ids=PANEL_IDS)
def test_panel_queries_filter_by_the_dashboard_variables(name: str, panel: Mapping[str, Any]) -> None:
    """Every selector of a panel query is filtered by $service, and by $destination or $breaker."""
    for target in _targets(panel):
        selectors = re.findall(r"[A-Za-z_:][\w:]*\{([^}]*)\}", target["expr"])
        assert selectors, target["expr"]
        for selector in selectors:
            assert 'service_name=~"$service"' in selector
            assert (
                'messaging_destination_name=~"$destination"' in selector
                or 'streamwarden_circuit_breaker_name=~"$breaker"' in selector
            )


def test_latency_panel_shows_percentiles_with_exemplars() -> None:
    """Processing latency shows p50/p95/p99 via histogram_quantile over rate of _bucket, with exemplars on."""
    panel = next(p for _, p in PANELS if p["title"] == "Processing latency")
    quantiles = []
    for target in _targets(panel):
        match = re.match(r"histogram_quantile\(([\d.]+), sum by \(le\) \(rate\(", target["expr"])
        assert match, target["expr"]
        assert "messaging_process_duration_seconds_bucket" in target["expr"]
        assert target["exemplar"] is True
        quantiles.append(float(match[1]))
    assert quantiles == [0.5, 0.95, 0.99]
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_breaker_state_is_a_state_timeline_with_every_state_mapped() -> None:
    """Circuit breaker state is a state-timeline panel mapping closed / half_open / open."""
    panel = next(p for _, p in PANELS if p["title"] == "Circuit breaker state")
    assert panel["type"] == "state-timeline"
    (target,) = _targets(panel)
    assert metric_names(target["expr"]) == {"streamwarden_circuit_breaker_status"}
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    texts = {value: option["text"] for value, option in mapping["options"].items()}
    assert texts == {"0": "closed", "1": "half_open", "2": "open"}
    for value, state in texts.items():
        assert f'streamwarden_circuit_breaker_state="{state}"' in target["expr"]
        assert re.search(rf'state="{state}"\}}\s*> 0\)\s*\*\s*{value}\b', target["expr"]), state


REQUIRED_ON_OVERVIEW = [
    "streamwarden_messages_total",
    "messaging_client_consumed_messages_total",
    "streamwarden_dedup_checks_total",
    "streamwarden_retry_attempts_total",
    "streamwarden_circuit_breaker_status",
    "streamwarden_circuit_breaker_transitions_total",
    "streamwarden_circuit_breaker_rejections_total",
    "streamwarden_dlq_messages_total",
    "streamwarden_dlq_depth",
    "messaging_process_duration_seconds_bucket",
    "streamwarden_consumer_lag",
    "streamwarden_consumer_pending",
    "streamwarden_consumer_lost_total",
]


@pytest.mark.parametrize("metric", REQUIRED_ON_OVERVIEW, ids=REQUIRED_ON_OVERVIEW)
def test_overview_shows_metric(metric: str) -> None:
    """The overview dashboard has a panel on each signal the issue asks for."""
    used = {m for name, p in PANELS if name == OVERVIEW for t in _targets(p) for m in metric_names(t["expr"])}
    assert metric in used


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query and variable selector (variables substituted) as PromQL."""
    exprs = [t["expr"] for _, panel in PANELS for t in _targets(panel)]
    for dashboard in DASHBOARDS.values():
        exprs.extend(s for _, q in variable_queries(dashboard) if (s := parse_label_values(q)[0]))
    substituted = [re.sub(r"\$\{?(__rate_interval)\}?", "1m", e).replace("$", "x") for e in exprs]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}:x", "expr": e} for i, e in enumerate(substituted)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = run_tool(["promtool", "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(substituted)} rules found" in result.stdout


# --- provisioning --------------------------------------------------------------------------------


def _datasources() -> dict[str, dict[str, Any]]:
    sources = [
        s
        for path in sorted((PROVISIONING_DIR / "datasources").glob("*.yaml"))
        for s in load_yaml(path)["datasources"]
    ]
    return {s["uid"]: s for s in sources}


def test_prometheus_datasource_links_exemplars_to_tempo() -> None:
    """The Prometheus data source sends exemplar trace ids (label trace_id) to the provisioned Tempo data source."""
    sources = _datasources()
    prometheus = next(s for s in sources.values() if s["type"] == "prometheus")
    (destination,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["name"] == "trace_id"
    assert sources[destination["datasourceUid"]]["type"] == "tempo"


def test_dashboard_provider_loads_files_read_only() -> None:
    """The dashboard provider is a file provider that does not let the UI change the dashboards."""
    (provider,) = load_yaml(PROVISIONING_DIR / "dashboards" / "streamwarden.yaml")["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    assert provider["options"]["path"]
