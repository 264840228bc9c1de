"""Request ids: issued ids recognised, invented ones not; random bytes drawn in chunks."""

from __future__ import annotations

import os
import uuid

import pytest

from service import request_ids
from service.request_ids import RandomBytes, RequestIds, random_uuid


def test_issued_ids_are_recognised_and_invented_ones_are_not() -> None:
    ids = RequestIds(b"k" * 32)
    issued = [ids.new() for _ in range(300)]
    assert len(set(issued)) == 300
    for rid in issued:
        parsed = uuid.UUID(rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert ids.issued(parsed)
    assert not any(ids.issued(uuid.uuid4()) for _ in range(300))
    assert not RequestIds(b"other key".ljust(32)).issued(uuid.UUID(issued[0]))


def test_random_bytes_come_from_one_draw_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(request_ids.os, "urandom", urandom)
    source = RandomBytes(chunk=64)
    parts = [source.take(16) for _ in range(8)]  # 128 bytes: two chunks
    assert draws == [64, 64]
    assert len(set(parts)) == 8 and all(len(p) == 16 for p in parts)
    assert len(source.take(100)) == 100  # more than a chunk at once
    assert draws[-1] == 100


def test_random_uuids_are_version_4_and_distinct() -> None:
    made = {random_uuid() for _ in range(1000)}
    assert len(made) == 1000
    assert all(uuid.UUID(u).version == 4 for u in made)
