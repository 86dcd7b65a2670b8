"""Signals that tell the truth in an incident (the parts of issue 10 that live in the layer)."""

from __future__ import annotations

from typing import Any

import pytest

import streamwarden as sw
from _support import Clock, Otel, RecordingSleep, build_layer
from streamwarden import _names as n


async def ok(message: Any) -> str:
    return "ok"


async def broken(message: Any) -> str:
    raise ValueError("bad message")


def layer_for(otel: Otel, clock: Clock, sleep: RecordingSleep, **settings: Any) -> sw.ReliabilityLayer:
    settings.setdefault("retry_jitter", False)
    return build_layer(None, otel, clock=clock, sleep=sleep, **settings)


def series(otel: Otel, metric: str) -> list[tuple[dict[str, Any], Any]]:
    return otel.points(metric)


async def test_rare_event_counters_exist_at_zero_before_the_first_event(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """DLQ write errors, invalid messages and every breaker transition and rejection are exported at 0
    as soon as a destination and a breaker exist, so increase() sees the first burst (a series born at
    10 reads as no increase at all)."""
    layer = layer_for(otel, clock, sleep)
    assert (await layer.process({"id": "a"}, ok)).outcome is sw.Outcome.PROCESSED
    write_errors = series(otel, n.METRIC_DLQ_WRITE_ERRORS)
    assert [(attrs[n.ATTR_MESSAGING_DESTINATION], value) for attrs, value in write_errors] == [("default", 0)]
    invalid = {attrs[n.ATTR_DLQ_REASON]: value for attrs, value in series(otel, n.METRIC_INVALID_MESSAGES)}
    assert invalid == {"invalid_message": 0, "missing_id": 0}
    transitions = {
        (attrs[n.ATTR_BREAKER_FROM], attrs[n.ATTR_BREAKER_TO]): value
        for attrs, value in series(otel, n.METRIC_BREAKER_TRANSITIONS)
    }
    assert transitions == {(a, b): 0 for a in sw.BreakerState for b in sw.BreakerState if a != b}
    assert [value for _, value in series(otel, n.METRIC_BREAKER_REJECTIONS)] == [0]
    layer.circuit_breaker.force_open(5.0)
    assert (
        otel.value(
            n.METRIC_BREAKER_TRANSITIONS,
            streamwarden__circuit_breaker__from="closed",
            streamwarden__circuit_breaker__to="open",
        )
        == 1
    )


async def test_latency_histogram_measures_handler_work_only(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """Duplicates, breaker refusals and invalid messages add no latency sample: during an outage the
    latency panel must not look faster than normal because refusals take ~0 s."""
    layer = layer_for(otel, clock, sleep, max_retries=0)
    await layer.process({"id": "a"}, ok)
    await layer.process({"id": "a"}, ok)  # duplicate
    await layer.process({"nothing": 1}, ok)  # invalid: no id
    layer.circuit_breaker.force_open(60.0)
    assert (await layer.process({"id": "b"}, ok)).outcome is sw.Outcome.DEFERRED
    assert otel.value(n.METRIC_PROCESS_DURATION) == 1
    layer.circuit_breaker.force_close()
    assert (await layer.process({"id": "c"}, broken)).outcome is sw.Outcome.DEAD_LETTERED
    assert otel.value(n.METRIC_PROCESS_DURATION) == 2  # a failed run is handler work too


@pytest.mark.parametrize(
    ("handler", "repeat", "outcome"),
    [(ok, False, "processed"), (ok, True, "duplicate"), (broken, False, "dead_lettered")],
    ids=["processed", "duplicate", "dead_lettered"],
)
async def test_process_span_carries_the_outcome(
    otel: Otel, clock: Clock, sleep: RecordingSleep, handler: Any, repeat: bool, outcome: str
) -> None:
    """Every process span carries streamwarden.outcome, so traces can be searched for deferred or
    dead-lettered messages."""
    layer = layer_for(otel, clock, sleep, max_retries=0)
    await layer.process({"id": "m"}, handler)
    if repeat:
        await layer.process({"id": "m"}, handler)
    last = otel.spans("process default")[-1]
    assert last.attributes is not None
    assert last.attributes[n.ATTR_OUTCOME] == outcome


async def test_duplicate_and_in_progress_events_say_what_the_claim_answered(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """The duplicate and in-progress span events carry the dedup result."""
    layer = layer_for(otel, clock, sleep)
    await layer.process({"id": "d"}, ok)
    await layer.process({"id": "d"}, ok)
    (duplicate,) = otel.events(n.EVENT_DEDUP_DUPLICATE)
    assert dict(duplicate.attributes or {}) == {n.ATTR_DEDUP_RESULT: "duplicate"}
    stale = await layer.dedup_store.claim("held", 60.0)
    assert stale.status is sw.ClaimStatus.NEW
    await layer.process({"id": "held"}, ok)
    (in_progress,) = otel.events(n.EVENT_DEDUP_IN_PROGRESS)
    assert dict(in_progress.attributes or {}) == {n.ATTR_DEDUP_RESULT: "in_progress"}


async def test_two_layers_of_one_service_share_their_breaker(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """Two layers of one service in one process name one dependency's breaker: it is one breaker, so
    when it opens the other layer stops calling the failing dependency too."""
    first = layer_for(otel, clock, sleep)
    second = layer_for(otel, clock, sleep)
    assert first.circuit_breaker is second.circuit_breaker
    first.circuit_breaker.force_open(30.0)
    assert (await second.process({"id": "s"}, ok)).outcome is sw.Outcome.DEFERRED


async def test_breakers_of_one_name_in_separate_registries_report_one_state(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """Layers given registries of their own (breakers=) still export one state per breaker name, the
    least healthy: never closed=1 and open=1 at once for one name."""
    first = layer_for(otel, clock, sleep, breakers=sw.BreakerRegistry(clock=clock))
    second = layer_for(otel, clock, sleep, breakers=sw.BreakerRegistry(clock=clock))
    assert first.circuit_breaker is not second.circuit_breaker
    second.circuit_breaker.force_open(30.0)
    status = {
        attrs[n.ATTR_BREAKER_STATE]: value
        for attrs, value in otel.points(n.METRIC_BREAKER_STATUS)
        if attrs[n.ATTR_BREAKER_NAME] == "default"
    }
    assert status == {"closed": 0, "open": 1, "half_open": 0}


async def test_retry_outcomes_say_whether_retries_helped(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """streamwarden.retry.outcomes counts messages whose first attempt failed: succeeded after a retry,
    or exhausted (dead-lettered here); both series exist at 0 first."""
    layer = layer_for(otel, clock, sleep, max_retries=1)
    await layer.process({"id": "fine"}, ok)
    outcomes = {attrs[n.ATTR_RETRY_RESULT]: value for attrs, value in otel.points(n.METRIC_RETRY_OUTCOMES)}
    assert outcomes == {"succeeded": 0, "exhausted": 0}
    calls = 0

    async def flaky(message: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("blip")
        return "ok"

    assert (await layer.process({"id": "flaky"}, flaky)).outcome is sw.Outcome.PROCESSED
    assert (await layer.process({"id": "down"}, broken)).outcome is sw.Outcome.DEAD_LETTERED  # permanent
    assert (
        await layer.process({"id": "gone"}, _always(ConnectionError("down")))
    ).outcome is sw.Outcome.DEAD_LETTERED
    outcomes = {attrs[n.ATTR_RETRY_RESULT]: value for attrs, value in otel.points(n.METRIC_RETRY_OUTCOMES)}
    assert outcomes == {"succeeded": 1, "exhausted": 2}


def _always(error: BaseException) -> Any:
    async def handler(message: Any) -> str:
        raise error

    return handler


async def test_breaker_gauges_show_failures_against_threshold_and_time_to_half_open(
    otel: Otel, clock: Clock, sleep: RecordingSleep
) -> None:
    """The breaker's counted failures, its threshold and the seconds until a half-open trial are gauges,
    so a panel can show how close it is to opening and when it will try again."""
    layer = layer_for(
        otel, clock, sleep, max_retries=0, circuit_breaker_threshold=3, circuit_breaker_timeout=30
    )

    def gauge(metric: str) -> Any:
        (point,) = [v for attrs, v in otel.points(metric) if attrs[n.ATTR_BREAKER_NAME] == "default"]
        return point

    await layer.process({"id": "x1"}, _always(ConnectionError("down")))
    assert (gauge(n.METRIC_BREAKER_FAILURES), gauge(n.METRIC_BREAKER_THRESHOLD)) == (1, 3)
    assert gauge(n.METRIC_BREAKER_RETRY_AFTER) == 0
    layer.circuit_breaker.force_open(30.0)
    clock.advance(10)
    assert gauge(n.METRIC_BREAKER_RETRY_AFTER) == pytest.approx(20.0)
