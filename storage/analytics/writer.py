"""The analytics writer: prediction rows and error counts, off the request path.

Records go to an in-memory buffer that a background thread flushes in batches with
`INSERT ... ON CONFLICT DO NOTHING` on the request id, so a record written twice is stored once,
and only the rows newly stored are added to the per-minute and per-hour `prediction_counts`.
While the database is down, rows beyond `buffer_limit` go to the spill log (spill.py), which is
replayed once the database answers again, and at the next start.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import Engine, Table
from sqlalchemy.dialects import postgresql, sqlite

from storage.analytics.records import PredictionRecord, utcnow
from storage.analytics.spill import Row, SpillLog
from storage.tables import prediction_counts, predictions, request_errors

log = logging.getLogger(__name__)

ANALYTICS_ROWS = Counter(
    "sentiment_analytics_rows_total",
    "Prediction rows by outcome: written to the database, spilled to disk, replayed from disk.",
    ["outcome"],
)
for _outcome in ("written", "spilled", "replayed"):
    ANALYTICS_ROWS.labels(_outcome)
ANALYTICS_BUFFERED = Gauge(
    "sentiment_analytics_buffered_rows",
    "Prediction rows waiting in memory for the database, summed over live workers.",
    multiprocess_mode="livesum",
)
ANALYTICS_SPILL_BYTES = Gauge(
    "sentiment_analytics_spill_bytes",
    "Bytes in the analytics spill files waiting to be replayed (one directory for all workers).",
    multiprocess_mode="livemax",
)


def upsert(engine: Engine, table: Table) -> Any:
    """The dialect's INSERT with ON CONFLICT (SQLite and PostgreSQL share the syntax)."""
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)


class AnalyticsWriter:
    """A bounded buffer of prediction rows and a thread that writes it, spilling on outage."""

    def __init__(
        self,
        engine: Engine,
        spill: SpillLog,
        store_text: bool = False,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        buffer_limit: int = 10_000,
    ) -> None:
        self.engine = engine
        self.spill = spill
        self.store_text = store_text
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._buffer: deque[Row] = deque()
        self._errors: deque[Row] = deque()
        self._buffer_limit = buffer_limit
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._healthy = True
        self._thread: threading.Thread | None = None
        self.spilled = 0
        self.replayed = 0
        self.written = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="analytics-writer", daemon=True)
            self._thread.start()

    def record(self, records: Iterable[PredictionRecord]) -> None:
        rows = []
        for rec in records:
            row = asdict(rec)
            if not self.store_text:
                row["text"] = None
            rows.append(row)
        with self._lock:
            self._buffer.extend(rows)
            size = len(self._buffer)
        # Never blocks or raises on the request path: overflow is spilled by the writer thread.
        if size >= self.batch_size or size > self._buffer_limit:
            self._wake.set()

    def record_error(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._errors.append({"created_at": utcnow(), "endpoint": endpoint, "status": status})
            if len(self._errors) > self._buffer_limit:
                self._errors.popleft()  # error counts are statistics: the oldest may go

    def write(self, rows: list[Row]) -> None:
        """Insert the rows not yet stored, and count exactly those in `prediction_counts`."""
        unique = list({row["request_id"]: row for row in rows}.values())
        stmt = (
            upsert(self.engine, predictions)
            .on_conflict_do_nothing(index_elements=[predictions.c.request_id])
            .returning(predictions.c.request_id)
        )
        with self.engine.begin() as conn:
            inserted = set(conn.execute(stmt, unique).scalars())
            counts: dict[tuple, list] = {}
            for row in unique:
                if row["request_id"] in inserted:
                    rest = (row["endpoint"], row["model"], row["variant"] or "", row["label"], bool(row["cached"]))
                    minute = row["created_at"].replace(second=0, microsecond=0)
                    for period, start in ((60, minute), (3600, minute.replace(minute=0))):
                        c = counts.setdefault((period, start, *rest), [0, 0.0])
                        c[0] += 1
                        c[1] += row["score"]
            if counts:
                # Sorted keys: concurrent writers lock the count rows in one order, never deadlock.
                names = ("period_s", "period_start", "endpoint", "model", "variant", "label", "cached")
                values = [
                    {**dict(zip(names, key, strict=True)), "n": n, "score_sum": score}
                    for key, (n, score) in sorted(counts.items())
                ]
                ins = upsert(self.engine, prediction_counts)
                conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=[prediction_counts.c[name] for name in names],
                        set_={
                            "n": prediction_counts.c.n + ins.excluded.n,
                            "score_sum": prediction_counts.c.score_sum + ins.excluded.score_sum,
                        },
                    ),
                    values,
                )

    def _spill(self, rows: list[Row]) -> None:
        self.spill.append(rows)
        self.spilled += len(rows)
        ANALYTICS_ROWS.labels("spilled").inc(len(rows))

    def _spill_overflow(self) -> None:
        """Move the oldest rows beyond half the buffer limit to the spill log."""
        with self._lock:
            if len(self._buffer) <= self._buffer_limit:
                return
            excess = len(self._buffer) - self._buffer_limit // 2
            rows = [self._buffer.popleft() for _ in range(excess)]
        try:
            self._spill(rows)
        except OSError as exc:  # disk full or not writable: keep them in memory rather than lose them
            with self._lock:
                self._buffer.extendleft(reversed(rows))
            log.error("cannot write the analytics spill file %s: %s", self.spill.path, exc)

    def _replayed(self, rows: int) -> None:
        self.replayed += rows
        ANALYTICS_ROWS.labels("replayed").inc(rows)

    def _flush_errors(self) -> None:
        with self._lock:
            rows = list(self._errors)
            self._errors.clear()
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(request_errors.insert(), rows)
        except Exception:
            with self._lock:
                self._errors.extendleft(reversed(rows))

    def flush(self) -> int:
        """Write everything buffered, then any spill files; returns the prediction rows written."""
        written = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
                if not batch:
                    break
                try:
                    self.write(batch)
                except Exception as exc:
                    with self._lock:
                        self._buffer.extendleft(reversed(batch))
                    if self._healthy:
                        log.warning("analytics database unavailable, buffering: %s", exc)
                    self._healthy = False
                    self._spill_overflow()
                    return written
                written += len(batch)
            if not self._healthy:
                log.warning("analytics database back; writing buffered rows")
            self._healthy = True
            self.written += written
            ANALYTICS_ROWS.labels("written").inc(written)
            try:
                self._flush_errors()
                self.spill.replay(self.write, self.batch_size, self._replayed)
            except Exception as exc:
                self._healthy = False
                log.warning("analytics replay interrupted: %s", exc)
        return written

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("analytics writer failed; retrying")

    def close(self) -> None:
        """Stop the thread; flush what is buffered, or spill it if the database is down."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        with self._lock:
            rows = list(self._buffer)
            self._buffer.clear()
        if rows:
            self._spill(rows)

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next successful one."""
        return self._healthy

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def update_gauges(self) -> None:
        ANALYTICS_BUFFERED.set(self.buffered)
        ANALYTICS_SPILL_BYTES.set(self.spill.bytes())
