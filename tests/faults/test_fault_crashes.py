"""Consumer processes killed, frozen and stopped at the worst moments: nothing lost, every duplicate counted.

Scenarios 1-4 and 10 of issue 4 (see docs/faults.md). Takeovers are read from the counters hash after
the surviving consumers exited gracefully (they flush at exit), and cross-checked with the takeover
lines the consumers wrote to the ledger.
"""

from __future__ import annotations

import signal
import time

from _faultlib import FaultRig, ids_of, ok_messages


async def test_kill_between_effect_and_completion_runs_it_twice_and_counts_one_takeover(
    rig: FaultRig,
) -> None:
    """kill -9 after the side effect, before the completion mark: a takeover after the lease, 2 executions."""
    await rig.create_group()
    victim = rig.spawn("c1")
    await rig.produce([("hang", {"action": "hang_after_effect"})])
    await rig.wait(lambda: len(rig.ledger().effects("hang")) == 1)
    victim.kill()
    record = await rig.dedup_record("hang")
    assert record["s"] == "p", "the victim died holding the lease, before the completion mark"
    lease_deadline = int(record["e"]) / 1000

    rig.release()
    survivor = rig.spawn("c2")
    others = ok_messages("ok", 5)
    await rig.produce(others)
    await rig.wait(lambda: rig.ledger().executed_ids() >= {"hang", *ids_of(others)})
    await rig.wait(rig.settled)
    await rig.stop_all()

    ledger = rig.ledger()
    executions = ledger.effects("hang")
    assert [e["pid"] for e in executions] == [victim.pid, survivor.pid]
    assert executions[1]["t"] >= lease_deadline, "the takeover waited for the lease to expire"
    counters = await rig.counters()
    assert counters["dedup_takeovers"] == 1 == ledger.takeovers()
    assert ledger.duplicate_executions() == counters["dedup_takeovers"]
    assert await rig.lost(["hang", *ids_of(others)]) == set()
    assert await rig.pending() == []


async def test_kill_after_the_effect_before_the_group_commit_is_one_counted_takeover(rig: FaultRig) -> None:
    """kill -9 after the effect, before the group commit (completion + XACK in one script) was sent: the
    record stays leased and the entry pending; after the lease the redelivery is one counted takeover."""
    await rig.create_group()
    victim = rig.spawn("c1")
    [entry] = await rig.produce([("acked-late", {"action": "die_before_ack"})])
    await rig.wait(lambda: not victim.alive())
    assert victim.proc.returncode == -9
    assert (await rig.dedup_record("acked-late"))["s"] == "p", "the completion died with the process"
    assert [p["entry"] for p in await rig.pending()] == [entry], "and so did the acknowledgement"

    survivor = rig.spawn("c2")
    await rig.wait(rig.settled)
    await rig.stop_all()

    ledger = rig.ledger()
    assert [e["pid"] for e in ledger.effects("acked-late")] == [victim.pid, survivor.pid]
    counters = await rig.counters()
    assert counters["dedup_takeovers"] == 1 == ledger.takeovers() == ledger.duplicate_executions()
    outcomes = survivor.stats_line()["outcomes"]  # redeliveries before the lease ran out: in progress
    assert outcomes["processed"] == 1
    assert set(outcomes) <= {"processed", "in_progress"}


async def test_kill_mid_handler_waits_for_the_lease_then_exactly_one_takeover(rig: FaultRig) -> None:
    """kill -9 before the side effect: nobody runs it until the lease expires, then one takeover runs it once."""
    await rig.create_group()
    victim = rig.spawn("c1")
    await rig.produce([("mid", {"action": "hang_before_effect"})])
    await rig.wait(lambda: len(rig.ledger().starts("mid")) == 1)
    lease_deadline = int((await rig.dedup_record("mid"))["e"]) / 1000
    victim.kill()

    rig.release()
    survivor = rig.spawn("c2")
    await rig.wait(lambda: "mid" in rig.ledger().executed_ids())
    await rig.wait(rig.settled)
    await rig.stop_all()

    ledger = rig.ledger()
    starts = ledger.starts("mid")
    assert [s["pid"] for s in starts] == [victim.pid, survivor.pid]
    assert starts[1]["t"] >= lease_deadline, "no one ran it while the dead owner's lease was valid"
    assert [e["pid"] for e in ledger.effects("mid")] == [survivor.pid]
    counters = await rig.counters()
    # the takeover is a *possible* duplicate: the handler was entered twice, its effect happened once
    assert counters["dedup_takeovers"] == 1 == ledger.takeovers() == len(starts) - 1
    assert ledger.duplicate_executions() == 0
    assert (await rig.dedup_record("mid"))["f"] == "2"


async def test_sigstop_past_the_lease_the_stale_owner_cannot_complete(rig: FaultRig) -> None:
    """SIGSTOP past the lease, right after the effect: another consumer takes over and runs it again (a
    counted takeover); the resumed owner can neither complete nor acknowledge it as its own."""
    await rig.create_group()
    stale = rig.spawn("c1")
    await rig.produce([("frozen", {"action": "hang_after_effect"})])
    await rig.wait(lambda: len(rig.ledger().effects("frozen")) == 1)
    stale.sigstop()

    fresh = rig.spawn("c2")
    await rig.wait(lambda: any(s["pid"] == fresh.pid for s in rig.ledger().starts("frozen")))
    rig.release()
    await rig.wait(rig.settled)
    assert [e["pid"] for e in rig.ledger().effects("frozen")] == [stale.pid, fresh.pid]

    # resumed: its attempt timed out while it was stopped, or it finishes and its completion is refused
    stale.sigcont()
    others = ok_messages("after", 6)
    await rig.produce(others)
    await rig.wait(lambda: rig.ledger().executed_ids() >= set(ids_of(others)))
    await rig.wait(rig.settled)
    await rig.stop_all()

    ledger = rig.ledger()
    counters = await rig.counters()
    assert counters["dedup_takeovers"] == 1 == ledger.takeovers()
    assert counters["dedup_leases_lost"] == 1, "the stale owner found its lease gone"
    assert ledger.duplicate_executions() == 1 == counters["dedup_takeovers"]
    assert all(n == 1 for i, n in ledger.effect_counts().items() if i != "frozen")
    record = await rig.dedup_record("frozen")
    assert (record["s"], record["f"]) == ("c", "2"), "the record is the new owner's completion"
    assert await rig.pending() == []


