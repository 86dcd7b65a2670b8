"""Kafka consumers killed and stopped at the worst moments: nothing lost, every duplicate counted.

Real ``streamwarden consume --kafka-bootstrap`` processes on a Tansu broker, dedup records in Redis.
A dead member's partitions move to a live one after the session timeout (2 s here); the new owner reads
from the committed offsets, so whatever the dead member finished but had not committed comes back: the
dedup store answers it ``duplicate`` (completed) or ``in_progress`` (leased) until the lease runs out,
and then it is a counted takeover.
"""

from __future__ import annotations

import time

from _kafkalib import KafkaFaultRig, ids_of, ok_messages


async def test_kill_9_mid_batch_loses_nothing_and_every_rerun_is_a_counted_takeover(
    rig: KafkaFaultRig,
) -> None:
    """kill -9 with a batch in flight (one handler past its effect, one before it, others sleeping):
    the survivor gets the partitions, nothing is lost, and only the runs the dead member left unfinished
    run again, each after a counted takeover."""
    await rig.create_topic(partitions=2)
    hangers = [("after", {"action": "hang_after_effect"}), ("before", {"action": "hang_before_effect"})]
    flow = ok_messages("m", 40, sleep_ms=40)
    await rig.produce(hangers, partition=0)
    await rig.produce(flow)
    victim = rig.spawn("c1")
    await rig.wait(
        lambda: (
            len(rig.ledger().effects("after")) == 1
            and len(rig.ledger().starts("before")) == 1
            and len(rig.ledger().effects()) >= 12
        ),
        what="a batch in flight",
    )
    committed_at_kill = await rig.committed()
    victim.kill()
    assert committed_at_kill[0] == 0, "nothing of partition 0 is committed past the unfinished 'after'"

    rig.release()
    survivor = rig.spawn("c2")
    await rig.wait(rig.settled, timeout=40, what="the group committed every record")
    await rig.stop_all()

    ledger = await rig.assert_oracle()
    assert [e["pid"] for e in ledger.effects("after")] == [victim.pid, survivor.pid]
    assert [s["pid"] for s in ledger.starts("before")] == [victim.pid, survivor.pid]
    assert [e["pid"] for e in ledger.effects("before")] == [survivor.pid]
    assert ledger.takeovers("after") == 1 == ledger.takeovers("before")
    counters = await rig.counters()
    assert counters["dedup_takeovers"] == ledger.takeovers(), "the survivor exited gracefully: all flushed"
    assert ledger.duplicate_executions() <= ledger.takeovers()
    assert survivor.proc.returncode == 0, survivor.stderr()


async def test_sigterm_mid_effect_commits_nothing_unfinished_and_keeps_the_claims(
    rig: KafkaFaultRig,
) -> None:
    """SIGTERM with work in flight: exit in time, commit only below the first unfinished record, keep
    the claims of what started; the next member takes those over after the lease (counted), and the
    finished records behind the gap come back as duplicates, not as second runs."""
    await rig.create_topic(partitions=1)
    after = [(f"after{i}", {"action": "hang_after_effect"}) for i in range(2)]
    before = [(f"before{i}", {"action": "hang_before_effect"}) for i in range(2)]
    quick = ok_messages("ok", 4)
    await rig.produce(after + before + quick)
    lease = {"STREAMWARDEN_PROCESSING_TIMEOUT": "5", "STREAMWARDEN_DEDUP_LEASE": "6"}
    first = rig.spawn("c1", shutdown_timeout=0.5, settings=lease)
    await rig.wait(
        lambda: len(rig.ledger().effects()) == 6 and len(rig.ledger().starts()) == 8, what="all 8 in flight"
    )

    started = time.monotonic()
    first.sigterm()
    await rig.wait(lambda: not first.alive(), timeout=15, what="c1 exited")
    elapsed = time.monotonic() - started
    # deadline: the current poll (0.1 s) + shutdown_timeout (0.5 s) + cancelling + leaving the group
    assert elapsed < 0.5 + 4.5, f"took {elapsed:.2f}s to stop"
    assert first.proc.returncode == 0, first.stderr()
    assert "abandoned 4 in-flight messages" in first.stderr()
    assert first.stats_line()["acked"] == 4, "the 4 quick ones finished (acknowledged, not committable)"
    assert await rig.committed() == {0: 0}, "offset 0 never finished: nothing may be committed"
    for mid in ids_of(after + before):
        assert (await rig.dedup_record(mid))["s"] == "p", "the claim is kept, not given back"

    rig.release()
    second = rig.spawn("c2", settings=lease)
    await rig.wait(rig.settled, timeout=30, what="the group committed every record")
    await rig.stop_all()

    ledger = await rig.assert_oracle()
    counters = await rig.counters()
    assert counters["dedup_takeovers"] == 4 == ledger.takeovers()
    assert ledger.duplicate_executions() == 2 == sum(ledger.takeovers(mid) for mid in ids_of(after))
    assert ledger.duplicate_invocations() == 4
    assert {mid: len(ledger.starts(mid)) for mid in ids_of(quick)} == dict.fromkeys(ids_of(quick), 1)
    assert second.stats_line()["outcomes"].get("duplicate", 0) >= 4, "the quick ones came back as duplicates"
