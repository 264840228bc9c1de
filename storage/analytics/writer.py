"""The analytics writer: prediction rows and error counts, off the request path.

A prediction's row is appended to the worker's local log (spill.py) before it is answered; a
background thread ships the log to the database in batches with `INSERT ... ON CONFLICT DO
NOTHING` on the request id, so a row sent twice is stored once, and only the rows newly stored
are added to the per-minute and per-hour `prediction_counts`. While the database is down the
log grows on disk (up to SPILL_MAX_BYTES) and is shipped once it is back; a dead worker's log is
shipped by a survivor or at the next start. A row the database refuses as data (not as a lost
connection) is set aside in a dead-letter file, so one bad row never stalls the rest.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge
from sqlalchemy import Connection, Engine, Table
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from storage.analytics.records import PredictionRecord, utcnow
from storage.analytics.spill import Row, SpillLog, encode
from storage.tables import prediction_counts, predictions, request_errors

# The cap of one worker's dead-letter file: rows the database refused as data are rare; a
# stream of them is a bug to fix, not rows to keep without end.
DEAD_LETTER_MAX_BYTES = 64 << 20
log = logging.getLogger(__name__)

ANALYTICS_ROWS = Counter(
    "sentiment_analytics_rows_total",
    "Prediction rows by outcome: written to the database from the worker's log, replayed from a"
    " dead worker's log, dropped (log at SPILL_MAX_BYTES, or its disk failing with memory full),"
    " dead_letter (refused by the database as data).",
    ["outcome"],
)
for _outcome in ("written", "replayed", "dropped", "dead_letter"):
    ANALYTICS_ROWS.labels(_outcome)
ANALYTICS_BUFFERED = Gauge(
    "sentiment_analytics_buffered_rows",
    "Prediction rows held in memory because the local log could not be written, summed over live workers.",
    multiprocess_mode="livesum",
)
ANALYTICS_SPILL_BYTES = Gauge(
    "sentiment_analytics_spill_bytes",
    "Bytes of prediction rows in the workers' local logs not yet in the database, summed over live workers.",
    multiprocess_mode="livesum",
)


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection, a timeout, a locked SQLite file or a schema not migrated
    yet: retry the same rows later. Anything else is the rows' own fault (a data error)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    transient = sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError | sa_exc.ProgrammingError
    return isinstance(exc, transient)


def upsert(engine: Engine, table: Table) -> Any:
    """The dialect's INSERT with ON CONFLICT (SQLite and PostgreSQL share the syntax)."""
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)


