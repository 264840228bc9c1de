"""Variant assignment: sticky, split as configured, independent of the worker."""

from __future__ import annotations

import random

import pytest

from service.ab import assign, bucket


@pytest.mark.parametrize("split", [0.5, 0.2, 0.0, 1.0])
def test_split_ratio_over_ten_thousand_users(split: float) -> None:
    ids = [f"user-{i}" for i in range(10_000)]
    share_b = sum(assign("exp", u, split) == "B" for u in ids) / len(ids)
    # binomial standard deviation at n=10,000 is at most 0.005; allow four of them
    assert share_b == pytest.approx(split, abs=0.02)


def test_assignment_is_sticky_and_depends_on_experiment() -> None:
    ids = [f"user-{i}" for i in range(2000)]
    first = [assign("exp", u, 0.5) for u in ids]
    assert [assign("exp", u, 0.5) for u in ids] == first
    other = [assign("other-exp", u, 0.5) for u in ids]
    assert other != first  # a new experiment reshuffles users
    assert all(0.0 <= bucket("exp", u) < 1.0 for u in ids[:100])


def test_anonymous_requests_are_random() -> None:
    rng = random.Random(3)
    picks = [assign("exp", None, 0.5, rng) for _ in range(2000)]
    assert 0.45 < picks.count("B") / len(picks) < 0.55
