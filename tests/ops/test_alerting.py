"""The shipped Prometheus rules, their promtool unit tests, the Alertmanager routing and the runbooks."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from _opslib import (
    ALERTMANAGER_FILE,
    COMPOSE_DIR,
    OPERATIONS_FILE,
    RULE_TESTS_DIR,
    RULES_FILE,
    RUNBOOKS_FILE,
    VENV_BIN,
    alert_rules,
    all_dashboard_panels,
    emitted_metric_names,
    load_yaml,
    metric_names,
    parse_duration,
    range_windows,
    recording_rules,
    route_timings,
    run_tool,
    runbook_anchors,
)

ALERTS = {rule["alert"]: rule for rule in alert_rules()}
ALERTNAMES = sorted(ALERTS)
RECORDS = {rule["record"]: rule for rule in recording_rules()}
RULE_TEST_FILES = sorted(RULE_TESTS_DIR.glob("*.yml"))
SEVERITY_RECEIVERS = {"critical": "streamwarden-critical", "warning": "streamwarden-warning"}
DEFAULT_RECEIVER = "streamwarden-warning"
RUNBOOK_URL_PREFIX = "https://github.com/streamwarden/streamwarden/blob/main/docs/runbooks.md#"


def _unit_test_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in RULE_TEST_FILES
        for test in load_yaml(path)["tests"]
        for case in test.get("alert_rule_test", [])
    ]


# --- promtool ------------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_every_rule() -> None:
    """`promtool check rules` accepts the rules file and counts every recording and alerting rule."""
    result = run_tool(["promtool", "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in result.stdout, result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    """`promtool test rules alerts/tests/*.yml` passes."""
    assert RULE_TEST_FILES, "no promtool unit tests in alerts/tests"
    result = run_tool(["promtool", "test", "rules", *map(str, RULE_TEST_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TEST_FILES), result.stdout


def test_rule_unit_tests_name_only_existing_alerts() -> None:
    """Every alertname in the promtool tests exists, so no "stays quiet" case passes by a typo."""
    unknown = {case["alertname"] for case in _unit_test_cases()} - set(ALERTS)
    assert not unknown


@pytest.mark.parametrize("alertname", ALERTNAMES, ids=ALERTNAMES)
def test_every_alert_has_firing_and_quiet_unit_tests(alertname: str) -> None:
    """Each alert has a promtool case where it fires, with its rendered annotations, and one where it stays quiet."""
    cases = [case for case in _unit_test_cases() if case["alertname"] == alertname]
    firing = [alert for case in cases for alert in case.get("exp_alerts") or []]
    assert firing, f"{alertname} is never expected to fire"
    assert any(not case.get("exp_alerts") for case in cases), f"{alertname} is never expected to stay quiet"
    for alert in firing:
        assert alert["exp_labels"]["severity"] == ALERTS[alertname]["labels"]["severity"]
        assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}


# --- rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alertname", ALERTNAMES, ids=ALERTNAMES)
def test_alert_has_severity_summary_description_and_runbook(alertname: str) -> None:
    """Each alert carries severity critical|warning, a static summary, a templated description and a runbook link."""
    rule = ALERTS[alertname]
    assert re.fullmatch(r"Streamwarden[A-Z][A-Za-z]+", alertname)
    assert rule["labels"]["severity"] in SEVERITY_RECEIVERS
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert "{{" not in annotations["summary"]
    assert re.search(r"\{\{[^}]*\$(labels|value)", annotations["description"])
    assert annotations["runbook_url"] == RUNBOOK_URL_PREFIX + alertname.lower()


@pytest.mark.parametrize("alertname", ALERTNAMES, ids=ALERTNAMES)
def test_description_states_the_alerts_own_for_duration(alertname: str) -> None:
    """A description that says "for more than N minutes" matches the alert's `for:`."""
    rule = ALERTS[alertname]
    stated = re.findall(r"for more than (\d+) minutes?", " ".join(rule["annotations"].values()))
    assert all(f"{minutes}m" == rule["for"] for minutes in stated), (stated, rule.get("for"))


@pytest.mark.parametrize("alertname", ALERTNAMES, ids=ALERTNAMES)
def test_runbook_url_anchor_resolves_to_a_heading(alertname: str) -> None:
    """The anchor of every runbook_url is a heading of docs/runbooks.md."""
    url = urllib.parse.urlsplit(ALERTS[alertname]["annotations"]["runbook_url"])
    assert url.path.endswith("/docs/runbooks.md")
    assert url.fragment in runbook_anchors()