# The rows' columns, in the order the statement below takes them.
COLUMNS = tuple(column.name for column in predictions.columns)
_INSERT = (
    f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    " ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)


def insert_new_rows(conn: Connection, rows: list[Row]) -> set[str]:
    """PostgreSQL: one short `INSERT ... ON CONFLICT DO NOTHING RETURNING` per row, sent by
    psycopg's executemany in pipeline mode (one round trip for the batch); returns the request
    ids newly stored.

    The multi-row INSERT that SQLAlchemy builds for a batch (500 rows x 12 parameters) is
    rewritten by psycopg from named to numbered parameters in Python on every call (too long for
    its statement cache): 120-150 us of the worker's CPU per row, holding the GIL the event loop
    waits for; this statement is rewritten once and cached (docs/decisions.md, "The analytics writer").
    COPY through a staging table costs less again, but a temporary table needs a privilege the
    replicas' role does not have (deploy/postgres/app-role.sh). Errors are raised as SQLAlchemy's
    (is_transient tells an outage from a refused row)."""
    driver = conn.connection.driver_connection
    try:
        with driver.cursor() as cur:  # type: ignore[union-attr]  # psycopg's Connection on PostgreSQL
            cur.executemany(_INSERT, [[row[name] for name in COLUMNS] for row in rows], returning=True)
            inserted = set()
            while True:
                found = cur.fetchone()
                if found is not None:  # None: the row was there already
                    inserted.add(found[0])
                if not cur.nextset():
                    return inserted
    except psycopg.Error as exc:
        raise sa_exc.DBAPIError.instance(_INSERT, None, exc, psycopg.Error, dialect=conn.dialect) from exc


class AnalyticsWriter:
    """The worker's analytics log and the thread that ships it to the database."""

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
        # Rows the log could not take (its disk failing), in memory up to `buffer_limit`.
        self._buffer: deque[Row] = deque()
        self._errors: deque[Row] = deque()
        self._buffer_limit = buffer_limit
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._healthy = True
        self._logged_since_flush = 0
        self._thread: threading.Thread | None = None
        self.replayed = 0
        self.written = 0
        self.dropped = 0
        self.dead_letters = 0
        self.dead_letter_path = spill.folder / f"deadletter-{spill.owner}.jsonl"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="analytics-writer", daemon=True)
            self._thread.start()

    def record(self, records: Iterable[PredictionRecord]) -> None:
        """Append the records' rows to the log with one write(2). Never raises on the request
        path: over the log's cap they are dropped and counted; a failing disk keeps them in
        memory up to `buffer_limit`, then drops and counts them."""
        rows = []
        for rec in records:
            row = dict(rec.__dict__)
            if not self.store_text:
                row["text"] = None
            rows.append(row)
        try:
            logged = self.spill.append(encode(rows))
        except OSError as exc:
            with self._lock:
                room = max(0, self._buffer_limit - len(self._buffer))
                self._buffer.extend(rows[:room])
            if room < len(rows):
                self._drop(len(rows) - room, f"the analytics log cannot be written ({exc}) and memory is full")
            self._wake.set()
            return
        if not logged:
            self._drop(len(rows), f"the analytics log is at SPILL_MAX_BYTES ({self.spill.max_bytes} bytes)")
            return
        self._logged_since_flush += len(rows)
        if self._logged_since_flush >= self.batch_size:
            self._logged_since_flush = 0
            self._wake.set()

    def _drop(self, rows: int, why: str) -> None:
        if not self.dropped:
            log.error("analytics rows dropped: %s", why)
        self.dropped += rows
        ANALYTICS_ROWS.labels("dropped").inc(rows)

    def record_error(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._errors.append({"created_at": utcnow(), "endpoint": endpoint, "status": status})
            if len(self._errors) > self._buffer_limit:
                self._errors.popleft()  # error counts are statistics: the oldest may go

    def write(self, rows: list[Row]) -> None:
        """Insert the rows not yet stored, and count exactly those in `prediction_counts`."""
        unique = list({row["request_id"]: row for row in rows}.values())
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                inserted = insert_new_rows(conn, unique)
            else:
                stmt = (
                    upsert(self.engine, predictions)
                    .on_conflict_do_nothing(index_elements=[predictions.c.request_id])
                    .returning(predictions.c.request_id)
                )
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

    def ship(self, rows: list[Row]) -> None:
        """`write`, setting aside the rows the database refuses as data: the batch is halved
        until the bad rows are alone, and those go to the dead-letter file. A transient error
        (is_transient) propagates: the same rows are shipped again later."""
        try:
            self.write(rows)
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(rows) == 1:
                self._dead_letter(rows[0], exc)
                return
            half = len(rows) // 2
            self.ship(rows[:half])
            self.ship(rows[half:])

    def _dead_letter(self, row: Row, exc: BaseException) -> None:
        rid, path = row.get("request_id"), self.dead_letter_path
        log.error("analytics row %s refused by the database, set aside in %s: %s", rid, path, exc)
        try:
            self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
            line = encode([{**row, "error": str(exc).splitlines()[0][:500]}])
            # the rows hold hashes of users' texts (their texts with STORE_TEXT): this user's
            # only, and capped, so a stream of rows the database refuses cannot fill the disk
            fd = os.open(self.dead_letter_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as f:
                if f.tell() + len(line) <= DEAD_LETTER_MAX_BYTES:
                    f.write(line)
                else:
                    log.error(
                        "dead-letter file %s is full (%d bytes): row %s dropped", path, DEAD_LETTER_MAX_BYTES, rid
                    )
        except (OSError, TypeError, ValueError, KeyError) as err:
            log.error("cannot write the dead-letter file: %s", err)
        self.dead_letters += 1
        ANALYTICS_ROWS.labels("dead_letter").inc()

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
        except Exception as exc:
            if not is_transient(exc):
                log.error("error counts refused by the database, dropped: %s", exc)
                return
            with self._lock:
                self._errors.extendleft(reversed(rows))

    def _unhealthy(self, exc: BaseException) -> None:
        if self._healthy:
            log.warning("analytics database unavailable, rows wait in the local log: %s", exc)
        self._healthy = False

    def flush(self) -> int:
        """Ship what is in memory, then the log, then dead workers' logs; returns the rows written
        from this worker's memory and log."""
        written = 0
        with self._flush_lock:
            self.spill.sync()
            try:
                while True:
                    with self._lock:
                        batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
                    if not batch:
                        break
                    try:
                        self.ship(batch)
                    except Exception:
                        with self._lock:
                            self._buffer.extendleft(reversed(batch))
                        raise
                    written += len(batch)
                while True:
                    rows, shipped = self.spill.read(self.batch_size)
                    if rows:
                        self.ship(rows)
                    shipped()
                    written += len(rows)
                    if len(rows) < self.batch_size:
                        break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._unhealthy(exc)
                return self._count_written(written)
            if not self._healthy:
                log.warning("analytics database back; shipping the local log")
            self._healthy = True
            self._count_written(written)
            try:
                self._flush_errors()
                self.spill.adopt(self.ship, self.batch_size, self._replayed)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._unhealthy(exc)
        return written

    def _count_written(self, rows: int) -> int:
        self.written += rows
        ANALYTICS_ROWS.labels("written").inc(rows)
        return rows

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("analytics writer failed; retrying")

    def close(self) -> None:
        """Stop the thread and ship what is left. Rows the database cannot take now stay in the
        log for the next start; rows held in memory are put in the log if it can take them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception:
            log.exception("analytics writer failed while closing")
        with self._lock:
            rows = list(self._buffer)
            self._buffer.clear()
        if rows:
            try:
                if not self.spill.append(encode(rows)):
                    self._drop(len(rows), "the analytics log is full at shutdown")
            except OSError as exc:
                self._drop(len(rows), f"the analytics log cannot be written at shutdown ({exc})")
        self.spill.close()

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next successful one."""
        return self._healthy

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def update_gauges(self) -> None:
        self.spill.refresh_others()
        ANALYTICS_BUFFERED.set(self.buffered)
        ANALYTICS_SPILL_BYTES.set(self.spill.pending_bytes())
