"""SqlAnalyticsStore: the analytics sink the service uses, on SQLAlchemy (SQLite by default,
PostgreSQL in production), put together from the writer, the spill log and the reports."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from storage.analytics.records import PredictionRecord, utcnow
from storage.analytics.reports import Reports
from storage.analytics.spill import SpillLog
from storage.analytics.writer import AnalyticsWriter, upsert
from storage.db import make_engine
from storage.tables import feedback


class SqlAnalyticsStore:
    """Every prediction, feedback and error, and the reports built from them.

    A prediction row is appended to the worker's local log (spill.py: one write(2), before the
    answer) and shipped from there by the writer thread (writer.py). While the database is down
    the log grows on disk, up to `spill_max_bytes` for the folder; a dead worker's log is shipped
    by a survivor or at the next start. Every insert is `ON CONFLICT (request_id) DO NOTHING`,
    so a row sent twice is stored once, and no answered prediction is lost while the disk holds.
    """

    def __init__(
        self,
        url: str,
        store_text: bool = False,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        buffer_limit: int = 10_000,
        spill_dir: Path | str = Path("var/spill"),
        spill_max_bytes: int = 1 << 30,
        pool: tuple[int, int] = (5, 5),
    ) -> None:
        """`pool`: the engine's pool size and overflow (storage.db.make_engine)."""
        self.url = url
        self.engine = make_engine(url, *pool)
        self.spill = SpillLog(spill_dir, spill_max_bytes)
        self.writer = AnalyticsWriter(self.engine, self.spill, store_text, flush_interval, batch_size, buffer_limit)
        self.reports = Reports(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def healthy(self) -> bool:
        return self.writer.healthy

    # writes

    def start(self) -> None:
        self.writer.start()

    def record(self, records: Iterable[PredictionRecord]) -> None:
        self.writer.record(records)

    def record_error(self, endpoint: str, status: int) -> None:
        self.writer.record_error(endpoint, status)

    def record_feedback(self, request_id: str, label: str) -> None:
        ins = upsert(self.engine, feedback).values(request_id=request_id, label=label, created_at=utcnow())
        stmt = ins.on_conflict_do_update(
            index_elements=[feedback.c.request_id],
            set_={"label": ins.excluded.label, "created_at": ins.excluded.created_at},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def flush(self) -> int:
        return self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.engine.dispose()

    # reads

    def summary(self, window: timedelta) -> dict[str, Any]:
        return self.reports.summary(window)

    def ab_report(self, window: timedelta) -> dict[str, Any]:
        return self.reports.ab_report(window)

    # state

    def status(self) -> str:
        if self.dialect == "sqlite":
            return "sqlite"
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return "ok"
        except Exception:
            return "down"

    def update_gauges(self) -> None:
        self.writer.update_gauges()

    def spill_files(self) -> list[Path]:
        return self.spill.files()