def _window(operations: str) -> str:
    match = re.fullmatch(r"(?:ratio_)?(?:rate|increase)(\d+[smhd])", operations)
    assert match, operations
    return match[1]


@pytest.mark.parametrize("name", sorted(RECORDS), ids=sorted(RECORDS))
def test_recording_rule_names_follow_level_metric_operations(name: str) -> None:
    """Recording rules are named level:metric:operations, the metric is an emitted one, and the window in
    the name is the expression's: its range selectors and offsets, or the window of the recorded series
    it divides."""
    level, metric, operations = name.split(":")
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level)
    bases = {n.removesuffix("_total") for n in emitted_metric_names()}
    assert any(metric == base or metric.startswith(base + "_") for base in bases), metric
    window = _window(operations)
    expr = RECORDS[name]["expr"]
    windows = set(range_windows(expr)) | set(re.findall(r"\boffset\s+(\d+[smhd])", expr))
    windows |= {_window(used.split(":")[2]) for used in metric_names(expr) if used in RECORDS}
    assert windows == {window}, (name, windows)


BORN_TOLERANT = re.compile(
    r"\(\s*(?P<metric>\w+)(?P<sel>\{[^}]*\})?\s+unless\s+(?P=metric)(?P=sel)?\s+offset\s+(?P<w>\d+[smhd])\s*\)"
    r"\s*\+\s*0\s+or\s+increase\(\s*(?P=metric)(?P=sel)?\[(?P=w)\]\s*\)"
)


@pytest.mark.parametrize("name", sorted(RECORDS), ids=sorted(RECORDS))
def test_counters_are_read_born_tolerant(name: str) -> None:
    """Every recording rule that reads a counter reads it with the born-tolerant increase
    `(x unless x offset W) + 0 or increase(x[W])`, so a series born at its first burst counts it; no
    rule reads a counter with rate() or a bare increase()."""
    expr = " ".join(RECORDS[name]["expr"].split())
    counters = {m for m in metric_names(expr) if m.endswith(("_total", "_count", "_bucket"))}
    tolerant = {m["metric"] for m in BORN_TOLERANT.finditer(expr)}
    assert counters == tolerant, (counters, tolerant)
    assert "rate(" not in expr.replace("ratio_rate", "")


def test_alerts_read_counters_only_through_recording_rules() -> None:
    """No alert expression applies rate() or increase() to a counter itself: they go through the
    born-tolerant recording rules."""
    for name, rule in ALERTS.items():
        counters = {m for m in metric_names(rule["expr"]) if m.endswith(("_total", "_count", "_bucket"))}
        assert counters == set(), (name, counters)


def _counters_of(expr: str) -> set[str]:
    """The counters an expression reads, through the recording rules it uses."""
    found: set[str] = set()
    for name in metric_names(expr):
        if name in RECORDS:
            found |= _counters_of(RECORDS[name]["expr"])
        elif name.endswith(("_total", "_count", "_bucket")):
            found.add(name)
    return found


COUNTER_ALERTS = sorted(name for name, rule in ALERTS.items() if _counters_of(rule["expr"]))


def _series_name(series: str) -> str:
    return series.split("{", 1)[0]


@pytest.mark.parametrize("alertname", COUNTER_ALERTS, ids=COUNTER_ALERTS)
def test_every_counter_alert_fires_on_a_series_that_starts_absent(alertname: str) -> None:
    """Each alert on a counter has a promtool case where it fires and one of the counters it reads has
    no sample at first (`_` / `_xN`) and is then born at a burst: the alert sees that first burst."""
    counters = _counters_of(ALERTS[alertname]["expr"])
    found = []
    for path in RULE_TEST_FILES:
        for test in load_yaml(path)["tests"]:
            fires = any(
                case["alertname"] == alertname and case.get("exp_alerts")
                for case in test.get("alert_rule_test", [])
            )
            absent_first = [
                s["series"]
                for s in test["input_series"]
                if _series_name(s["series"]) in counters and str(s["values"]).split()[0].startswith("_")
            ]
            if fires and absent_first:
                found.append(test["name"])
    assert found, f"{alertname}: no promtool case fires on an absent-then-born series of {counters}"


# --- Alertmanager --------------------------------------------------------------------------------


