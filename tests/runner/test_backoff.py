"""ExponentialBackoff: the runner's injectable back-off (capped, full jitter, seeded RNG)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamwarden._retry import Backoff, ExponentialBackoff


def test_bounds_double_up_to_the_cap() -> None:
    """Without jitter the delay after n failures is min(cap, base * 2 ** (n - 1))."""
    backoff = ExponentialBackoff(base=0.05, cap=0.3, jitter=False)
    assert [backoff.compute(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.3, 0.3, 0.3]
    assert isinstance(backoff, Backoff)


def test_full_jitter_draws_from_the_injected_random() -> None:
    """With jitter each delay is uniform in [0, bound], drawn from the given random.Random."""
    draws = [ExponentialBackoff(base=0.05, cap=5, rng=random.Random(42)).compute(3) for _ in range(2)]
    assert draws[0] == draws[1] == random.Random(42).uniform(0.0, 0.2)


@settings(max_examples=200, deadline=None)
@given(
    failures=st.integers(min_value=1, max_value=10**6),
    base=st.floats(min_value=1e-4, max_value=10),
    extra=st.floats(min_value=0, max_value=100),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_every_delay_is_within_zero_and_the_cap(failures: int, base: float, extra: float, seed: int) -> None:
    """Any failure count (even a million: no overflow) gives a finite delay in [0, min(cap, bound)]."""
    backoff = ExponentialBackoff(base=base, cap=base + extra, rng=random.Random(seed))
    delay = backoff.compute(failures)
    assert math.isfinite(delay)
    assert 0.0 <= delay <= backoff.cap_for(failures) <= base + extra


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (math.nan, 1), (1, 0.5), (1, math.inf)], ids=str)
def test_invalid_bounds_are_refused(base: float, cap: float) -> None:
    """A non-positive or non-finite base, or a cap below the base, is a ValueError."""
    with pytest.raises(ValueError, match=r"base|cap"):
        ExponentialBackoff(base=base, cap=cap)