async def test_sigterm_mid_effect_every_duplicate_is_a_counted_takeover(rig: FaultRig) -> None:
    """SIGTERM with work in flight: exit in time, ack only finished work, keep the claims of what started.

    Two handlers are past their effect, two before it, when SIGTERM comes. Nothing unfinished is
    acknowledged; their claims are not released (before issue 9 they were, and the next consumer re-ran
    them at once: an uncounted duplicate). The next consumer takes them over after the lease: duplicate
    executions == counted takeovers of the ones past their effect, duplicate invocations == all takeovers.
    """
    await rig.create_group()
    after = [(f"after{i}", {"action": "hang_after_effect"}) for i in range(2)]
    before = [(f"before{i}", {"action": "hang_before_effect"}) for i in range(2)]
    quick = ok_messages("ok", 4)
    entries = dict(
        zip(ids_of(after + before + quick), await rig.produce(after + before + quick), strict=True)
    )
    lease = {"STREAMWARDEN_PROCESSING_TIMEOUT": "5", "STREAMWARDEN_DEDUP_LEASE": "6"}
    first = rig.spawn("c1", shutdown_timeout=0.5, settings=lease)
    await rig.wait(lambda: len(rig.ledger().effects()) == 6 and len(rig.ledger().starts()) == 8)
    await rig.wait(lambda: _acked_count(rig, 4))

    started = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(30)
    elapsed = time.monotonic() - started
    # deadline: the current XREADGROUP block (0.1 s) + shutdown_timeout (0.5 s) + cancelling
    assert elapsed < 0.5 + 2.5, f"took {elapsed:.2f}s to stop"
    assert first.proc.returncode == 0, first.stderr()
    assert "abandoned 4 in-flight messages" in first.stderr()
    assert first.stats_line()["acked"] == 4
    unfinished = ids_of(after + before)
    assert {p["entry"] for p in await rig.pending()} == {entries[mid] for mid in unfinished}
    await rig.assert_no_unprocessed_acked()
    for mid in unfinished:
        assert (await rig.dedup_record(mid))["s"] == "p", "the claim is kept, not given back"

    rig.release()
    rig.spawn("c2", settings=lease)
    await rig.wait(lambda: rig.ledger().executed_ids() == set(entries), timeout=30)
    await rig.wait(rig.settled)
    await rig.stop_all()
    ledger = rig.ledger()
    counters = await rig.counters()
    assert counters["dedup_takeovers"] == 4 == ledger.takeovers()
    assert ledger.duplicate_executions() == 2 == sum(ledger.takeovers(mid) for mid in ids_of(after))
    assert ledger.duplicate_invocations() == counters["dedup_takeovers"]
    assert await rig.lost(entries) == set()


async def test_two_consumers_never_run_one_id_at_the_same_time(rig: FaultRig) -> None:
    """Two consumers reclaim 64 orphaned entries: no id runs twice, no takeover, no overlapping runs.

    Before issue 9 a reclaim took a whole batch and claimed every lease up front; the leases ran out while
    the entries waited for slots, the other consumer took them over, and both ran the same ids at once.
    """
    await rig.create_group()
    messages = ok_messages("o", 64, sleep_ms=300)  # 64 x 0.3 s on 4 slots: longer than the 2 s lease
    await rig.produce(messages)
    await rig.client.xreadgroup(rig.group, "dead", {rig.stream: ">"}, count=64)  # read, then "crashed"
    for name in ("c1", "c2"):
        rig.spawn(name, concurrency=4, batch_size=64, claim_every=0.1, claim_idle_ms=600)
    await rig.wait(rig.settled, timeout=60)
    await rig.stop_all()

    ledger = rig.ledger()
    counters = await rig.counters()
    assert ledger.overlapping_runs() == []
    assert ledger.duplicate_executions() == 0
    assert counters["dedup_takeovers"] == 0 == ledger.takeovers(), "nobody died: nothing to take over"
    assert counters["dedup_leases_lost"] == 0
    assert ledger.executed_ids() == set(ids_of(messages))


async def _acked_count(rig: FaultRig, count: int) -> bool:
    await rig.assert_no_unprocessed_acked()
    return len(await rig.acked_message_ids()) == count


async def test_kill_after_dlq_write_before_xack_does_not_dead_letter_twice(rig: FaultRig) -> None:
    """kill -9 between the confirmed DLQ write and XACK: the redelivery neither re-runs nor re-dead-letters."""
    await rig.create_group()
    victim = rig.spawn("c1")
    await rig.produce([("doomed", {"action": "fail_permanent", "die_before_ack": True})])
    await rig.wait(lambda: not victim.alive())
    assert len(await rig.dlq()) == 1, "dead-lettered, then killed before XACK"

    rig.spawn("c2")
    await rig.wait(rig.settled)
    await rig.stop_all()
    ledger = rig.ledger()
    counters = await rig.counters()
    assert len(await rig.dlq()) == 1
    assert len(ledger.starts("doomed")) - 1 == counters["dedup_takeovers"]