def test_amtool_check_config_accepts_alertmanager_yml() -> None:
    """`amtool check-config alerts/alertmanager.yml` passes."""
    result = run_tool(["amtool", "check-config", str(ALERTMANAGER_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


ROUTE_CASES = [
    (["severity=critical"], "streamwarden-critical"),
    (["severity=warning"], "streamwarden-warning"),
    (["alertname=SomethingElse", "severity=info"], DEFAULT_RECEIVER),
    (["alertname=NoSeverity"], DEFAULT_RECEIVER),
]


@pytest.mark.parametrize(
    ("labels", "receiver"), ROUTE_CASES, ids=[" ".join(labels) for labels, _ in ROUTE_CASES]
)
def test_amtool_routes_by_severity(labels: list[str], receiver: str) -> None:
    """`amtool config routes test` sends critical alerts to the critical receiver and the rest to warning."""
    result = run_tool(["amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER_FILE}", *labels])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


@pytest.mark.parametrize("alertname", ALERTNAMES, ids=ALERTNAMES)
def test_every_alert_routes_to_the_receiver_of_its_severity(alertname: str) -> None:
    """Each shipped alert, with its own labels, reaches the receiver of its severity (amtool --verify.receivers)."""
    severity = ALERTS[alertname]["labels"]["severity"]
    result = run_tool(
        [
            "amtool",
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_FILE}",
            f"--verify.receivers={SEVERITY_RECEIVERS[severity]}",
            f"alertname={alertname}",
            f"severity={severity}",
            "service_name=orders",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- timing ----------------------------------------------------------------------------------------

PAGE_WITHIN = 60.0
RESOLVED_WITHIN = 60.0


def _compose_intervals() -> tuple[float, float]:
    config = load_yaml(COMPOSE_DIR / "prometheus.yml")["global"]
    return parse_duration(config["scrape_interval"]), parse_duration(config["evaluation_interval"])


def test_breaker_pages_within_60s_of_opening_with_the_shipped_timings() -> None:
    """Worst case from a breaker opening to the page, with the compose stack's 15 s scrape and evaluation:
    the scrape that sees it, the evaluation that sees the scrape, `for:`, the critical route's
    group_wait."""
    scrape, evaluation = _compose_intervals()
    rule = ALERTS["StreamwardenCircuitBreakerOpen"]
    timings = route_timings(load_yaml(ALERTMANAGER_FILE), rule["labels"])
    worst = scrape + evaluation + parse_duration(rule["for"]) + timings["group_wait"]
    assert worst <= PAGE_WITHIN, (worst, timings)
    # `for:` is a whole number of evaluations (else the page waits for the next one).
    assert parse_duration(rule["for"]) % evaluation == 0


def test_breaker_resolves_within_60s_of_closing_with_the_shipped_timings() -> None:
    """Worst case from a breaker closing to the resolved notification: the scrape and the evaluation that
    see it (Prometheus sends the resolution at once), then the group's next group_interval tick."""
    scrape, evaluation = _compose_intervals()
    rule = ALERTS["StreamwardenCircuitBreakerOpen"]
    timings = route_timings(load_yaml(ALERTMANAGER_FILE), rule["labels"])
    worst = scrape + evaluation + timings["group_interval"]
    assert worst <= RESOLVED_WITHIN, (worst, timings)
    assert "keep_firing_for" not in rule


def test_the_documented_timing_arithmetic_is_the_shipped_one() -> None:
    """alertmanager.yml and docs/operations.md state the critical route's timings and the two worst cases
    as the files make them."""
    scrape, evaluation = _compose_intervals()
    rule = ALERTS["StreamwardenCircuitBreakerOpen"]
    timings = route_timings(load_yaml(ALERTMANAGER_FILE), rule["labels"])
    page = scrape + evaluation + parse_duration(rule["for"]) + timings["group_wait"]
    resolved = scrape + evaluation + timings["group_interval"]
    for doc in (ALERTMANAGER_FILE, OPERATIONS_FILE):
        text = doc.read_text(encoding="utf-8")
        assert f"= {page:.0f} s" in text, doc.name
        assert f"= {resolved:.0f} s" in text, doc.name
        assert f"group_wait {timings['group_wait']:.0f} s" in text, doc.name
        assert f"group_interval {timings['group_interval']:.0f} s" in text, doc.name


def test_every_webhook_sends_resolved_notifications() -> None:
    """Every receiver is a webhook with send_resolved: true."""
    config = load_yaml(ALERTMANAGER_FILE)
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == set(SEVERITY_RECEIVERS.values())
    for receiver in receivers.values():
        assert receiver["webhook_configs"], receiver["name"]
        assert all(w["send_resolved"] is True for w in receiver["webhook_configs"]), receiver["name"]


INHIBITIONS = {
    "StreamwardenCircuitBreakerOpen": (
        "StreamwardenHighErrorRate",
        "StreamwardenConsumerStalled",
        "StreamwardenConsumerPendingAge",
    ),
    "StreamwardenTargetDown": ("StreamwardenMetricsAbsent",),
}


def test_inhibitions_name_existing_alerts_of_the_same_service() -> None:
    """An open breaker inhibits the error-rate, stalled-consumer and pending-age alerts of its service; a
    dead target its service's MetricsAbsent. Every alert named exists and carries the service_name the
    inhibition matches on (promtool exp_labels)."""
    rules = load_yaml(ALERTMANAGER_FILE)["inhibit_rules"]
    assert len(rules) == len(INHIBITIONS)
    for rule in rules:
        (source,) = rule["source_matchers"]
        source_name = source.removeprefix('alertname="').removesuffix('"')
        targets = INHIBITIONS[source_name]
        expected = f'alertname=~"{"|".join(targets)}"' if len(targets) > 1 else f'alertname="{targets[0]}"'
        assert rule["target_matchers"] == [expected]
        assert rule["equal"] == ["service_name"]
        for alertname in (source_name, *targets):
            assert alertname in ALERTS
            fired = [
                a
                for c in _unit_test_cases()
                if c["alertname"] == alertname
                for a in c.get("exp_alerts") or []
            ]
            assert fired
            assert all("service_name" in a["exp_labels"] for a in fired)


# --- runbooks ------------------------------------------------------------------------------------


def test_runbooks_have_one_section_per_alert_and_no_orphans() -> None:
    """docs/runbooks.md has a section for each alert, and every Streamwarden* section is a shipped alert."""
    headings = re.findall(r"^## (\S+)\s*$", RUNBOOKS_FILE.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(h for h in headings if h.startswith("Streamwarden")) == ALERTNAMES


def test_runbooks_name_the_documented_receivers() -> None:
    """The runbooks name the receivers alertmanager.yml routes to."""
    text = RUNBOOKS_FILE.read_text(encoding="utf-8")
    for receiver in SEVERITY_RECEIVERS.values():
        assert f"`{receiver}`" in text


DOCS = [RUNBOOKS_FILE, OPERATIONS_FILE]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_panels_named_in_the_docs_exist_on_the_dashboard(doc: Path) -> None:
    """Every panel named in italics in the runbooks and the operations guide is a shipped dashboard panel."""
    named = set(re.findall(r"(?<![*\w])\*([^*\n]+)\*(?![*\w])", doc.read_text(encoding="utf-8")))
    assert named
    titles = {panel["title"] for _, panel in all_dashboard_panels()}
    assert named <= titles, named - titles


REQUIRED_RUNBOOK_COMMANDS = {"dlq list", "dlq show", "dlq replay", "breakers", "metrics"}
# An invocation in inline code, or a line of a code block that starts with one.
_INVOCATION = re.compile(r"(?:^|`)streamwarden ((?:dlq )?[a-z]+)([^`\n]*)", re.M)


def _doc_commands() -> dict[tuple[str, str], set[str]]:
    """(doc, command) -> the options the doc passes to it."""
    found: dict[tuple[str, str], set[str]] = {}
    for doc in DOCS:
        for command, rest in _INVOCATION.findall(doc.read_text(encoding="utf-8")):
            options = set(re.findall(r"(?<!\S)(--?[a-z][\w-]*)", rest.split("#")[0]))
            found.setdefault((doc.name, command), set()).update(options)
    return found


DOC_COMMANDS = sorted(_doc_commands().items())


def test_runbooks_use_the_operator_commands() -> None:
    """The runbooks show `streamwarden dlq list|show|replay`, `streamwarden breakers` and `streamwarden metrics`."""
    used = {command for (doc, command), _ in DOC_COMMANDS if doc == RUNBOOKS_FILE.name}
    assert used >= REQUIRED_RUNBOOK_COMMANDS


@pytest.mark.parametrize(
    ("doc_command", "options"), DOC_COMMANDS, ids=[f"{d}:{c}" for (d, c), _ in DOC_COMMANDS]
)
def test_commands_in_the_docs_exist_in_the_cli(doc_command: tuple[str, str], options: set[str]) -> None:
    """Every `streamwarden <command> [options]` the runbooks and the operations guide show exists, with those options."""
    _, command = doc_command
    result = run_tool([str(VENV_BIN / "streamwarden"), *command.split(), "--help"])
    assert result.returncode == 0, result.stdout + result.stderr
    for option in options:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout), option
