"""A stateful attack on the marker design: two stores (two processes) on one broker interleave adds,
deletes and purges of two destinations; after every step both must agree with a plain model of the live
entries (count, per-destination count, list, get)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from _kafka_dlq_support import FAST, entry
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from _kafka_broker import KafkaBroker
from streamwarden._kafka import KafkaDeadLetterStore

T = TypeVar("T")
DESTINATIONS = ("orders", "payments")


class TwoStores(RuleBasedStateMachine):
    """The model: entry id -> (destination, message id) of every live entry."""

    bootstrap: ClassVar[str] = ""
    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.ns = f"m{uuid.uuid4().hex[:10]}"
        options = {**FAST, "topic_pattern": rf"{self.ns}\..+\.dlq", "partitions": 2}
        self.stores = [KafkaDeadLetterStore(self.bootstrap, **options) for _ in range(2)]
        self.live: dict[str, tuple[str, str]] = {}
        self.serial = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    def dest(self, name: str) -> str:
        return f"{self.ns}.{name}"

    @rule(target=ids, who=st.integers(0, 1), name=st.sampled_from(DESTINATIONS))
    def add(self, who: int, name: str) -> str:
        self.serial += 1
        message_id = f"id-{self.serial}"
        entry_id = self.run(self.stores[who].add(entry(self.dest(name), message_id=message_id)))
        assert entry_id not in self.live
        self.live[entry_id] = (self.dest(name), message_id)
        return entry_id

    @rule(who=st.integers(0, 1), entry_id=ids)
    def delete(self, who: int, entry_id: str) -> None:
        removed = self.run(self.stores[who].delete(entry_id))
        assert removed == (entry_id in self.live)
        self.live.pop(entry_id, None)

    @rule(who=st.integers(0, 1), name=st.none() | st.sampled_from(DESTINATIONS))
    def purge(self, who: int, name: str | None) -> None:
        destination = None if name is None else self.dest(name)
        doomed = [k for k, (d, _) in self.live.items() if destination is None or d == destination]
        assert self.run(self.stores[who].purge(destination)) == len(doomed)
        for key in doomed:
            del self.live[key]

    @rule(who=st.integers(0, 1), entry_id=ids)
    def get(self, who: int, entry_id: str) -> None:
        got = self.run(self.stores[who].get(entry_id))
        if entry_id in self.live:
            assert got is not None
            assert (got.destination, got.message_id) == self.live[entry_id]
        else:
            assert got is None

    @invariant()
    def both_stores_agree_with_the_model(self) -> None:
        for store in self.stores:
            assert self.run(store.count()) == len(self.live)
            for name in DESTINATIONS:
                expected = sum(1 for d, _ in self.live.values() if d == self.dest(name))
                assert self.run(store.count(self.dest(name))) == expected
            listed = self.run(store.list(limit=1_000))
            assert {e.entry_id: (e.destination, e.message_id) for e in listed} == self.live

    def teardown(self) -> None:
        for store in self.stores:
            self.run(store.aclose())
        self.loop.close()


def test_two_stores_agree_with_a_model(kafka_broker: KafkaBroker) -> None:
    """Whatever the interleaving of adds, deletes and purges across two stores, both see exactly the
    live entries of the model."""
    TwoStores.bootstrap = kafka_broker.bootstrap
    run_state_machine_as_test(
        TwoStores,
        settings=settings(
            max_examples=12,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
