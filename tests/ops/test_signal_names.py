"""Every metric the dashboards and rules name is one the code emits (streamwarden._names), a recording
rule, or `up` (Prometheus's own, for the liveness alert)."""

from __future__ import annotations

import pytest
from _opslib import (
    PROMETHEUS_BUILTIN_METRICS,
    RUNNER_ONLY_METRICS,
    alert_rules,
    all_dashboard_panels,
    dashboard_files,
    emitted_metric_names,
    load_json,
    metric_names,
    parse_label_values,
    recording_rule_names,
    recording_rules,
    variable_queries,
)

from streamwarden import _names

EMITTED = emitted_metric_names()
KNOWN = EMITTED | recording_rule_names() | RUNNER_ONLY_METRICS | PROMETHEUS_BUILTIN_METRICS

RULES = [(r.get("alert") or r["record"], r["expr"]) for r in recording_rules() + alert_rules()]
PANEL_EXPRS = [
    (f"{name}:{panel['title']}:{target['refId']}", target["expr"])
    for name, panel in all_dashboard_panels()
    for target in panel["targets"]
]
VARIABLE_SELECTORS = [
    (f"{path.name}:${var}", selector)
    for path in dashboard_files()
    for var, query in variable_queries(load_json(path))
    if (selector := parse_label_values(query)[0])
]


def test_emitted_names_follow_the_prometheus_spelling_rule() -> None:
    """Each PROMETHEUS_NAMES entry is its OTel name with dots as underscores plus _seconds or _total at most."""
    for otel_name, prom_name in _names.PROMETHEUS_NAMES.items():
        base = otel_name.replace(".", "_")
        assert prom_name in {base, base + "_total", base + "_seconds"}, (otel_name, prom_name)
    assert _names.PROMETHEUS_NAMES[_names.METRIC_PROCESS_DURATION] + "_bucket" in EMITTED


@pytest.mark.parametrize(("rule", "expr"), RULES, ids=[r for r, _ in RULES])
def test_rule_names_only_known_metrics(rule: str, expr: str) -> None:
    """Each rule expression selects only emitted or recorded metrics, or `up`."""
    names = metric_names(expr)
    assert names
    assert names <= KNOWN, names - KNOWN


@pytest.mark.parametrize(("panel", "expr"), PANEL_EXPRS, ids=[p for p, _ in PANEL_EXPRS])
def test_panel_names_only_known_metrics(panel: str, expr: str) -> None:
    """Each panel query selects only emitted or recorded metrics."""
    names = metric_names(expr)
    assert names
    assert names <= KNOWN, names - KNOWN


@pytest.mark.parametrize(("variable", "selector"), VARIABLE_SELECTORS, ids=[v for v, _ in VARIABLE_SELECTORS])
def test_variable_queries_use_emitted_metrics(variable: str, selector: str) -> None:
    """Template variables take their values from metrics the code emits (never runner-only ones)."""
    assert metric_names(selector) <= EMITTED


def test_runner_only_metrics_are_used_and_spelled_as_the_code_spells_them() -> None:
    """The runner-only metrics are used by a rule or panel, and each is a Prometheus name of _names."""
    used = {n for _, e in RULES + PANEL_EXPRS for n in metric_names(e)}
    assert used >= RUNNER_ONLY_METRICS
    assert set(_names.PROMETHEUS_NAMES.values()) >= RUNNER_ONLY_METRICS


def test_rules_use_prometheus_builtins_only_where_listed() -> None:
    """`up` is the one series of Prometheus's own the rules use (the liveness alert), and no panel needs it."""
    rule_builtins = {n for _, e in RULES for n in metric_names(e)} & PROMETHEUS_BUILTIN_METRICS
    assert rule_builtins == PROMETHEUS_BUILTIN_METRICS
    assert not {n for _, e in PANEL_EXPRS for n in metric_names(e)} & PROMETHEUS_BUILTIN_METRICS
