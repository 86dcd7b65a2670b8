"""Lint of the shipped Grafana dashboards and provisioning: what an operator relies on when opening them."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from _opslib import (
    PROVISIONING_DIR,
    RUNBOOKS_FILE,
    alert_rules,
    all_dashboard_panels,
    counters_outside_rate,
    dashboard_files,
    load_json,
    load_yaml,
    metric_names,
    parse_label_values,
    range_windows,
    run_tool,
    runbook_anchors,
    variable_queries,
)

from streamwarden._types import Outcome

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
    "streamwarden_consumer_oldest_pending_age_seconds",
    "streamwarden_dlq_write_errors_total",
    "streamwarden_invalid_messages_total",
    "streamwarden_dlq_replays_total",
    "streamwarden_circuit_breaker_failures",
    "streamwarden_circuit_breaker_threshold",
    "streamwarden_circuit_breaker_retry_after_seconds",
    "streamwarden_retry_outcomes_total",
    "streamwarden_retry_topic_records_total",
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


# --- outcome-correct top-line signals -----------------------------------------------------------------

TOP_LINE = ("Throughput", "Success rate", "Error rate", "Dedup hit rate", "p99 latency")
NOT_ATTEMPTS = ("deferred", "in_progress")
_MESSAGES_SELECTOR = re.compile(r"streamwarden_messages_total\{([^}]*)\}")
_OUTCOME_MATCHER = re.compile(r'streamwarden_outcome\s*(=~|=|!=|!~)\s*"([^"]*)"')


def _outcomes_selected(selector: str) -> set[str]:
    """The outcomes a streamwarden_messages_total selector matches."""
    match = _OUTCOME_MATCHER.search(selector)
    if match is None:
        return {o.value for o in Outcome}
    op, value = match.groups()
    hits = {o.value for o in Outcome if re.fullmatch(value, o.value)}
    return hits if op in ("=", "=~") else {o.value for o in Outcome} - hits


def _panel(title: str) -> Mapping[str, Any]:
    (panel,) = [p for name, p in PANELS if name == OVERVIEW and p["title"] == title]
    return panel


@pytest.mark.parametrize("title", TOP_LINE, ids=TOP_LINE)
def test_top_line_panels_count_no_deferred_or_refused_delivery(title: str) -> None:
    """The top-line stats are over attempted messages: no streamwarden_messages_total selector of theirs
    matches a deferred or in-progress delivery, so an outage that redelivers everything cannot raise
    throughput or dilute a rate; the p99 comes from the histogram of handler runs only."""
    panel = _panel(title)
    assert panel["type"] == "stat"
    for target in _targets(panel):
        for selector in _MESSAGES_SELECTOR.findall(target["expr"]):
            selected = _outcomes_selected(selector)
            assert not selected & set(NOT_ATTEMPTS), (title, selector)
    if title == "Throughput":
        (target,) = _targets(panel)
        (selector,) = _MESSAGES_SELECTOR.findall(target["expr"])
        assert _outcomes_selected(selector) == {"processed", "dead_lettered", "failed"}
    if title == "p99 latency":
        (target,) = _targets(panel)
        assert metric_names(target["expr"]) == {"messaging_process_duration_seconds_bucket"}
        assert target["expr"].startswith("histogram_quantile(0.99, sum by (le) (rate(")


def test_dedup_hit_rate_is_over_claimed_messages() -> None:
    """Dedup hit rate: duplicates over duplicates plus attempted messages, less the invalid ones (never
    claimed); a denominator of 0 shows no data rather than 0%."""
    (target,) = _targets(_panel("Dedup hit rate"))
    expr = target["expr"]
    numerator, _, denominator = expr.partition(" / ")
    assert [_outcomes_selected(s) for s in _MESSAGES_SELECTOR.findall(numerator)] == [{"duplicate"}]
    assert [_outcomes_selected(s) for s in _MESSAGES_SELECTOR.findall(denominator)] == [
        {"duplicate", "processed", "dead_lettered", "failed"}
    ]
    assert "- (sum(rate(streamwarden_invalid_messages_total{" in denominator
    assert denominator.rstrip().endswith("> 0)")


def test_deferrals_and_refusals_have_their_own_panel() -> None:
    """One panel shows the deliveries that were not attempts: deferred and in-progress outcomes and the
    calls an open breaker refused."""
    panel = _panel("Deferred and refused deliveries")
    selectors = [s for t in _targets(panel) for s in _MESSAGES_SELECTOR.findall(t["expr"])]
    assert [_outcomes_selected(s) for s in selectors] == [set(NOT_ATTEMPTS)]
    assert any(
        "streamwarden_circuit_breaker_rejections_total" in metric_names(t["expr"]) for t in _targets(panel)
    )


def test_dlq_depth_is_never_summed_over_instances() -> None:
    """Every query of streamwarden_dlq_depth takes the largest report per destination first (several
    processes may report one queue), and sums at most over destinations after that."""
    exprs = [t["expr"] for _, p in PANELS for t in _targets(p) if "streamwarden_dlq_depth" in t["expr"]]
    assert len(exprs) >= 2
    for expr in exprs:
        for match in re.finditer(r"streamwarden_dlq_depth", expr):
            before = expr[: match.start()]
            assert before.endswith("max by (messaging_destination_name) ("), expr


BREAKDOWNS = {
    "Attempted messages by destination": "streamwarden_messages_total",
    "Error rate by destination": "streamwarden_messages_total",
    "p99 latency by destination": "messaging_process_duration_seconds_bucket",
}


@pytest.mark.parametrize("title", sorted(BREAKDOWNS), ids=sorted(BREAKDOWNS))
def test_per_service_and_destination_breakdowns(title: str) -> None:
    """Throughput, error rate and latency are also shown per service and destination."""
    panel = _panel(title)
    for target in _targets(panel):
        assert BREAKDOWNS[title] in metric_names(target["expr"])
        assert re.search(r"sum by \((?:le, )?service_name, messaging_destination_name\)", target["expr"])
        assert "{{service_name}} / {{messaging_destination_name}}" in target["legendFormat"]


# --- links ------------------------------------------------------------------------------------------

RUNBOOK_URL = "https://github.com/streamwarden/streamwarden/blob/main/docs/runbooks.md"


def _all_links() -> list[tuple[str, Mapping[str, Any]]]:
    links = [(f"dashboard:{link['title']}", link) for link in DASHBOARDS[OVERVIEW]["links"]]
    links += [(f"{p['title']}:{link['title']}", link) for _, p in PANELS for link in p.get("links", [])]
    return links


def test_every_runbook_link_resolves_and_every_alert_has_a_panel_linking_its_runbook() -> None:
    """Panels link the runbook section of the alert that watches them: each link's anchor is a heading of
    docs/runbooks.md, and every alert's section is linked from at least one panel (the critical
    DLQWriteFailing too: it has a panel to look at)."""
    anchors = runbook_anchors()
    linked: set[str] = set()
    for where, link in _all_links():
        url = urllib.parse.urlsplit(link["url"])
        if url.geturl().startswith(RUNBOOK_URL):
            assert url.fragment == "" or url.fragment in anchors, where
            linked.add(url.fragment)
    assert RUNBOOKS_FILE.name in RUNBOOK_URL
    assert "" in linked  # the dashboard links the runbooks themselves
    assert {rule["alert"].lower() for rule in alert_rules()} <= linked


def _tempo_uid() -> str:
    (tempo,) = [s for s in _datasources().values() if s["type"] == "tempo"]
    uid: str = tempo["uid"]
    return uid


TEMPO_OUTCOMES = ("dead_lettered", "deferred", "failed")


@pytest.mark.parametrize("outcome", TEMPO_OUTCOMES, ids=TEMPO_OUTCOMES)
def test_tempo_links_search_traces_by_service_and_outcome(outcome: str) -> None:
    """A link opens Grafana Explore on the provisioned Tempo data source with a TraceQL search for the
    selected services' process spans of one outcome (the span attribute streamwarden.outcome), in the
    dashboard's time range; substituted as Grafana does, the pane is valid JSON."""
    found = []
    for where, link in _all_links():
        url = urllib.parse.urlsplit(link["url"])
        if url.path != "/explore":
            continue
        query = dict(urllib.parse.parse_qsl(url.query.replace("${service:pipe}", "orders|billing")))
        panes = json.loads(
            query["panes"].replace("${__from}", "1700000000000").replace("${__to}", "1700000600000")
        )
        for pane in panes.values():
            (tempo_query,) = pane["queries"]
            assert pane["datasource"] == tempo_query["datasource"]["uid"] == _tempo_uid(), where
            assert tempo_query["queryType"] == "traceql"
            assert 'resource.service.name =~ "orders|billing"' in tempo_query["query"]
            if f'span.streamwarden.outcome = "{outcome}"' in tempo_query["query"]:
                found.append(where)
    assert outcome in {o.value for o in Outcome}
    assert any(where.startswith("Throughput by outcome:") for where in found), found
    assert any(where.startswith("dashboard:") for where in found), found
