"""The offset tracker against a model: the commit point never passes a record that is not done, never
goes back, and reaches the end once every record read is done (hypothesis state machine)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from streamwarden._runners._kafka import OffsetTracker


class TrackerModel(RuleBasedStateMachine):
    """Reads with gaps (compaction), completions in any order, give-backs and redeliveries, commits."""

    @initialize(start=st.integers(0, 1000))
    def start(self, start: int) -> None:
        self.tracker = OffsetTracker(start)
        self.next = start
        self.busy: set[int] = set()
        self.held: set[int] = set()
        self.done: set[int] = set()
        self.last_point = start
        self.last_committed = start

    @rule(gap=st.integers(0, 3), count=st.integers(1, 4))
    def read(self, gap: int, count: int) -> None:
        for i in range(count):
            offset = self.next + (gap if i == 0 else 0)
            self.tracker.read(offset)
            self.busy.add(offset)
            self.next = offset + 1

    @precondition(lambda self: self.busy or self.held)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.busy | self.held)))
        assert self.tracker.done(offset)
        self.busy.discard(offset)
        self.held.discard(offset)
        self.done.add(offset)

    @precondition(lambda self: self.busy)
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.busy)))
        assert self.tracker.hold(offset)
        self.busy.remove(offset)
        self.held.add(offset)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.held)))
        assert self.tracker.retry(offset)
        self.held.remove(offset)
        self.busy.add(offset)

    @rule(offset=st.integers(-5, 2000))
    def stray_ack(self, offset: int) -> None:
        """An ack of a record that is not open (stale, repeated, never read) changes nothing."""
        if offset in self.busy or offset in self.held:
            return
        assert not self.tracker.done(offset)
        assert not self.tracker.hold(offset)
        assert not self.tracker.retry(offset)

    @rule()
    def commit(self) -> None:
        point = self.tracker.committable()
        if point is not None:
            self.tracker.mark_committed(point)

    @invariant()
    def never_past_an_open_record(self) -> None:
        open_offsets = self.busy | self.held
        point = self.tracker.commit_point
        if open_offsets:
            assert point == min(open_offsets)
            assert self.tracker.committed <= min(open_offsets)
        else:
            assert point == self.next  # everything read is done: the end
        assert point >= self.last_point
        assert self.tracker.committed >= self.last_committed
        self.last_point = point
        self.last_committed = self.tracker.committed

    @invariant()
    def counts(self) -> None:
        assert self.tracker.open == len(self.busy) + len(self.held)
        assert self.tracker.busy == len(self.busy)
        assert self.tracker.last_read == self.next


TestTrackerModel = TrackerModel.TestCase
TestTrackerModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.permutations(range(30)))
def test_any_completion_order_reaches_the_end(order: list[int]) -> None:
    """Whatever order 30 records finish in, the commit point is the first unfinished one, then 30."""
    tracker = OffsetTracker(0)
    for offset in range(30):
        tracker.read(offset)
    finished: set[int] = set()
    for offset in order:
        tracker.done(offset)
        finished.add(offset)
        expected = min(set(range(30)) - finished, default=30)
        assert tracker.commit_point == expected
    assert tracker.committable() == 30


def test_offsets_must_ascend() -> None:
    """Reading an offset below the last one read is refused (the transport starts a new tracker)."""
    tracker = OffsetTracker(5)
    tracker.read(7)
    with pytest.raises(ValueError, match="ascend"):
        tracker.read(6)
    with pytest.raises(ValueError, match="ascend"):
        OffsetTracker(5).read(4)


def test_start_counts_as_committed() -> None:
    """Nothing to commit until a record past the start is done; a gap in offsets is no hole."""
    tracker = OffsetTracker(10)
    assert tracker.committable() is None
    tracker.read(10)
    tracker.read(13)  # 11, 12 compacted away
    assert tracker.committable() is None
    tracker.done(13)
    assert tracker.committable() is None  # 10 still open
    tracker.done(10)
    assert tracker.committable() == 14
    tracker.mark_committed(14)
    tracker.mark_committed(12)  # a late, lower commit answer never moves it back
    assert tracker.committed == 14
    assert tracker.committable() is None
