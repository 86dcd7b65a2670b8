"""The PromQL helpers the lint tests rely on find what they should (so the lint can fail)."""

from __future__ import annotations

import pytest
from _opslib import counters_outside_rate, github_anchor, metric_names, promql_regex_literal, range_windows

NAME_CASES = [
    ('sum by (le) (rate(foo_bucket{a="b", c=~"$x"}[$__rate_interval]))', {"foo_bucket"}),
    ("a:b:rate5m / on (service_name) group_left (x) c_total > 0.5 and d", {"a:b:rate5m", "c_total", "d"}),
    ('max by (s) (g{state="open"} > 0) * 2 or (g{state="by"} > 0) * 1', {"g"}),
    ("histogram_quantile(0.99, sum without (instance) (rate(h_bucket[5m] offset 1h)))", {"h_bucket"}),
    ("(sum(rate(x_total[1m])) or vector(0)) / sum(rate(x_total[1m]))", {"x_total"}),
    ("1e3 * deriv(lag[10m]) >= 0 unless ignoring (a) other", {"lag", "other"}),
]


@pytest.mark.parametrize(("expr", "names"), NAME_CASES, ids=[c[0][:40] for c in NAME_CASES])
def test_metric_names_finds_selected_metrics_only(expr: str, names: set[str]) -> None:
    """metric_names returns metric names, not functions, keywords, labels, strings or durations."""
    assert metric_names(expr) == names


RATE_CASES = [
    ("rate(a_total[5m])", []),
    ('increase(a_total{x="y_total"}[5m])', []),
    ("sum(a_total)", ["a_total"]),
    ("a_bucket", ["a_bucket"]),
    ("rate(a_sum[5m]) / a_count", ["a_count"]),
    ("irate(a_total[5m])", ["a_total"]),
    ("max_over_time(a_total[5m])", ["a_total"]),
    ("rate(a_total[5m]) + gauge", []),
]


@pytest.mark.parametrize(("expr", "bad"), RATE_CASES, ids=[c[0] for c in RATE_CASES])
def test_counters_outside_rate_flags_raw_counters(expr: str, bad: list[str]) -> None:
    """counters_outside_rate flags _total/_bucket/_count/_sum series not directly under rate()/increase()."""
    assert counters_outside_rate(expr) == bad


def test_range_windows_lists_every_window() -> None:
    """range_windows returns the inside of every range selector, ignoring brackets in strings."""
    assert range_windows('rate(a[5m]) / rate(b{x="[1h]"}[$__rate_interval])') == ["5m", "$__rate_interval"]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("StreamwardenHighErrorRate", "streamwardenhigherrorrate"),
        ("What it means, and why!", "what-it-means-and-why"),
    ],
    ids=["alert", "punctuation"],
)
def test_github_anchor_matches_github_slugs(heading: str, anchor: str) -> None:
    """github_anchor lowercases, drops punctuation and turns spaces into hyphens, as GitHub does."""
    assert github_anchor(heading) == anchor


def test_promql_regex_literal_escapes_regex_metacharacters() -> None:
    """Regex metacharacters of a label value are escaped for a double-quoted PromQL string."""
    assert promql_regex_literal("orders.v1-(eu)") == "orders\\\\.v1-\\\\(eu\\\\)"
