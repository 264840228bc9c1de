"""What the analytics store is given and what the service asks of it: the prediction record and
the AnalyticsStore protocol."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class PredictionRecord:
    """One answered prediction, as stored (the text itself only when configured)."""

    request_id: str
    endpoint: str
    model: str
    label: str
    score: float
    cached: bool
    latency_ms: float
    text_sha256: str
    text_length: int
    variant: str | None = None
    text: str | None = None
    created_at: datetime = field(default_factory=utcnow)


class AnalyticsStore(Protocol):
    """What the service asks of its analytics sink (SqlAnalyticsStore is the one there is)."""

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        ...

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next successful one."""
        ...

    def start(self) -> None: ...

    def record(self, records: Iterable[PredictionRecord]) -> None: ...

    def record_error(self, endpoint: str, status: int) -> None: ...

    def record_feedback(self, request_id: str, label: str) -> None: ...

    def summary(self, window: timedelta) -> dict[str, Any]: ...

    def ab_report(self, window: timedelta) -> dict[str, Any]: ...

    def status(self) -> str: ...

    def update_gauges(self) -> None: ...

    def flush(self) -> int: ...

    def close(self) -> None: ...
