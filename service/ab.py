"""A/B variant assignment: sticky per user, random for anonymous requests."""

from __future__ import annotations

import hashlib
import random
from typing import Literal

Variant = Literal["A", "B"]


def bucket(experiment: str, user_id: str) -> float:
    """A stable number in [0, 1) for this user in this experiment (same on every worker)."""
    digest = hashlib.sha256(f"{experiment}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(experiment: str, user_id: str | None, split: float, rng: random.Random | None = None) -> Variant:
    """ "B" for a `split` share of users, "A" for the rest."""
    point = bucket(experiment, user_id) if user_id is not None else (rng or random).random()
    return "B" if point < split else "A"
